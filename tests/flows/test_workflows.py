"""The automation files name things that exist: deployments, work pools, commands and their options."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]


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
    from flows.dev import local_run

    prefect = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    local = next(d for d in prefect["deployments"] if d["name"] == local_run.DEPLOYMENT.split("/")[1])
    assert local["work_pool"]["name"] == local_run.POOL
    assert local["entrypoint"] == "flows/pipeline.py:mtl_pipeline" and (ROOT / "flows/pipeline.py").is_file()
    assert local["schedules"] and local["triggers"][0]["expect"] == ["mtlrec.data.landed"]
    makefile = (ROOT / "Makefile").read_text()
    assert "mtlrec up" in makefile and "mtlrec down" in makefile
    assert "--data" in _help("up") and "--port" in _help("up")


@pytest.mark.parametrize("name, online", [("feature_store.yaml", "sqlite"), ("feature_store.redis.yaml", "redis")])
def test_the_feast_repo_files_say_what_the_code_writes(name, online):
    """feature_repo/*.yaml (for `feast` in that directory) and the per-dataset config the code writes agree."""
    from feature_repo.store import StoreSettings

    repo = ROOT / "feature_repo"
    written = yaml.safe_load((repo / name).read_text())
    code = StoreSettings.for_dataset(ROOT / "data/synth", online=online, redis="127.0.0.1:6379,db=0",
                                     project="mtlrec").yaml_config()
    for cfg, base in ((written, repo), (code, ROOT)):  # paths as absolute ones
        cfg["registry"] = str((base / cfg["registry"]).resolve())
        if "path" in cfg["online_store"]:
            cfg["online_store"]["path"] = str((base / cfg["online_store"]["path"]).resolve())
    assert written == code


def test_the_bento_installs_the_pins():
    """services/requirements.txt, what the bento installs, is services/requirements.in at constraints.txt's pins."""
    from services import pins

    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]
    assert (ROOT / bento["requirements_txt"]).resolve() == pins.TARGET and not bento.get("lock_packages")
    assert pins.TARGET.read_text() == pins.render(), "services/requirements.txt is stale: `make bento-requirements`"
    constraints = pins.read_pins()
    assert all(constraints[n] == v for n, v in pins.read_pins(pins.TARGET).items())
