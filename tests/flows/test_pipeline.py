"""The pipeline end to end through a real Prefect server, the way a user runs it.

A `prefect server start` subprocess (SQLite, then PostgreSQL), the work pool
and the deployments of prefect.yaml registered with the Prefect CLI, a
process worker polling the pool, and `prefect deployment run ... --watch`;
what the runs did is read back from the server's API (flow runs, task runs,
artifacts) and from the BentoML registry in a temporary BENTOML_HOME.

Time: the servers and every CLI call are real processes, so each costs
seconds of start-up; the dataset is the tiny one of conftest.py and training
runs one epoch. The result storage (where Prefect keeps cache records) and
the artifact directory are shared by both servers, so the PostgreSQL run
finds validation and features in the cache when the SQLite tests ran first
(its training artifacts are deleted, so it must train again); it registers,
evaluates and promotes into its own registry.
The schedulers of the test servers are off, so the nightly schedule of
prefect.yaml can never start a run in the middle of a test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from flows.dev import prefect_server, processes
from services import model_store, production_pointer, registry_io

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
POOL, DEPLOYMENT = "mtlrec-local", "mtl-pipeline/local"
FAST = ["train.max_epochs=1"]
# Infinite learning rate: after the first step every weight is inf and the loss NaN. With the click task alone the
# loss stays a number (NaN) until the epoch ends, where training's own NonFiniteLoss check fails the run.
NAN_LOSS = FAST + ["train.lr=.inf", "train.batch_size=512", "tasks=[{name: click, type: binary}]"]
STAGE_TASKS = {"train-model", "register-model", "evaluate-model", "promote-model", "publish-report"}
UUID = re.compile(r"UUID: ([0-9a-f-]{36})")


def _bin(name: str) -> str:
    found = BIN / name
    return str(found) if found.exists() else shutil.which(name) or name


@dataclass
class Orchestrator:
    """One Prefect server with prefect.yaml deployed on it and a process worker polling its pool."""

    server: prefect_server.Server
    env: dict[str, str]
    bento: Path
    reports: Path
    artifacts: Path
    worker: subprocess.Popen | None = None

    def cli(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([_bin("prefect"), *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                             timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
        return res

    def run(self, data: Path, overrides: list[str] = FAST, timeout: int = 300) -> tuple[int, str, str]:
        """`prefect deployment run --watch` through the CLI: (exit code, flow run id, output)."""
        res = self.cli("deployment", "run", DEPLOYMENT, "--param", f"data={data}",
                       "--param", f"overrides={json.dumps(overrides)}", "--param", f"report_dir={self.reports}",
                       "--param", f"artifacts={self.artifacts}", "--watch", "--watch-timeout", str(timeout),
                       timeout=timeout + 60, check=False)
        out = res.stdout + res.stderr
        found = UUID.search(out)
        assert found, out
        return res.returncode, found.group(1), out

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(api=self.server.url)

    def flow_run(self, run_id: str):
        with self.client() as c:
            return c.read_flow_run(uuid.UUID(run_id))

    def runs_of(self, run_id: str) -> list:
        """The flow run and its stage subflow runs."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        with self.client() as c:
            children = c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[uuid.UUID(run_id)])))
        return [self.flow_run(run_id), *children]

    def task_runs(self, run_id: str) -> dict:
        """Task name (without Prefect's suffix) -> task run, over the run and its stage subflows."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = self.runs_of(run_id)
        with self.client() as c:
            tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])))
            flows = {c.read_flow(r.flow_id).name for r in runs}  # the parent's stand-in task runs for subflows
        return {t.name.rsplit("-", 1)[0]: t for t in tasks if t.name.rsplit("-", 1)[0] not in flows}

    def log_lines(self, run_id: str) -> list[str]:
        """Every log line of the run and its stage subflows."""
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        ids = [r.id for r in self.runs_of(run_id)]
        with self.client() as c:
            return [entry.message for entry in c.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=ids)))]

    def task_states(self, run_id: str) -> dict[str, str]:
        return {name: t.state.name for name, t in self.task_runs(run_id).items()}

    def artifact_keys(self, run_id: str) -> set[str]:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        ids = [r.id for r in self.runs_of(run_id)]
        with self.client() as c:
            found = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
        return {a.key for a in found if a.key}

    def wait_final(self, run_id: str, timeout: float = 240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} not finished after {timeout}s")


@contextlib.contextmanager
def orchestrator(home: Path, shared: Path, database_url: str | None = None):
    """Server, work pool, `prefect deploy --all`, worker; all stopped (process groups) however the test ends."""
    server = prefect_server.start(home, database_url=database_url, scheduler=False)
    worker = None
    try:
        env = server.client_env({
            **os.environ, "PREFECT_HOME": str(home), "BENTOML_HOME": str(home / "bentoml"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(shared / "prefect-storage"),
            "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "BENTOML_DO_NOT_TRACK": "True", "GX_ANALYTICS_ENABLED": "False", "FEAST_USAGE": "False",
        })
        orch = Orchestrator(server, env, bento=home / "bentoml", reports=home / "reports",
                            artifacts=shared / "artifacts")
        orch.cli("work-pool", "create", POOL, "--type", "process")
        orch.cli("--no-prompt", "deploy", "--all", "--prefect-file", str(ROOT / "prefect.yaml"))
        log = open(home / "worker.log", "wb")
        # started elsewhere than the checkout: the deployment's pull step must take the run there
        worker = subprocess.Popen([_bin("prefect"), "worker", "start", "--pool", POOL, "--limit", "1"],
                                  env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        orch.worker = worker
        yield orch
    finally:
        if worker is not None:
            processes.stop_group(worker.pid, timeout=20)
        server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline-shared")


@pytest.fixture(scope="module")
def dataset(clean_dataset, shared) -> Path:
    """A private copy of the tiny dataset: the pipeline writes its feature store and Data Docs into it."""
    out = shared / "data"
    shutil.copytree(clean_dataset, out, ignore=shutil.ignore_patterns("_gx", "_features"))
    return out


def _corrupt_copy(dataset: Path, out: Path) -> Path:
    shutil.copytree(dataset, out, ignore=shutil.ignore_patterns("_gx", "_features"))
    df = pd.read_parquet(out / "interactions.parquet")
    df.loc[df.index[:5], "click"] = 2  # the label domain rule
    df.to_parquet(out / "interactions.parquet", index=False)
    return out


def _summary(orch: Orchestrator, tag: str) -> dict:
    return json.loads((orch.reports / f"run-{tag.replace(':', '-')}.json").read_text())


class TestOnSQLite:
    """One SQLite-backed server for the class, torn down before the PostgreSQL test starts its own."""

    @pytest.fixture(scope="class")
    def local(self, tmp_path_factory, shared):
        with orchestrator(tmp_path_factory.mktemp("prefect-sqlite"), shared) as orch:
            yield orch

    @pytest.fixture(scope="class")
    def first(self, local, dataset):
        code, run_id, out = local.run(dataset)
        return {"code": code, "id": run_id, "out": out}

    @pytest.fixture
    def bento(self, local, monkeypatch):
        monkeypatch.setenv("BENTOML_HOME", str(local.bento))
        return local.bento

    def test_deployment_from_prefect_yaml(self, local):
        """The schedule, the trigger and the pull step came from prefect.yaml through `prefect deploy`."""
        with local.client() as c:
            dep = c.read_deployment_by_name(DEPLOYMENT)
            automations = c.read_automations()
        assert dep.work_pool_name == POOL
        assert dep.parameters["data"] == "data/synth" and dep.parameters["config"] == "mmoe"
        assert [(s.schedule.cron, s.active) for s in dep.schedules] == [("0 3 * * *", True)]
        (step,) = dep.pull_steps
        assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(ROOT)
        triggers = [a.trigger for a in automations if "mtlrec.data.landed" in getattr(a.trigger, "expect", ())]
        assert len(triggers) == 1 and triggers[0].match.model_dump()["prefect.resource.id"] == "mtlrec.dataset.*"

    def test_first_run_registers_and_promotes(self, local, first, bento):
        assert first["code"] == 0, first["out"] + (local.server.log_tail())
        run = local.flow_run(first["id"])
        assert run.state.is_completed() and run.state.name == "Completed"
        states = local.task_states(first["id"])
        assert {"validate", "compute-features", "apply-features", "materialize-features", "training-set",
                *STAGE_TASKS} <= set(states), states
        assert set(states.values()) == {"Completed"}, states
        assert {"validation-summary", "evaluation", "gate-decision", "pipeline-report",
                "pipeline-report-file"} <= local.artifact_keys(first["id"])

        tag = production_pointer.production()
        assert tag is not None and [m["tag"] for m in model_store.list_models()] == [tag]
        summary = _summary(local, tag)
        assert summary["tag"] == tag and summary["registered"] and summary["promoted"]
        assert summary["production"] == tag and summary["cached"] == []
        d = summary["decision"]
        assert d["reference"] == "popularity" and d["delta"] >= 0 and d["k"] == 10 and d["users"] > 0
        assert Path(summary["report"]).is_file() and Path(summary["report"]).name.startswith("gate-")
        assert Path(summary["files"]["gate plot"]).read_bytes()[:4] == b"\x89PNG"
        assert list(d["differences"]) == ["popularity"] and d["differences"]["popularity"]["delta"] == d["delta"]
        assert Path(summary["data_docs"]).is_file()
        assert set(summary["stage_seconds"]) == {"validate", "features", "train", "evaluate", "promote"}
        # Training's own progress is in the run's log, where the UI and make run show it.
        lines = local.log_lines(first["id"])
        assert any(line.startswith("epoch 1/1:") and "s left" in line for line in lines), lines[-20:]
        assert [e["event"] for e in registry_io.audit_events()].count("promote") == 1

    def test_rerun_comes_from_the_cache(self, local, first, dataset, bento):
        """Unchanged data and config: validation, features and training are cache hits; nothing new is registered."""
        assert first["code"] == 0
        tag = production_pointer.production()
        code, run_id, out = local.run(dataset)
        assert code == 0, out
        states = local.task_states(run_id)
        for name in ("validate", "compute-features", "apply-features", "materialize-features", "training-set",
                     "train-model"):
            assert states[name] == "Cached", states
        summary = _summary(local, tag)
        assert summary["cached"] == ["validate", "features", "train"]
        assert summary["tag"] == tag and not summary["registered"] and not summary["promoted"]
        assert summary["decision"]["already_production"] and Path(summary["artifact"]).is_dir()
        assert [m["tag"] for m in model_store.list_models()] == [tag] and production_pointer.production() == tag
        assert [e["event"] for e in registry_io.audit_events()].count("promote") == 1

    def test_invalid_data_fails_at_validation(self, local, first, dataset, tmp_path, bento):
        assert first["code"] == 0
        before = production_pointer.pointer()
        code, run_id, out = local.run(_corrupt_copy(dataset, tmp_path / "corrupt"))
        assert code == 1 and "Failed" in out, out
        assert local.flow_run(run_id).state.is_failed()
        states = local.task_states(run_id)
        assert states == {"validate": "Failed"}, states
        assert "validation-summary" in local.artifact_keys(run_id)  # the failing rules, on the failed run
        assert production_pointer.pointer() == before and len(model_store.list_models()) == 1

    def test_non_finite_loss_promotes_nothing(self, local, first, dataset, bento):
        assert first["code"] == 0
        before = production_pointer.pointer()
        code, run_id, out = local.run(dataset, overrides=NAN_LOSS)
        assert code == 1, out
        assert local.flow_run(run_id).state.is_failed()
        states = local.task_states(run_id)
        assert states["train-model"] == "Failed" and states["validate"] == "Cached", states
        assert not STAGE_TASKS - {"train-model"} & set(states), states
        assert "NonFiniteLoss" in local.task_runs(run_id)["train-model"].state.message
        assert production_pointer.pointer() == before and len(model_store.list_models()) == 1

    def test_data_landed_event_starts_a_run(self, local, first, tmp_path):
        """`mtlrec data landed DIR` -> the deployment's trigger -> a flow run whose `data` is DIR.

        The pool is paused meanwhile, so the run is only looked at, not executed:
        what executing a run does is what the other tests check.
        """
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

        landed = tmp_path / "landed"
        landed.mkdir()
        local.cli("work-pool", "pause", POOL)
        try:
            with local.client() as c:
                dep = c.read_deployment_by_name(DEPLOYMENT)
            res = subprocess.run([_bin("mtlrec"), "data", "landed", str(landed)], env=local.env, cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)
            assert res.returncode == 0 and "mtlrec.data.landed" in res.stdout, res.stdout + res.stderr
            deadline, run = time.monotonic() + 60, None
            while run is None and time.monotonic() < deadline:
                time.sleep(0.5)
                with local.client() as c:
                    runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(
                        deployment_id=FlowRunFilterDeploymentId(any_=[dep.id])))
                run = next((r for r in runs if r.parameters.get("data") == str(landed)), None)
            assert run is not None, "the trigger created no flow run for the landed dataset"
            assert run.parameters["config"] == "mmoe" and run.state.is_scheduled()
            with local.client() as c:
                c.delete_flow_run(run.id)
        finally:
            local.cli("work-pool", "resume", POOL)

    def test_data_landed_needs_a_server(self, tmp_path):
        env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PREFECT_HOME": str(tmp_path)}
        res = subprocess.run([_bin("mtlrec"), "data", "landed", str(tmp_path)], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and "PREFECT_API_URL" in res.stderr, res.stdout + res.stderr

    def test_pipeline_command_runs_in_process(self, local, first, dataset, tmp_path, bento):
        """`mtlrec pipeline` runs the flow in its own process, recorded on the server it is pointed at."""
        assert first["code"] == 0
        before = production_pointer.pointer()
        bad = _corrupt_copy(dataset, tmp_path / "bad")
        res = subprocess.run([_bin("mtlrec"), "pipeline", "--data", str(bad), "--set", "train.max_epochs=1",
                              "--report-dir", str(tmp_path / "reports")], env=local.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=240)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "pipeline failed: ValidationFailed" in res.stderr and "interactions.click: domain" in res.stderr
        with local.client() as c:
            runs = c.read_flow_runs()
        mine = [r for r in runs if r.parameters.get("data") == str(bad) and r.parent_task_run_id is None]
        assert not any(r.deployment_id for r in mine)
        assert len(mine) == 1 and mine[0].state.is_failed()
        assert production_pointer.pointer() == before


@pytest.fixture
def postgres_db(postgres_database):
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{postgres_database}"


def test_deployment_run_on_a_postgres_server(postgres_db, tmp_path, shared, dataset, monkeypatch):
    """One whole run on a PostgreSQL-backed server.

    The trained artifacts are deleted first: after the SQLite tests the cache
    still holds a training result that names them, and the run must train
    again rather than hand on a path to nothing.
    """
    shutil.rmtree(shared / "artifacts", ignore_errors=True)
    with orchestrator(tmp_path / "prefect-pg", shared, database_url=postgres_db) as orch:
        code, run_id, out = orch.run(dataset)
        assert code == 0, out + orch.server.log_tail()
        assert orch.flow_run(run_id).state.is_completed()
        states = orch.task_states(run_id)
        assert states["train-model"] == "Completed", states
        assert {"validate", "register-model", "evaluate-model", "promote-model"} <= set(states), states
        assert "pipeline-report" in orch.artifact_keys(run_id)
    import psycopg2

    db = postgres_db.rsplit("/", 1)[1]
    with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=db) as pg, pg.cursor() as cur:
        cur.execute("SELECT count(*) FROM flow_run WHERE id = %s", (str(run_id),))
        assert cur.fetchone()[0] == 1, "the run is not in the PostgreSQL database: the server used another one"
    monkeypatch.setenv("BENTOML_HOME", str(orch.bento))
    tag = production_pointer.production()
    summary = _summary(orch, tag)
    assert tag is not None and summary["promoted"] and Path(summary["artifact"]).is_dir()
