"""The off-policy estimators, IPS, SNIPS and DR, their 95% intervals and the evidence they need.

They read a ``Sample``: one target weighting's terms over the requests whose logging policy could have
drawn it (``models/decisions/exploration_log.py`` says which those are). The unit is the request, its
reward summed over the list's items; the target is "always rank with vector t":

- IPS: the mean of ``w r``, ``w = 1[drawn = t] / P(t)``. Unbiased; its
  variance grows with 1/P(t).
- SNIPS: ``sum(w r) / sum(w)``. Divides by the realised weight instead of
  the number of requests: a small bias for much less variance.
- DR (doubly robust): the mean of ``r^(t) + w (r - r^(drawn))``. The reward
  model ``r^(v)`` is the model's own expected reward of the list vector
  ``v`` would have shown (the policy record's ``expected``, weighted by the
  rewards). Unbiased however poor the model; the better it is, the less of
  the reward is left to the noisy importance weights.

Evidence. Each logging policy (the requests that share one set of vectors
and probabilities: in practice one period of one configuration) counts only
if its own requests hold at least ``MIN_MATCHING`` ranked with t and
``MIN_REWARDED`` of those with a non-zero reward; over the policies kept the
importance weights need an effective sample size ``(sum w)^2 / sum w^2`` of
``MIN_ESS``. Below that the estimate is refused with the figures. Within a
policy every match weighs the same, so the ESS of the policies kept is at
least ``MIN_MATCHING``: ``MIN_ESS`` binds when it is raised above it, or the
matching minimum lowered. Why per policy: the intervals fail where a few
heavily weighted requests decide the estimate, as when a period that
explored t at 2% is pooled with one that served t at 92% (the period's
handful of matches weighs 46 times the others), or when few lists earned
anything at all. How the minimums were chosen, and the coverage they give:
``models/decisions/offpolicy.py``.

Intervals: ``value +- q se``, the standard error from the per-request
influence terms (the delta method for the ratio that SNIPS is), and ``q``
the quantile of Student's t with ``matching - 1`` degrees of freedom: the
matching requests carry the spread, and at a few dozen of them the normal
quantile is too narrow.

numpy only: the command line reads the minimums from here as its defaults and starts without pandas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_MATCHING = 30
MIN_REWARDED = 20
MIN_ESS = 30.0


class Refused(ValueError):
    """An estimate the log cannot back; the message carries the figures and what the log can judge instead."""


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float
    q: float = 1.959963984540054  # the two-sided 95% quantile the interval uses

    @property
    def low(self) -> float:
        return self.value - self.q * self.se

    @property
    def high(self) -> float:
        return self.value + self.q * self.se

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high

    def __str__(self) -> str:
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass(frozen=True)
class Sample:
    """One target's terms over the requests whose policy could draw it: everything the estimators read.

    ``model_target`` / ``model_chosen``: the reward model's value of the target's list and of the drawn one,
    NaN where the log has no reward model for that request. ``policy``: which logging policy served each
    request (any labels; None: one policy), for the per-policy evidence rule.
    """

    reward: np.ndarray
    probability: np.ndarray  # P(target) under each request's own policy, in (0, 1]
    matched: np.ndarray  # the request was ranked with the target
    model_target: np.ndarray
    model_chosen: np.ndarray
    policy: np.ndarray | None = None

    @property
    def weight(self) -> np.ndarray:
        return self.matched / self.probability

    @property
    def requests(self) -> int:
        return len(self.reward)

    @property
    def matching(self) -> int:
        return int(np.count_nonzero(self.matched))

    @property
    def rewarded(self) -> int:
        return int(np.count_nonzero(self.matched & (self.reward != 0)))

    @property
    def ess(self) -> float:
        w = self.weight
        square = float((w * w).sum())
        return float(w.sum()) ** 2 / square if square > 0 else 0.0

    @property
    def policies(self) -> np.ndarray:
        return np.zeros(self.requests, dtype=np.int64) if self.policy is None else np.asarray(self.policy)

    def subset(self, rows: np.ndarray) -> "Sample":
        return Sample(self.reward[rows], self.probability[rows], self.matched[rows], self.model_target[rows],
                      self.model_chosen[rows], None if self.policy is None else np.asarray(self.policy)[rows])


@dataclass(frozen=True)
class Evaluation:
    """A target weighting's estimated reward per request, over the requests that support it."""

    ips: Estimate
    snips: Estimate
    dr: Estimate | None  # None when a request used has no reward model: ``dr_missing`` says why
    logged: Estimate  # the average reward the logging policy actually earned on the requests used
    matching: int  # requests used that were ranked with the target
    rewarded: int  # of those, the ones whose list earned a reward
    requests: int  # requests used
    ess: float
    dr_missing: str = ""
    target: dict[str, float] = field(default_factory=dict)
    used: dict[tuple[str, str], int] = field(default_factory=dict)  # (fusion version, exploration) -> requests
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> requests


@dataclass(frozen=True)
class Minimums:
    """The evidence an estimate needs: per policy ``matching`` and ``rewarded``, over those kept ``ess``."""

    matching: int = MIN_MATCHING
    rewarded: int = MIN_REWARDED
    ess: float = MIN_ESS

    def __post_init__(self):
        if self.matching < 2:
            raise ValueError(f"min_matching must be at least 2 (one request has no spread to build an interval "
                             f"from), got {self.matching}")
        if self.rewarded < 1 or self.ess < 0:
            raise ValueError(f"min_rewarded must be at least 1 (no reward at all has no spread either) and "
                             f"min_ess not negative, got {self.rewarded} and {self.ess}")


