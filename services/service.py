"""The BentoML ranking service: ``bentoml serve services.service:RankingService``.

Configuration is the ``MTLREC_*`` environment (``models.settings``; ``mtlrec settings`` lists every variable,
its value and what it does). The request bounds, worker count and access log are read when this module is
imported; the dataset (``MTLREC_DATASET``), online store, timeouts and reload polling when a worker starts; the
admin token on every ``POST /admin/reload``. ``BENTOML_HOME`` is the model store: the production model is what
``services.registry.production()`` names. With several workers ``/admin/reload`` reaches the one worker that receives
it, so each worker also follows the production pointer by itself (``MTLREC_RELOAD_POLL_S``), and SIGHUP to the
server is forwarded to every worker (``services.server``).

The impression log never stands in a ranking's way: ``/rank`` queues its answer for the log's writer thread
(``services/event_writer.py``) and reads a user's history for ``novelty`` from memory (``services/recent.py``);
``/feedback`` and ``/admin/reload`` are async endpoints whose database and model-loading work runs on executors of
their own, never on the thread that answers ``/rank``. ``/feedback`` needs the ``feedback_token`` of the answer it
labels (``services/feedback_token.py``).

Errors: a bad request (an unknown field too) answers 400 with ``{"error", "detail": [{"loc": [field, ...], "msg",
"type"}]}``, the shape BentoML's own validation uses; no production model or an unavailable online store answers
503 with ``{"error": ...}``; non-finite scores and bugs answer 500 with an ``error_id`` found in the log.
``/readyz`` is 200 only while a model is loaded and the online store holds rows for entities it must hold.
Reload swaps one reference: a request in flight keeps the model object it started with.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import random
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import bentoml
from starlette.responses import JSONResponse

from models.settings import get_settings
from services import ranking
from services.breaker import Breaker, Busy
from services.events import new_request_id
from services.middleware import BoundedJson, DocsRedirect, JsonOnly, RecycleConnections, harden_uvicorn
from services.request_context import declared_context, request_time
from services.schemas import (Candidates, Diversity, Events, FeedbackResponse, Fusion, Id, K, RankResponse,
                              ReloadResponse, ScoreResponse, Token, Weights, context_model)

log = logging.getLogger("mtlrec.service")

_requests = bentoml.metrics.Counter(name="mtlrec_requests",
                                    documentation="Ranking API requests by endpoint and outcome",
                                    labelnames=["endpoint", "outcome"])
_writer_cpu = bentoml.metrics.Counter(name="mtlrec_event_writer_cpu_seconds",
                                      documentation="CPU seconds the impression log's writer thread spent (what "
                                                    "the log costs the worker, beside the requests it answers)")
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


DB_QUEUE = 64  # feedback calls waiting for the event database at once, per worker; beyond, 503 at once


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
_CONTEXT_COLUMNS, _DATA_START = declared_context(_SETTINGS.dataset)
Context = context_model(_CONTEXT_COLUMNS)  # the OpenAPI schema lists the dataset's own context columns


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
        from services.feedback_token import Tokens
        from services.recent import Answers, History

        self.dataset = env.dataset
        self.settings = StoreSettings.for_dataset(self.dataset)
        # A store outage must cost a request milliseconds: bounded timeouts, no client retries, a breaker.
        self.reader = FeatureReader.for_serving(open_store(self.settings, serving=True),
                                                connect_timeout_s=env.store_connect_timeout_ms / 1000,
                                                read_timeout_s=env.store_read_timeout_ms / 1000,
                                                cooldown_s=env.store_cooldown_ms / 1000)
        self.model: Optional[ranking.Model] = None
        self._reload_lock = threading.Lock()
        # Model loading for /admin/reload, off the thread that answers /rank.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtlrec-reload")
        try:
            self.tokens = Tokens.from_settings(env.feedback_secret.get_secret_value())
        except (OSError, ValueError) as e:  # `mtlrec serve` checks this first; a worker must not crash-loop on it
            log.error("no shared feedback secret (%s): this worker signs with its own, which no other replica "
                      "accepts; set MTLREC_FEEDBACK_SECRET", e)
            self.tokens = Tokens(os.urandom(32))
        memory = env.events_memory_mb << 20
        self._answers = Answers(max_bytes=memory)  # feedback checks this worker's answers here first
        self._history = History(max_bytes=memory // 2)  # what each user liked, for novelty
        self._feedback_wait_s = env.feedback_wait_ms / 1000
        self.events = None  # the impression log (services/events.py); MTLREC_EVENTS_URL=off turns it off
        if env.events_url.strip().lower() != "off":
            self._start_log(env)
        # MTLREC_EXPLORE: requests without weights may be ranked with a nearby weighting (services/ranking.py).
        # random.Random.random() is one C call, safe across the request threads without a lock.
        self.explore = ranking.Exploration.from_settings(env)
        self._rng = random.Random()
        try:
            self._load()
        except Exception as e:  # noqa: BLE001 - serve (not ready) and let a reload fix it
            log.error("no production model loaded: %s", e)
        if env.reload_poll_s > 0:  # every worker follows the production pointer by itself
            threading.Thread(target=self._follow, args=(env.reload_poll_s,), daemon=True, name="mtlrec-reload").start()
        _SERVICES.append(self)  # SIGHUP (forwarded to this worker by services.server) reloads it in place

    def _start_log(self, env) -> None:
        """The impression log's writer, and the executor feedback's database work runs on (a few threads, each
        with its own connection; a breaker answers 503 at once while the database is failing)."""
        from services.event_writer import ImpressionLog
        from services.events import Connections, EventStore

        timeout_s = env.events_timeout_ms / 1000
        store = EventStore.for_dataset(self.dataset, env.events_url or None)
        store = EventStore(store.url, connect_timeout_s=timeout_s)
        retention = env.events_retention_days * 86_400 or None
        self.events = ImpressionLog(store, capacity=env.events_queue_rows, on_drop=_event_drops.inc,
                                    on_outcome=self._settled, retry_s=max(timeout_s, 0.5), retention_s=retention,
                                    on_feedback=lambda rows: self._history.add((u, i) for u, i, _ in rows),
                                    follow_s=1.0, follow_from=30 * 86_400, on_cpu=_writer_cpu.inc)
        self._db = Connections(store)
        self._db_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mtlrec-feedback")
        self._db_breaker = Breaker(store.where(), cooldown_s=max(timeout_s, 0.5))
        self._db_waiting = 0  # feedback calls on the executor now; beyond DB_QUEUE they answer 503 at once
        self._db_timeout_s = 2 * timeout_s + 1.0

    def _settled(self, requests, written: bool, reason: str) -> None:
        self._answers.settle((r.request_id for r in requests), written, reason)

    # ---- model ------------------------------------------------------------------------------
    def _load(self) -> tuple[Optional[str], str]:
        """Serve what the production pointer names now: its model and its fusion weights' version."""
        from services import registry
        from models.scoring.artifact import Scorer

        with self._reload_lock:
            live = registry.serving()
            if live is None:
                raise LookupError(f"no production model in the registry at {registry.home()}")
            model = self.model
            previous = f"{model.tag}#{model.fusion}" if model else None
            if model is None or model.tag != live.tag:
                model = ranking.Model.of(live.tag, Scorer.load(registry.artifact_path(live.tag)), live.weights,
                                         live.fusion)
            elif model.fusion != live.fusion:
                model = model.with_fusion(live.weights, live.fusion)
            if model is not self.model:
                self.model = model
                log.info("serving %s with fusion %s (was %s)", model.tag, model.fusion, previous)
            return previous, f"{model.tag}#{model.fusion}"

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
                live = registry.serving()
            except Exception:  # noqa: BLE001 - a torn read is retried on the next tick
                continue
            model = self.model
            if live and (model is None or (live.tag, live.fusion) != (model.tag, model.fusion)):
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
        a nearby weighting drawn at random; the answer's ``weights`` are the ones used. ``feedback_token`` in the
        answer is what ``/feedback`` on it needs.
        """
        request_id = new_request_id()

        def answer(model):
            ts, extra = request_time(context, _DATA_START)
            out = ranking.rank(model, self.reader, user_id, list(candidates), k=k, weights=weights,
                               diversity=diversity, fusion=fusion, request_ts=ts, context=extra,
                               explore=self.explore, rng=self._rng, novelty=novelty,
                               seen_items=self._history.items(user_id) if novelty > 0 else None)
            propensities, policy = out.pop("propensities"), out.pop("policy")  # the log's, not the response's
            out["request_id"] = request_id
            out["feedback_token"] = self.tokens.sign(request_id)
            self._log(request_id, ts, out, extra, propensities, policy)
            return out

        return self._answer("rank", RankResponse, answer)

    def _log(self, request_id: str, ts: Optional[float], answer: dict, context: dict, propensities: list,
             policy: dict) -> None:
        """Queue the answer's rows (never blocks, never raises), stamped with the server's clock; the client's
        feature time, when it sent one, is kept in the context."""
        if self.events is None:
            return
        from services.events import Ranked

        user, items = answer["user_id"], [it["item_id"] for it in answer["items"]]
        self._answers.add(request_id, user, items)
        logged = {**context, "timestamp": ts} if ts is not None else context
        self.events.log(Ranked(request_id, time.time(), answer, propensities, logged, policy))

    @bentoml.api(route="/feedback")
    async def feedback(self, request_id: Id, item_id: Id, events: Events, token: Token = None) -> FeedbackResponse:
        """What the user did with an item a ``/rank`` answer showed: ``events`` keyed by the model's tasks, and
        ``token``, the answer's ``feedback_token``.

        Recorded only for an answer whose rows are in the log: 409 if they were dropped, 503 if they are not
        written yet (retry). Idempotent on (request, item, event): a repeat is reported under ``duplicates``.
        """
        if not token:
            return self._refuse("feedback", 401, "token", "missing: send the feedback_token of the /rank answer")
        if not self.tokens.valid(request_id, token):
            return self._refuse("feedback", 403, "token", "does not match this request_id")
        model = self.model
        if self.events is None:
            _requests.labels("feedback", "unavailable").inc()
            return _unavailable("the impression log is off (MTLREC_EVENTS_URL=off): feedback cannot be recorded")
        if model is None:
            _requests.labels("feedback", "unavailable").inc()
            return _unavailable("no production model is loaded to check the events against")
        from services.events import EventStoreError
        from services.recent import DROPPED, QUEUED

        try:
            checked = ranking.check_events(model, events)
            answer = self._answers.get(request_id)
            if answer is not None:
                deadline = time.monotonic() + self._feedback_wait_s
                while answer.state == QUEUED and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                if answer.state == DROPPED:
                    return self._refuse("feedback", 409, "request_id", f"its rows are not in the impression log: "
                                                                       f"{answer.reason}")
                if answer.state == QUEUED:
                    _requests.labels("feedback", "unavailable").inc()
                    return _unavailable("the answer is not written to the impression log yet: retry")
                shown, user = answer.items, answer.user_id
            else:  # another worker's answer (or an old one): the log says what it showed
                logged = await self._logged(request_id)
                if not logged:  # the token is valid, so a worker did answer it: its rows are not in the log
                    return self._refuse("feedback", 409, "request_id", "its rows are not in the impression log "
                                        f"after {self._feedback_wait_s:g} s: dropped, pruned, or not written yet")
                shown, user = set(logged), next(v["user_id"] for v in logged.values())
            if item_id not in shown:
                raise ranking.RequestError("item_id", f"{item_id!r} was not in the answer to this request")
            new = await self._database("record_feedback", request_id, item_id, checked)
        except ranking.RequestError as e:
            _requests.labels("feedback", "bad_request").inc()
            return _bad(e.field, e.reason, status=404 if e.field in ("request_id", "item_id") else 400)
        except (EventStoreError, TimeoutError, Busy) as e:
            _requests.labels("feedback", "unavailable").inc()
            return _unavailable(str(e) or "the event database did not answer in time")
        except Exception as e:  # noqa: BLE001 - a bug: 500 with an id
            _requests.labels("feedback", "error").inc()
            return _internal(e, "internal error")
        if user is not None and any(checked[n] > 0 for n in new):
            self._history.add([(user, item_id)])
        _requests.labels("feedback", "ok").inc()
        return FeedbackResponse(request_id=request_id, item_id=item_id, recorded=new,
                                duplicates=[n for n in checked if n not in new])

    async def _logged(self, request_id: str) -> dict:
        """What the log holds of an answer another worker gave, waiting up to the feedback wait for its writer."""
        deadline, pause = time.monotonic() + self._feedback_wait_s, 0.02
        logged = await self._database("shown", request_id)
        while not logged and time.monotonic() + pause < deadline:
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.32)
            logged = await self._database("shown", request_id)
        return logged

    async def _database(self, method: str, *args):
        """``EventStore.<method>(*args)`` on the feedback executor: bounded in time and in calls waiting, and
        refused at once while the breaker is open."""
        from services.events import EventStoreError

        self._db_breaker.check()
        if self._db_waiting >= DB_QUEUE:
            raise Busy(f"{self._db_waiting} feedback calls are waiting for the event database: retry")
        self._db_waiting += 1
        try:
            call = asyncio.get_running_loop().run_in_executor(self._db_pool, lambda: self._db.run(method, *args))
            try:
                result = await asyncio.wait_for(call, self._db_timeout_s)
            except EventStoreError as e:
                self._db_breaker.failure(e)
                raise
            except asyncio.TimeoutError as e:
                self._db_breaker.failure(e)
                raise TimeoutError(f"the event database {self._db.store.where()} did not answer in "
                                   f"{self._db_timeout_s:.1f} s") from None
            self._db_breaker.success()
            return result
        finally:
            self._db_waiting -= 1

    def _refuse(self, endpoint: str, status: int, field: str, reason: str) -> JSONResponse:
        _requests.labels(endpoint, "refused" if status in (401, 403, 409) else "bad_request").inc()
        return _bad(field, reason, status=status)

    @bentoml.on_shutdown
    def _flush_events(self) -> None:
        if self.events is not None:
            self.events.close()

    @bentoml.api(route="/score")
    def score(self, user_id: Id, items: Candidates, context: Optional[Context] = None) -> ScoreResponse:
        """Raw per-objective scores of (user, item) pairs, in request order."""
        def compute(model):
            ts, extra = request_time(context, _DATA_START)
            return ranking.score_items(model, self.reader, user_id, list(items), request_ts=ts, context=extra)

        return self._answer("score", ScoreResponse, compute)

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
    async def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Serve what production points to now (model and fusion weights); authenticated by ``MTLREC_ADMIN_TOKEN``.

        The model loads on an executor of its own: requests keep being answered while it does.
        """
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
            previous, now = await asyncio.get_running_loop().run_in_executor(self._loader, self._load)
        except Exception as e:  # noqa: BLE001 - keep serving the old model
            return refuse(503, f"reload failed, still serving {self.model.tag if self.model else None}: {e}")
        tag, fusion = now.split("#", 1)
        return ReloadResponse(model_version=tag, fusion_version=fusion,
                              previous=previous.split("#", 1)[0] if previous else None, changed=previous != now)


# The fields each JSON route takes: those of its API's input model, built by BentoML from the method's signature.
FIELDS = {api.route: set(api.input_spec.model_fields) for api in RankingService.apis.values()}
harden_uvicorn(_SETTINGS.header_timeout_s)
RankingService.add_asgi_middleware(BoundedJson, fields=FIELDS, max_bytes=_SETTINGS.max_body_bytes)
RankingService.add_asgi_middleware(JsonOnly)
RankingService.add_asgi_middleware(DocsRedirect)
# One worker has nobody to hand connections to; several share one listening socket unevenly (see the middleware).
RankingService.add_asgi_middleware(RecycleConnections, limit=_SETTINGS.keepalive_requests)  # 16 with several
