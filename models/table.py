"""The training table: one row per impression, its features and its labels.

This is the one replaceable place where the contract tables are joined into
model input. The Feast issue swaps the join for point-in-time
``get_historical_features``; everything downstream reads the same columns.
Only attributes that are fixed per user/item, and context known at request
time, are derived here, so this join cannot leak the future.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from models import contract

TABLE_FILE = "training.parquet"


def build_training_table(dataset_dir: Path | str) -> pd.DataFrame:
    t = contract.load_dataset(dataset_dir)
    users = t["users"].rename(columns={contract.TIMESTAMP: "user_since"})
    items = t["items"].rename(columns={contract.TIMESTAMP: "item_since"})
    df = t["interactions"].merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    ts = df[contract.TIMESTAMP]
    df["hour"] = ts.dt.hour.astype("int64")
    df["dow"] = ts.dt.dayofweek.astype("int64")
    df["item_age_days"] = ((ts - df["item_since"]).dt.total_seconds() / 86_400).astype("float32")
    df["user_tenure_days"] = ((ts - df["user_since"]).dt.total_seconds() / 86_400).astype("float32")
    if "price" in df:
        df["log_price"] = np.log1p(df["price"].astype("float64")).astype("float32")
    return df.drop(columns=["user_since", "item_since"]).sort_values(contract.TIMESTAMP, kind="stable").reset_index(drop=True)


def load_training_table(path: Path | str) -> pd.DataFrame:
    """A parquet file is used as is; a dataset directory is joined first."""
    path = Path(path)
    if path.is_dir():
        if (path / TABLE_FILE).exists() and not (path / contract.INTERACTIONS.file).exists():
            return pd.read_parquet(path / TABLE_FILE)
        return build_training_table(path)
    return pd.read_parquet(path)
