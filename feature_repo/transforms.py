"""Request-time feature logic, written once and used twice.

The on-demand feature view calls ``context_features`` inside Feast (training
sets through ``get_historical_features``, and the SDK's online path); the
served path (``feature_repo/online.py``) calls the same function on the
same inputs, so training and serving cannot drift apart. Pure pandas/numpy:
no Feast import, cheap to test.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DAY_S = 86_400.0

TOP_CATEGORY = "user_top_category_30d"


def _floats(x) -> np.ndarray:
    return pd.to_numeric(pd.Series(x), errors="coerce").to_numpy(dtype=np.float64) if np.asarray(x).dtype.kind == "O" \
        else np.asarray(x, dtype=np.float64)


def context_features(df):
    """Hour and weekday of the request, item age, user tenure, and a user x item category cross.

    The inputs are the user and item views' columns and ``request_ts``, epoch seconds of the impression or
    request (the request source ``request_context`` of ``feature_repo/definitions.py``). The cross is computed
    only where items have a category (``category`` among the inputs).

    ``df`` is a DataFrame (inside Feast), answered with a DataFrame, or a dict of equal-length arrays
    (the served path), answered with a dict of arrays: a request does not pay for pandas.
    """
    ts = _floats(df["request_ts"])
    seconds = np.nan_to_num(ts, nan=0.0)
    out: dict[str, np.ndarray] = {}
    out["hour"] = ((seconds % DAY_S) // 3600).astype(np.int64)
    # 1970-01-01 was a Thursday: day 0 -> weekday 3 (Monday = 0, as pandas' dayofweek).
    out["dow"] = ((seconds // DAY_S + 3) % 7).astype(np.int64)
    item_since = _floats(df["item_since_ts"])
    user_since = _floats(df["user_since_ts"])
    out["item_age_days"] = np.nan_to_num((ts - item_since) / DAY_S, nan=0.0)
    out["user_tenure_days"] = np.nan_to_num((ts - user_since) / DAY_S, nan=0.0)
    if "category" in df and TOP_CATEGORY in df:
        top = np.asarray(df[TOP_CATEGORY], dtype=object)
        cat = np.asarray(df["category"], dtype=object)
        match = pd.notna(top) & pd.notna(cat) & (top.astype(str) == cat.astype(str)) & (top.astype(str) != "")
        out["top_category_match"] = match.astype(np.int64)
    return pd.DataFrame(out, index=df.index) if isinstance(df, pd.DataFrame) else out
