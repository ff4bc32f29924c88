"""Numeric features as quantile-binned embeddings, beside the standardised value, where validation says so.

A standardised value enters the network as one number: an MLP turns it into
a smooth function of it, and learns sharp or non-monotone effects (a price
band that sells, an hour that clicks) slowly. Binning the value at training
quantiles and giving each bin an embedding lets the first layer see any shape
at once, at the price of more parameters and of resolution inside a bin.
Which features need it depends on the data, so it is chosen per feature:
the bins are added (the value stays) when, on the validation split, the
training split's per-bin positive rates rank some binary task better than
the value itself does (AUC of the value taken in its better direction) by
at least ``margin``. That is the gain a monotone transform cannot give.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.metrics import functional as metrics

N_BINS = 32
MARGIN = 0.005  # validation AUC a feature's bins must add over its value


def quantile_edges(x: np.ndarray, n_bins: int = N_BINS) -> list[float]:
    """Inner edges at the training split's quantiles, repeated ones merged (a count column has few)."""
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return []
    qs = np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.unique(qs).astype(float).tolist()


def codes(x: np.ndarray, edges: list[float], first: int) -> np.ndarray:
    """Bin ``i`` (0..len(edges)) as code ``first + i``; NaN as ``first - 1`` (the feature's MISSING code)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right") + first
    out[np.isnan(x)] = first - 1
    return out


def _bin_auc(train_x, train_y, valid_x, valid_y, edges) -> float:
    """Validation AUC of the training split's smoothed positive rate per bin."""
    k = len(edges) + 2  # bins, and NaN
    tb, vb = codes(train_x, edges, 1), codes(valid_x, edges, 1)
    prior = train_y.mean()
    hits = np.bincount(tb, weights=train_y, minlength=k)
    rate = (hits + 10 * prior) / (np.bincount(tb, minlength=k) + 10)
    return metrics.auc(rate[vb], valid_y)


def _known(label: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Which rows have a label, and their labels as 0/1."""
    y = pd.to_numeric(label, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    known = ~np.isnan(y)
    return known, (y[known] > 0).astype(np.float64)


def choose(train: pd.DataFrame, valid: pd.DataFrame, numeric: list[str], labels: list[str],
           mode: str = "auto", n_bins: int = N_BINS, margin: float = MARGIN) -> dict[str, dict]:
    """``{feature: {"edges": [...], "gain": validation AUC the bins add}}`` for the features to bin.

    ``mode``: ``auto`` (by validation, module docstring), ``all`` or ``none``. ``labels``: binary label
    columns to judge by; a feature is binned if its bins help any of them.
    """
    if mode not in ("auto", "all", "none"):
        raise ValueError(f"numeric binning must be auto, all or none, not {mode!r}")
    if mode == "none" or n_bins < 2:
        return {}
    out = {}
    for c in numeric:
        tx = pd.to_numeric(train[c], errors="coerce").to_numpy(np.float64)
        edges = quantile_edges(tx, n_bins)
        if len(edges) < 2:  # two bins or fewer: the value already says it
            continue
        if mode == "all":
            out[c] = {"edges": edges, "gain": None}
            continue
        vx = pd.to_numeric(valid[c], errors="coerce").to_numpy(np.float64)
        best = -np.inf
        for label in labels:
            # judged on the rows whose label is known: a missing label is no negative
            tk, ty = _known(train[label])
            vk, vy = _known(valid[label])
            if len(ty) == 0 or len(vy) == 0 or ty.min() == ty.max() or vy.min() == vy.max():
                continue
            lx, lv = tx[tk], vx[vk]
            value_auc = metrics.auc(np.nan_to_num(lv, nan=np.nanmean(lx) if np.isfinite(lx).any() else 0.0), vy)
            gain = _bin_auc(lx, ty, lv, vy, edges) - max(value_auc, 1 - value_auc)
            best = max(best, gain)
        if best >= margin:
            out[c] = {"edges": edges, "gain": round(float(best), 4)}
    return out
