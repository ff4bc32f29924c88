"""Offline metrics of a multi-task model on one split, in one place.

The fused ranking is judged against a graded relevance: the sum of the
binary labels, each weighted by its declared ``gain`` (a purchase that
implies a click counts for both), so the metric rewards ranking the
behaviours the dataset declares valuable above the rest. Fusing by the
weighted sum of probabilities with the gains as weights ranks by the expected
relevance, which is what maximises expected DCG, provided the probabilities are
calibrated (``models/scoring/calibration.py``: an over-predicted rare head would
otherwise outweigh the rest); it is the default.

Besides per-task AUC/GAUC/logloss (beside it ``base_logloss``, the log-loss
of always predicting the split's positive rate, and ``ece``, the expected
calibration error) and the ranking metrics, two summaries are
offered to early stopping: ``mean_auc`` over the binary tasks and ``loss``,
the sum of the binary tasks' logloss (lower is better).
"""

from __future__ import annotations

import numpy as np

from models.metrics import functional as metrics
from models.fusion import fuse
from models.tasks import TaskSet

MINIMISED = ("loss", "logloss", "rmse", "ece")
ALIASES = {"ndcg@": "fused/", "recall@": "fused/", "reward@": "fused/"}  # bare ranking metrics mean the fused ranking's


def fusion_weights(tasks: TaskSet) -> dict[str, float]:
    return {t.name: t.fusion_weight for t in tasks if t.ranks and t.fusion_weight > 0}


def _weighted_labels(tasks: TaskSet, labels: np.ndarray, weight) -> np.ndarray:
    """Per row, the sum over ranking tasks of ``weight(task)`` x its binary label (``labels``: [N, T]).

    NaN where a label that carries weight is missing: the row's grade is unknown, so the ranking metrics leave
    it out (``models.metrics.functional``) rather than grade it as if that behaviour had not happened.
    """
    out = np.zeros(len(labels), dtype=np.float64)
    for j, t in enumerate(tasks):
        if t.ranks and weight(t):
            y = np.asarray(labels[:, j], dtype=np.float64)
            out += weight(t) * np.where(np.isnan(y), np.nan, y > 0)
    return out


def relevance(tasks: TaskSet, labels: np.ndarray) -> np.ndarray:
    """Graded relevance per row: the binary labels weighted by their declared gains."""
    return _weighted_labels(tasks, labels, lambda t: t.gain)


def rewards(tasks: TaskSet, labels: np.ndarray) -> np.ndarray:
    """Reward per row: the binary labels weighted by their declared rewards."""
    return _weighted_labels(tasks, labels, lambda t: t.reward_value)


def monitor_key(monitor: str, metrics: dict | None = None) -> str:
    """The metrics-dict key a monitor name refers to (``ndcg@10`` is the fused ranking's)."""
    if metrics is not None and monitor in metrics:
        return monitor
    for prefix, where in ALIASES.items():
        if monitor.startswith(prefix):
            return where + monitor
    return monitor


def mode(monitor: str) -> str:
    return "min" if monitor.split("/")[-1] in MINIMISED else "max"


def worst(monitor: str) -> float:
    return 1e9 if mode(monitor) == "min" else -1.0


def evaluate_predictions(tasks: TaskSet, probs: dict[str, np.ndarray], labels: np.ndarray, users: np.ndarray,
                         ks=(10, 20, 50), weights: dict[str, float] | None = None,
                         method: str = "sum") -> dict[str, float]:
    """Flat dict: ``<task>/auc``, ``<task>/ndcg@10``, ``fused/ndcg@10``, ``mean_auc``, ``loss``, ..."""
    out: dict[str, float] = {}
    for j, t in enumerate(tasks):
        # Each task is judged on the rows whose label is known: a missing label is no negative.
        y, p = np.asarray(labels[:, j], dtype=np.float64), probs[t.name]
        known = ~np.isnan(y)
        if t.type == "binary":
            u = users
            if not known.all():
                y, p, u = y[known], p[known], users[known]
            out[f"{t.name}/auc"] = metrics.auc(p, y)
            out[f"{t.name}/gauc"] = metrics.gauc(u, p, y)
            out[f"{t.name}/logloss"] = metrics.logloss(p, y)
            out[f"{t.name}/base_logloss"] = metrics.base_logloss(y)  # the constant at the split's rate
            out[f"{t.name}/ece"] = metrics.ece(p, y)
            out.update({f"{t.name}/{k}": v for k, v in metrics.ranking_metrics(u, p, y, ks).items()
                        if k != "users"})
        elif t.type == "regression":
            mask = known & (labels[:, tasks.names.index(t.parent)] > 0) if t.parent else known
            out[f"{t.name}/rmse"] = metrics.rmse(p[mask], y[mask]) if mask.any() else float("nan")
        else:
            out[f"{t.name}/accuracy"] = float(np.mean(p[known].argmax(-1) == y[known])) if known.any() \
                else float("nan")
    aucs = [out[f"{t.name}/auc"] for t in tasks if t.ranks and np.isfinite(out[f"{t.name}/auc"])]
    out["mean_auc"] = float(np.mean(aucs)) if aucs else float("nan")
    out["loss"] = float(sum(out[f"{t.name}/logloss"] for t in tasks if t.ranks)) if tasks.binary else float("nan")
    if tasks.binary:
        fused = fuse(probs, weights or fusion_weights(tasks), method=method)
        out.update({f"fused/{k}": v for k, v in metrics.ranking_metrics(users, fused, relevance(tasks, labels),
                                                                        ks).items()})
        out.update({f"fused/{k}": v for k, v in metrics.reward_metrics(users, fused, rewards(tasks, labels),
                                                                       ks).items()})
    return out
