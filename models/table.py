"""Where training rows come from: a parquet file of features and labels, nothing else.

The training table is built by the feature store (``flows/features``):
Feast's point-in-time ``get_historical_features`` over the impression log,
written to ``<dataset>/_features/training.parquet``. ``models/`` only reads
it, so a GPU machine with torch and Lightning alone can train from a copied
parquet file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from models import contract

TABLE_FILE = "training.parquet"
WORKSPACE = "_features"


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


def load_training_table(path: Path | str) -> pd.DataFrame:
    df = pd.read_parquet(training_file(path))
    df[contract.TIMESTAMP] = pd.to_datetime(df[contract.TIMESTAMP], utc=True)
    return df.sort_values(contract.TIMESTAMP, kind="stable").reset_index(drop=True)
