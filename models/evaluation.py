"""Offline metrics of a multi-task model on one split, in one place.

The fused ranking is judged against a graded relevance, the sum of the
binary labels (a purchase counts twice: it implies a click), so the metric
rewards ranking buyers above mere clickers, as the product does.
"""

from __future__ import annotations

import numpy as np

from models import metrics
from models.fusion import fuse
from models.tasks import TaskSet


def fusion_weights(tasks: TaskSet) -> dict[str, float]:
    return {t.name: t.fusion_weight for t in tasks if t.ranks and t.fusion_weight > 0}


def evaluate_predictions(tasks: TaskSet, probs: dict[str, np.ndarray], labels: np.ndarray, users: np.ndarray,
                         ks=(10, 20, 50), weights: dict[str, float] | None = None) -> dict[str, float]:
    """Flat dict: ``<task>/auc``, ``<task>/ndcg@10``, ``fused/ndcg@10``, ... for logging and artifacts."""
    out: dict[str, float] = {}
    for j, t in enumerate(tasks):
        y, p = labels[:, j], probs[t.name]
        if t.type == "binary":
            out[f"{t.name}/auc"] = metrics.auc(p, y)
            out[f"{t.name}/gauc"] = metrics.gauc(users, p, y)
            out[f"{t.name}/logloss"] = metrics.logloss(p, y)
            out.update({f"{t.name}/{k}": v for k, v in metrics.ranking_metrics(users, p, y, ks).items() if k != "users"})
        elif t.type == "regression":
            mask = labels[:, tasks.names.index(t.parent)] > 0 if t.parent else np.ones(len(y), bool)
            out[f"{t.name}/rmse"] = metrics.rmse(p[mask], y[mask]) if mask.any() else float("nan")
        else:
            out[f"{t.name}/accuracy"] = float(np.mean(p.argmax(-1) == y))
    binary = [j for j, t in enumerate(tasks) if t.ranks]
    if binary:
        relevance = labels[:, binary].sum(axis=1)
        fused = fuse(probs, weights or fusion_weights(tasks))
        out.update({f"fused/{k}": v for k, v in metrics.ranking_metrics(users, fused, relevance, ks).items()})
    return out
