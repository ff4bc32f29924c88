"""The pipeline's stages as Prefect flows: validate, build features, train, evaluate, promote.

One flow per stage so that each can be run, retried and read on its own in
the UI; ``flows/pipeline.py`` chains them as subflows. Every task has a
timeout, so a hung store or a runaway training run fails the run instead of
holding a worker. Only the feature store's tasks retry (with backoff): its
files and Redis can fail and then work; validation, training and the gate
would give the same answer again, so they fail at once.

Validation, features and training are cached on fingerprints of what they
read (``flows/caching.py``): a rerun on unchanged data and config skips them.
Before using a cache, each stage checks that the files a cached result names
still exist and refreshes the cache if not.

The stage modules (Great Expectations, Feast, torch) are imported inside the
flows, so importing this module, which ``prefect deploy`` does to read the
entrypoint, takes a second rather than twenty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.states import State

from flows import caching

MINUTE, HOUR = 60, 3600
Online = Literal["sqlite", "redis"]


def _cached(state: State) -> bool:
    return state.name == "Cached"


def _value(state: State, stage: str, cached: list[str]) -> Any:
    """The task's result (raising its exception, which fails the flow); notes a cache hit under the stage's name."""
    value = state.result()
    if _cached(state):
        cached.append(stage)
    return value


# --- validate --------------------------------------------------------------------------------------------------------

@flow(name="validate-data", timeout_seconds=HOUR)
def validate_flow(data: str) -> dict:
    """Great Expectations over every table; raises ValidationFailed, so nothing after it runs on bad data."""
    from flows.validation.tasks import validate_task

    task_ = validate_task.with_options(cache_key_fn=caching.validate_cache_key, persist_result=True,
                                       refresh_cache=not caching.validation_outputs_exist(data),
                                       timeout_seconds=30 * MINUTE)
    cached: list[str] = []
    result = _value(task_(data, return_state=True), "validate", cached)
    if cached:  # the task published its summary on the run that computed it; say so on this run too
        create_markdown_artifact(
            key="validation-summary", description="Great Expectations validation of the contract tables",
            markdown=f"# Validation passed: `{data}` (cached: the tables are byte-identical to a validated run)\n\n"
                     + "\n".join(f"- {t}: {n:,} rows" for t, n in result["rows"].items())
                     + f"\n\nData Docs: `{result['docs_path']}`")
    return {**result, "cached": bool(cached)}


# --- features --------------------------------------------------------------------------------------------------------

@flow(name="build-features", timeout_seconds=3 * HOUR)
def features_flow(data: str, online: Online | None = None) -> dict:
    """Feature tables, Feast apply, online materialisation, point-in-time training set.

    With Redis online, materialisation is never served from the cache: the
    pipeline cannot see from here whether Redis still holds the values, and
    an incremental materialisation of unchanged data is cheap.
    """
    from flows.features import tasks as feature_tasks
    from flows.features.store import StoreSettings

    cache = dict(cache_key_fn=caching.features_cache_key, persist_result=True,
                 refresh_cache=not caching.features_outputs_exist(data, online))
    cached: list[str] = []
    rows = _value(feature_tasks.compute_features.with_options(timeout_seconds=HOUR, **cache)(
        data, online, return_state=True), "compute", cached)
    views = _value(feature_tasks.apply_features.with_options(timeout_seconds=15 * MINUTE, **cache)(
        data, online, return_state=True), "apply", cached)
    sqlite = StoreSettings.for_dataset(data, online=online).online == "sqlite"
    materialize = feature_tasks.materialize_features.with_options(timeout_seconds=HOUR, **(cache if sqlite else {}))
    started = _value(materialize(data, online, return_state=True), "materialize", cached)
    training = _value(feature_tasks.training_set.with_options(timeout_seconds=2 * HOUR, **cache)(
        data, online, return_state=True), "training-set", cached)
    caching.mark_features_built(data, online)
    return {"tables": rows, "views": views, "materialized": started, "training_file": training,
            "cached": cached == ["compute", "apply", "materialize", "training-set"], "cached_steps": cached}


# --- train -----------------------------------------------------------------------------------------------------------

@task(name="train-model", retries=0, timeout_seconds=6 * HOUR, cache_key_fn=caching.train_cache_key,
      persist_result=True)
def train_task(config: dict, training_file: str, out: str, key: str) -> dict:
    """``key`` is unused here: it is what the cache is keyed on (and what names ``out``)."""
    from models.train import train

    meta = train(config, training_file, out, progress=False)
    split = "test" if meta["metrics"]["test"] else "valid"
    return {"artifact": out, "epochs": meta["training"]["epochs"], "seconds": round(meta["training"]["seconds"], 1),
            "metrics": {k: v for k, v in meta["metrics"][split].items()
                        if k.startswith("fused/") or k.endswith("/auc")}, "split": split}


@flow(name="train", timeout_seconds=6 * HOUR)
def train_flow(data: str, config: str = "mmoe", overrides: list[str] | None = None,
               artifacts: str = "artifacts/pipeline") -> dict:
    """One model from a config and the dataset's training table; the artifact directory is named by its key."""
    from models.config import load_config
    from models.table import training_file

    cfg = load_config(config, overrides or [])
    table = str(training_file(data))
    key = caching.training_key(table, cfg)
    out = Path(artifacts).resolve() / f"{Path(config).stem}-{key[:16]}"
    task_ = train_task.with_options(refresh_cache=not caching.artifact_exists(out))
    cached: list[str] = []
    result = _value(task_(cfg, table, str(out), key, return_state=True), "train", cached)
    return {**result, "key": key, "cached": bool(cached)}


