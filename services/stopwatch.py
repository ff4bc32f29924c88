"""Where one request's time goes: laps at the stage boundaries of the ranking path.

``benchmarks/rank_profile.py`` hands ``ranking.rank`` a ``Stopwatch`` and reads its laps; the service hands
it none, and each boundary then costs one call that does nothing.
"""

from __future__ import annotations

import time


class Stopwatch:
    """Seconds per stage, summed over every request timed with it; ``start`` marks where a request begins."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        """The time since the last lap (or ``start``) is ``stage``'s."""
        t = time.perf_counter()
        self.laps[stage] = self.laps.get(stage, 0.0) + t - self._t
        self._t = t


class _Off:
    def start(self) -> None:
        pass

    def lap(self, stage: str) -> None:
        pass


OFF = _Off()
