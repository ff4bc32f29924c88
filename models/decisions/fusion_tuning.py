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

The search only proposes. Whether the proposal replaces the weighting the
model is served with now is decided on the test split, which the search
never saw, by ``accept``: per user, the reward-weighted DCG@K of the
proposal minus that of the current weighting (``metrics.reward_per_user``,
the ``reward@K`` of the reports), and a paired bootstrap over users
(``models.decisions.gate.paired_bootstrap``) whose interval must exclude zero from
below. A validation score the search maximised says nothing about that: a
proposal that only fits the validation rows must not go live.

Weights are kept rounded to ``DECIMALS`` places, and ``weight_text`` prints
them exactly as kept, so a printed weighting pasted back as JSON is the
weighting that was judged and kept.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

import numpy as np
import pandas as pd

from models.metrics import functional as metrics
from models.data.resident import time_split
from models.metrics.multitask import fusion_weights
from models.fusion import fuse
from models.decisions.gate import fusion_used, paired_bootstrap
from models.evaluation.holdout import reward_of
from models.tasks import TaskSet

DECIMALS = 6  # places a tuned weight is kept (and printed) with


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


def rounded(weights: dict[str, float]) -> dict[str, float]:
    """A weighting as it is kept: each weight rounded to ``DECIMALS`` places."""
    return {k: round(float(w), DECIMALS) for k, w in weights.items()}


def weight_text(w: float) -> str:
    """A kept weight as printed: the shortest text that parses back to the same float, as JSON writes it."""
    return repr(round(float(w), DECIMALS))


@dataclass(frozen=True)
class OffPolicyEvidence:
    """What the service's own log says about proposal minus current: an interval of the reward difference.

    Anything with ``low`` and ``high`` will do (``models.decisions.offpolicy``'s estimate of a difference has both);
    this is the shape to build one by hand, or from another estimator, with a note on where it came from.
    """

    low: float
    high: float
    note: str = ""


class Interval(Protocol):
    low: float
    high: float


@dataclass(frozen=True)
class FusionDecision:
    """Whether a proposed weighting replaces the current one, and the figures that decided it.

    ``metric`` is the per-user metric compared on the test split (``reward@K``: reward-weighted DCG@K,
    ``metrics.reward_per_user``); ``current`` and ``proposed`` are its means over ``users``, ``difference``
    proposed minus current, ``interval`` the paired bootstrap interval of that difference at ``confidence``.
    """

    accepted: bool
    reason: str
    metric: str
    current: float
    proposed: float
    difference: float
    interval: tuple[float, float]
    users: int
    confidence: float
    bootstrap: int
    offpolicy: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval)
        return out


def accept(current: np.ndarray, proposed: np.ndarray, *, metric: str = "reward@10", bootstrap: int = 1000,
           confidence: float = 0.95, seed: int = 0, offpolicy: Interval | None = None) -> FusionDecision:
    """Accept the proposal only if it beats the current weighting per user, by an interval that excludes 0.

    ``current`` and ``proposed`` hold one value per test user, the same users in the same order: pairing
    removes what users differ by, which dwarfs what weightings differ by. A better mean alone is not enough:
    where the declared weights are already within noise of the best, a tuner that kept every better mean
    would swap the served weights on luck.

    ``offpolicy``: when the service's log has explored the proposal, the off-policy estimate of proposal minus
    current (anything with ``low`` and ``high``, e.g. ``OffPolicyEvidence``). Given, its interval must exclude
    zero from below too, since the logged traffic is what the weights will serve; not given, the held-out
    test split decides alone.
    """
    current, proposed = np.asarray(current, dtype=np.float64), np.asarray(proposed, dtype=np.float64)
    if current.shape != proposed.shape:
        raise ValueError(f"per-user values must pair up: {current.shape} against {proposed.shape}")
    diff = proposed - current
    low, high = paired_bootstrap(diff, bootstrap, confidence, seed)
    figures = dict(metric=metric, current=_mean(current), proposed=_mean(proposed), difference=_mean(diff),
                   interval=(low, high), users=len(diff), confidence=confidence, bootstrap=bootstrap,
                   offpolicy=_evidence(offpolicy))
    stated = (f"{metric} on the test split: proposed {figures['proposed']:.4f} against current "
              f"{figures['current']:.4f}, difference {figures['difference']:+.4f} "
              f"[{confidence:.0%} interval {low:+.4f}, {high:+.4f}] over {len(diff):,} users")
    if len(diff) == 0:
        return FusionDecision(False, f"declined: the test split has no users to judge {metric} on", **figures)
    if not np.any(diff):
        return FusionDecision(False, "declined: the proposal ranks every test user's list as the current weighting "
                                     f"does ({stated})", **figures)
    if not low > 0:
        return FusionDecision(False, f"declined: {stated}; the interval does not exclude 0", **figures)
    if offpolicy is not None and not float(offpolicy.low) > 0:
        return FusionDecision(False, f"declined: {stated}, but off-policy on the service's log the difference is "
                                     f"[{float(offpolicy.low):+.4f}, {float(offpolicy.high):+.4f}], which does not "
                                     "exclude 0", **figures)
    agrees = (f"; off-policy agrees [{float(offpolicy.low):+.4f}, {float(offpolicy.high):+.4f}]"
              if offpolicy is not None else "")
    return FusionDecision(True, f"accepted: {stated}{agrees}", **figures)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def _evidence(offpolicy: Interval | None) -> dict[str, Any] | None:
    if offpolicy is None:
        return None
    return {"low": float(offpolicy.low), "high": float(offpolicy.high),
            "note": str(getattr(offpolicy, "note", "") or offpolicy)}


