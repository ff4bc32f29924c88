"""Off-policy evaluation of a fusion weighting from the service's exploration log.

Why: an A/B test of every candidate weighting costs traffic and weeks. When
the service explores (``MTLREC_EXPLORE=epsilon``) each request's list was
ranked by a weight vector drawn with a known probability, so the reward a
*different* choice would have earned can be estimated from the same log.

The unit is the request (the whole list, its reward summed over items), and
the target is "always rank with vector t". Three estimators, over the
requests whose logging policy could have drawn t:

- IPS: the mean of ``w r``, ``w = 1[drawn = t] / P(t)``. Unbiased; its
  variance grows with 1/P(t).
- SNIPS: ``sum(w r) / sum(w)``. Divides by the realised weight instead of
  the number of requests: a small bias for much less variance.
- DR (doubly robust): the mean of ``r^(t) + w (r - r^(drawn))``. The reward
  model ``r^(v)`` is the model's own expected reward of the list vector
  ``v`` would have shown (the policy record's ``expected``, weighted by the
  rewards). Unbiased however poor the model; the better it is, the less of
  the reward is left to the noisy importance weights.

Support is per request. A request counts for t only when its own policy
gave t a non-zero probability: an explored request whose vectors hold t, or
a request ranked without exploration by t itself (probability 1). Pooling
every vector the log ever drew instead puts the requests of a period whose
policy could never show t into the denominator and drags the estimate
towards 0 (after a rollout of tuned weights: the period before it). A
request ranked with its caller's own weights was no policy's draw and
never counts. The estimate is of the reward t would earn on the traffic of
the requests used, which the result breaks down by fusion version and
exploration setting.

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
anything at all.

The minimums come from the simulator in ``tests/models/test_offpolicy.py``:
requests drawn from a pool whose exact expected reward per weighting is
known (the synthetic generator's truth), the service's own epsilon-greedy
policy and ranking, Bernoulli clicks and purchases, reward click 1 and
purchase 5. Coverage of the 95% intervals, 2000 replications per row, of an
explored non-base vector (P = 0.02, epsilon 0.1), by the expected number of
requests ranked with it; "sparse" has every click 10 times rarer; "minimums
off" answers any log with 2 matches and a reward; "answered" is the share of
logs not refused, the coverage among those:

                  dense: 77% of lists rewarded           sparse: 14% of lists rewarded
  expected   minimums off     minimums on               minimums off     minimums on
  matches    IPS SNIPS  DR    answered  IPS SNIPS  DR   IPS SNIPS  DR    answered  IPS SNIPS  DR
       10    .91  .90  .97          0%    -    -    -   .75  .71  .91          0%    -    -    -
       20    .92  .92  .96          2%  .91  .93  .86   .76  .76  .93          0%    -    -    -
       30    .93  .94  .95         51%  .99  .94  .96   .87  .86  .92          0%    -    -    -
       50    .94  .93  .95        100%  .94  .93  .95   .88  .90  .93          0%    -    -    -
      100    .95  .95  .95        100%  .95  .95  .95   .92  .92  .94         10%  .93  .95  .95
      200    .95  .95  .96        100%  .95  .95  .96   .94  .94  .94         97%  .96  .95  .94
      500    .95  .96  .94        100%  .95  .96  .94   .94  .94  .95        100%  .94  .94  .95

Over 213 settings (rewards dense, sparse and 30 times sparser; epsilon 0.5
and 0.1; the base vector and an explored one at 10 to 800 expected matches;
a period exploring around the declared weights followed by one serving the
target, in 20 combinations of sizes), 300 replications each, the 110 where
the minimums answered at least 100 logs all covered at 0.90 or more with
every estimator (lowest 0.904, mean 0.95). The same minimums applied to
the log as a whole instead of per policy left 14 settings below 0.90, the
lowest at 0.55 (IPS, 1000 requests exploring the target at 2% then 1000
serving it, 4% of lists rewarded).

Intervals: ``value +- q se``, the standard error from the per-request
influence terms (the delta method for the ratio that SNIPS is), and ``q``
the quantile of Student's t with ``matching - 1`` degrees of freedom: the
matching requests carry the spread, and at a few dozen of them the normal
quantile is too narrow.

Weightings are compared after normalising to sum 1 (``normalise``) at
``TOLERANCE``, and printed by ``format_weights`` as JSON at full float
precision, so a printed weighting pasted back matches what was logged.

numpy and pandas only: ``models/`` is the layer everyone may import. pandas
is imported where the request table is built, so the command line, which
reads this module's defaults, starts without it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Estimate", "Evaluation", "Comparison", "Sample", "Refused", "REQUEST_COLUMNS", "MIN_MATCHING",
           "MIN_REWARDED", "MIN_ESS", "normalise", "format_weights", "list_rewards", "logged_requests", "estimate",
           "evaluate", "judgeable", "compare"]

TOLERANCE = 1e-6
MIN_MATCHING = 30
MIN_REWARDED = 20
MIN_ESS = 30.0

# The request table every estimate reads (``logged_requests`` builds it from the event log), one row per request:
REQUEST_COLUMNS = (
    "request_id",
    "ts",             # epoch seconds
    "source",         # "model": the service's policy chose the weights; "request": the caller's own (never used);
                      # "unrecorded": a log from before the record said (counted as the model's)
    "fusion",         # the fusion weights version the service served; None when unrecorded
    "explore",        # "epsilon" when this request was explored, else "off"
    "epsilon",        # the service's epsilon; NaN when unrecorded
    "vectors",        # the weightings the policy could draw ([the logged weights] when not explored)
    "probabilities",  # their probabilities ([1.0] when not explored)
    "chosen",         # the index of the one drawn
    "expected",       # per vector, {objective: the model's expected count over its list}; None when not logged
    "outcomes",       # {event: summed feedback value over the list's items}
)

_CALLER = "ranked with its caller's own weights"
_ABSENT = "target not among the weightings its policy could draw"
_ZERO = "target drawn with probability 0 (epsilon 0)"
_THIN = "its policy ranked too few requests with the target"


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
class Comparison:
    """``proposal`` against ``current`` on the requests both can be judged on; ``refused`` says why not."""

    proposal: dict[str, float]
    current: dict[str, float]
    method: str = ""  # "DR" or "SNIPS"
    requests: int = 0
    proposal_value: Estimate | None = None
    current_value: Estimate | None = None
    difference: Estimate | None = None  # proposal - current
    refused: str | None = None


@dataclass(frozen=True)
class _Minimums:
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


def normalise(weights: dict[str, float]) -> dict[str, float]:
    """Weights summing to 1, zeros dropped: ``{click: 1, purchase: 3}`` and ``{click: 2, purchase: 6}`` rank alike
    under sum fusion (and product fusion's order too), so they are one weighting."""
    positive = {k: float(v) for k, v in weights.items() if v}
    total = sum(positive.values())
    if not positive or total <= 0:
        raise ValueError(f"weights need a positive total, got {weights}")
    return {k: v / total for k, v in sorted(positive.items())}


def format_weights(weights: dict[str, float]) -> str:
    """The normalised weighting as JSON: every float at the precision that reads back to itself."""
    return json.dumps(normalise(weights))


def _same(a: dict[str, float], b: dict[str, float], tol: float = TOLERANCE) -> bool:
    return all(abs(a.get(k, 0.0) - b.get(k, 0.0)) <= tol for k in set(a) | set(b))


def list_rewards(events: Sequence[dict[str, float]], rewards: dict[str, float]) -> float:
    """One list's reward: over its items, sum of ``reward[t] * event[t]``; an item without feedback adds 0."""
    return float(sum(rewards.get(t, 0.0) * float(v) for item in events for t, v in item.items()))


# ---- the request table ----------------------------------------------------------------------------------------


def logged_requests(impressions: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """The request table (``REQUEST_COLUMNS``) from ``EventStore.read()``'s impressions and feedback.

    Reads the policy record in each of its forms: the full one (source, fusion, exploration settings, and for
    an explored request its vectors, probabilities, draw and the reward model ``expected``), the early explored
    one (vectors, probabilities, draw only) and the early ``{}`` (not explored; whether the caller or the model
    chose the weights was not recorded, so they count as the model's).
    """
    import pandas as pd

    outcomes: dict[str, dict[str, float]] = {}
    if len(feedback):
        for (request, event), value in feedback.groupby(["request_id", "event"])["value"].sum().items():
            outcomes.setdefault(request, {})[str(event)] = float(value)
    first = impressions.drop_duplicates("request_id")
    rows = [_request(r, ts, w, p, outcomes.get(r, {}))
            for r, ts, w, p in zip(first["request_id"], first["ts"], first["weights"], first["policy"])]
    return pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))


