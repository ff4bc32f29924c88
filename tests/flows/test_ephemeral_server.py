"""The in-process pipeline's temporary Prefect server: time to start on a loaded machine, and a clear way out."""

from __future__ import annotations

import os
import subprocess
import sys

from flows.cli.workflow import EPHEMERAL_STARTUP_S


def _pipeline(tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", "--data", str(tmp_path / "none")],
                          env={**base, "PREFECT_HOME": str(tmp_path / "prefect"), **env}, capture_output=True,
                          text=True, timeout=300)


def test_a_server_that_does_not_start_in_time_fails_the_run_saying_how_to_give_it_longer(tmp_path):
    run = _pipeline(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    assert run.returncode == 1
    assert "did not start within 0 s" in run.stderr
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher" in run.stderr


def test_the_default_wait_suits_a_loaded_machine(tmp_path):
    """Without a setting of the user's, the pipeline command gives the temporary server minutes, not
    Prefect's 20 s (the flow is replaced by one that reports the setting it was started with)."""
    assert EPHEMERAL_STARTUP_S >= 120
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    run = subprocess.run([sys.executable, "-c", "import os, flows.cli.workflow as w, sys; "
                          "sys.argv = ['mtlrec']; from typer.testing import CliRunner; "
                          "from flows.cli import app; import flows.pipeline as p; "
                          "p.mtl_pipeline = lambda **kw: print('timeout', "
                          "os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS']) or {}; "
                          "print(CliRunner().invoke(app, ['pipeline']).output)"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert f"timeout {EPHEMERAL_STARTUP_S}" in run.stdout, run.stderr
