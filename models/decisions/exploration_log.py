"""The service's exploration log read as requests, and which of them count for a target weighting.

``logged_requests`` turns the event log's impressions and feedback into the request table
(``REQUEST_COLUMNS``, one row per request); ``RequestLog`` holds it as arrays, its logging policies grouped,
and builds the ``Sample`` the estimators (``models/decisions/offpolicy_estimators.py``) read.

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

Weightings are compared after normalising to sum 1 (``normalise``) at
``TOLERANCE``, and printed by ``format_weights`` as JSON at full float
precision, so a printed weighting pasted back matches what was logged.

numpy and pandas only: ``models/`` is the layer everyone may import. pandas
is imported where the request table is built.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from models.decisions.offpolicy_estimators import Sample

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["REQUEST_COLUMNS", "RequestLog", "Support", "normalise", "format_weights", "list_rewards",
           "logged_requests"]

TOLERANCE = 1e-6

# The request table every estimate reads (``logged_requests`` builds it from the event log), one row per request:
REQUEST_COLUMNS = (
    "request_id",
    "ts",             # epoch seconds
    "source",         # "model": the service's policy chose the weights; "request": the caller's own (never used);
                      # "unrecorded": a policy record that does not say (counted as the model's)
    "fusion",         # the fusion weights version the service served; None when unrecorded
    "explore",        # "epsilon" when this request was explored, else "off"
    "epsilon",        # the service's epsilon; NaN when unrecorded
    "vectors",        # the weightings the policy could draw ([the logged weights] when not explored)
    "probabilities",  # their probabilities ([1.0] when not explored)
    "chosen",         # the index of the one drawn
    "expected",       # per vector, {objective: the model's expected count over its list}; None when not logged
    "outcomes",       # {event: summed feedback value over the list's items}
)

# Why a request does not count for a target (``Support.left_out``):
_CALLER = "ranked with its caller's own weights"
_ABSENT = "target not among the weightings its policy could draw"
_ZERO = "target drawn with probability 0 (epsilon 0)"


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


def logged_requests(impressions: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """The request table (``REQUEST_COLUMNS``) from ``EventStore.read()``'s impressions and feedback.

    Reads the policy record in each of its forms: the full one (source, fusion, exploration settings, and for
    an explored request its vectors, probabilities, draw and the reward model ``expected``), the short explored
    one (vectors, probabilities, draw only) and the empty ``{}`` (not explored; it does not say whether the
    caller or the model chose the weights, so they count as the model's).
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
class Support:
    """Which requests of the log can judge one target, and how many were left out for each reason."""

    probability: np.ndarray  # per request of the log: P(target) under its policy, 0 without support
    matched: np.ndarray
    left_out: dict[str, int]  # reason -> requests, before the evidence rule

    @property
    def rows(self) -> np.ndarray:
        return np.flatnonzero(self.probability > 0)


class RequestLog:
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

    def support(self, target: dict[str, float]) -> Support:
        tid = self.target_id(target)
        hit = self.weighting == tid if tid >= 0 else np.zeros(self.weighting.shape, dtype=bool)
        policy = self.group >= 0
        g = np.maximum(self.group, 0)
        probability = np.where(policy, (self.probability * hit).sum(axis=1)[g], 0.0)
        matched = policy & hit[g, np.clip(self.chosen, 0, hit.shape[1] - 1)]
        listed = policy & hit.any(axis=1)[g]
        left_out = {_CALLER: int(self.caller.sum()), _ABSENT: int((policy & ~listed).sum()),
                    _ZERO: int((listed & (probability <= 0)).sum())}
        return Support(probability, matched, {k: v for k, v in left_out.items() if v})

    def sample(self, target: dict[str, float], support: Support, rows: np.ndarray | None = None) -> Sample:
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

