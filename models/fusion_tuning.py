"""Fusion weights learned offline: the weights that earn the most reward on the validation split.

The declared fusion weights (each task's gain) rank by expected graded
relevance, which is the best order only if the probabilities are calibrated
and the gains are what an event is worth. Neither holds in general: heads
are miscalibrated by different amounts, and a purchase may be worth five
clicks. So the weights are searched for directly, against the dataset's
declared rewards.

What is maximised is reward-weighted NDCG@K on the validation split (the
rows early stopping saw, never the test rows): each row's gain is its
labels times their tasks' rewards, normalised per user by the best order of
that user's rows, so a heavy user does not outweigh the rest. Only the
ratios of the weights matter (a weighted sum or a weighted product ranks the
same when every weight is scaled), so the search runs on the simplex, with
the cross-entropy method: a Gaussian over softmax logits, refitted to the
best quarter of each batch. It needs no gradient of a rank metric, and
scoring once then re-fusing makes each candidate a sort, not a forward pass.

Default and tuned weights are then both judged on the test split, which the
search never saw: that comparison, not the validation score the search
maximised, says whether the tuned weights are better.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pandas as pd

from models import metrics
from models.data import time_split
from models.evaluation import fusion_weights
from models.fusion import fuse
from models.holdout import reward_of
from models.tasks import TaskSet


def cem(objective: Callable[[np.ndarray], float], dim: int, *, start: np.ndarray | None = None,
        iterations: int = 10, samples: int = 32, elite: float = 0.25, seed: int = 0, init_std: float = 1.0,
        min_std: float = 0.05, smoothing: float = 0.7) -> tuple[np.ndarray, float, list[float]]:
    """Maximise ``objective`` over the probability simplex of ``dim`` weights; (best, its value, best per round).

    Samples are softmax(z) with z Gaussian, so every candidate is a valid weighting and none is exactly 0
    (fusion drops a zero weight, and a search that may switch an objective off should do so by degrees).
    ``start`` is evaluated first, so the result is never worse than it on the objective. ``min_std`` keeps
    the search from collapsing onto an early elite before the last round.
    """
    rng = np.random.default_rng(seed)
    if start is None:
        start = np.full(dim, 1.0 / dim)
    start = np.asarray(start, dtype=np.float64)
    mu = np.log(np.clip(start / start.sum(), 1e-3, None))
    mu -= mu.mean()
    sigma = np.full(dim, float(init_std))
    n_elite = max(2, int(math.ceil(elite * samples)))
    best_w = _softmax(mu)
    best = float(objective(best_w))
    history: list[float] = []
    for _ in range(iterations):
        z = mu + sigma * rng.standard_normal((samples, dim))
        values = np.array([objective(_softmax(row)) for row in z])
        top = np.argsort(-values, kind="stable")[:n_elite]
        if values[top[0]] > best:
            best, best_w = float(values[top[0]]), _softmax(z[top[0]])
        mu = smoothing * z[top].mean(axis=0) + (1 - smoothing) * mu
        sigma = np.maximum(smoothing * z[top].std(axis=0) + (1 - smoothing) * sigma, min_std)
        history.append(best)
    return best_w, best, history


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


class _Split:
    """One split scored once: its users, per-objective probabilities, and each row's reward and relevance."""

    def __init__(self, frame: pd.DataFrame, scorer, tasks: TaskSet):
        self.rows = len(frame)
        self.users = frame["user_id"].astype(str).to_numpy()
        self.probs = scorer.predict(frame)
        labels = {t.name: (pd.to_numeric(frame[t.column], errors="coerce").fillna(0).to_numpy(np.float64) > 0)
                  .astype(np.float64) for t in tasks.binary if t.column in frame}
        self.rewards = reward_of(tasks, labels)
        self.relevance = sum((t.gain * labels[t.name] for t in tasks.binary if t.name in labels),
                             np.zeros(self.rows))

    def reward_ndcg(self, fused: np.ndarray, k: int) -> float:
        v = metrics.per_user(self.users, fused, self.rewards, (k,))[f"ndcg@{k}"]
        return float(v.mean()) if len(v) else float("nan")

    def judge(self, weights: dict[str, float], method: str, k: int) -> dict[str, float]:
        fused = fuse(self.probs, weights, method=method)
        return {f"reward_ndcg@{k}": self.reward_ndcg(fused, k),
                f"reward@{k}": metrics.reward_metrics(self.users, fused, self.rewards, (k,))[f"reward@{k}"],
                f"ndcg@{k}": metrics.ranking_metrics(self.users, fused, self.relevance, (k,))[f"ndcg@{k}"]}


def tune(scorer, table: pd.DataFrame, *, k: int = 10, iterations: int = 10, samples: int = 32,
         seed: int = 0) -> dict[str, Any]:
    """Search the model's fusion weights on its validation split; judge default and tuned on its test split.

    ``scorer`` is a loaded ``models.artifact.Scorer``; ``table`` the training table it was trained from (or a
    newer one with the same columns), cut with the model's own split fractions.
    """
    tasks = scorer.tasks
    split = scorer.meta["config"]["data"]["split"]
    _, valid, test = time_split(table, split["valid_fraction"], split["test_fraction"])
    if len(valid) == 0 or len(test) == 0:
        raise ValueError("the table is too small to tune on: its validation or test split is empty")
    objectives = [t.name for t in tasks.binary]
    default = fusion_weights(tasks)
    method = scorer.fusion_method
    rewards = tasks.rewards()
    if not rewards:
        raise ValueError("no ranking objective declares a reward above 0: there is nothing to maximise")
    v, te = _Split(valid, scorer, tasks), _Split(test, scorer, tasks)
    if len(objectives) < 2:
        tuned = dict(default)  # one objective: every weighting ranks the same
        rounds = 0
    else:
        scale = sum(default.values()) or 1.0
        start = np.array([default.get(o, 0.0) for o in objectives])

        def objective(w: np.ndarray) -> float:
            return v.reward_ndcg(fuse(v.probs, dict(zip(objectives, w)), method=method), k)

        best, _, _ = cem(objective, len(objectives), start=start, iterations=iterations, samples=samples,
                         seed=seed)
        tuned = {o: round(float(w * scale), 6) for o, w in zip(objectives, best)}
        rounds = iterations
    return {"weights": tuned, "default_weights": default, "method": method, "objectives": objectives,
            "rewards": rewards, "metric": f"reward_ndcg@{k}",
            "valid": {"default": v.judge(default, method, k), "tuned": v.judge(tuned, method, k)},
            "test": {"default": te.judge(default, method, k), "tuned": te.judge(tuned, method, k)},
            "rows": {"valid": v.rows, "test": te.rows}, "k": k, "iterations": rounds, "samples": samples,
            "seed": seed}
