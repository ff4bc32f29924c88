"""The ranking protocol that separates models: each held-out positive among items the user was never shown.

Re-ranking a user's own ~10 held-out impressions saturates (Recall@50 is 1
for any ranker with fewer than 50 rows), and everything in it was already
chosen by the production system. Here every held-out positive row (a row
with relevance > 0 for the fused ranking; a row with label 1 for an
objective) is ranked against ``n`` items the same user was never shown
anywhere in the log, drawn without replacement from the items that existed
at that moment (first seen at or before the positive's time). With
``n="all"`` it is full-catalogue ranking, affordable when the catalogue is
small (MovieLens).

On a log whose exposure is skewed, this protocol rewards predicting what
gets shown: an active user has been shown every much-shown item, so the
items they were never shown are mostly rarely-shown ones, while the held-out
positive was shown. On the synthetic log (Zipf exposure) popularity beats
the generator's own click probability here, which knows nothing of exposure
(figures in benchmarks/README.md, "unshown-99"). Drawing candidates in
proportion to exposure changes little, because the user's never-shown set
is what is skewed. Read its figures beside the re-ranking protocol's, which
holds exposure fixed (every candidate was shown).

A candidate row is the positive's row (user features, request context) with
the item side replaced by that item's features *as of the positive's time*:
the item's latest row in the log at or before that moment, whose values the
feature store joined point-in-time for that impression. Nothing after the
positive leaks in, and nothing is staler than the item's last impression
(the item's last training row would be stale by the whole holdout).
Request-time crosses (item age, category match) are recomputed by
the dataset's context transform when one is given.

Unshown items are not known negatives (the user might have liked one), so
absolute figures are lower bounds; the protocol is for comparing rankers on
the same candidates, which every ranker here is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from models.contract import tables as contract

TS = contract.TIMESTAMP


@dataclass
class Candidates:
    """One frame of rows to score and, per row, the positive it belongs to."""

    frame: pd.DataFrame
    group: np.ndarray  # index into ``positives`` for every row of ``frame``
    is_positive: np.ndarray  # the row is the held-out positive itself
    positives: pd.DataFrame  # the positive rows, in group order
    n: int | str  # candidates per positive asked for
    sizes: np.ndarray  # unshown candidates actually drawn per positive


def _ns(times) -> np.ndarray:
    """UTC nanoseconds since the epoch, whatever the resolution and zone of ``times``."""
    t = pd.to_datetime(pd.Series(np.asarray(times)) if not isinstance(times, pd.Series) else times, utc=True)
    return t.dt.tz_convert(None).to_numpy().astype("datetime64[ns]").astype(np.int64)


def _codes(values: pd.Series, categories: pd.Index) -> np.ndarray:
    return pd.Categorical(values.astype(str), categories=categories).codes.astype(np.int64)


def draw(log: pd.DataFrame, positives: pd.DataFrame, n: int | str, seed: int = 0,
         chunk: int = 512) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """Per positive, the item codes of its candidates: ``(rows, items, catalogue)``.

    ``rows`` indexes ``positives``. An item is eligible for a positive if the
    user never saw it in ``log`` and it was first seen at or before the
    positive's time; drawn uniformly among those.
    """
    items = pd.Index(np.unique(log["item_id"].astype(str)))
    n_items = len(items)
    users = pd.Index(np.unique(log["user_id"].astype(str)))
    item_code = _codes(log["item_id"], items)
    shown = np.unique(_codes(log["user_id"], users) * n_items + item_code)
    first = pd.Series(log[TS].to_numpy()).groupby(item_code).min().reindex(range(n_items)).to_numpy()
    first_ns = _ns(first)
    p_user = _codes(positives["user_id"], users)
    p_ts = _ns(positives[TS])
    rng = np.random.default_rng(seed)
    out_rows, out_items = [], []
    for lo in range(0, len(positives), chunk):
        hi = min(lo + chunk, len(positives))
        u, t = p_user[lo:hi, None], p_ts[lo:hi, None]
        if n == "all":
            cand = np.broadcast_to(np.arange(n_items), (hi - lo, n_items))
            keep = _eligible(cand, u, t, shown, first_ns, n_items)
        else:
            cand, keep = _sample(rng, int(n), u, t, shown, first_ns, n_items)
        r, c = np.nonzero(keep)
        out_rows.append(r + lo)
        out_items.append(cand[r, c])
    return np.concatenate(out_rows), np.concatenate(out_items), items


def _eligible(cand, u, t, shown, first_ns, n_items) -> np.ndarray:
    code = u * n_items + cand
    pos = np.searchsorted(shown, code)
    seen = shown[np.minimum(pos, len(shown) - 1)] == code
    return ~seen & (first_ns[cand] <= t)


def _sample(rng, n, u, t, shown, first_ns, n_items, tries: int = 4):
    """Uniform draws without replacement among eligible items, by rejection (a row short of ``n`` redraws)."""
    rows = len(u)
    got = np.full((rows, n), -1, dtype=np.int64)
    filled = np.zeros(rows, dtype=np.int64)
    width = 2 * n
    for _ in range(tries):
        need = np.nonzero(filled < n)[0]
        if len(need) == 0:
            break
        draws = rng.integers(0, n_items, size=(len(need), width))
        ok = _eligible(draws, u[need], t[need], shown, first_ns, n_items)
        # Drop repeats: of a row's draws and of what the row already holds (first occurrence wins).
        both = np.concatenate([got[need], draws], axis=1)
        order = np.argsort(both, axis=1, kind="stable")
        s = np.take_along_axis(both, order, axis=1)
        dup_sorted = np.zeros_like(s, dtype=bool)
        dup_sorted[:, 1:] = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        ok &= ~dup[:, n:]
        slots = n - filled[need]
        take = ok & (np.cumsum(ok, axis=1) <= slots[:, None])
        r, c = np.nonzero(take)
        col = filled[need][r] + (np.cumsum(take, axis=1)[r, c] - 1)
        got[need[r], col] = draws[r, c]
        filled[need] += take.sum(axis=1)
        width *= 2
    return np.where(got >= 0, got, 0), got >= 0


def build(log: pd.DataFrame, positives: pd.DataFrame, item_columns: list[str], n: int | str = 99,
          seed: int = 0, recompute: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
          label_columns: list[str] = ()) -> Candidates:
    """The positives and their unshown candidates, item features as of each positive's time."""
    positives = positives.reset_index(drop=True)
    rows, codes, catalogue = draw(log, positives, n, seed)
    negatives = positives.iloc[rows].reset_index(drop=True)
    negatives["item_id"] = catalogue.to_numpy()[codes]
    side = [c for c in item_columns if c in log.columns and c not in ("item_id", TS)]
    if side:
        negatives = _as_of(negatives, log, side)
    for c in label_columns:
        if c in negatives:
            negatives[c] = 0
    if recompute is not None and len(negatives):
        ctx = recompute(negatives)
        negatives[list(ctx.columns)] = ctx.to_numpy()
    frame = pd.concat([positives, negatives.astype(positives.dtypes.to_dict(), errors="ignore")],
                      ignore_index=True)
    group = np.concatenate([np.arange(len(positives)), rows])
    is_positive = np.zeros(len(frame), dtype=bool)
    is_positive[: len(positives)] = True
    sizes = np.bincount(rows, minlength=len(positives))
    return Candidates(frame, group, is_positive, positives, n, sizes)


def _as_of(rows: pd.DataFrame, log: pd.DataFrame, side: list[str]) -> pd.DataFrame:
    """Replace ``side`` columns with the item's latest logged values at or before each row's time."""
    rows = rows.drop(columns=side)
    rows["_order"] = np.arange(len(rows))
    right = log[["item_id", TS, *side]].copy()
    right["item_id"] = right["item_id"].astype(str)
    right = right.sort_values(TS, kind="stable")
    left = rows.assign(item_id=rows["item_id"].astype(str)).sort_values(TS, kind="stable")
    merged = pd.merge_asof(left, right, on=TS, by="item_id", direction="backward", allow_exact_matches=True)
    return merged.sort_values("_order").drop(columns="_order").reset_index(drop=True)
