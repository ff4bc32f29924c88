"""Cache keys for the pipeline's stages: digests of what a stage reads, never of Python objects.

Prefect's default cache policy hashes a task's arguments, which fails on
objects such as a ``FeatureStore`` and, worse, says nothing about the files a
path argument points to. Every key here is a sha256 over file bytes (the
dataset's tables and manifest, the training table, the source code of the
stage) and plain settings, so a rerun on unchanged inputs is a cache hit and
any changed byte is a miss.

A cache hit returns the old result, which names files on disk. Each stage
also says whether those files are still there (``*_outputs_exist``); the
flows refresh the cache when they are not, so a cached result never points
at a deleted artifact.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from models.artifact import sha256

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Keyed on size and mtime too, so one process hashes an unchanged file once however many keys use it."""
    return sha256(path)


def file_digest(path: Path | str) -> str:
    st = os.stat(path)
    return _file_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def files_digest(files: Iterable[Path]) -> str:
    """Names and bytes of several files; a missing file counts as absent, not as an error."""
    h = hashlib.sha256()
    for f in sorted(Path(p) for p in files):
        h.update(f.name.encode() + b"\0")
        h.update((file_digest(f) if f.is_file() else "absent").encode())
    return h.hexdigest()


def digest(*parts: Any) -> str:
    """One sha256 over JSON-able parts; dicts are key-sorted so equal settings give equal keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def dataset_digest(dataset: Path | str) -> str:
    """The contract tables and the manifest (validation reads its declared time range)."""
    d = Path(dataset)
    return files_digest([*d.glob("*.parquet"), d / "dataset.yaml"])


def code_digest(*packages: str) -> str:
    """The source of the code that computes a stage: editing it must invalidate that stage's cache."""
    paths = [ROOT / p for p in packages]
    return files_digest([f for p in paths for f in (p.rglob("*.py") if p.is_dir() else [p])])


# --- one key per stage -------------------------------------------------------------------------------------------

def validation_key(directory: str, docs_dir: str | None = None) -> str:
    return "mtlrec-validate-" + digest(str(Path(directory).resolve()), docs_dir, dataset_digest(directory),
                                       code_digest("flows/validation", "models/contract.py"))


def features_key(step: str, dataset: str, online: str | None) -> str:
    from flows.features.store import StoreSettings

    s = StoreSettings.for_dataset(dataset, online=online)
    where = {"dataset": str(s.dataset), "online": s.online, "redis": s.redis if s.online == "redis" else None,
             "project": s.project}
    # not flows/features/online.py: serving reads the store, nothing in it builds the features
    code = code_digest("flows/features/compute.py", "flows/features/store.py", "flows/features/tasks.py",
                       "feature_repo", "models/contract.py")
    return f"mtlrec-features-{step}-" + digest(where, dataset_digest(dataset), code)


def training_key(training_file: str, config: dict) -> str:
    """The resolved config (so a changed YAML file or override counts), the table, and the model code."""
    return digest(config, file_digest(training_file), code_digest("models"))


# --- is a cached result still usable -----------------------------------------------------------------------------

def validation_outputs_exist(directory: str, docs_dir: str | None = None) -> bool:
    root = Path(docs_dir) if docs_dir else Path(directory) / "_gx"
    return any(root.rglob("index.html")) if root.is_dir() else False


def features_outputs_exist(dataset: str, online: str | None) -> bool:
    from flows.features.store import StoreSettings

    s = StoreSettings.for_dataset(dataset, online=online)
    need = [s.training_file, s.registry_file] + ([s.workspace / "online.db"] if s.online == "sqlite" else [])
    stamp = features_stamp(dataset, online)
    # The files sit at one path per dataset: they must also be the ones this key built (not a later build on
    # other data or settings that a cache hit for this key would otherwise hand on).
    built_here = stamp.is_file() and stamp.read_text().strip() == features_key("stamp", dataset, online)
    return built_here and all(p.exists() for p in need) and s.tables.is_dir() and any(s.tables.glob("*.parquet"))


def features_stamp(dataset: str, online: str | None) -> Path:
    from flows.features.store import StoreSettings

    return StoreSettings.for_dataset(dataset, online=online).workspace / ".built-for"


def mark_features_built(dataset: str, online: str | None) -> None:
    """Record which inputs the feature files now on disk were built from (see ``features_outputs_exist``)."""
    features_stamp(dataset, online).write_text(features_key("stamp", dataset, online) + "\n")


def artifact_exists(out: Path | str) -> bool:
    from models.artifact import META, WEIGHTS

    return all((Path(out) / f).is_file() for f in (WEIGHTS, META))


# --- as Prefect cache_key_fn callables (context, parameters) -> str ------------------------------------------------

def validate_cache_key(context, parameters: dict) -> str:
    return validation_key(parameters["directory"], parameters.get("docs_dir"))


def features_cache_key(context, parameters: dict) -> str:
    return features_key(context.task.name, parameters["dataset"], parameters.get("online"))


def train_cache_key(context, parameters: dict) -> str:
    """The flow computed the training key already (it names the artifact directory); the output path joins it."""
    return "mtlrec-train-" + digest(parameters["key"], str(Path(parameters["out"]).resolve()))
