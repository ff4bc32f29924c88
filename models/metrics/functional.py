"""Ranking and classification metrics, vectorised over all users at once.

Per-user metrics are computed by one sort of (user, score) and bincounts, not a
Python loop over users, so evaluating millions of impressions takes seconds.
Users without a single positive are left out of the ranking averages (their
NDCG is undefined), which is the usual protocol; the count is reported.

Ties. Rows with equal scores are ranked as a block, never by row order: a
popularity baseline with its sampled negatives appended last, or a bf16 model
with many equal outputs, must not gain (or lose) from where rows sit in the
table. Every metric here gives a tied block its expected value under a
uniformly random order inside the block:

* AUC and GAUC: Mann-Whitney with average ranks (a tied positive-negative pair
  counts 1/2), as ``sklearn.metrics.roc_auc_score``.
* NDCG@K: scikit-learn's ``ndcg_score(ignore_ties=False)``: a tied block gets
  its mean gain at each of its positions, so a block straddling the cut-off K
  contributes that mean gain times the discounts of its positions inside K.
* Recall@K: a block straddling K contributes
  (its positions inside K / its size) x (its positives).
* reward@K: DCG@K with each row's reward as its gain, tied blocks as in NDCG.

All arithmetic is float64 whatever the input dtype (bf16, fp16 and fp32
outputs, numpy arrays or torch tensors, are upcast first).

Missing labels. A NaN label is unknown, not a negative: every metric here
leaves that row out (``_labelled``), so a task is judged on the rows whose
label is known, and a user none of whose rows is labelled has no list.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _f64(x) -> np.ndarray:
    """Float64 numpy array from a list, a numpy array of any float dtype or a torch tensor (bf16 included)."""
    if hasattr(x, "detach"):  # a torch tensor: numpy has no bfloat16, so widen on the torch side first
        import torch

        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x).astype(np.float64, copy=False)


def _array(x) -> np.ndarray:
    """Group keys or labels as a numpy array (torch tensors moved to the host)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _labelled(labels, *columns) -> tuple[np.ndarray, ...]:
    """The rows whose label is known: ``labels`` (float64) and each of ``columns`` (numpy) without the NaN-labelled
    rows. No copy when every label is known, the usual case."""
    y = _f64(labels)
    columns = tuple(_f64(c) if hasattr(c, "detach") else np.asarray(c) for c in columns)
    missing = np.isnan(y)
    if not missing.any():
        return (y, *columns)
    keep = ~missing
    return (y[keep], *(c[keep] for c in columns))


def _changes(v: np.ndarray) -> np.ndarray:
    """``v[i] != v[i-1]`` for i >= 1, with NaN equal to NaN (NaN scores tie with each other)."""
    return (v[1:] != v[:-1]) & ~(np.isnan(v[1:]) & np.isnan(v[:-1]))


def _codes(groups) -> tuple[np.ndarray, np.ndarray]:
    """Integer group codes in the sorted order of the keys, and the sorted keys (a hash, not a sort of strings)."""
    codes, keys = pd.factorize(_array(groups), sort=True, use_na_sentinel=False)
    return codes, np.asarray(keys)


