"""The BentoML ranking service: ``bentoml serve services.service:RankingService``.

Configuration is the ``MTLREC_*`` environment (``models.settings``; ``mtlrec settings`` lists every variable,
its value and what it does). The request bounds, worker count and access log are read when this module is
imported; the dataset (``MTLREC_DATASET``), online store, timeouts and reload polling when a worker starts; the
admin token on every ``POST /admin/reload``. ``BENTOML_HOME`` is the model store: the production model is what
``services.production_pointer.serving()`` names, and each worker loads it, reloads it and follows it
(``services/live_model.py``).

The class below is the list of endpoints and their wiring; the work lives beside it. Ranking and scoring are
``services/ranking.py``; the error responses and the request counter ``services/responses.py``; the impression
log ``services/event_log.py``: ``/rank`` queues its answer there and reads a user's history for ``novelty``
from memory, and ``/feedback`` and ``/admin/reload`` run their database and model-loading work on executors
of their own. ``/rank`` and ``/score`` are computed on the worker's event loop itself: their work is CPU-bound
and a worker runs one at a time anyway (one torch thread; scale with workers), and handing each request to a
thread pool and back cost a fifth to a third of the throughput (benchmarks/README.md, "Where a /rank's time
goes"). Nothing in them waits on anything slower than the online store, whose reads are bounded.
``/feedback`` needs the ``feedback_token`` of the answer it labels (``services/feedback_token.py``).
``/readyz`` is 200 only while a model is loaded and the online store holds rows for entities it must hold.
"""

from __future__ import annotations

import hmac
import logging
import os
import random
from typing import Optional

import bentoml
from starlette.responses import JSONResponse

from models.settings import get_settings
from services import ranking
from services.breaker import Busy
from services.event_log import EventLog, NotLogged, NotWrittenYet
from services.event_rows import new_request_id
from services.event_store import EventStoreError
from services.exploration import Exploration
from services.live_model import LiveModel
from services.middleware import BoundedJson, DocsRedirect, JsonOnly, RecycleConnections, harden_uvicorn
from services.request_context import declared_context, request_time
from services.responses import answer, bad, count, internal, refuse, unavailable
from services.stopwatch import OFF
from services.schemas import (Candidates, Diversity, Events, FeedbackResponse, Fusion, Id, K, RankResponse,
                              ReloadResponse, ScoreResponse, Token, Weights, context_model)

log = logging.getLogger("mtlrec.service")

_SETTINGS = get_settings()  # what shapes the service itself: read once, when its module is imported
_CONTEXT_COLUMNS, _DATA_START = declared_context(_SETTINGS.dataset)
Context = context_model(_CONTEXT_COLUMNS)  # the OpenAPI schema lists the dataset's own context columns


@bentoml.service(name="mtlrec", workers=_SETTINGS.workers, traffic={"timeout": 30},
                 logging={"access": {"enabled": _SETTINGS.access_log}})
