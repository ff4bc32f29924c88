"""`make run` waits for a pipeline run as long as it makes progress (flows/dev/run_watch.py), on a real Prefect
server: a run slower than a fixed watch timeout is still waited for; a failed run and a stalled one end the wait
with a clear message."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from datetime import datetime, timezone

import pytest
from prefect import flow, task

from flows.dev import prefect_server
from flows.dev.run_watch import watch


@flow(name="slow-stage")
def _slow_stage():  # never run here: the tests create its runs and move their states through the API
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = prefect_server.start(tmp_path_factory.mktemp("prefect"), scheduler=False)
    yield s
    s.stop()


def _client(url):
    from prefect.client.orchestration import PrefectClient

    return PrefectClient(api=url)


def _new_run(url) -> str:
    async def go():
        async with _client(url) as c:
            return (await c.create_flow_run(_slow_stage)).id
    return asyncio.run(go())


def _drive(url, run_id, steps):
    """Play ``steps`` on the run from another thread: ("log", text), ("state", State), ("sleep", seconds)."""
    from prefect.client.schemas.actions import LogCreate

    async def go():
        async with _client(url) as c:
            for kind, value in steps:
                if kind == "sleep":
                    await asyncio.sleep(value)
                elif kind == "log":
                    await c.create_logs([LogCreate(name="mtlrec", level=20, message=value, flow_run_id=run_id,
                                                   timestamp=datetime.now(timezone.utc))])
                else:
                    await c.set_flow_run_state(run_id, value, force=True)

    t = threading.Thread(target=lambda: asyncio.run(go()), daemon=True)
    t.start()
    return t


def test_a_run_that_keeps_making_progress_is_waited_for_past_any_fixed_timeout(server):
    from prefect.states import Completed, Running

    run_id = _new_run(server.url)
    steps = [("state", Running())] + [x for i in range(6) for x in (("sleep", 0.7), ("log", f"epoch {i + 1}/6"))]
    driver = _drive(server.url, run_id, steps + [("sleep", 0.5), ("state", Completed())])
    said: list[str] = []
    t0 = time.monotonic()
    # No change for 2 s would count as a stall; the run takes about 5 s in all, logging every 0.7 s.
    outcome = watch(server.url, run_id, stall_after=2.0, poll=0.2, say=said.append)
    driver.join(5)
    assert outcome.ok and outcome.state == "Completed", outcome
    assert time.monotonic() - t0 > 4.0
    assert [s for s in said if "epoch" in s] == [f"  [flow] epoch {i + 1}/6" for i in range(6)]


def test_a_failed_run_ends_the_wait_with_its_message(server):
    from prefect.states import Failed, Running

    run_id = _new_run(server.url)
    _drive(server.url, run_id, [("state", Running()), ("sleep", 0.5),
                                ("state", Failed(message="validation failed: 3 rules"))]).join(5)
    outcome = watch(server.url, run_id, stall_after=30, poll=0.2, say=lambda s: None)
    assert not outcome.ok and outcome.state == "Failed" and "validation failed" in outcome.message


def test_a_run_with_no_progress_at_all_is_reported_stalled(server):
    from prefect.states import Running

    run_id = _new_run(server.url)
    _drive(server.url, run_id, [("state", Running())]).join(5)
    outcome = watch(server.url, run_id, stall_after=1.5, poll=0.2, say=lambda s: None)
    assert not outcome.ok and outcome.state == "Stalled" and "no progress for 2 s" in outcome.message


def test_start_creates_a_run_of_the_named_deployment_with_the_parameters(server):
    from flows.dev.run_watch import start

    async def deploy():
        async with _client(server.url) as c:
            flow_id = await c.create_flow(_slow_stage)
            await c.create_deployment(flow_id, "local")

    asyncio.run(deploy())
    run_id = start(server.url, "slow-stage/local", {"data": "data/synth", "overrides": ["train.max_epochs=1"]})

    async def read():
        async with _client(server.url) as c:
            return await c.read_flow_run(run_id)

    run = asyncio.run(read())
    assert run.parameters == {"data": "data/synth", "overrides": ["train.max_epochs=1"]} and run.deployment_id


def test_make_runs_sample_request_asks_as_of_the_end_of_the_log(tmp_path):
    """Scored as of now, a past log's time features lie outside what training saw and the answer says so:
    the first request a new user sees asks as of the log's end instead."""
    import pandas as pd

    from flows.data.synth import SynthConfig, generate
    from flows.dev.local_run import sample_request

    manifest = generate(tmp_path, SynthConfig(n_users=50, n_items=30, n_interactions=2000, days=5))
    body = sample_request(tmp_path)
    assert pd.Timestamp(body["context"]["timestamp"]) == pd.Timestamp(manifest.end)
    assert len(body["candidates"]) == 20 and body["user_id"].startswith("u")


def test_the_first_run_on_the_embedded_data_has_a_training_budget_and_your_own_data_has_none(tmp_path):
    from flows.dev.local_run import FIRST_RUN_TRAIN_S, budgeted

    overrides, said = budgeted(Path("data/synth"), [], None)
    assert overrides == [f"train.max_time={FIRST_RUN_TRAIN_S:g}"] and "embedded dataset" in said
    assert budgeted(tmp_path / "mine", ["train.lr=0.01"], None) == (["train.lr=0.01"], "")
    assert budgeted(tmp_path / "mine", [], 30)[0] == ["train.max_time=30"]
    assert budgeted(Path("data/synth"), ["train.max_time=500"], None)[0] == ["train.max_time=500"]


def test_the_stages_lines_are_shown_with_the_stage_they_came_from(server):
    """The pipeline's stages are subflow runs: their log lines (training's epochs) are printed too."""
    from prefect.client.schemas.actions import LogCreate
    from prefect.states import Completed, Running

    @flow(name="train")
    def _stage():
        return None

    @task(name="train")
    def _stand_in():  # the parent's task run that stands for a subflow
        return None

    run_id = _new_run(server.url)

    async def child():
        async with _client(server.url) as c:
            stand_in = await c.create_task_run(_stand_in, flow_run_id=run_id, dynamic_key="0")
            sub = await c.create_flow_run(_stage, parent_task_run_id=stand_in.id)
            await c.create_logs([LogCreate(name="mtlrec", level=20, message="epoch 1/1: 9 steps", flow_run_id=sub.id,
                                           timestamp=datetime.now(timezone.utc))])

    asyncio.run(child())
    driver = _drive(server.url, run_id, [("state", Running()), ("sleep", 0.5), ("state", Completed())])
    said: list[str] = []
    outcome = watch(server.url, run_id, stall_after=5.0, poll=0.2, say=said.append)
    driver.join(5)
    assert outcome.ok, outcome
    assert "  [train] epoch 1/1: 9 steps" in said, said
