"""Off-policy evaluation of a fusion weighting from the service's exploration log.

Why: an A/B test of every candidate weighting costs traffic and weeks. When
the service explores (``MTLREC_EXPLORE=epsilon``) each request's list was
ranked by a weight vector drawn with a known probability, so the reward a
*different* choice would have earned can be estimated from the same log:
inverse propensity scoring reweights the requests that happened to use the
target vector by one over the probability of that draw.

The unit is the request (the whole list, its reward summed over items), and
the target is "always rank with vector t", so only vectors the logging policy
could draw are estimable: anything else has no support in the log and is
refused rather than extrapolated. IPS is unbiased but its variance grows with
1/probability; self-normalised IPS divides by the realised sum of weights
instead of the number of requests, trading a small bias for much less
variance. Intervals are normal approximations over requests (the delta method
for the ratio that SNIPS is).

numpy only: ``models/`` is the layer everyone may import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Estimate", "Evaluation", "normalise", "support", "evaluate", "list_rewards"]

TOLERANCE = 1e-6


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float
    z: float = 1.959963984540054  # two-sided 95%

    @property
    def low(self) -> float:
        return self.value - self.z * self.se

    @property
    def high(self) -> float:
        return self.value + self.z * self.se

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass(frozen=True)
class Evaluation:
    """A target weighting's estimated reward per request, and the logging policy's own."""

    target: dict[str, float]
    ips: Estimate
    snips: Estimate
    logged: Estimate  # the average reward the logging policy actually earned
    matching: int  # requests whose drawn vector is the target
    requests: int


def normalise(weights: dict[str, float]) -> dict[str, float]:
    """Weights summing to 1, zeros dropped: ``{click: 1, purchase: 3}`` and ``{click: 2, purchase: 6}`` rank alike
    under sum fusion (and product fusion's order too), so they are one weighting."""
    positive = {k: float(v) for k, v in weights.items() if v}
    total = sum(positive.values())
    if not positive or total <= 0:
        raise ValueError(f"weights need a positive total, got {weights}")
    return {k: v / total for k, v in sorted(positive.items())}


def _same(a: dict[str, float], b: dict[str, float], tol: float = TOLERANCE) -> bool:
    return all(abs(a.get(k, 0.0) - b.get(k, 0.0)) <= tol for k in set(a) | set(b))


def support(vectors: Iterable[dict[str, float]]) -> list[dict[str, float]]:
    """The distinct weightings among ``vectors``, normalised, in first-seen order."""
    out: list[dict[str, float]] = []
    for v in vectors:
        n = normalise(v)
        if not any(_same(n, s) for s in out):
            out.append(n)
    return out


def list_rewards(events: Sequence[dict[str, float]], rewards: dict[str, float]) -> float:
    """One list's reward: over its items, sum of ``reward[t] * event[t]``; an item without feedback adds 0."""
    return float(sum(rewards.get(t, 0.0) * float(v) for item in events for t, v in item.items()))


def evaluate(rewards: Sequence[float], chosen: Sequence[dict[str, float]], probabilities: Sequence[float],
             target: dict[str, float], *, logged_vectors: Iterable[dict[str, float]] | None = None) -> Evaluation:
    """IPS and SNIPS estimates of the reward per request of always ranking with ``target``.

    Per request: its reward, the vector that ranked it and the probability the policy drew that vector.
    ``logged_vectors`` is the support the logging policy drew from (default: the vectors that were drawn);
    a target outside it raises ``ValueError`` listing the logged vectors.
    """
    r = np.asarray(rewards, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    n = len(r)
    if not (len(chosen) == len(p) == n) or n == 0:
        raise ValueError(f"need one reward, chosen vector and probability per request, and at least one request "
                         f"(got {n}, {len(chosen)}, {len(p)})")
    if not ((p > 0) & (p <= 1)).all():
        raise ValueError("probabilities must lie in (0, 1]")
    t = normalise(target)
    logged = support(list(chosen) + list(logged_vectors or []))
    if not any(_same(t, v) for v in logged):
        shown = "; ".join(_format(v) for v in logged)
        raise ValueError(f"target {_format(t)} is not a logged weighting (after normalising to sum 1, tolerance "
                         f"{TOLERANCE:g}); the log can only judge these: {shown}")
    match = np.array([_same(t, normalise(c)) for c in chosen])
    w = match / p  # the importance weight of a deterministic target: 1[drawn = target] / P(drawn)
    x = w * r
    ips = Estimate(float(x.mean()), _se(x))
    if match.any():
        value = float(x.sum() / w.sum())
        # delta method for the ratio mean(w r) / mean(w): the residuals w (r - value), scaled by mean(w)
        snips = Estimate(value, _se(w * (r - value)) / float(w.mean()))
    else:
        snips = Estimate(float("nan"), float("nan"))
    return Evaluation(target=t, ips=ips, snips=snips, logged=Estimate(float(r.mean()), _se(r)),
                      matching=int(match.sum()), requests=n)


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _format(weights: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:.4g}" for k, v in weights.items()) + "}"