def _runs(groups, scores: np.ndarray):
    """Sort by (group, -score); tied runs of equal scores inside a group.

    Returns the sort order, each row's group index, the number of groups, and per run: its group
    index, its first row (in sorted order), its start rank inside the group (0-based) and its length.
    ``groups`` are integer codes (``_codes``), so the sort is a numeric one.
    """
    order = np.lexsort((-scores, groups))
    g, s = groups[order], scores[order]
    m = len(g)
    new_group = np.ones(m, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.copy()
    new_run[1:] |= _changes(s)
    group_starts = np.flatnonzero(new_group)
    group_idx = np.cumsum(new_group) - 1
    run_first = np.flatnonzero(new_run)
    run_len = np.diff(np.append(run_first, m))
    run_group = group_idx[run_first]
    run_rank = run_first - group_starts[run_group]
    return order, group_idx, len(group_starts), run_group, run_first, run_rank, run_len


def _grouped(groups, scores, labels):
    """Sort by (group code, -score), with tied runs; the labels in that order and each group's ideal order.

    ``groups`` are integer codes from ``_codes``. Returns ``(lab, ideal, group_idx, rank, n_groups,
    runs)``: ``rank`` is the 0-based rank inside the group of the sorted rows, ``ideal`` the labels
    sorted descending inside each group, and ``runs = (run_group, run_first, run_rank, run_len)`` the
    tied blocks of scores.
    """
    scores, labels = _f64(scores), _f64(labels)
    order, gi, n, run_group, run_first, run_rank, run_len = _runs(groups, scores)
    lab = labels[order]
    rank = np.arange(len(lab)) - np.repeat(run_first - run_rank, run_len)  # row index minus its group's start
    ideal = lab[np.lexsort((-lab, gi))]  # groups stay sorted
    return lab, ideal, gi, rank, n, (run_group, run_first, run_rank, run_len)


def per_user(groups, scores, labels, ks=(10, 20, 50)) -> dict[str, np.ndarray]:
    """Per-user NDCG@K and Recall@K, for users with at least one positive (key ``users``: their ids).

    Tied scores count as described in the module docstring (expected value over the orders of a
    tied block). The paired bootstrap of the promotion gate resamples these rows.
    """
    labels, groups, scores = _labelled(labels, _array(groups), _f64(scores))
    if len(groups) == 0:
        return {"users": groups[:0], **{f"{m}@{k}": np.zeros(0) for m in ("ndcg", "recall") for k in ks}}
    codes, ids = _codes(groups)
    lab, ideal, gi, rank, n, (run_group, run_first, run_rank, run_len) = _grouped(codes, scores, labels)
    pos = (lab > 0).astype(np.float64)
    positives = np.bincount(gi, weights=pos, minlength=n)
    valid = positives > 0
    # Per tied run: mean gain and positives; cumulative discounts give any run's discount sum inside K.
    run_gain = np.add.reduceat(lab, run_first) / run_len
    run_pos = np.add.reduceat(pos, run_first)
    cum_disc = np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(int(rank.max()) + 1) + 2.0))))
    disc = 1.0 / np.log2(rank + 2.0)
    run_end = run_rank + run_len
    out: dict[str, np.ndarray] = {"users": ids[valid]}
    for k in ks:
        lo, hi = np.minimum(run_rank, k), np.minimum(run_end, k)
        dcg = np.bincount(run_group, weights=run_gain * (cum_disc[hi] - cum_disc[lo]), minlength=n)
        hits = np.bincount(run_group, weights=run_pos * (hi - lo) / run_len, minlength=n)
        idcg = np.bincount(gi, weights=ideal * disc * (rank < k), minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"ndcg@{k}"] = dcg[valid] / idcg[valid]
        out[f"recall@{k}"] = hits[valid] / positives[valid]
    return out


def reward_per_user(groups, scores, rewards, ks=(10, 20, 50)) -> dict[str, np.ndarray]:
    """Per-user reward-weighted DCG@K (key ``reward@K``) for every user, those who earned nothing included.

    Unlike NDCG it is not normalised: a list's expected business value is what the ranking is for, and a
    user with nothing worth showing is a list that earns 0, not an undefined one.
    """
    rewards, groups, scores = _labelled(rewards, _array(groups), _f64(scores))
    if len(groups) == 0:
        return {"users": groups[:0], **{f"reward@{k}": np.zeros(0) for k in ks}}
    codes, ids = _codes(groups)
    lab, _, _, rank, n, (run_group, run_first, run_rank, run_len) = _grouped(codes, scores, rewards)
    run_gain = np.add.reduceat(lab, run_first) / run_len
    cum_disc = np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(int(rank.max()) + 1) + 2.0))))
    run_end = run_rank + run_len
    out: dict[str, np.ndarray] = {"users": ids}
    for k in ks:
        lo, hi = np.minimum(run_rank, k), np.minimum(run_end, k)
        out[f"reward@{k}"] = np.bincount(run_group, weights=run_gain * (cum_disc[hi] - cum_disc[lo]), minlength=n)
    return out


def reward_metrics(groups, scores, rewards, ks=(10, 20, 50)) -> dict[str, float]:
    """reward@K: the expected reward of a list (reward-weighted DCG@K), averaged over every user."""
    rows = reward_per_user(groups, scores, rewards, ks)
    return {k: (float(np.mean(v)) if len(v) else float("nan")) for k, v in rows.items() if k != "users"}


def ranking_metrics(groups, scores, labels, ks=(10, 20, 50)) -> dict[str, float]:
    """NDCG@K and Recall@K (hits in the top K over the user's positives), averaged over users."""
    rows = per_user(groups, scores, labels, ks)
    out = {k: (float(np.mean(v)) if len(v) else float("nan")) for k, v in rows.items() if k != "users"}
    out["users"] = int(len(rows["users"]))
    return out


