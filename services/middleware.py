"""ASGI middleware of the ranking service: what BentoML's own request handling does not do for us."""

from __future__ import annotations

from starlette.responses import JSONResponse


class JsonOnly:
    """The API takes JSON only; any other body type gets 415 naming it.

    BentoML would otherwise try other decoders (a multipart content type without a boundary
    escapes its error handling as a 500).
    """

    ROUTES = ("/rank", "/score", "/feedback", "/admin/reload")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("path") in self.ROUTES:
            raw = dict(scope.get("headers") or []).get(b"content-type", b"")
            media = raw.decode("latin-1").split(";")[0].strip().lower()
            if media and media != "application/json":
                resp = JSONResponse({"error": f"unsupported content-type {media!r}: send application/json",
                                     "detail": [{"type": "content_type", "loc": ["content-type"],
                                                 "msg": "the body must be application/json"}]}, status_code=415)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RecycleConnections:
    """Answer the ``limit``-th request of a keep-alive connection with ``Connection: close``.

    Why: every worker accepts from one shared listening socket, and the first worker to wake
    takes a whole burst of new connections. Clients that keep their connections open (any pool,
    any load balancer) then stay pinned to that worker while the others idle, and throughput
    depends on how the first burst fell (see benchmarks/README.md). A closed connection is
    reopened by the client and accepted by whichever worker is waiting in its event loop, the
    idle one, so connections drift to the less loaded workers. nginx's ``keepalive_requests`` is
    the same knob. ``limit`` 0 keeps connections open.
    """

    MAX_TRACKED = 4096  # connections the client closed itself leave an entry behind; forget them in bulk

    def __init__(self, app, limit: int = 16):
        self.app = app
        self.limit = limit
        self.served: dict[tuple, int] = {}

    async def __call__(self, scope, receive, send):
        client = scope.get("client")
        if scope.get("type") != "http" or self.limit <= 0 or client is None:
            await self.app(scope, receive, send)
            return
        key = tuple(client)
        count = self.served.get(key, 0) + 1
        if count < self.limit:
            if len(self.served) >= self.MAX_TRACKED:
                self.served.clear()
            self.served[key] = count
            await self.app(scope, receive, send)
            return
        self.served.pop(key, None)

        async def closing(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


class BoundedJson:
    """Bodies of the JSON routes: at most ``max_bytes`` (413 beyond), and no field the route does not take.

    Why here: BentoML reads the whole body into memory before validating it (a few huge bodies cost the
    worker their size in resident memory), and its validation ignores unknown fields, so a typo such as
    ``diversty`` would be silently dropped. The body is read once, bounded, checked, and handed on unchanged.
    ``fields`` maps a route to the top-level fields it accepts.
    """

    def __init__(self, app, fields: dict[str, set[str]], max_bytes: int = 1 << 20):
        self.app = app
        self.fields = fields
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("path") not in self.fields or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # a chunked body that says nothing of its size: stop reading it here
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        unknown = self._unknown(scope["path"], body)
        if unknown:
            known = sorted(self.fields[scope["path"]])
            detail = [{"type": "extra_forbidden", "loc": [f], "msg": f"unknown field; known: {known}"} for f in unknown]
            await JSONResponse({"error": f"unknown field(s) {unknown}; this endpoint takes {known}", "detail": detail},
                               status_code=400)(scope, receive, send)
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _unknown(self, path: str, body: bytes) -> list[str]:
        import json

        try:
            data = json.loads(body) if body else {}
        except ValueError:
            return []  # malformed JSON is BentoML's to report, with its own 400
        return sorted(set(data) - self.fields[path]) if isinstance(data, dict) else []

    async def _too_large(self, scope, receive, send):
        await JSONResponse({"error": f"request body larger than {self.max_bytes:,} bytes",
                            "detail": [{"type": "too_large", "loc": ["body"],
                                        "msg": f"at most {self.max_bytes:,} bytes"}]},
                           status_code=413, headers={"connection": "close"})(scope, receive, send)


def harden_uvicorn(header_timeout_s: float) -> bool:
    """Close a connection that has not sent a complete request head within ``header_timeout_s``.

    uvicorn times out idle keep-alive connections only after a response; a client that connects and sends
    nothing, or trickles its headers (slowloris), holds a connection and its buffers forever, and BentoML
    offers no setting for it. This wraps ``connection_made`` of uvicorn's two HTTP/1.1 protocols with a
    deadline that a complete request head (``self.cycle``) disarms. It must run in the worker before uvicorn
    accepts, which importing the service module does. Returns False where uvicorn's protocols have moved
    (``tests/services/test_service.py`` checks it stays True for the pinned uvicorn).
    """
    try:
        from uvicorn.protocols.http import h11_impl, httptools_impl
    except ImportError:  # pragma: no cover
        return False
    for proto in (h11_impl.H11Protocol, httptools_impl.HttpToolsProtocol):
        if getattr(proto.connection_made, "_mtlrec_deadline", False):
            continue
        original = proto.connection_made

        def connection_made(self, transport, *args, _original=original, **kwargs):
            _original(self, transport, *args, **kwargs)

            def expire():
                if getattr(self, "cycle", None) is None and not transport.is_closing():
                    transport.close()  # no request head in time: free the connection

            self.loop.call_later(header_timeout_s, expire)

        connection_made._mtlrec_deadline = True
        proto.connection_made = connection_made
    return True


class DocsRedirect:
    """``/docs`` answers with the API docs BentoML serves at ``/`` (Swagger UI; the spec is ``/docs.json``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http" and scope.get("path") in ("/docs", "/docs/") and scope.get("method") == "GET":
            from starlette.responses import RedirectResponse

            await RedirectResponse("/", status_code=307)(scope, receive, send)
            return
        await self.app(scope, receive, send)
