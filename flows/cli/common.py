"""What several command groups share: the store settings of a dataset, and a training set built on demand."""

from __future__ import annotations

from pathlib import Path

ONLINE_HELP = "online store: sqlite (default) or redis; also MTLREC_ONLINE_STORE / MTLREC_REDIS"


def store_settings(directory: Path, online: str | None):
    from feature_repo.store import StoreSettings

    return StoreSettings.for_dataset(directory, online=online)


def model_path(model: str) -> tuple[Path, str | None]:
    """A model argument is an artifact directory or a registry tag (name:version)."""
    if Path(model).is_dir():
        return Path(model), None
    from services import model_store

    return model_store.artifact_path(model), model


def ensure_training_set(data: Path, materialize_online: bool = False) -> None:
    """A dataset directory gets its Feast training set built when it is missing or older than the log."""
    log = data / "interactions.parquet"
    if not (data.is_dir() and log.exists()):
        return
    s = store_settings(data, None)
    if not s.training_file.exists() or s.training_file.stat().st_mtime < log.stat().st_mtime:
        from feature_repo.build import build_all

        build_all(data, s, materialize_online=materialize_online)


def training_table(data: Path):
    """The table to evaluate on: whole while it fits, else a share of users.

    ``models.data.streamed.evaluation_table`` chooses.
    """
    from models.data.streamed import evaluation_table

    ensure_training_set(data)
    return evaluation_table(data)


def show_training_progress() -> None:
    """Training's own lines (``mtlrec.train``: each epoch, each baseline) on stderr, for commands that train
    without the training command's logging set up. The stream is looked up at each line, so a command run
    inside another program (a test's runner replaces stderr and closes it after) leaves nothing stale."""
    import logging
    import sys

    class CurrentStderr(logging.StreamHandler):
        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, _):
            pass

    log = logging.getLogger("mtlrec.train")
    if not any(isinstance(h, logging.StreamHandler) and getattr(h, "_mtlrec", False) for h in log.handlers):
        handler = CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._mtlrec = True
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
