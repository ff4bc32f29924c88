"""`make run`: the whole workflow on one machine, the way a team runs it, from a fresh clone.

It does what an operator would do by hand: make the embedded dataset, make
sure a Prefect server is up (reusing one that answers), create the process
work pool, `prefect deploy` the deployments of ``prefect.yaml``, start a
worker, and start a run of the deployment ``mtl-pipeline/local`` (what
``prefect deployment run`` does), so the run shows in the Prefect UI like any
scheduled or CI-triggered one. It waits for that run as long as the run makes
progress, printing its log lines (``flows/dev/run_watch.py``: no fixed watch
timeout, so a slow machine is not a failure). Then it starts the ranking service on the
production model, sends one real ranking request, prints the answer and
where to look.

The server, the worker and the service keep running afterwards (their logs
and pid files are under ``.mtlrec/``) so that the UI, the API docs and
`prefect deployment run` keep working; `make stop` (``mtlrec down``) stops
all three.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from flows.dev import prefect_server, processes, run_watch
from flows.dev import launcher

ROOT = Path(__file__).resolve().parents[2]
STATE = ROOT / ".mtlrec"
POOL = "mtlrec-local"
DEPLOYMENT = "mtl-pipeline/local"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def _run(cmd: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    print("$ " + " ".join([Path(cmd[0]).name, *cmd[1:]]), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd[1:3])} ...` failed with exit code {proc.returncode}")
    return proc


def _background(name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Start ``cmd`` in its own session with its output in .mtlrec/<name>.log; the pid goes in <name>.pid."""
    STATE.mkdir(exist_ok=True)
    stop_process(name)
    with open(STATE / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    (STATE / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def stop_process(name: str) -> bool:
    pid_file = STATE / f"{name}.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    pid_file.unlink(missing_ok=True)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if str(ROOT / ".venv").encode() not in cmdline and b"mtlrec" not in cmdline and b"prefect" not in cmdline:
        return False  # a recycled pid: not ours
    processes.stop_group(pid, timeout=20)
    return True


def sample_request(data: Path, n: int = 20, seed: int = 0) -> dict:
    """A real request: a user from the dataset and items from the catalogue, in the API's body form, at the time
    the log ends (the embedded log ends in the past: scored as of now, its time features would lie outside
    what training saw, and the answer would say so)."""
    import numpy as np
    import pandas as pd

    from models.contract import tables as contract

    rng = np.random.default_rng(seed)
    users = pd.read_parquet(data / "users.parquet", columns=["user_id"])["user_id"].astype(str).to_numpy()
    items = pd.read_parquet(data / "items.parquet", columns=["item_id"])["item_id"].astype(str).to_numpy()
    context = {"device": "mobile"}
    manifest = contract.Manifest.load(data)
    if manifest is not None and manifest.end:
        context["timestamp"] = pd.Timestamp(manifest.end).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"user_id": str(rng.choice(users)), "candidates": rng.choice(items, size=min(n, len(items)),
                                                                         replace=False).tolist(),
            "k": 5, "diversity": 0.3, "context": context}


def _latest_summary(report_dir: Path) -> dict:
    runs = sorted(report_dir.glob("run-*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(runs[-1].read_text()) if runs else {}


# The embedded dataset's first run trains for at most this long: enough for its best epoch on two idle cores
# (benchmarks/README.md, "First run"), so that a laptop gets a ranked answer in minutes.
FIRST_RUN_TRAIN_S = 95.0


def budgeted(data: Path, overrides: list[str], train_budget: float | None) -> tuple[list[str], str]:
    """The run's overrides with its training budget (``train.max_time``), and a line saying so: the given
    budget, else ``FIRST_RUN_TRAIN_S`` on the embedded dataset; none on other data or when the overrides
    set one already."""
    embedded = (ROOT / data).resolve() == (ROOT / "data" / "synth").resolve()
    budget = train_budget if train_budget is not None else (FIRST_RUN_TRAIN_S if embedded else None)
    if not budget or any(o.startswith("train.max_time=") for o in overrides):
        return overrides, ""
    why = ", the first run on the embedded dataset" if embedded and train_budget is None else ""
    return [*overrides, f"train.max_time={budget:g}"], (
        f"training for at most {budget:g} s (train.max_time{why}); your own data trains to the recipe's epochs")


def up(data: Path = Path("data/synth"), port: int = 3000, config: str = "mmoe", overrides: list[str] | None = None,
       report_dir: Path = Path("reports"), stall_after: float = run_watch.STALL_AFTER_S,
       train_budget: float | None = None) -> int:
    """``train_budget``: seconds of training at most; None: the first-run budget on the embedded dataset
    (``FIRST_RUN_TRAIN_S``) and none on any other, which trains to the row-count recipe."""
    t0 = time.monotonic()
    overrides, said = budgeted(data, list(overrides or []), train_budget)
    if said:
        print(said, flush=True)
    data, report_dir = (ROOT / data).resolve(), (ROOT / report_dir).resolve()
    # FEAST_USAGE / BENTOML_DO_NOT_TRACK: no telemetry (nor its DNS errors offline). The worker looks for
    # scheduled runs every 2 s rather than Prefect's 10, so a run starts as soon as it is asked for.
    env = dict(os.environ, FEAST_USAGE="False", BENTOML_DO_NOT_TRACK="True", PYTHONPATH=str(ROOT),
               DO_NOT_TRACK="1", PREFECT_WORKER_QUERY_SECONDS=os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2"))

    if not (data / "interactions.parquet").is_file():
        _say(f"embedded dataset -> {data.relative_to(ROOT) if data.is_relative_to(ROOT) else data}")
        _run([_bin("mtlrec"), "data", "synth", "--out", str(data)], env)

    _say("Prefect server")
    url = env.get("PREFECT_API_URL") or prefect_server.api_url()
    server = prefect_server.ensure(url)
    env["PREFECT_API_URL"] = server.url
    print(f"{'started' if server.process else 'reusing'} {server.url}"
          + (f" (log {server.log})" if server.log else ""), flush=True)

    _say(f"work pool {POOL}, deployments from prefect.yaml, a process worker")
    if subprocess.run([_bin("prefect"), "work-pool", "inspect", POOL], env=env, cwd=ROOT,
                      capture_output=True).returncode != 0:
        _run([_bin("prefect"), "work-pool", "create", POOL, "--type", "process"], env)
    _run([_bin("prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", str(ROOT / "prefect.yaml")], env)
    _background("worker", [_bin("prefect"), "worker", "start", "--pool", POOL], env)
    print(f"worker log: {STATE / 'worker.log'}", flush=True)

    params = {"data": str(data), "config": config, "report_dir": str(report_dir)}
    if overrides:
        params["overrides"] = list(overrides)
    shown = " ".join(f"--param {k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in params.items())
    _say(f"prefect deployment run '{DEPLOYMENT}' {shown}")
    from services import production_pointer

    production_before = production_pointer.production()
    run_id = run_watch.start(server.url, DEPLOYMENT, params)
    print(f"flow run {run_id}: {server.url.removesuffix('/api')}/runs/flow-run/{run_id} (waiting while it makes "
          f"progress; it fails only if the run fails or nothing changes for {stall_after / 60:.0f} min)", flush=True)
    outcome = run_watch.watch(server.url, run_id, stall_after=stall_after)
    if not outcome.ok:
        now = production_pointer.production()
        state = "unchanged" if now == production_before else f"now {now} (was {production_before})"
        print(f"\nThe pipeline run ended {outcome.state}: {outcome.message}. See the Prefect UI at "
              f"{server.url.removesuffix('/api')} and {STATE / 'worker.log'}. Production is {state}.", file=sys.stderr)
        return 1
    summary = _latest_summary(report_dir)

    _say(f"ranking service on 127.0.0.1:{port}")
    try:
        launcher.preflight(data)  # e.g. the gate kept the first model out of production: say so, not time out
    except launcher.NotServable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    svc_log = STATE / "service.log"
    _background("service", launcher.command(port, data=data), env)  # --data sets the service's dataset
    try:
        processes.wait_until_ok(f"http://127.0.0.1:{port}/readyz", timeout=120, what="the ranking service",
                                log=svc_log)
    except (RuntimeError, TimeoutError) as e:
        raise SystemExit(str(e)) from None

    body = sample_request(data)
    _say("one ranking request: POST /rank")
    print("curl -s -XPOST 127.0.0.1:%d/rank -H 'content-type: application/json' -d '%s'" % (port, json.dumps(body)))
    req = urllib.request.Request(f"http://127.0.0.1:{port}/rank", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        answer = json.loads(r.read())
    print(json.dumps(answer, indent=2))

    ui = server.url.removesuffix("/api")
    _say(f"done in {time.monotonic() - t0:.0f} s; where to look")
    rows = [
        ("Prefect UI (flow runs, artifacts)", ui),
        ("Data Docs (validation)", summary.get("data_docs") or "see the validation-summary artifact"),
        ("gate report", summary.get("report") or str(report_dir)),
        ("model", f"{summary.get('tag')} ({'promoted' if summary.get('promoted') else 'not promoted'}; "
                  f"production: {summary.get('production')})"),
        ("ranking API docs", f"http://127.0.0.1:{port}/docs"),
        ("retrain on demand", f"PREFECT_API_URL={server.url} .venv/bin/prefect deployment run '{DEPLOYMENT}' --watch"),
        ("stop server, worker, service", "make stop"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


def down() -> int:
    stopped = [name for name in ("service", "worker") if stop_process(name)]
    if prefect_server.stop():
        stopped.append("prefect server")
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(up() if sys.argv[1:2] != ["down"] else down())
