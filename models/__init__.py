"""The learning core: everything that turns a training table into a scored, judged model.

It runs with torch, Lightning, numpy, pandas, pyarrow and PyYAML alone (the GPU machine has
nothing else), so nothing here imports Prefect, Feast, Great Expectations or BentoML.

Rooms, lowest first; a room imports only from rooms below it (import-linter, pyproject.toml):

- ``contract/``: the tables every stage reads and the task declaration that names their behaviours.
- ``tasks``, ``config``, ``settings``, ``fusion``: the nouns every room shares (task specs, a run's
  YAML configuration, the ``MTLREC_*`` environment, how objectives fuse into one score).
- ``metrics/``: ranking and classification metrics, and a multi-task model's metrics on one split.
- ``data/``: how rows reach the model: the training table, encoding, resident and streamed batches.
- ``architectures/``, ``balancers/``: the two plug-in interfaces; any architecture with any balancer.
- ``scoring/``: a trained model on disk and how it scores: the artifact, calibration, its tensor file.
- ``training/``: the Lightning module, the recipe and everything a training run does.
- ``evaluation/``: judging models offline: the holdout, unseen candidates, single-task baselines, comparisons.
- ``decisions/``: what goes live: the promotion gate, fusion weights tuned on rewards, off-policy estimates.

``train.py`` at the root is the ``python -m models.train`` command, which the docs and the GPU machine use.
"""