def _request(request_id: str, ts: float, weights: dict, policy: dict | None, outcomes: dict) -> tuple:
    p = policy or {}
    explored = "vectors" in p
    source = p.get("source", "model" if explored else "unrecorded")
    epsilon = p.get("epsilon")
    return (request_id, float(ts), source, p.get("fusion"), "epsilon" if explored else "off",
            float("nan") if epsilon is None else float(epsilon),
            list(p["vectors"]) if explored else [dict(weights)],
            [float(x) for x in p["probabilities"]] if explored else [1.0],
            int(p["chosen"]) if explored else 0, p.get("expected"), outcomes)


@dataclass(frozen=True)
class _Support:
    probability: np.ndarray  # per request of the log: P(target) under its policy, 0 without support
    matched: np.ndarray
    left_out: dict[str, int]  # reason -> requests, before the evidence rule

    @property
    def rows(self) -> np.ndarray:
        return np.flatnonzero(self.probability > 0)


class _Log:
    """The request table as arrays, its policies grouped: one support check per distinct policy, not per request."""

    def __init__(self, requests: pd.DataFrame, rewards: dict[str, float]):
        missing = set(REQUEST_COLUMNS) - set(requests.columns)
        if missing:
            raise ValueError(f"the request table lacks {sorted(missing)} (build it with logged_requests)")
        self.ids = requests["request_id"].to_numpy(object)
        self.caller = (requests["source"] == "request").to_numpy()
        self.chosen = requests["chosen"].to_numpy(np.int64)
        self.fusion = np.array(["(unrecorded)" if f is None or f != f else str(f) for f in requests["fusion"]],
                               dtype=object)
        self.explore = np.array([_explore_label(x, e) for x, e in zip(requests["explore"], requests["epsilon"])],
                                dtype=object)
        self.weightings: list[dict[str, float]] = []  # distinct, normalised, first seen first
        self._group_policies(requests)
        self._check_draws()
        self.reward = np.array([sum(rewards.get(e, 0.0) * float(v) for e, v in o.items())
                                for o in requests["outcomes"]], dtype=np.float64)
        self.model = self._reward_model(requests["expected"], rewards)

    def _group_policies(self, requests: pd.DataFrame) -> None:
        keys: dict[tuple, int] = {}
        policies: list[tuple[list, list]] = []
        group = np.full(len(requests), -1, dtype=np.int64)
        for i, (caller, vectors, probabilities) in enumerate(
                zip(self.caller, requests["vectors"], requests["probabilities"])):
            if caller:
                continue
            key = (tuple(tuple(sorted(v.items())) for v in vectors), tuple(probabilities))
            if key not in keys:
                keys[key] = len(policies)
                policies.append((vectors, probabilities))
            group[i] = keys[key]
        width = max((len(v) for v, _ in policies), default=1)
        self.group = group
        self.probability = np.zeros((len(policies), width))  # per policy and vector
        self.weighting = np.full((len(policies), width), -1, dtype=np.int64)  # each vector's index in weightings
        for g, (vectors, probabilities) in enumerate(policies):
            _check_policy(vectors, probabilities, self.ids[np.argmax(group == g)])
            self.probability[g, :len(vectors)] = probabilities
            self.weighting[g, :len(vectors)] = [self._weighting_id(v) for v in vectors]

    def _weighting_id(self, vector: dict[str, float]) -> int:
        n = normalise(vector)
        for j, w in enumerate(self.weightings):
            if _same(n, w):
                return j
        self.weightings.append(n)
        return len(self.weightings) - 1

    def _check_draws(self) -> None:
        policy = self.group >= 0
        width = self.probability.shape[1]
        bad = policy & ((self.chosen < 0) | (self.chosen >= width))
        if not bad.any():
            bad[policy] = self.probability[self.group[policy], self.chosen[policy]] <= 0
        if bad.any():
            raise ValueError(f"request {self.ids[np.argmax(bad)]}: its logged draw is not one its policy could "
                             "make (an index outside its vectors, or one of probability 0)")

    def _reward_model(self, expected: pd.Series, rewards: dict[str, float]) -> np.ndarray:
        model = np.full((len(expected), self.probability.shape[1]), np.nan)
        for i, per_vector in enumerate(expected):
            if per_vector and not self.caller[i]:
                model[i, :len(per_vector)] = [sum(rewards.get(o, 0.0) * float(x) for o, x in e.items())
                                              for e in per_vector]
        return model

    def target_id(self, target: dict[str, float]) -> int:
        t = normalise(target)
        return next((j for j, w in enumerate(self.weightings) if _same(t, w)), -1)

    def support(self, target: dict[str, float]) -> _Support:
        tid = self.target_id(target)
        hit = self.weighting == tid if tid >= 0 else np.zeros(self.weighting.shape, dtype=bool)
        policy = self.group >= 0
        g = np.maximum(self.group, 0)
        probability = np.where(policy, (self.probability * hit).sum(axis=1)[g], 0.0)
        matched = policy & hit[g, np.clip(self.chosen, 0, hit.shape[1] - 1)]
        listed = policy & hit.any(axis=1)[g]
        left_out = {_CALLER: int(self.caller.sum()), _ABSENT: int((policy & ~listed).sum()),
                    _ZERO: int((listed & (probability <= 0)).sum())}
        return _Support(probability, matched, {k: v for k, v in left_out.items() if v})

    def sample(self, target: dict[str, float], support: _Support, rows: np.ndarray | None = None) -> Sample:
        """The target's terms over ``rows`` (default: every request that supports it)."""
        rows = support.rows if rows is None else rows
        tid = self.target_id(target)
        place = np.argmax(self.weighting[self.group[rows]] == tid, axis=1)  # the target among each one's vectors
        probability = support.probability[rows]
        certain = probability >= 1.0  # r^ cancels out of DR where the target is certain (DR_i = r_i)
        return Sample(reward=self.reward[rows], probability=probability, matched=support.matched[rows],
                      model_target=np.where(certain, 0.0, self.model[rows, place]),
                      model_chosen=np.where(certain, 0.0, self.model[rows, self.chosen[rows]]),
                      policy=self.group[rows])

    def policy_names(self) -> dict[int, str]:
        """Each policy as the fusion versions and the exploration that served it."""
        fusions: dict[int, set] = {}
        explores: dict[int, str] = {}
        for g, fusion, explore in zip(self.group.tolist(), self.fusion, self.explore):
            if g >= 0:
                fusions.setdefault(g, set()).add(fusion)
                explores.setdefault(g, explore)
        return {g: f"{', '.join(sorted(f))} / {explores[g]}" for g, f in fusions.items()}

    def used_by(self, rows: np.ndarray) -> dict[tuple[str, str], int]:
        return dict(sorted(Counter(zip(self.fusion[rows], self.explore[rows])).items()))


