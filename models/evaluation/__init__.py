"""Judging models offline: the time-ordered holdout, unseen candidates, single-task baselines, and comparison runs."""
