"""The BentoML ranking service: ``bentoml serve services.service:RankingService``.

Configuration is the ``MTLREC_*`` environment (``models.settings``; ``mtlrec settings`` lists every variable,
its value and what it does). The request bounds, worker count and access log are read when this module is
imported; the dataset (``MTLREC_DATASET``), online store, timeouts and reload polling when a worker starts; the
admin token on every ``POST /admin/reload``. ``BENTOML_HOME`` is the model store: the production model is what
``services.registry.production()`` names. With several workers ``/admin/reload`` reaches the one worker that receives
it, so each worker also follows the production pointer by itself (``MTLREC_RELOAD_POLL_S``), and SIGHUP to the
server is forwarded to every worker (``services.server``).

Errors: a bad request (an unknown field too) answers 400 with ``{"error", "detail": [{"loc": [field, ...], "msg",
"type"}]}``, the shape BentoML's own validation uses; no production model or an unavailable online store answers
503 with ``{"error": ...}``; non-finite scores and bugs answer 500 with an ``error_id`` found in the log.
``/readyz`` is 200 only while a model is loaded and the online store holds rows for entities it must hold.
Reload swaps one reference: a request in flight keeps the model object it started with.
"""

from __future__ import annotations

import hmac
import logging
import os
import random
import signal
import threading
import time
import uuid
from typing import Optional

import bentoml
from starlette.responses import JSONResponse

from models.settings import get_settings
from services import ranking
from services.middleware import BoundedJson, DocsRedirect, JsonOnly, RecycleConnections, harden_uvicorn
from services.schemas import (Candidates, Context, Diversity, Events, FeedbackResponse, Fusion, Id, K, RankResponse,
                              ReloadResponse, ScoreResponse, Weights)

log = logging.getLogger("mtlrec.service")

_requests = bentoml.metrics.Counter(name="mtlrec_requests",
                                    documentation="Ranking API requests by endpoint and outcome",
                                    labelnames=["endpoint", "outcome"])
_event_drops = bentoml.metrics.Counter(name="mtlrec_event_drops",
                                       documentation="Impression-log rows dropped (queue full or event database "
                                                     "unavailable); the ranking requests themselves were answered")


def _bad(field: str, reason: str, kind: str = "value_error", status: int = 400) -> JSONResponse:
    return JSONResponse({"error": f"invalid {field}: {reason}",
                         "detail": [{"type": kind, "loc": field.split("."), "msg": reason}]}, status_code=status)


def _unavailable(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=503)