class RankingService:
    def __init__(self) -> None:
        # Nothing here may raise: a worker whose constructor raises is restarted forever. What can fail (no
        # model, no shared secret, a store down) is logged and leaves the worker not ready or degraded;
        # `mtlrec serve` checks those preconditions before it starts any worker.
        os.environ.setdefault("FEAST_USAGE", "False")
        import torch

        env = get_settings()  # this worker's, read as it starts
        # One request's forward pass is small: intra-op threads only contend with the other requests' threads.
        # Scale out with workers instead.
        torch.set_num_threads(env.torch_threads)
        from feature_repo.online import FeatureReader
        from feature_repo.store import StoreSettings, open_store
        from services.feedback_token import Tokens
        from services.recent import History

        self.dataset = env.dataset
        self.settings = StoreSettings.for_dataset(self.dataset)
        # A store outage must cost a request milliseconds: bounded timeouts, no client retries, a breaker.
        self.reader = FeatureReader.for_serving(open_store(self.settings, serving=True),
                                                connect_timeout_s=env.store_connect_timeout_ms / 1000,
                                                read_timeout_s=env.store_read_timeout_ms / 1000,
                                                cooldown_s=env.store_cooldown_ms / 1000)
        self.live = LiveModel()
        self.tokens = Tokens.for_worker(env.feedback_secret.get_secret_value())
        self.history = History(max_bytes=(env.events_memory_mb << 20) // 2)  # what each user liked, for novelty
        self.events: Optional[EventLog] = None  # MTLREC_EVENTS_URL=off turns the impression log off
        if env.events_url.strip().lower() != "off":
            self.events = EventLog(self.dataset, env, history=self.history)
        # MTLREC_EXPLORE: requests without weights may be ranked with a nearby weighting (services/exploration.py).
        # random.Random.random() is one C call, safe across the request threads without a lock.
        self.explore = Exploration.from_settings(env)
        self._rng = random.Random()
        try:
            self.live.load()
        except Exception as e:  # noqa: BLE001 - serve (not ready) and let a reload fix it
            log.error("no production model loaded: %s", e)
        if env.reload_poll_s > 0:  # every worker follows the production pointer by itself
            self.live.follow(env.reload_poll_s)
        self.live.reload_on_sighup()

    def __is_ready__(self) -> bool:
        if self.live.model is None:
            return False
        ok, why = self.reader.ready()  # a real read of entities the store must hold; fails fast while it is down
        if not ok:
            log.warning("not ready: %s", why)
        return ok

    @bentoml.api(route="/rank")
    async def rank(self, user_id: Id, candidates: Candidates, context: Optional[Context] = None, k: K = None,
             weights: Weights = None, diversity: Diversity = 0.0, fusion: Optional[Fusion] = None,
             novelty: Diversity = 0.0) -> RankResponse:
        """Rank candidate items for a user: fused score, each objective's score, rank before re-ranking.

        ``weights`` are keyed by the model's objectives (its declared binary tasks); ``fusion`` defaults to the
        model's own method. Without ``weights`` the model's fusion weights rank, or, with ``MTLREC_EXPLORE=epsilon``,
        a nearby weighting drawn at random; the answer's ``weights`` are the ones used. ``feedback_token`` in the
        answer is what ``/feedback`` on it needs.
        """
        return answer("rank", RankResponse, self.live.model,
                      lambda model: self.ranked(model, user_id, candidates, context, k=k, weights=weights,
                                                diversity=diversity, fusion=fusion, novelty=novelty))

    def ranked(self, model, user_id: str, candidates, context, *, k=None, weights=None, diversity: float = 0.0,
               fusion=None, novelty: float = 0.0, clock=OFF) -> dict:
        """``/rank``'s answer from validated fields, its rows queued for the impression log; ``clock``
        (``services.stopwatch``) takes a lap at each stage, the log's included (``benchmarks/rank_profile.py``)."""
        request_id = new_request_id()
        ts, extra = request_time(context, _DATA_START)
        out = ranking.rank(model, self.reader, user_id, list(candidates), k=k, weights=weights,
                           diversity=diversity, fusion=fusion, request_ts=ts, context=extra,
                           explore=self.explore, rng=self._rng, novelty=novelty,
                           seen_items=self.history.items(user_id) if novelty > 0 else None, clock=clock)
        propensities, policy = out.pop("propensities"), out.pop("policy")  # the log's, not the response's
        out["request_id"] = request_id
        out["feedback_token"] = self.tokens.sign(request_id)
        if self.events is not None:
            self.events.log(request_id, ts, out, extra, propensities, policy)
        clock.lap("impression log")
        return out

    @bentoml.api(route="/score")
    async def score(self, user_id: Id, items: Candidates, context: Optional[Context] = None) -> ScoreResponse:
        """Raw per-objective scores of (user, item) pairs, in request order."""
        def compute(model):
            ts, extra = request_time(context, _DATA_START)
            return ranking.score_items(model, self.reader, user_id, list(items), request_ts=ts, context=extra)

        return answer("score", ScoreResponse, self.live.model, compute)

    @bentoml.api(route="/feedback")
    async def feedback(self, request_id: Id, item_id: Id, events: Events, token: Token = None) -> FeedbackResponse:
        """What the user did with an item a ``/rank`` answer showed: ``events`` keyed by the model's tasks, and
        ``token``, the answer's ``feedback_token``.

        Recorded only for an answer whose rows are in the log: 409 if they were dropped, 503 if they are not
        written yet (retry). Idempotent on (request, item, event): a repeat is reported under ``duplicates``.
        """
        if not token:
            return refuse("feedback", 401, "token", "missing: send the feedback_token of the /rank answer")
        if not self.tokens.valid(request_id, token):
            return refuse("feedback", 403, "token", "does not match this request_id")
        model = self.live.model
        if self.events is None:
            count("feedback", "unavailable")
            return unavailable("the impression log is off (MTLREC_EVENTS_URL=off): feedback cannot be recorded")
        if model is None:
            count("feedback", "unavailable")
            return unavailable("no production model is loaded to check the events against")
        try:
            checked = ranking.check_events(model, events)
            shown, user = await self.events.shown(request_id)
            if item_id not in shown:
                raise ranking.RequestError("item_id", f"{item_id!r} was not in the answer to this request")
            new = await self.events.call("record_feedback", request_id, item_id, checked)
        except NotLogged as e:
            return refuse("feedback", 409, "request_id", str(e))
        except ranking.RequestError as e:
            count("feedback", "bad_request")
            return bad(e.field, e.reason, status=404 if e.field in ("request_id", "item_id") else 400)
        except (EventStoreError, TimeoutError, Busy, NotWrittenYet) as e:
            count("feedback", "unavailable")
            return unavailable(str(e) or "the event database did not answer in time")
        except Exception as e:  # noqa: BLE001 - a bug: 500 with an id
            count("feedback", "error")
            return internal(e, "internal error")
        if user is not None and any(checked[n] > 0 for n in new):
            self.history.add([(user, item_id)])
        count("feedback", "ok")
        return FeedbackResponse(request_id=request_id, item_id=item_id, recorded=new,
                                duplicates=[n for n in checked if n not in new])

    @bentoml.api(route="/admin/reload")
    async def reload(self, ctx: bentoml.Context) -> ReloadResponse:
        """Serve what production points to now (model and fusion weights); authenticated by ``MTLREC_ADMIN_TOKEN``.

        The model loads on an executor of its own: requests keep being answered while it does.
        """
        expected = get_settings().admin_token.get_secret_value()  # read per call: a new token needs no restart
        headers = ctx.request.headers
        given = headers.get("x-admin-token") or headers.get("authorization", "").removeprefix("Bearer ").strip()

        def refuse_reload(status: int, message: str) -> JSONResponse:
            ctx.response.status_code = status  # with a context parameter BentoML takes the status from it
            return JSONResponse({"error": message}, status_code=status)

        if not expected:
            return refuse_reload(403, "reload over HTTP is disabled: MTLREC_ADMIN_TOKEN is not set")
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            return refuse_reload(401, "missing or wrong admin token")
        try:
            previous, now = await self.live.reload()
        except Exception as e:  # noqa: BLE001 - keep serving the old model
            model = self.live.model
            return refuse_reload(503, f"reload failed, still serving {model.tag if model else None}: {e}")
        tag, fusion = now.split("#", 1)
        return ReloadResponse(model_version=tag, fusion_version=fusion,
                              previous=previous.split("#", 1)[0] if previous else None, changed=previous != now)

    @bentoml.on_shutdown
    def _flush_events(self) -> None:
        if self.events is not None:
            self.events.close()


# The fields each JSON route takes: those of its API's input model, built by BentoML from the method's signature.
FIELDS = {api.route: set(api.input_spec.model_fields) for api in RankingService.apis.values()}
harden_uvicorn(_SETTINGS.header_timeout_s)
RankingService.add_asgi_middleware(BoundedJson, fields=FIELDS, max_bytes=_SETTINGS.max_body_bytes)
RankingService.add_asgi_middleware(JsonOnly)
RankingService.add_asgi_middleware(DocsRedirect)
# One worker has nobody to hand connections to; several share one listening socket unevenly (see the middleware).
RankingService.add_asgi_middleware(RecycleConnections, limit=_SETTINGS.keepalive_requests)  # 16 with several
