"""A trained model on disk and how it scores: the artifact, per-task calibration, and its tensor file format."""
