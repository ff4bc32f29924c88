"""The ranking logic of the service, free of BentoML so it can be tested and reused offline.

One request: read the online features (user once, items in bulk), add the request context the model
was trained on (``device``; ``position`` is 0 at serving: the slot is not known yet), score every
objective in one batched forward pass, fuse with ``models.fusion.fuse`` (the function training and
evaluation judge the model by), then re-rank for novelty and for diversity, with maximal marginal relevance
over item category. A request that sends no weights may be ranked with a nearby weighting drawn at random
(``services/exploration.py``); ``rank`` applies that policy and reports what it drew.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from feature_repo.online import StoreUnavailable
from feature_repo.schema import WINDOWS
from models.metrics.multitask import fusion_weights
from models.fusion import fuse
from services.exploration import Exploration, choose, policy_probabilities, propensities, weight_vectors
from services.stopwatch import OFF

__all__ = ["Model", "RequestError", "StoreUnavailable", "NonFiniteScores", "rank", "score_items", "mmr",
           "check_events", "data_span", "time_outside_data", "order"]


class RequestError(ValueError):
    """A request the model cannot serve; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NonFiniteScores(RuntimeError):
    """The model scored NaN or infinity: an error to count and report, never a silent 0."""


@dataclass
class Model:
    """A loaded production model; the service swaps the whole object on reload."""

    tag: str
    scorer: Any  # models.scoring.artifact.Scorer
    weights: dict[str, float] = field(default_factory=dict)
    fusion: str = "declared"  # the fusion weights' version: "declared", or an accepted tuning's id
    # the first and last impression the model was trained and judged on (epoch seconds), read once from its
    # artifact; None for an artifact that does not record them
    span: tuple[float, float] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        self.span = data_span(getattr(self.scorer, "meta", None) or {})

    @classmethod
    def of(cls, tag: str, scorer, weights: dict[str, float] | None = None, fusion: str | None = None) -> "Model":
        """``weights``: the model's accepted fusion weights (version ``fusion``); else its declared ones."""
        if not weights:
            return cls(tag=tag, scorer=scorer, weights=fusion_weights(scorer.tasks), fusion="declared")
        return cls(tag=tag, scorer=scorer, weights=dict(weights), fusion=fusion or "tuned")

    def with_fusion(self, weights: dict[str, float] | None, fusion: str | None) -> "Model":
        """The same scorer under another fusion version: a new object, so a request in flight keeps its own."""
        return Model.of(self.tag, self.scorer, weights, fusion)

    @property
    def objectives(self) -> list[str]:
        return [t.name for t in self.scorer.tasks if t.ranks]


def data_span(meta: dict[str, Any]) -> tuple[float, float] | None:
    """The time range of an artifact's training table (all its splits), from ``meta["data"]["time_ranges"]``."""
    ranges = [r for r in ((meta.get("data") or {}).get("time_ranges") or {}).values() if r and len(r) == 2]
    try:
        stamps = [pd.Timestamp(v) for r in ranges for v in r]
    except (TypeError, ValueError):
        return None
    if not stamps:
        return None
    stamps = [t.tz_convert("UTC") if t.tzinfo else t.tz_localize("UTC") for t in stamps]
    return min(stamps).timestamp(), max(stamps).timestamp()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def time_outside_data(span: tuple[float, float] | None, ts: float) -> str | None:
    """Why the request time ``ts`` lies outside the data, or None: outside means more than the longest feature
    window (``feature_repo.schema.WINDOWS``, days) before the data starts or after it ends. Beyond that the
    windowed counts describe another time than the request's, and the time-derived features are clipped to
    what training saw (``models.data.encoder.FeatureSpec.bounds``): the scores are the model's at the data's edge."""
    if span is None:
        return None
    window = max(WINDOWS) * 86_400.0
    start, end = span
    if start - window <= ts <= end + window:
        return None
    side = f"{(ts - end) / 86_400:.0f} days after the data ends ({_iso(end)})" if ts > end else \
        f"{(start - ts) / 86_400:.0f} days before the data starts ({_iso(start)})"
    return (f"the request time {_iso(ts)} is {side}, beyond the longest feature window ({max(WINDOWS)} days): "
            "time-derived features are held to the range training saw; send context.timestamp to score as of "
            "another time")


