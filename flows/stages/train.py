"""Training, the third stage: one model from a config and the dataset's training table, cached on both."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.caching import code_digest, digest, file_digest
from flows.stages.common import HOUR, value


def training_key(training_file: str, config: dict) -> str:
    """The resolved config (so a changed YAML file or override counts), the table, and the model code."""
    return digest(config, file_digest(training_file), code_digest("models"))


def artifact_exists(out: Path | str) -> bool:
    from models.scoring.artifact import META, WEIGHTS

    return all((Path(out) / f).is_file() for f in (WEIGHTS, META))


@contextlib.contextmanager
def training_lines_in_the_run_log():
    """Training's own lines (``mtlrec.train``: the recipe, each epoch with the time left) into this task run's
    Prefect log, so the UI and ``make run``, which prints the run's log as it comes, show where training
    is. Only for the task's duration; training's lines elsewhere go where they went."""
    run_log = get_run_logger()

    class ToRunLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            run_log.log(record.levelno, record.getMessage())

    source = logging.getLogger("mtlrec.train")
    handler, level = ToRunLog(logging.INFO), source.level
    source.addHandler(handler)
    if source.getEffectiveLevel() > logging.INFO:
        source.setLevel(logging.INFO)
    try:
        yield
    finally:
        source.removeHandler(handler)
        source.setLevel(level)


def train_cache_key(context, parameters: dict) -> str:
    """The flow computed the training key already (it names the artifact directory); the output path joins it."""
    return "mtlrec-train-" + digest(parameters["key"], str(Path(parameters["out"]).resolve()))


@task(name="train-model", retries=0, timeout_seconds=6 * HOUR, cache_key_fn=train_cache_key,
      persist_result=True)
def train_task(config: dict, training_file: str, out: str, key: str) -> dict:
    """``key`` is unused here: it is what the cache is keyed on (and what names ``out``)."""
    from models.training.train import train

    with training_lines_in_the_run_log():
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
    from models.data.training_table import training_file

    cfg = load_config(config, overrides or [])
    table = str(training_file(data))
    key = training_key(table, cfg)
    out = Path(artifacts).resolve() / f"{Path(config).stem}-{key[:16]}"
    task_ = train_task.with_options(refresh_cache=not artifact_exists(out))
    cached: list[str] = []
    result = value(task_(cfg, table, str(out), key, return_state=True), "train", cached)
    return {**result, "key": key, "cached": bool(cached)}