def estimate(sample: Sample, *, min_matching: int = MIN_MATCHING, min_rewarded: int = MIN_REWARDED,
             min_ess: float = MIN_ESS, policy_names: dict[Any, str] | None = None) -> Evaluation:
    """IPS, SNIPS and DR with 95% intervals over the policies with the evidence, else ``Refused``.

    ``policy_names``: how the refusal names each of ``sample.policy``'s policies.
    """
    minimums = Minimums(min_matching, min_rewarded, min_ess)
    if sample.requests == 0:
        raise Refused("no request's policy could have drawn the target")
    kept = sample.subset(with_evidence(sample, minimums))
    if kept.requests == 0 or kept.ess < minimums.ess:
        raise Refused(shortfall(sample, kept, minimums, policy_names))
    df = kept.matching - 1
    unmodelled = int(np.count_nonzero(np.isnan(kept.model_target) | np.isnan(kept.model_chosen)))
    missing = (f"{unmodelled:,} of the requests used were logged without the policy's reward model (its "
               "'expected', which only the current policy record carries)") if unmodelled else ""
    r = kept.reward
    return Evaluation(ips=interval(*_ips(kept), df), snips=interval(*snips_terms(kept), df),
                      dr=None if unmodelled else interval(*dr_terms(kept), df),
                      logged=Estimate(float(r.mean()), _se(r - r.mean()), _t95(len(r) - 1)),
                      matching=kept.matching, rewarded=kept.rewarded, requests=kept.requests, ess=kept.ess,
                      dr_missing=missing)


def with_evidence(sample: Sample, minimums: Minimums) -> np.ndarray:
    """The requests of the policies that, on their own, ranked enough requests with the target and rewarded."""
    _, inverse, _, matching, rewarded = _per_policy(sample)
    return ((matching >= minimums.matching) & (rewarded >= minimums.rewarded))[inverse]


def _per_policy(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The policies, each request's, and per policy: requests, ranked with the target, of those rewarded."""
    policies, inverse = np.unique(sample.policies, return_inverse=True)
    count = lambda x: np.bincount(inverse, weights=x, minlength=len(policies)).astype(np.int64)  # noqa: E731
    return (policies, inverse, count(np.ones(sample.requests)), count(sample.matched),
            count(sample.matched & (sample.reward != 0)))


def shortfall(sample: Sample, kept: Sample, minimums: Minimums, names: dict[Any, str] | None) -> str:
    """Why ``sample`` is refused (``kept``: its requests of the policies with the evidence), with the figures."""
    need = (f"an estimate needs, within one logging policy, {minimums.matching:,} requests ranked with the target "
            f"and {minimums.rewarded:,} of them rewarded (min_matching, min_rewarded), and over the policies "
            f"used an effective sample size of the importance weights of {minimums.ess:g} (min_ess)")
    if kept.requests:
        return (f"too little evidence: the effective sample size of the importance weights is {kept.ess:.1f} over "
                f"the {kept.requests:,} requests of the policies with enough of it ({kept.matching:,} ranked with "
                f"the target): a few heavily weighted requests would decide the estimate; {need}")
    policies, _, requests, matching, rewarded = _per_policy(sample)
    each = "; ".join(f"{(names or {}).get(p, p)}: {m:,} ({r:,} rewarded) of {n:,}"
                     for p, n, m, r in zip(policies.tolist(), requests, matching, rewarded))
    return (f"too little evidence: {sample.matching:,} requests ranked with the target ({sample.rewarded:,} of "
            f"them rewarded), of {sample.requests:,} whose policy could draw it; per policy: {each}; {need}")


# Each estimator returns its value and the per-request influence terms its standard error is built from.


def _ips(s: Sample) -> tuple[float, np.ndarray]:
    x = s.weight * s.reward
    value = float(x.mean())
    return value, x - value


def snips_terms(s: Sample) -> tuple[float, np.ndarray]:
    w = s.weight
    value = float((w * s.reward).sum() / w.sum())
    return value, w * (s.reward - value) / float(w.mean())  # the delta method's influence of the ratio


def dr_terms(s: Sample) -> tuple[float, np.ndarray]:
    x = s.model_target + s.weight * (s.reward - s.model_chosen)
    value = float(x.mean())
    return value, x - value


def _se(influence: np.ndarray) -> float:
    n = len(influence)
    return float(np.sqrt((influence ** 2).sum() / (n - 1) / n)) if n > 1 else float("nan")


def interval(value: float, influence: np.ndarray, df: int) -> Estimate:
    """``value`` with its 95% interval: the standard error of ``influence`` and Student's t at ``df``."""
    return Estimate(value, _se(influence), _t95(df))


def _t95(df: float) -> float:
    """Student's t two-sided 95% quantile: exact to 4 degrees of freedom, then the Cornish-Fisher series in 1/df
    (within 0.01% of it from 5 df)."""
    z = 1.959963984540054
    if df <= 0:
        return float("nan")
    if df == math.inf:
        return z
    if df <= len(_T95_SMALL) and df == int(df):
        return _T95_SMALL[int(df) - 1]
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


_T95_SMALL = (12.706204736174694, 4.302652729749462, 3.1824463052837078, 2.7764451051977934)
