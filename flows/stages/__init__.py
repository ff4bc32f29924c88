"""The pipeline's stages as Prefect flows: validate, build features, train, evaluate, promote.

One flow per stage so that each can be run, retried and read on its own in
the UI; ``flows/pipeline.py`` chains them as subflows.
Each module here is one stage: its tasks, its cache key and its flow. Every task has a
timeout, so a hung store or a runaway training run fails the run instead of
holding a worker. Only the feature store's tasks retry (with backoff): its
files and Redis can fail and then work; validation, training and the gate
would give the same answer again, so they fail at once.

Validation, features and training are cached on fingerprints of what they
read (each stage's key in its module, from the digests of ``flows/caching.py``):
a rerun on unchanged data and config skips them.
Before using a cache, each stage checks that the files a cached result names
still exist and refreshes the cache if not.

The stage modules (Great Expectations, Feast, torch) are imported inside the
flows, so importing this module, which ``prefect deploy`` does to read the
entrypoint, takes a second rather than twenty.
"""

from __future__ import annotations

from flows.stages.common import HOUR, MINUTE, Online
from flows.stages.evaluate import evaluate_flow
from flows.stages.features import features_flow
from flows.stages.promote import promote_flow
from flows.stages.train import train_flow
from flows.stages.validate import validate_flow

__all__ = ["HOUR", "MINUTE", "Online", "validate_flow", "features_flow", "train_flow", "evaluate_flow",
           "promote_flow"]