# --- evaluate --------------------------------------------------------------------------------------------------------

@task(name="register-model", retries=0, timeout_seconds=10 * MINUTE)
def register_once(artifact: str) -> dict:
    """A rerun whose training came from the cache finds its model already registered instead of adding a twin."""
    from flows import registry

    existing = registry.find_registered(artifact)
    return {"tag": existing or registry.register(artifact), "new": existing is None}


@flow(name="evaluate", timeout_seconds=2 * HOUR)
def evaluate_flow(artifact: str, data: str) -> dict:
    """Register the artifact, then rank the holdout with it and the baselines; the registry keeps the result."""
    from flows.evaluation_tasks import evaluate_task

    reg = register_once(artifact)
    result = evaluate_task.with_options(timeout_seconds=HOUR)(reg["tag"], data)
    return {"tag": reg["tag"], "registered": reg["new"], "evaluation": result}


# --- promote ---------------------------------------------------------------------------------------------------------

@flow(name="promote", timeout_seconds=2 * HOUR)
def promote_flow(tag: str, data: str, k: int | None = None, margin: float | None = None,
                 auc_tolerance: float | None = None, report_dir: str = "reports") -> dict:
    """The NDCG@K gate; a candidate that already is production is not gated against itself.

    (It would pass with a zero gain at a zero margin and write a promotion
    of production over itself into the audit log.)
    """
    from dataclasses import asdict

    from flows import registry
    from flows.evaluation_tasks import promote_task
    from flows.promote import gate_config

    gate = {n: v for n, v in {"k": k, "margin": margin, "auc_tolerance": auc_tolerance}.items() if v is not None}
    if registry.production() == registry.resolve(tag):
        reason = f"{tag} is already the production model: nothing to gate"
        create_markdown_artifact(key="gate-decision", markdown=f"# Gate: UNCHANGED\n\n- {reason}",
                                 description="NDCG@K promotion gate: decision and the numbers behind it")
        return {"promote": False, "already_production": True, "reasons": [reason],
                "config": asdict(gate_config(**gate))}
    decision = promote_task(tag, data, report_dir=str(Path(report_dir).resolve()), **gate)
    return {**decision, "already_production": False}
