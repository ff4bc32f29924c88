"""ASGI middleware of the ranking service: what BentoML's own request handling does not do for us."""

from __future__ import annotations

from starlette.responses import JSONResponse


class JsonOnly:
    """The API takes JSON only; any other body type gets 415 naming it.

    BentoML would otherwise try other decoders (a multipart content type without a boundary
    escapes its error handling as a 500).
    """

    ROUTES = ("/rank", "/score", "/admin/reload")

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
    any load balancer) then stay pinned to that worker while the others idle: with two workers,
    32 pooled connections gave either about 450 or about 230 requests/s, depending on how the
    first burst fell. A closed connection is reopened by the client and accepted by whichever
    worker is waiting in its event loop, the idle one, so connections drift to the less loaded
    workers. nginx's ``keepalive_requests`` is the same knob. ``limit`` 0 keeps connections open.
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