@dataclass
class Scored:
    frame: dict[str, np.ndarray]  # the model's input columns
    probs: dict[str, np.ndarray]
    item_cold: np.ndarray
    user_cold: bool
    outside: str | None = None  # why the request time lies outside the data (time_outside_data), or None

    def flags(self) -> dict[str, Any]:
        """The answer's flag that the request time lies outside the data, and the warnings that say why."""
        return {"time_outside_data": self.outside is not None, "warnings": [self.outside] if self.outside else []}


def model_inputs(reader, user_id: str, item_ids: list[str], request_ts: float,
                 context: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, bool]:
    """The model's input columns: the feature service's plus the request's context columns.

    Context columns are those the log carried at training time (``device``, a declared ``context``
    column) and come from the request's ``context``; one the request leaves out is missing (the model's
    unknown code, or the training mean). ``position`` defaults to 0: the slot is not known yet, and
    scoring every candidate as if shown first takes the position effect out of the comparison.
    """
    cols, item_known, user_known = reader.columns(user_id, item_ids, request_ts)
    n = len(item_ids)
    for name, value in {"position": 0, **(context or {})}.items():
        cols[name] = np.full(n, value, dtype=np.float64 if isinstance(value, (int, float)) and
                             not isinstance(value, bool) else object)
    return cols, item_known, user_known


def score(model: Model, reader, user_id: str, item_ids: list[str], *, request_ts: float | None = None,
          context: dict[str, Any] | None = None, clock=OFF) -> Scored:
    """Every task's output for each item; ``clock`` (``services.stopwatch``) takes a lap after each stage."""
    ts = time.time() if request_ts is None else float(request_ts)
    cols, item_known, user_known = model_inputs(reader, user_id, item_ids, ts, context)  # raises StoreUnavailable
    clock.lap("features")
    scorer = model.scorer
    cat, num = scorer.encode(cols)
    clock.lap("encode")
    raw = scorer.score_codes(cat, num)
    clock.lap("forward")
    probs = scorer.calibration.apply(raw)
    bad = [k for k, v in probs.items() if not np.isfinite(v).all()]
    if bad:
        raise NonFiniteScores(f"non-finite scores for {bad}")
    scored = Scored(frame=cols, probs=probs, item_cold=~np.asarray(item_known, dtype=bool), user_cold=not user_known,
                    outside=time_outside_data(model.span, ts))
    clock.lap("calibrate")
    return scored


def resolve_weights(model: Model, weights: dict[str, float] | None) -> dict[str, float]:
    """The request's weights (replacing the defaults: an objective left out weighs 0), checked."""
    if weights is None:
        return dict(model.weights)
    known = model.objectives
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise RequestError("weights", f"unknown objective(s) {unknown}; this model ranks by {known}")
    if not any(w > 0 for w in weights.values()):
        raise RequestError("weights", "at least one objective needs a positive weight")
    return {k: float(v) for k, v in weights.items()}


