"""Waiting for a pipeline run for as long as it makes progress, and showing that progress.

`prefect deployment run --watch` gives up after a fixed ``--watch-timeout``: on a busy laptop a healthy
run that was still training was reported as failed. Here a run is waited for however long it takes; it
fails only when it ends in a failed, crashed or cancelled state, or when nothing about it has changed (no
state change, no task-run change, no new log line) for ``stall_after`` seconds. While waiting, each new
log line of the run and of its stages (subflow runs) is printed with the task run or stage it came from,
so the user sees the stage and, in training, each epoch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

# An hour without a new log line, task-run change or state change: a training epoch on a large log on a
# slow machine stays well inside it, a hung worker does not.
STALL_AFTER_S = 3600.0


@dataclass
class Outcome:
    state: str  # the run's final state name, or "Stalled"
    ok: bool
    message: str


async def _runs(client, root: UUID) -> dict[UUID, str]:
    """The run and every subflow run under it (the pipeline's stages are subflows), each with its flow's name."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs: dict[UUID, str] = {root: "flow"}
    frontier = [root]
    while frontier:
        children = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
        frontier = [c.id for c in children if c.id not in runs]
        for c in children:
            if c.id not in runs:
                runs[c.id] = (await client.read_flow(c.flow_id)).name
    return runs


async def _watch(api_url: str, flow_run_id: UUID, stall_after: float, poll: float, say: Callable[[str], None]):
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    seen: set = set()
    last_marker = None
    last_progress = time.monotonic()
    async with PrefectClient(api=api_url) as client:
        while True:
            run = await client.read_flow_run(flow_run_id)
            runs = await _runs(client, flow_run_id)
            tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(runs))))
            names = {t.id: t.name for t in tasks}
            # Every page of the run's and its stages' logs: a stage's lines can reach the server after a later
            # line of another stage, so lines are told apart by id, not by a running offset.
            new, offset = [], 0
            while True:
                page = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(runs))),
                                              offset=offset, sort=LogSort.TIMESTAMP_ASC)
                new += [e for e in page if e.id not in seen]
                offset += len(page)
                if len(page) < 200:  # the server's page size (PREFECT_API_DEFAULT_LIMIT)
                    break
            for entry in new:
                seen.add(entry.id)
                stage = names.get(entry.task_run_id) if entry.task_run_id else runs.get(entry.flow_run_id, "flow")
                say(f"  [{stage or 'flow'}] {entry.message.splitlines()[0] if entry.message else ''}")
            marker = (run.state_name, tuple(sorted((str(t.id), t.state_name) for t in tasks)), len(seen))
            if marker != last_marker:
                last_marker, last_progress = marker, time.monotonic()
            state = run.state
            if state is not None and state.is_final():
                ok = state.is_completed()
                return Outcome(state.name, ok, "" if ok else (state.message or f"the run ended {state.name}"))
            if time.monotonic() - last_progress > stall_after:
                return Outcome("Stalled", False, f"no progress for {stall_after:.0f} s (state {run.state_name}, "
                                                 f"{len(seen)} log lines): the worker may have died")
            await asyncio.sleep(poll)


def watch(api_url: str, flow_run_id: UUID | str, *, stall_after: float = STALL_AFTER_S, poll: float = 2.0,
          say: Callable[[str], None] = print) -> Outcome:
    """Wait for the flow run to end, printing its new log lines; see the module docstring."""
    return asyncio.run(_watch(api_url, UUID(str(flow_run_id)), stall_after, poll, say))


def start(api_url: str, deployment: str, parameters: dict) -> UUID:
    """A flow run of ``deployment`` (``flow/deployment``) with ``parameters``, for a worker to pick up."""

    async def go() -> UUID:
        from prefect.client.orchestration import PrefectClient

        async with PrefectClient(api=api_url) as client:
            d = await client.read_deployment_by_name(deployment)
            run = await client.create_flow_run_from_deployment(d.id, parameters=parameters)
            return run.id

    return asyncio.run(go())