def auc(scores, labels) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties given their average rank; NaN with one class."""
    return gauc(np.zeros(len(_array(labels)), dtype=np.int64), scores, labels)


def gauc(groups, scores, labels) -> float:
    """Impression-weighted mean of per-user AUC over users with both classes (NaN if there are none).

    Each user's AUC is the rank-sum AUC with tied scores given their average rank (a tied
    positive-negative pair counts 1/2); the weight is the user's number of rows. Users whose rows are
    all positive or all negative have no AUC and are left out, weights included.
    """
    y, groups, scores = _labelled(labels, _array(groups), _f64(scores))
    y = (y > 0).astype(np.float64)
    if len(y) == 0:
        return float("nan")
    order, gi, n, run_group, run_first, run_rank, run_len = _runs(_codes(groups)[0], scores)
    y = y[order]
    size = np.bincount(gi, minlength=n).astype(np.float64)
    n_pos = np.bincount(gi, weights=y, minlength=n)
    n_neg = size - n_pos
    # Sorted by descending score: a run at (0-based) rank r of length L holds ascending ranks
    # size - r - L + 1 .. size - r, average size - r - (L - 1) / 2.
    run_avg = size[run_group] - run_rank - (run_len - 1) / 2.0
    run_pos = np.add.reduceat(y, run_first)
    rank_sum = np.bincount(run_group, weights=run_avg * run_pos, minlength=n)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return float("nan")
    per_group = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.average(per_group, weights=size[ok]))


def logloss(probs, labels, eps: float = 1e-7) -> float:
    """Mean binary log-loss over the labelled rows; NaN without any."""
    y, p = _labelled(labels, probs)
    if len(y) == 0:
        return float("nan")
    p = np.clip(p.astype(np.float64), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def base_logloss(labels) -> float:
    """Log-loss of always predicting the labels' own positive rate: what any head must beat to carry information
    (a head above it is worse than no model for that task's probability). NaN without labels."""
    (y,) = _labelled(labels)
    if len(y) == 0:
        return float("nan")
    return logloss(np.full(len(y), y.mean()), y)


ECE_BINS = 15  # Guo et al. 2017's equal-width bins


def ece(probs, labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error: over equal-width probability bins, |mean prediction - positive rate|
    weighted by the bin's share of rows. Near 0 for calibrated probabilities however well or badly they rank,
    so it sits beside AUC rather than replacing it. NaN without rows."""
    y, p = _labelled(labels, probs)
    if len(p) == 0:
        return float("nan")
    idx = np.clip((p * bins).astype(np.int64), 0, bins - 1)  # p = 1 falls in the last bin
    gap = np.abs(np.bincount(idx, weights=p, minlength=bins) - np.bincount(idx, weights=y, minlength=bins))
    return float(gap.sum() / len(p))  # sum over bins of (count / N) * |mean p - mean y| = |sum p - sum y| / N


def rmse(pred, target) -> float:
    """Root mean squared error over the rows whose target is known; NaN without any."""
    y, p = _labelled(target, pred)
    if len(y) == 0:
        return float("nan")
    return float(np.sqrt(np.mean((p.astype(np.float64) - y) ** 2)))


def beyond_accuracy(groups, scores, items, k: int, popularity: dict | pd.Series, catalogue: int,
                    categories=None) -> dict[str, float]:
    """What accuracy does not see, over each group's top ``k`` by score.

    ``coverage@k``: the share of the catalogue that appears in anyone's top k (a ranker that shows everyone
    the same hits covers little). ``novelty@k``: the mean self-information ``-log2 p(item)`` of the shown
    items, ``p`` an item's share of the training positives (add-one smoothed over the catalogue), so long-tail
    items count more. ``ild@k``: intra-list diversity, the share of pairs in a top k whose categories differ
    (only with ``categories``). Top k by score, ties broken by row order.
    """
    frame = pd.DataFrame({"g": np.asarray(groups), "s": np.asarray(scores, dtype=np.float64),
                          "i": np.asarray(items).astype(str)})
    if categories is not None:
        frame["c"] = pd.Series(np.asarray(categories, dtype=object)).fillna("").astype(str).to_numpy()
    top = frame.sort_values(["g", "s"], ascending=[True, False], kind="stable").groupby("g", sort=False).head(k)
    if top.empty:
        return {f"coverage@{k}": float("nan"), f"novelty@{k}": float("nan"), f"ild@{k}": float("nan")}
    counts = pd.Series(popularity, dtype=np.float64)
    counts.index = counts.index.astype(str)
    total = float(counts.sum()) + max(catalogue, 1)
    share = (top["i"].map(counts).fillna(0.0) + 1.0) / total
    out = {f"coverage@{k}": top["i"].nunique() / max(catalogue, 1),
           f"novelty@{k}": float((-np.log2(share)).groupby(top["g"].to_numpy()).mean().mean())}
    if categories is not None:
        sizes = top.groupby("g").size()
        same = top.groupby(["g", "c"]).size().pow(2).groupby(level=0).sum() - sizes  # ordered same-category pairs
        pairs = sizes * (sizes - 1)
        ok = pairs > 0
        out[f"ild@{k}"] = float((1.0 - same[ok] / pairs[ok]).mean()) if ok.any() else float("nan")
    return out