class _Split:
    """One split scored once: its users, per-objective probabilities, and each row's reward and relevance."""

    def __init__(self, frame: pd.DataFrame, scorer, tasks: TaskSet):
        # A row missing a label that carries a gain or a reward has no known reward or grade: it is left out of
        # the split (read as 0 it would pay a ranking for burying a behaviour nobody recorded). Both weightings
        # a decision compares are judged on the same rows, so the comparison stays paired.
        weighted = [t.column for t in tasks.binary if t.column in frame and (t.gain or t.reward_value)]
        frame = frame[frame[weighted].notna().all(axis=1)] if weighted else frame
        self.rows = len(frame)
        self.users = frame["user_id"].astype(str).to_numpy()
        self.probs = scorer.predict(frame)
        labels = {t.name: (pd.to_numeric(frame[t.column], errors="coerce").to_numpy(np.float64) > 0)
                  .astype(np.float64) for t in tasks.binary if t.column in frame}
        self.rewards = reward_of(tasks, labels)
        self.relevance = sum((t.gain * labels[t.name] for t in tasks.binary if t.name in labels),
                             np.zeros(self.rows))

    def reward_ndcg(self, fused: np.ndarray, k: int) -> float:
        v = metrics.per_user(self.users, fused, self.rewards, (k,))[f"ndcg@{k}"]
        return float(v.mean()) if len(v) else float("nan")

    def reward_per_user(self, weights: dict[str, float], method: str, k: int) -> np.ndarray:
        """reward@K of each user's list (every user, in one fixed order) ranked by ``weights``."""
        fused = fuse(self.probs, weights, method=method)
        return metrics.reward_per_user(self.users, fused, self.rewards, (k,))[f"reward@{k}"]

    def judge(self, weights: dict[str, float], method: str, k: int) -> dict[str, float]:
        fused = fuse(self.probs, weights, method=method)
        return {f"reward_ndcg@{k}": self.reward_ndcg(fused, k),
                f"reward@{k}": metrics.reward_metrics(self.users, fused, self.rewards, (k,))[f"reward@{k}"],
                f"ndcg@{k}": metrics.ranking_metrics(self.users, fused, self.relevance, (k,))[f"ndcg@{k}"]}

    def decide(self, proposed: dict[str, float], current: dict[str, float], method: str, k: int,
               **gate) -> FusionDecision:
        return accept(self.reward_per_user(current, method, k), self.reward_per_user(proposed, method, k),
                      metric=f"reward@{k}", **gate)