def _explore_label(explore: str, epsilon: float) -> str:
    if explore != "epsilon":
        return "off"
    return "epsilon" if epsilon is None or epsilon != epsilon else f"epsilon {epsilon:g}"


def _check_policy(vectors: list, probabilities: list, request_id: Any) -> None:
    p = np.asarray(probabilities, dtype=np.float64)
    if len(vectors) != len(p) or not len(p) or not ((p >= 0) & (p <= 1)).all() or abs(p.sum() - 1) > TOLERANCE:
        raise ValueError(f"request {request_id}: its policy record needs one probability in [0, 1] per vector, "
                         f"summing to 1 (got {len(vectors)} vectors, probabilities {list(p)})")


# ---- the estimators --------------------------------------------------------------------------------------------


def estimate(sample: Sample, *, min_matching: int = MIN_MATCHING, min_rewarded: int = MIN_REWARDED,
             min_ess: float = MIN_ESS, policy_names: dict[Any, str] | None = None) -> Evaluation:
    """IPS, SNIPS and DR with 95% intervals over the policies with the evidence, else ``Refused``.

    ``policy_names``: how the refusal names each of ``sample.policy``'s policies.
    """
    minimums = _Minimums(min_matching, min_rewarded, min_ess)
    if sample.requests == 0:
        raise Refused("no request's policy could have drawn the target")
    kept = sample.subset(_enough(sample, minimums))
    if kept.requests == 0 or kept.ess < minimums.ess:
        raise Refused(_shortfall(sample, kept, minimums, policy_names))
    df = kept.matching - 1
    unmodelled = int(np.count_nonzero(np.isnan(kept.model_target) | np.isnan(kept.model_chosen)))
    missing = (f"{unmodelled:,} of the requests used were logged without the policy's reward model (its "
               "'expected', which only the current policy record carries)") if unmodelled else ""
    r = kept.reward
    return Evaluation(ips=_interval(*_ips(kept), df), snips=_interval(*_snips(kept), df),
                      dr=None if unmodelled else _interval(*_dr(kept), df),
                      logged=Estimate(float(r.mean()), _se(r - r.mean()), _t95(len(r) - 1)),
                      matching=kept.matching, rewarded=kept.rewarded, requests=kept.requests, ess=kept.ess,
                      dr_missing=missing)


