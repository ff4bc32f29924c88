"""What every stage uses: timeouts, the online-store choice, and reading a task's state."""

from __future__ import annotations

from typing import Any, Literal

from prefect.states import State

MINUTE, HOUR = 60, 3600
Online = Literal["sqlite", "redis"]


def cached_state(state: State) -> bool:
    return state.name == "Cached"


def value(state: State, stage: str, cached: list[str]) -> Any:
    """The task's result (raising its exception, which fails the flow); notes a cache hit under the stage's name."""
    value = state.result()
    if cached_state(state):
        cached.append(stage)
    return value
