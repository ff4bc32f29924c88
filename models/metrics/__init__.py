"""Metrics: ranking and classification metrics vectorised over users, and a multi-task model's metrics on one split."""
