"""Feature tables from the validated contract tables: profiles and windowed aggregates.

Aggregates are daily snapshots. The snapshot stamped midnight ``d`` counts
the interactions of the ``w`` days strictly before ``d``; a row is written
at the log's first midnight (all zeros) and then only when some window's
value changed since the previous snapshot (activity entering or leaving a
window), so the tables stay small and the latest row per entity is always
its current value. Everything is dense numpy over
(entity, day): one ``bincount`` and one ``cumsum``, no loop over entities.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from feature_repo.definitions import SCHEMAS, WINDOWS
from models import contract

DAY = pd.Timedelta(days=1)


def _profile_users(users: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"user_id": users["user_id"].astype(str), "event_timestamp": users[contract.TIMESTAMP]})
    out["age"] = pd.to_numeric(users["age"], errors="coerce").astype("float64") if "age" in users else np.nan
    for c in ("gender", "segment"):
        out[c] = users[c].astype(object).where(users[c].notna(), None) if c in users else None
    out["user_since_ts"] = _epoch_s(users[contract.TIMESTAMP])
    return out


def _profile_items(items: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"item_id": items["item_id"].astype(str), "event_timestamp": items[contract.TIMESTAMP]})
    out["category"] = items["category"].astype(str)
    price = pd.to_numeric(items["price"], errors="coerce").astype("float64") if "price" in items else \
        pd.Series(np.nan, index=items.index)
    out["price"] = price
    out["log_price"] = np.log1p(price.clip(lower=0))
    out["item_since_ts"] = _epoch_s(items[contract.TIMESTAMP])
    return out


def _epoch_s(ts: pd.Series) -> np.ndarray:
    return ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)


def _windowed(daily: np.ndarray) -> np.ndarray:
    """daily [E, D] -> window sums [len(WINDOWS), E, D+1]; snapshot s covers days [s-w, s)."""
    e, d = daily.shape
    cs = np.zeros((e, d + 1), dtype=np.int64)
    np.cumsum(daily, axis=1, out=cs[:, 1:])
    s = np.arange(d + 1)
    return np.stack([cs - cs[:, np.maximum(s - w, 0)] for w in WINDOWS])


def _activity(inter: pd.DataFrame, key: str, prefix: str, day0: pd.Timestamp, n_days: int,
              categories: pd.Series | None = None) -> pd.DataFrame:
    codes, uniques = pd.factorize(inter[key].astype(str), sort=True)
    n = len(uniques)
    day = ((inter[contract.TIMESTAMP] - day0) // DAY).to_numpy(dtype=np.int64)
    flat = codes.astype(np.int64) * n_days + day
    counts = {}
    for name, weights in (("impressions", None), ("clicks", inter["click"].to_numpy(np.int64)),
                          ("purchases", inter["purchase"].to_numpy(np.int64))):
        counts[name] = _windowed(np.bincount(flat, weights=weights, minlength=n * n_days)
                                 .astype(np.int64).reshape(n, n_days))
    stacked = np.concatenate(list(counts.values()))  # [3W, E, D+1]
    changed = np.zeros((n, n_days + 1), dtype=bool)
    # Snapshot 0 (all zeros) is written for every entity: "nothing yet" is a value, not a missing row.
    changed[:, 0] = True
    changed[:, 1:] = (stacked[:, :, 1:] != stacked[:, :, :-1]).any(axis=0)
    top = None
    if categories is not None:
        # Most-clicked category over the longest window, per user and snapshot ("" when none).
        cat_codes, cat_names = pd.factorize(categories.astype(str), sort=True)
        k = len(cat_names)
        clicked = inter["click"].to_numpy() > 0
        cat_flat = (codes.astype(np.int64)[clicked] * k + cat_codes[clicked]) * n_days + day[clicked]
        per_cat = np.bincount(cat_flat, minlength=n * k * n_days).astype(np.int32).reshape(n * k, n_days)
        w30 = _windowed(per_cat)[-1].reshape(n, k, n_days + 1)
        best = w30.argmax(axis=1)
        top = np.where(w30.max(axis=1) > 0, np.asarray(cat_names, dtype=object)[best], "")
        changed[:, 1:] |= top[:, 1:] != top[:, :-1]
    ent, snap = np.nonzero(changed)
    out = {key: np.asarray(uniques, dtype=object)[ent], "event_timestamp": day0 + pd.to_timedelta(snap, unit="D")}
    for j, w in enumerate(WINDOWS):
        imps, clicks, buys = (counts[c][j][ent, snap] for c in ("impressions", "clicks", "purchases"))
        out[f"{prefix}_impressions_{w}d"] = imps
        out[f"{prefix}_clicks_{w}d"] = clicks
        out[f"{prefix}_purchases_{w}d"] = buys
        out[f"{prefix}_ctr_{w}d"] = clicks / np.maximum(imps, 1)
        out[f"{prefix}_cvr_{w}d"] = buys / np.maximum(clicks, 1)
    if top is not None:
        out[f"{prefix}_top_category_30d"] = top[ent, snap]
    return pd.DataFrame(out)


def compute_feature_tables(dataset_dir: Path | str, tables_dir: Path | str) -> dict[str, int]:
    """Write the four source tables the feature views read; returns their row counts."""
    t0 = time.perf_counter()
    t = contract.load_dataset(dataset_dir)
    inter = t["interactions"]
    day0 = inter[contract.TIMESTAMP].min().floor("D")
    n_days = int((inter[contract.TIMESTAMP].max() - day0) // DAY) + 1
    cat_of_item = t["items"].set_index(t["items"]["item_id"].astype(str))["category"]
    categories = inter["item_id"].astype(str).map(cat_of_item)
    tables = {
        "user_profile": _profile_users(t["users"]),
        "user_activity": _activity(inter, "user_id", "user", day0, n_days, categories=categories),
        "item_profile": _profile_items(t["items"]),
        "item_popularity": _activity(inter, "item_id", "item", day0, n_days),
    }
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, df in tables.items():
        missing = set(SCHEMAS[name]) - set(df.columns)
        assert not missing, f"{name} lacks {missing}"  # the definitions and this module must agree
        # Microseconds: DuckDB casts TIMESTAMPTZ (us) but not its nanosecond form.
        df["event_timestamp"] = df["event_timestamp"].astype("datetime64[us, UTC]")
        df.to_parquet(tables_dir / f"{name}.parquet", index=False)
        rows[name] = len(df)
    rows["seconds"] = round(time.perf_counter() - t0, 2)
    return rows
