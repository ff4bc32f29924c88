"""Exploration: the randomised part of ranking, logged so that off-policy evaluation can judge other weightings.

With ``MTLREC_EXPLORE=epsilon`` (off by default), a request that sends no weights is ranked with one of a few
weight vectors around the model's own, drawn epsilon-greedily, and every placement carries its propensity.
Without it the log only ever shows what the default weights rank, and no other weighting can be judged from
it; with it, ``models.decisions.offpolicy`` estimates another weighting's reward from the same traffic.

The policy is plain functions (``weight_vectors``, ``policy_probabilities``, ``choose``, ``propensities``), so a
simulator drives exactly what the service runs; ``services.ranking.rank`` applies them to a request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Exploration", "weight_vectors", "policy_probabilities", "choose", "propensities"]


@dataclass(frozen=True)
class Exploration:
    """The exploration policy of the service (``MTLREC_EXPLORE*``); the default explores nothing."""

    policy: str = "off"  # "off" | "epsilon"
    epsilon: float = 0.1
    spread: float = 0.5

    @property
    def on(self) -> bool:
        return self.policy == "epsilon"

    @classmethod
    def from_settings(cls, settings) -> "Exploration":
        return cls(settings.explore, settings.explore_epsilon, settings.explore_spread)


def _normalised(weights: dict[str, float]) -> tuple:
    total = sum(weights.values())
    return tuple(sorted((k, round(v / total, 9)) for k, v in weights.items() if v))


def weight_vectors(base: dict[str, float], spread: float) -> list[dict[str, float]]:
    """The base vector, then each positive-weight objective (by name) times ``1 + spread`` and ``1 - spread``.

    Deterministic, so every worker and every evaluation sees the same support; a vector that normalises to one
    already listed (one objective alone: scaling cannot change its order) is left out, so no two vectors are
    the same weighting under two names.
    """
    if not 0 < spread < 1:
        raise ValueError(f"spread must lie in (0, 1), got {spread}")
    base = {k: float(base[k]) for k in sorted(base)}
    vectors, seen = [base], {_normalised(base)}
    for name in [k for k, v in base.items() if v > 0]:
        for factor in (1.0 + spread, 1.0 - spread):
            v = {**base, name: round(base[name] * factor, 12)}  # 1 - 0.8 shown as 0.2, not 0.19999999999999996
            key = _normalised(v)
            if key not in seen:
                seen.add(key)
                vectors.append(v)
    return vectors


def policy_probabilities(n: int, epsilon: float) -> list[float]:
    """Epsilon-greedy over ``n`` vectors, the first being the greedy one: ``1 - eps + eps/n``, else ``eps/n``."""
    if n < 1 or not 0 <= epsilon <= 1:
        raise ValueError(f"need n >= 1 and epsilon in [0, 1], got n={n}, epsilon={epsilon}")
    share = epsilon / n
    return [1.0 - epsilon + share] + [share] * (n - 1)


def choose(probabilities: list[float], rng) -> int:
    """The index drawn with ``probabilities``; ``rng`` is anything with ``.random()`` (numpy or ``random``)."""
    u = float(rng.random())
    cumulative = np.cumsum(probabilities)
    return int(min(np.searchsorted(cumulative, u * cumulative[-1], side="right"), len(probabilities) - 1))


def propensities(orders: list[np.ndarray], probabilities: list[float], chosen: int) -> np.ndarray:
    """Per slot of the chosen list: the probability the policy puts that item in that slot.

    That is the sum of the probabilities of every vector whose list has the same item there, so an item
    every vector places alike has propensity 1 however much the policy explores.
    """
    shown = np.asarray(orders[chosen])
    missed = np.zeros(len(shown), dtype=np.float64)  # the probability of the vectors that place another item
    for o, p in zip(orders, probabilities):
        o = np.asarray(o)
        same = np.zeros(len(shown), dtype=bool)
        n = min(len(o), len(shown))
        same[:n] = o[:n] == shown[:n]
        missed += p * ~same
    # 1 - missed rather than the sum of the matches: a slot all vectors agree on is exactly 1, not 1 - ulp
    return np.clip(1.0 - missed, 0.0, 1.0)
