"""The automation files name things that exist: deployments, work pools, commands and their options."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[1]


def _help(*command: str) -> str:
    res = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return res.output


def test_retrain_workflow_runs_commands_that_exist():
    wf = yaml.safe_load((ROOT / ".github/workflows/retrain.yml").read_text())
    triggers = wf[True]  # YAML 1.1 reads the key `on` as True
    assert {"workflow_dispatch", "schedule", "push"} <= set(triggers)
    script = "\n".join(step.get("run", "") for step in wf["jobs"]["retrain"]["steps"])
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    flow_name = "mtl-pipeline"
    named = {f"{flow_name}/{d['name']}" for d in deployments}
    assert set(re.findall(r"deployment run '([^']+)'", script)) <= named
    options = _help("pipeline")
    for opt in re.findall(r"mtlrec pipeline ([^\n]*)", script)[0].split():
        if opt.startswith("--"):
            assert opt in options, f"`mtlrec pipeline` has no {opt}"
    for path in triggers["push"]["paths"]:
        assert list(ROOT.glob(path.rstrip("*").rstrip("/"))), f"push path {path} matches nothing in the repository"


def test_make_run_and_prefect_yaml_agree():
    from flows import local_run

    prefect = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    local = next(d for d in prefect["deployments"] if d["name"] == local_run.DEPLOYMENT.split("/")[1])
    assert local["work_pool"]["name"] == local_run.POOL
    assert local["entrypoint"] == "flows/pipeline.py:mtl_pipeline" and (ROOT / "flows/pipeline.py").is_file()
    assert local["schedules"] and local["triggers"][0]["expect"] == ["mtlrec.data.landed"]
    makefile = (ROOT / "Makefile").read_text()
    assert "mtlrec up" in makefile and "mtlrec down" in makefile
    assert "--data" in _help("up") and "--port" in _help("up")