def _enough(sample: Sample, minimums: _Minimums) -> np.ndarray:
    """The requests of the policies that, on their own, ranked enough requests with the target and rewarded."""
    _, inverse, _, matching, rewarded = _per_policy(sample)
    return ((matching >= minimums.matching) & (rewarded >= minimums.rewarded))[inverse]


def _per_policy(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The policies, each request's, and per policy: requests, ranked with the target, of those rewarded."""
    policies, inverse = np.unique(sample.policies, return_inverse=True)
    count = lambda x: np.bincount(inverse, weights=x, minlength=len(policies)).astype(np.int64)  # noqa: E731
    return (policies, inverse, count(np.ones(sample.requests)), count(sample.matched),
            count(sample.matched & (sample.reward != 0)))


def _shortfall(sample: Sample, kept: Sample, minimums: _Minimums, names: dict[Any, str] | None) -> str:
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


def _ips(s: Sample) -> tuple[float, np.ndarray]:
    x = s.weight * s.reward
    value = float(x.mean())
    return value, x - value


def _snips(s: Sample) -> tuple[float, np.ndarray]:
    w = s.weight
    value = float((w * s.reward).sum() / w.sum())
    return value, w * (s.reward - value) / float(w.mean())  # the delta method's influence of the ratio


def _dr(s: Sample) -> tuple[float, np.ndarray]:
    x = s.model_target + s.weight * (s.reward - s.model_chosen)
    value = float(x.mean())
    return value, x - value


def _se(influence: np.ndarray) -> float:
    n = len(influence)
    return float(np.sqrt((influence ** 2).sum() / (n - 1) / n)) if n > 1 else float("nan")


def _interval(value: float, influence: np.ndarray, df: int) -> Estimate:
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


# ---- the log's questions ---------------------------------------------------------------------------------------


def evaluate(requests: pd.DataFrame, target: dict[str, float], rewards: dict[str, float], *,
             min_matching: int = MIN_MATCHING, min_rewarded: int = MIN_REWARDED,
             min_ess: float = MIN_ESS) -> Evaluation:
    """The reward per request of always ranking with ``target``, over the requests that can judge it.

    ``requests``: the request table (``logged_requests``); ``rewards``: per event. ``Refused`` when no request
    supports the target or the evidence is below the minimums; its message lists the weightings the log can
    judge.
    """
    minimums = _Minimums(min_matching, min_rewarded, min_ess)
    log = _Log(requests, rewards)
    tid = log.target_id(target)
    t = log.weightings[tid] if tid >= 0 else normalise(target)  # as logged: what the log prints reads back to it
    support = log.support(t)
    sample = log.sample(t, support)
    try:
        result = estimate(sample, min_matching=min_matching, min_rewarded=min_rewarded, min_ess=min_ess,
                          policy_names=log.policy_names())
    except Refused as e:
        raise Refused(f"target {format_weights(t)}: {e}{_left_out(support.left_out)}.\n"
                      f"{_judgeable_text(log, minimums)}") from None
    keep = _enough(sample, minimums)
    thin = int((~keep).sum())
    return replace(result, target=t, used=log.used_by(support.rows[keep]),
                   left_out={**support.left_out, **({_THIN: thin} if thin else {})})


def judgeable(requests: pd.DataFrame, rewards: dict[str, float], *, min_matching: int = MIN_MATCHING,
              min_rewarded: int = MIN_REWARDED,
              min_ess: float = MIN_ESS) -> list[tuple[dict[str, float], int, float]]:
    """The weightings the log has the evidence to judge, most matching requests first: (weighting, matching, ESS)."""
    return _judgeable(_Log(requests, rewards), _Minimums(min_matching, min_rewarded, min_ess))[0]


def _judgeable(log: _Log, minimums: _Minimums) -> tuple[list[tuple[dict[str, float], int, float]], int]:
    """The weightings with the evidence, and how many more the log supports with too little of it."""
    enough, short = [], 0
    for w in log.weightings:
        support = log.support(w)
        if not len(support.rows):
            continue
        sample = log.sample(w, support)
        kept = sample.subset(_enough(sample, minimums))
        if kept.requests and kept.ess >= minimums.ess:
            enough.append((w, kept.matching, kept.ess))
        else:
            short += 1
    return sorted(enough, key=lambda x: -x[1]), short


def _judgeable_text(log: _Log, minimums: _Minimums) -> str:
    enough, short = _judgeable(log, minimums)
    more = f" ({short} more that it could have drawn, with too little evidence)" if short else ""
    if not enough:
        return f"The log has the evidence to judge no weighting{more}."
    lines = "\n".join(f"  {format_weights(w)}  ({m:,} requests ranked with it, ESS {e:.1f})" for w, m, e in enough)
    return f"The log can judge these{more}:\n{lines}"


def _left_out(left_out: dict[str, int]) -> str:
    return ("; left out: " + ", ".join(f"{n:,} {why}" for why, n in left_out.items())) if left_out else ""


def compare(requests: pd.DataFrame, proposal: dict[str, float], current: dict[str, float],
            rewards: dict[str, float], *, min_matching: int = MIN_MATCHING, min_rewarded: int = MIN_REWARDED,
            min_ess: float = MIN_ESS) -> Comparison:
    """``proposal`` minus ``current`` in reward per request, on the requests that can judge both.

    Those are the requests of the logging policies that could draw both and have the evidence for each. Why
    only those: a request that supports one alone belongs to a period the other could not be shown in, and a
    difference across periods would mix the weighting with the period. On the shared requests the two
    estimates are not independent even though no request drew both: SNIPS's normalisation and DR's reward
    model use every supported request, so the two move together with the traffic, while IPS's disjoint
    matches pull them apart. The interval is therefore built from the per-request difference of the two
    influence terms, which carries their covariance whatever its sign (adding the two variances would be too
    wide for DR and SNIPS). The estimator is DR where every shared request has the reward model, else SNIPS.
    Never raises on a log short of evidence: ``refused`` says why.
    """
    minimums = _Minimums(min_matching, min_rewarded, min_ess)
    p, c = normalise(proposal), normalise(current)
    out = Comparison(proposal=p, current=c)
    log = _Log(requests, rewards)
    supports = [log.support(w) for w in (p, c)]
    judged = []
    for w, support in zip((p, c), supports):
        sample = log.sample(w, support)
        judged.append(set(support.rows[_enough(sample, minimums)].tolist()))
    shared = np.array(sorted(judged[0] & judged[1]), dtype=np.int64)
    if not len(shared):
        return replace(out, refused=f"no logging policy could draw both {format_weights(p)} and "
                                    f"{format_weights(c)} with the evidence to judge each")
    samples = [log.sample(w, support, shared) for w, support in zip((p, c), supports)]
    for name, w, s in zip(("proposal", "current"), (p, c), samples):
        if s.ess < minimums.ess:
            return replace(out, requests=len(shared),
                           refused=f"{name} {format_weights(w)}: {_shortfall(s, s, minimums, None)}")
    modelled = all(not (np.isnan(s.model_target).any() or np.isnan(s.model_chosen).any()) for s in samples)
    method, estimator = ("DR", _dr) if modelled else ("SNIPS", _snips)
    (vp, ip), (vc, ic) = estimator(samples[0]), estimator(samples[1])
    df = min(s.matching for s in samples) - 1
    return replace(out, method=method, requests=len(shared), proposal_value=_interval(vp, ip, df),
                   current_value=_interval(vc, ic, df), difference=_interval(vp - vc, ip - ic, df))
