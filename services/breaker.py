"""A circuit breaker for the event database: while it fails, calls fail at once instead of each waiting."""

from __future__ import annotations

import time


class Busy(RuntimeError):
    """The event database is failing (breaker open) or too many calls wait for it: answer 503 now."""


class Breaker:
    """Open for ``cooldown_s`` after a failure: calls fail at once meanwhile instead of each waiting for the
    timeout; the first call after it tries the database again."""

    def __init__(self, where: str, cooldown_s: float):
        self.where, self.cooldown_s = where, cooldown_s
        self._open_until, self.last_error = 0.0, ""

    def check(self) -> None:
        if time.monotonic() < self._open_until:
            raise Busy(f"the event database {self.where} is unavailable ({self.last_error}): retry later")

    def failure(self, error: BaseException) -> None:
        self.last_error = f"{type(error).__name__}: {error}"
        self._open_until = time.monotonic() + self.cooldown_s

    def success(self) -> None:
        self._open_until = 0.0