def mmr(relevance: np.ndarray, categories: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """Indices of the top ``k`` by maximal marginal relevance.

    Each step picks ``argmax lambda * rel - (1 - lambda) * max_sim`` with ``lambda = 1 - diversity``,
    relevance min-max scaled to [0, 1] over the candidates and similarity 1 between items of the same
    category (an item of unknown category is similar to none). Ties go to the more relevant item, so
    diversity 0 is the relevance order and diversity 1 takes a new category whenever one is left.
    """
    n = len(relevance)
    k = min(k, n)
    order = np.argsort(-relevance, kind="stable")
    if diversity <= 0 or k <= 1:
        return order[:k]
    rel = relevance[order].astype(np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.ones_like(rel)
    cats = pd.Series(categories[order], dtype=object)
    codes = np.where(cats.isna(), -1 - np.arange(n), pd.factorize(cats.fillna(""))[0])  # unknown: unique code
    lam = 1.0 - diversity
    taken = np.zeros(n, dtype=bool)
    seen_code: set[int] = set()
    max_sim = np.zeros(n)
    picked: list[int] = []
    for _ in range(k):
        gain = lam * rel - (1.0 - lam) * max_sim
        gain[taken] = -np.inf
        j = int(np.argmax(gain))  # first maximum: the most relevant among ties (rel is sorted)
        picked.append(j)
        taken[j] = True
        if codes[j] not in seen_code:
            seen_code.add(int(codes[j]))
            max_sim[codes == codes[j]] = 1.0
    return order[np.asarray(picked, dtype=np.int64)]


def order(probs: dict[str, np.ndarray], weights: dict[str, float], fusion: str, categories: np.ndarray, k: int,
          diversity: float, novelty: float = 0.0, tail: np.ndarray | None = None,
          seen: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fused scores and the shown candidates' indices, slot by slot: what one weighting would show.

    ``novelty`` (0-1) blends the fused score (min-max scaled) with the candidates' long-tail score ``tail``
    and scales down the items the user already interacted with (``seen``) by ``1 - novelty``; diversity
    re-ranks what comes out. At 0 the order is the fused score's.
    """
    fused = fuse(probs, weights, method=fusion)
    key = fused
    if novelty > 0:
        key = _unit(fused)
        if tail is not None:
            key = (1.0 - novelty) * key + novelty * _unit(tail)
        if seen is not None:
            key = np.where(seen, key * (1.0 - novelty), key)
    return fused, mmr(key, categories, k, diversity)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    span = x.max() - x.min() if len(x) else 0.0
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def tail_scores(frame: dict[str, np.ndarray], primary: str | None) -> np.ndarray | None:
    """How far in the long tail each candidate is: ``-log(1 + n)``, ``n`` the item's count of the primary
    task over the longest window the feature store keeps (its popularity feature); None when it has none."""
    from feature_repo.schema import WINDOWS, count_column

    for window in sorted(WINDOWS, reverse=True):
        column = count_column("item", primary or "", window)
        if column in frame:
            counts = np.nan_to_num(np.asarray(frame[column], dtype=np.float64), nan=0.0)
            return -np.log1p(np.clip(counts, 0.0, None))
    return None


def rank(model: Model, reader, user_id: str, candidates: list[str], *, k: int | None = None,
         weights: dict[str, float] | None = None, diversity: float = 0.0, fusion: str | None = None,
         request_ts: float | None = None, context: dict[str, Any] | None = None,
         explore: Exploration | None = None, rng=None, novelty: float = 0.0,
         seen_items: set[str] | None = None, clock=OFF) -> dict[str, Any]:
    """The ranked top ``k`` with fused and per-objective scores; plain data, ready for JSON.

    ``novelty`` favours the long tail and demotes ``seen_items`` (what the user already interacted with);
    see ``order``.

    Besides the answer, two keys for the impression log (the service removes them from the response):
    ``propensities``, one per returned item, and ``policy``: what served it (``source``: ``model`` or
    ``request``, the ``fusion`` version, ``explore`` and its ``epsilon`` and ``spread``) and, when this request
    was explored, ``vectors``, ``probabilities``, the ``chosen`` index and each vector's ``expected`` objectives
    (the sum of each objective's probability over the items that vector would show). ``weights`` in the answer
    is the vector that ranked it.
    """
    if k is not None and not 1 <= k <= len(candidates):
        raise RequestError("k", f"must be between 1 and the number of candidates ({len(candidates)}), got {k}")
    w = resolve_weights(model, weights)
    fusion = fusion or model.scorer.fusion_method
    s = score(model, reader, user_id, candidates, request_ts=request_ts, context=context, clock=clock)
    cats = np.asarray(s.frame["category"], dtype=object) if "category" in s.frame else np.full(len(candidates), None)
    shown = k or len(candidates)
    extra: dict[str, Any] = {}
    if novelty > 0:
        primary = getattr(model.scorer.tasks, "primary", None) or next(
            (t.name for t in model.scorer.tasks if t.type == "binary"), None)
        extra = {"novelty": float(novelty), "tail": tail_scores(s.frame, primary),
                 "seen": np.array([c in seen_items for c in candidates]) if seen_items else None}
    explore = explore or Exploration()
    policy: dict[str, Any] = {"source": "request" if weights is not None else "model", "fusion": model.fusion,
                              "explore": explore.policy}
    if explore.on:
        policy.update(epsilon=float(explore.epsilon), spread=float(explore.spread))
    if explore.on and weights is None:  # a caller's explicit weights are never explored
        vectors = weight_vectors(w, explore.spread)
        probabilities = policy_probabilities(len(vectors), explore.epsilon)
        chosen = choose(probabilities, rng if rng is not None else np.random.default_rng())
        ranked = [order(s.probs, v, fusion, cats, shown, diversity, **extra) for v in vectors]  # scored once
        w = vectors[chosen]
        fused, top = ranked[chosen]
        prop = propensities([r[1] for r in ranked], probabilities, chosen)
        # the reward model of doubly robust estimates: what each vector's list would show, objective by objective
        expected = [{o: float(s.probs[o][r[1]].sum()) for o in model.objectives if o in s.probs} for r in ranked]
        policy.update(vectors=vectors, probabilities=probabilities, chosen=chosen, expected=expected)
    else:
        fused, top = order(s.probs, w, fusion, cats, shown, diversity, **extra)
        prop = np.ones(len(top))
    if not np.isfinite(fused).all():
        raise NonFiniteScores("non-finite fused scores")
    clock.lap("fuse and re-rank")
    before = np.empty(len(fused), dtype=np.int64)
    before[np.argsort(-fused, kind="stable")] = np.arange(1, len(fused) + 1)
    objectives = model.objectives
    items = [{"item_id": candidates[i], "score": _num(fused[i]),
              "scores": {o: _num(s.probs[o][i]) for o in objectives if o in s.probs},
              "rank_before_rerank": int(before[i]), "cold_start": bool(s.item_cold[i])} for i in top]
    out = {"model_version": model.tag, "user_id": user_id, "user_cold_start": s.user_cold, "weights": w,
           "fusion": fusion, "diversity": float(diversity), "novelty": float(novelty), "items": items,
           **s.flags(), "propensities": [float(p) for p in prop], "policy": policy}
    clock.lap("answer")
    return out


def score_items(model: Model, reader, user_id: str, items: list[str], *, request_ts: float | None = None,
                context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every task's output (binary probabilities and regression outputs) per item, in request order."""
    s = score(model, reader, user_id, items, request_ts=request_ts, context=context)
    return {"model_version": model.tag, "user_id": user_id, "user_cold_start": s.user_cold, **s.flags(),
            "items": [{"item_id": it, "scores": {t: _num(p[i]) for t, p in s.probs.items()},
                       "cold_start": bool(s.item_cold[i])} for i, it in enumerate(items)]}


def check_events(model: Model, events: dict[str, float]) -> dict[str, float]:
    """Feedback events named by the model's declared tasks, each value in its task's domain.

    Binary: 0 or 1; multiclass: a class index; regression: a finite number (not below 0 for a task trained on
    ``log1p``). A wrong name or value is a ``RequestError`` naming ``events.<name>``.
    """
    tasks = {t.name: t for t in model.scorer.tasks}
    out = {}
    for name, value in events.items():
        field = f"events.{name}"
        task = tasks.get(name)
        if task is None:
            raise RequestError(field, f"unknown event; this model's tasks are {sorted(tasks)}")
        value = float(value)
        if task.type == "binary" and value not in (0.0, 1.0):
            raise RequestError(field, f"must be 0 or 1 (task {name} is binary), got {value:g}")
        if task.type == "multiclass" and (value != int(value) or not 0 <= value < task.num_classes):
            raise RequestError(field, f"must be a class index 0..{task.num_classes - 1}, got {value:g}")
        if task.type == "regression" and task.transform == "log1p" and value < 0:
            raise RequestError(field, f"must not be negative (task {name} is trained on log1p), got {value:g}")
        out[name] = value
    return out


def _num(x) -> float:
    return float(x)  # finite: score() and rank() refuse anything else
