"""Digests for the pipeline stages' cache keys: of what a stage reads, never of Python objects.

Prefect's default cache policy hashes a task's arguments, which fails on
objects such as a ``FeatureStore`` and, worse, says nothing about the files a
path argument points to. Every key here is a sha256 over file bytes (the
dataset's tables and manifest, the training table, the source code of the
stage) and plain settings, so a rerun on unchanged inputs is a cache hit and
any changed byte is a miss.

Each stage module in ``flows/stages/`` builds its key from these. A cache
hit returns the old result, which names files on disk, so each stage also
says whether those files are still there (``*_outputs_exist``) and refreshes
the cache when they are not: a cached result never points at a deleted
artifact.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Keyed on size and mtime too, so one process hashes an unchanged file once however many keys use it."""
    del size, mtime_ns  # cache keys only: a changed file misses the cache
    from models.scoring.artifact import sha256  # here, not at the top: models.artifact imports torch

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
