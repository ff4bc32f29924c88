"""What the ranking API answers when it cannot answer, and the count of every endpoint's outcomes.

A bad request (an unknown field too) answers 400 with ``{"error", "detail": [{"loc": [field, ...], "msg",
"type"}]}``, the shape BentoML's own validation uses; no production model or an unavailable online store
answers 503 with ``{"error": ...}``; non-finite scores and bugs answer 500 with an ``error_id`` found in the
log. ``mtlrec_requests`` on ``/metrics`` counts every answer by endpoint and outcome.
"""

from __future__ import annotations

import logging
import uuid

import bentoml
from starlette.responses import JSONResponse

from services import ranking

log = logging.getLogger("mtlrec.service")

_requests = bentoml.metrics.Counter(name="mtlrec_requests",
                                    documentation="Ranking API requests by endpoint and outcome",
                                    labelnames=["endpoint", "outcome"])


def count(endpoint: str, outcome: str) -> None:
    _requests.labels(endpoint, outcome).inc()


def bad(field: str, reason: str, kind: str = "value_error", status: int = 400) -> JSONResponse:
    return JSONResponse({"error": f"invalid {field}: {reason}",
                         "detail": [{"type": kind, "loc": field.split("."), "msg": reason}]}, status_code=status)


def unavailable(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=503)


def internal(error: BaseException, message: str) -> JSONResponse:
    """A 500 whose id finds the traceback in the log."""
    error_id = uuid.uuid4().hex[:12]
    log.error("error %s: %s", error_id, message, exc_info=error)
    return JSONResponse({"error": message, "error_id": error_id}, status_code=500)


def refuse(endpoint: str, status: int, field: str, reason: str) -> JSONResponse:
    """A 4xx naming ``field``, counted as refused (401, 403, 409) or as a bad request."""
    count(endpoint, "refused" if status in (401, 403, 409) else "bad_request")
    return bad(field, reason, status=status)


def answer(endpoint: str, response, model, compute):
    """``response(**compute(model))``, or the 4xx/503/500 its error maps to; counted either way.

    ``model`` is the one snapshot the request uses, read once by the caller: a reload mid-request cannot mix two.
    """
    if model is None:
        count(endpoint, "unavailable")
        return unavailable("no production model is loaded")
    try:
        out = compute(model)
    except ranking.RequestError as e:
        count(endpoint, "bad_request")
        return bad(e.field, e.reason)
    except ranking.StoreUnavailable as e:
        count(endpoint, "unavailable")
        return unavailable(str(e))
    except ranking.NonFiniteScores as e:
        count(endpoint, "nonfinite")
        return internal(e, f"model {model.tag} produced non-finite scores")
    except Exception as e:  # noqa: BLE001 - a bug, not the client's fault nor the store's: 500 with an id
        count(endpoint, "error")
        return internal(e, "internal error")
    count(endpoint, "ok")
    return response(**out)
