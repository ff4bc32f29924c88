"""Ranking and classification metrics, vectorised over all users at once.

Per-user metrics are computed by one sort of (user, score) and bincounts, not a
Python loop over users, so evaluating millions of impressions takes seconds.
Users without a single positive are left out of the ranking averages (their
NDCG is undefined), which is the usual protocol; the count is reported.
"""

from __future__ import annotations

import numpy as np


def _grouped(groups: np.ndarray, scores: np.ndarray, labels: np.ndarray):
    """Sort by (group, -score) and give each row its group index and 0-based rank."""
    groups = np.asarray(groups)
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    order = np.lexsort((-scores, groups))
    g = groups[order]
    boundaries = np.flatnonzero(g[1:] != g[:-1]) + 1
    starts = np.concatenate(([0], boundaries))
    sizes = np.diff(np.concatenate((starts, [len(g)])))
    group_idx = np.repeat(np.arange(len(starts)), sizes)
    rank = np.arange(len(g)) - starts[group_idx]
    # The ideal order: labels sorted descending inside each group (groups stay sorted).
    ideal = labels[order][np.lexsort((-labels[order], group_idx))]
    return labels[order], ideal, group_idx, rank, len(starts)


def per_user(groups, scores, labels, ks=(10, 20, 50)) -> dict[str, np.ndarray]:
    """Per-user NDCG@K and Recall@K, for users with at least one positive (key ``users``: their ids).

    The paired bootstrap of the promotion gate resamples these rows.
    """
    groups = np.asarray(groups)
    if len(groups) == 0:
        return {"users": groups[:0], **{f"{m}@{k}": np.zeros(0) for m in ("ndcg", "recall") for k in ks}}
    lab, ideal, gi, rank, n = _grouped(groups, scores, labels)
    disc = 1.0 / np.log2(rank + 2.0)
    positives = np.bincount(gi, weights=(lab > 0).astype(np.float64), minlength=n)
    valid = positives > 0
    ids = np.sort(np.unique(groups))  # _grouped orders groups the same way (lexsort on the group key)
    out: dict[str, np.ndarray] = {"users": ids[valid]}
    for k in ks:
        top = rank < k
        dcg = np.bincount(gi, weights=lab * disc * top, minlength=n)
        idcg = np.bincount(gi, weights=ideal * disc * top, minlength=n)
        hits = np.bincount(gi, weights=(lab > 0) * top, minlength=n)
        out[f"ndcg@{k}"] = dcg[valid] / idcg[valid]
        out[f"recall@{k}"] = hits[valid] / positives[valid]
    return out


def ranking_metrics(groups, scores, labels, ks=(10, 20, 50)) -> dict[str, float]:
    """NDCG@K and Recall@K (hits in the top K over the user's positives), averaged over users."""
    rows = per_user(groups, scores, labels, ks)
    out = {k: (float(np.mean(v)) if len(v) else float("nan")) for k, v in rows.items() if k != "users"}
    out["users"] = int(len(rows["users"]))
    return out


def auc(scores, labels) -> float:
    """ROC AUC by the rank-sum formula, ties given their average rank."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average ranks over runs of tied scores.
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(groups, scores, labels) -> float:
    """Impression-weighted mean of per-user AUC over users with both classes."""
    groups = np.asarray(groups)
    scores = np.asarray(scores, dtype=np.float64)
    labels = (np.asarray(labels) > 0).astype(np.float64)
    # Per-group rank-sum AUC: rank within group by score (ties averaged).
    order = np.lexsort((scores, groups))
    g, s, y = groups[order], scores[order], labels[order]
    new_group = np.concatenate(([True], g[1:] != g[:-1]))
    new_run = new_group | np.concatenate(([True], s[1:] != s[:-1]))
    run_id = np.cumsum(new_run) - 1
    group_id = np.cumsum(new_group) - 1
    pos_in_group = np.arange(len(g)) - np.flatnonzero(new_group)[group_id]
    run_start = np.flatnonzero(new_run)
    run_len = np.diff(np.concatenate((run_start, [len(g)])))
    avg_rank = pos_in_group[run_start] + (run_len + 1) / 2.0  # 1-based average rank
    rank = avg_rank[run_id]
    n = group_id[-1] + 1 if len(g) else 0
    n_pos = np.bincount(group_id, weights=y, minlength=n)
    size = np.bincount(group_id, minlength=n).astype(np.float64)
    n_neg = size - n_pos
    rank_sum = np.bincount(group_id, weights=rank * y, minlength=n)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per_user = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.average(per_user, weights=size[ok]))


def logloss(probs, labels, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def rmse(pred, target) -> float:
    return float(np.sqrt(np.mean((np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64)) ** 2)))
