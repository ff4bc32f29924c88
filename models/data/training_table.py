"""Where training rows come from: a parquet file of features and labels, nothing else.

The training table is built by the feature store (``feature_repo/training_set.py``):
Feast's point-in-time ``get_historical_features`` over the impression log,
written to ``<dataset>/_features/training.parquet``. ``models/`` only reads
it, so a GPU machine with torch and Lightning alone can train from a copied
parquet file. The file's own metadata (``TABLE_METADATA``) carries the
dataset's task declaration and the model's input columns, so the copy needs
nothing beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from models.contract import tables as contract

TABLE_FILE = "training.parquet"
WORKSPACE = "_features"
TABLE_METADATA = b"mtlrec"  # parquet key-value metadata: {"declaration": ..., "features": ...}


def training_file(path: Path | str) -> Path:
    """The training parquet behind a path: the file itself, or the one a dataset's feature store wrote."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / WORKSPACE / TABLE_FILE, path / TABLE_FILE):
        if candidate.exists():
            return candidate
    hint = (" (a dataset directory: build its training set with `mtlrec features build "
            f"{path}`)") if (path / contract.INTERACTIONS.file).exists() else ""
    raise FileNotFoundError(f"no training table at {path}{hint}")


def table_metadata(path: Path | str) -> dict:
    """The declaration and feature lists stored in a training parquet ({} for a table written without them)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(training_file(path)).metadata or {}
    if TABLE_METADATA in meta:
        return json.loads(meta[TABLE_METADATA])
    # A table re-saved with pandas (DataFrame.to_parquet) keeps it in the frame's attrs.
    attrs = json.loads(meta.get(b"PANDAS_ATTRS", b"{}"))
    return attrs.get("mtlrec") or {}


def table_columns(path: Path | str) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(training_file(path)).names)


def load_training_table(path: Path | str) -> pd.DataFrame:
    """Rows in time order; ``df.attrs["mtlrec"]`` holds the file's metadata (``table_metadata``)."""
    df = pd.read_parquet(training_file(path))
    df[contract.TIMESTAMP] = pd.to_datetime(df[contract.TIMESTAMP], utc=True)
    df = df.sort_values(contract.TIMESTAMP, kind="stable").reset_index(drop=True)
    df.attrs["mtlrec"] = table_metadata(path)
    return df
