"""Feast definitions for mtlrec: entities, feature views, the context view and the feature service."""