def _internal(error: BaseException, message: str) -> JSONResponse:
    """A 500 whose id finds the traceback in the log."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error %s: %s", error_id, message, exc_info=error)
    return JSONResponse({"error": message, "error_id": error_id}, status_code=500)


def _context(context: Optional[Context]) -> tuple[Optional[float], dict]:
    """The request time (epoch seconds, None for now) and the context columns the model may read."""
    ctx = context or Context()
    extra = {k: v for k, v in (ctx.model_extra or {}).items() if isinstance(v, (str, int, float, bool))}
    if ctx.device is not None:
        extra["device"] = ctx.device
    return (ctx.timestamp.timestamp() if ctx.timestamp else None), extra


class RecentRequests:
    """The items of this worker's last answers, so feedback does not wait for the log's writer.

    Feedback on an answer another worker gave is checked against the database instead.
    """

    def __init__(self, capacity: int = 50_000):
        from collections import OrderedDict

        self.capacity = capacity
        self._items: "OrderedDict[str, set[str]]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, request_id: str, items: set[str]) -> None:
        with self._lock:
            self._items[request_id] = items
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def items(self, request_id: str) -> Optional[set[str]]:
        with self._lock:
            return self._items.get(request_id)


_SERVICES: list = []


def _on_hup(*_) -> None:
    """Reload every service of this worker in a thread: the worker keeps answering while the model loads."""
    for service in list(_SERVICES):
        threading.Thread(target=service._load_quietly, daemon=True, name="mtlrec-sighup").start()


try:  # at import, in the worker's main thread (a handler cannot be installed from another thread)
    signal.signal(signal.SIGHUP, _on_hup)
except ValueError:
    pass


_SETTINGS = get_settings()  # what shapes the service itself: read once, when its module is imported


@bentoml.service(name="mtlrec", workers=_SETTINGS.workers, traffic={"timeout": 30},
                 logging={"access": {"enabled": _SETTINGS.access_log}})
class RankingService:
    def __init__(self) -> None:
        os.environ.setdefault("FEAST_USAGE", "False")
        import torch

        env = get_settings()  # this worker's, read as it starts
        # One request's forward pass is small: intra-op threads only contend with the other requests (5x slower
        # on two busy cores). Scale out with workers instead.
        torch.set_num_threads(env.torch_threads)
        from feature_repo.online import FeatureReader
        from feature_repo.store import StoreSettings, open_store

        self.dataset = env.dataset
        self.settings = StoreSettings.for_dataset(self.dataset)
        # A store outage must cost a request milliseconds: bounded timeouts, no client retries, a breaker.
        self.reader = FeatureReader.for_serving(open_store(self.settings, serving=True),
                                                connect_timeout_s=env.store_connect_timeout_ms / 1000,
                                                read_timeout_s=env.store_read_timeout_ms / 1000,
                                                cooldown_s=env.store_cooldown_ms / 1000)
        self.model: Optional[ranking.Model] = None
        self._reload_lock = threading.Lock()
        self.events = None  # the impression log (services/events.py); MTLREC_EVENTS_URL=off turns it off
        if env.events_url.strip().lower() != "off":
            from services.events import EventStore, ImpressionLog

            store = EventStore.for_dataset(self.dataset, env.events_url or None)
            try:
                store.create()  # here, so that feedback finds the tables before the first impression is written
            except Exception as e:  # noqa: BLE001 - a down database must not stop the ranking; the writer retries
                log.warning("impression log unavailable at start (rows will be dropped until it answers): %s", e)
            self.events = ImpressionLog(store, capacity=env.events_queue_rows, on_drop=_event_drops.inc)
        # MTLREC_EXPLORE: requests without weights may be ranked with a nearby weighting (services/ranking.py).
        # random.Random.random() is one C call, safe across the request threads without a lock.
        self.explore = ranking.Exploration.from_settings(env)
        self._rng = random.Random()
        self._recent = RecentRequests()  # feedback on a request whose rows are still queued finds them here
        try:
            self._load()
        except Exception as e:  # noqa: BLE001 - serve (not ready) and let a reload fix it
            log.error("no production model loaded: %s", e)
        if env.reload_poll_s > 0:  # every worker follows the production pointer by itself
            threading.Thread(target=self._follow, args=(env.reload_poll_s,), daemon=True, name="mtlrec-reload").start()
        _SERVICES.append(self)  # SIGHUP (forwarded to this worker by services.server) reloads it in place

    # ---- model ------------------------------------------------------------------------------
    def _load(self) -> tuple[Optional[str], str]:
        from services import registry
        from models.artifact import Scorer

        with self._reload_lock:
            tag = registry.production()
            if tag is None:
                raise LookupError(f"no production model in the registry at {registry.home()}")
            previous = self.model.tag if self.model else None
            if previous != tag:
                tuned = (registry.fusion_of(tag) or {}).get("weights")  # what the gate judged it with
                self.model = ranking.Model.of(tag, Scorer.load(registry.artifact_path(tag)), weights=tuned)
                log.info("serving %s (was %s)", tag, previous)
            return previous, tag

    def _load_quietly(self) -> None:
        try:
            self._load()
        except Exception as e:  # noqa: BLE001
            log.error("reload failed, keeping %s: %s", self.model.tag if self.model else None, e)

    def _follow(self, every_s: float) -> None:
        from services import registry

        while True:
            time.sleep(every_s)
            try:
                current = registry.production()
            except Exception:  # noqa: BLE001 - a torn read is retried on the next tick
                continue
            if current and (self.model is None or current != self.model.tag):
                self._load_quietly()

    def _store_ok(self) -> bool:
        ok, why = self.reader.ready()  # a real read of entities the store must hold; fails fast while it is down
        if not ok:
            log.warning("not ready: %s", why)
        return ok

    def __is_ready__(self) -> bool:
        return self.model is not None and self._store_ok()

    # ---- API --------------------------------------------------------------------------------
    @bentoml.api(route="/rank")
    def rank(self, user_id: Id, candidates: Candidates, context: Optional[Context] = None, k: K = None,
             weights: Weights = None, diversity: Diversity = 0.0, fusion: Optional[Fusion] = None,
             novelty: Diversity = 0.0) -> RankResponse:
        """Rank candidate items for a user: fused score, each objective's score, rank before re-ranking.

        ``weights`` are keyed by the model's objectives (its declared binary tasks); ``fusion`` defaults to the
        model's own method. Without ``weights`` the model's fusion weights rank, or, with ``MTLREC_EXPLORE=epsilon``,
        a nearby weighting drawn at random; the answer's ``weights`` are the ones used.
        """
        ts, extra = _context(context)
        request_id = uuid.uuid4().hex

        def answer(model):
            out = ranking.rank(model, self.reader, user_id, list(candidates), k=k, weights=weights,
                               diversity=diversity, fusion=fusion, request_ts=ts, context=extra,
                               explore=self.explore, rng=self._rng, novelty=novelty,
                               seen_items=self._interacted(user_id) if novelty > 0 else None)
            propensities, policy = out.pop("propensities"), out.pop("policy")  # the log's, not the response's
            out["request_id"] = request_id
            self._log(request_id, ts, out, extra, propensities, policy)
            return out

        return self._answer("rank", RankResponse, answer)

    def _interacted(self, user_id: str) -> Optional[set[str]]:
        """What the user gave positive feedback on, for ``novelty``; nothing when the log is off or down."""
        if self.events is None:
            return None
        from services.events import EventStoreError

        try:
            return self.events.store.interacted(user_id)
        except EventStoreError as e:
            log.warning("novelty without the user's history: %s", e)
            return None

    def _log(self, request_id: str, ts: Optional[float], answer: dict, context: dict, propensities: list,
             policy: dict) -> None:
        """Queue the answer's rows (never blocks, never raises), each with its placement's propensity."""
        if self.events is None:
            return
        from services.events import Ranked

        self._recent.add(request_id, {it["item_id"] for it in answer["items"]})
        self.events.log(Ranked(request_id, time.time() if ts is None else ts, answer, propensities, context, policy))

    @bentoml.api(route="/feedback")
    def feedback(self, request_id: Id, item_id: Id, events: Events) -> FeedbackResponse:
        """What the user did with an item a ``/rank`` answer showed: ``events`` keyed by the model's tasks.

        Idempotent on (request, item, event): a repeat is reported under ``duplicates`` and changes nothing.
        """
        model = self.model
        if self.events is None:
            _requests.labels("feedback", "unavailable").inc()
            return _unavailable("the impression log is off (MTLREC_EVENTS_URL=off): feedback cannot be recorded")
        if model is None:
            _requests.labels("feedback", "unavailable").inc()
            return _unavailable("no production model is loaded to check the events against")
        from services.events import EventStoreError

        try:
            checked = ranking.check_events(model, events)
            shown = self._recent.items(request_id)
            if shown is None:
                shown = set(self.events.store.shown(request_id))
            if not shown:
                raise ranking.RequestError("request_id", "unknown: no ranking answer with this id was logged "
                                                         "(or it was dropped)")
            if item_id not in shown:
                raise ranking.RequestError("item_id", f"{item_id!r} was not in the answer to this request")
            new = self.events.store.record_feedback(request_id, item_id, checked)
        except ranking.RequestError as e:
            _requests.labels("feedback", "bad_request").inc()
            return _bad(e.field, e.reason, status=404 if e.field in ("request_id", "item_id") else 400)
        except EventStoreError as e:
            _requests.labels("feedback", "unavailable").inc()
            return _unavailable(str(e))
        except Exception as e:  # noqa: BLE001 - a bug: 500 with an id
            _requests.labels("feedback", "error").inc()
            return _internal(e, "internal error")
        _requests.labels("feedback", "ok").inc()
        return FeedbackResponse(request_id=request_id, item_id=item_id, recorded=new,
                                duplicates=[n for n in checked if n not in new])

    @bentoml.on_shutdown
    def _flush_events(self) -> None:
        if self.events is not None:
            self.events.close()

    @bentoml.api(route="/score")
    def score(self, user_id: Id, items: Candidates, context: Optional[Context] = None) -> ScoreResponse:
        """Raw per-objective scores of (user, item) pairs, in request order."""
        ts, extra = _context(context)
        return self._answer("score", ScoreResponse, lambda model: ranking.score_items(
            model, self.reader, user_id, list(items), request_ts=ts, context=extra))

    def _answer(self, endpoint: str, response, compute):
        """One model snapshot per request (a reload mid-request cannot mix two), errors mapped to 4xx/503."""
        model = self.model
        if model is None:
            _requests.labels(endpoint, "unavailable").inc()
            return _unavailable("no production model is loaded")
        try:
            out = compute(model)
        except ranking.RequestError as e:
            _requests.labels(endpoint, "bad_request").inc()
            return _bad(e.field, e.reason)
        except ranking.StoreUnavailable as e:
            _requests.labels(endpoint, "unavailable").inc()
            return _unavailable(str(e))
        except ranking.NonFiniteScores as e:
            _requests.labels(endpoint, "nonfinite").inc()
            return _internal(e, f"model {model.tag} produced non-finite scores")
        except Exception as e:  # noqa: BLE001 - a bug, not the client's fault nor the store's: 500 with an id
            _requests.labels(endpoint, "error").inc()
            return _internal(e, "internal error")
        _requests.labels(endpoint, "ok").inc()
        return response(**out)

    @bentoml.api(route="/admin/reload")
    def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Load the model production points to now; authenticated by ``MTLREC_ADMIN_TOKEN``."""
        expected = get_settings().admin_token.get_secret_value()  # read per call, as it always was
        headers = ctx.request.headers
        given = headers.get("x-admin-token") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        def refuse(status: int, message: str) -> JSONResponse:
            ctx.response.status_code = status  # with a context parameter BentoML takes the status from it
            return JSONResponse({"error": message}, status_code=status)

        if not expected:
            return refuse(403, "reload over HTTP is disabled: MTLREC_ADMIN_TOKEN is not set")
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            return refuse(401, "missing or wrong admin token")
        try:
            previous, tag = self._load()
        except Exception as e:  # noqa: BLE001 - keep serving the old model
            return refuse(503, f"reload failed, still serving {self.model.tag if self.model else None}: {e}")
        return ReloadResponse(model_version=tag, previous=previous, changed=previous != tag)


# The fields each JSON route takes: those of its API's input model, built by BentoML from the method's signature.
FIELDS = {api.route: set(api.input_spec.model_fields) for api in RankingService.apis.values()}
harden_uvicorn(_SETTINGS.header_timeout_s)
RankingService.add_asgi_middleware(BoundedJson, fields=FIELDS, max_bytes=_SETTINGS.max_body_bytes)
RankingService.add_asgi_middleware(JsonOnly)
RankingService.add_asgi_middleware(DocsRedirect)
# One worker has nobody to hand connections to; several share one listening socket unevenly (see the middleware).
RankingService.add_asgi_middleware(RecycleConnections, limit=_SETTINGS.keepalive_requests)  # 16 with several