def _splits(scorer, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    split = scorer.meta["config"]["data"]["split"]
    _, valid, test = time_split(table, split["valid_fraction"], split["test_fraction"])
    if len(valid) == 0 or len(test) == 0:
        raise ValueError("the table is too small to tune on: its validation or test split is empty")
    return valid, test


def _checked(scorer, weights: dict[str, float] | None) -> dict[str, float]:
    """``weights`` (None: the declared ones), refused when they name objectives the model does not rank."""
    return fusion_used(scorer, weights)["weights"]


def judge(scorer, table: pd.DataFrame, proposed: dict[str, float], current: dict[str, float] | None = None, *,
          k: int = 10, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
          offpolicy: Interval | None = None) -> FusionDecision:
    """``accept`` on the model's test split: does ``proposed`` replace ``current`` (None: the declared weights)?

    For a proposal judged again once there is off-policy evidence about it, which exists only after ``tune``
    proposed it and the service explored it.
    """
    _, test = _splits(scorer, table)
    return _Split(test, scorer, scorer.tasks).decide(_checked(scorer, proposed), _checked(scorer, current),
                                                     scorer.fusion_method, k, bootstrap=bootstrap,
                                                     confidence=confidence, seed=seed, offpolicy=offpolicy)


def tune(scorer, table: pd.DataFrame, *, k: int = 10, iterations: int = 10, samples: int = 32, seed: int = 0,
         current: dict[str, float] | None = None, bootstrap: int = 1000, confidence: float = 0.95,
         gate_seed: int = 0, offpolicy: Callable[[dict, dict], Interval | None] | None = None) -> dict[str, Any]:
    """Propose fusion weights from the validation split; decide on the test split whether they replace ``current``.

    ``scorer`` is a loaded ``models.scoring.artifact.Scorer``; ``table`` the training table it was trained from (or a
    newer one with the same columns), cut with the model's own split fractions. ``current`` is the weighting
    the model is served with now (None: its declared weights); the search starts from it, so it proposes
    nothing worse than it on the validation split. The report's ``decision`` is ``accept``'s on the test
    split, ``bootstrap`` resamples at ``confidence`` seeded with ``gate_seed``; ``accepted`` and ``reason``
    repeat its verdict at the top. ``offpolicy(proposed, current)``, when given, is asked once the proposal is
    known: the service log's evidence about the difference (None when the log cannot judge it).
    """
    tasks = scorer.tasks
    valid, test = _splits(scorer, table)
    objectives = [t.name for t in tasks.binary]
    default = fusion_weights(tasks)
    current = _checked(scorer, current)
    method = scorer.fusion_method
    rewards = tasks.rewards()
    if not rewards:
        raise ValueError("no ranking objective declares a reward above 0: there is nothing to maximise")
    v, te = _Split(valid, scorer, tasks), _Split(test, scorer, tasks)
    if len(objectives) < 2:
        tuned = dict(current)  # one objective: every weighting ranks the same
        rounds = 0
    else:
        scale = sum(current.values()) or 1.0
        start = np.array([current.get(o, 0.0) for o in objectives])

        def objective(w: np.ndarray) -> float:
            return v.reward_ndcg(fuse(v.probs, dict(zip(objectives, w)), method=method), k)

        best, _, _ = cem(objective, len(objectives), start=start, iterations=iterations, samples=samples,
                         seed=seed)
        tuned = rounded({o: float(w * scale) for o, w in zip(objectives, best)})
        rounds = iterations
    evidence = offpolicy(tuned, current) if offpolicy is not None and tuned != current else None
    decision = te.decide(tuned, current, method, k, bootstrap=bootstrap, confidence=confidence, seed=gate_seed,
                         offpolicy=evidence)
    weightings = {"default": default, "current": current, "tuned": tuned}
    return {"accepted": decision.accepted, "reason": decision.reason, "weights": tuned, "default_weights": default,
            "current_weights": current, "method": method, "objectives": objectives, "rewards": rewards,
            "metric": f"reward_ndcg@{k}", "decision": decision.to_dict(),
            "valid": {name: v.judge(w, method, k) for name, w in weightings.items()},
            "test": {name: te.judge(w, method, k) for name, w in weightings.items()},
            "rows": {"valid": v.rows, "test": te.rows}, "k": k, "iterations": rounds, "samples": samples,
            "seed": seed}
