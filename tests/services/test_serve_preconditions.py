"""`mtlrec serve` refuses at once, in one line, when the feature store or the production model is missing.

Without the check BentoML's worker fails on the missing feature service, BentoML restarts it forever and
``/healthz`` never answers. Each test runs the real command as a subprocess with a private BENTOML_HOME.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from flows.dev.processes import free_port, stop_group
from flows.dev import launcher

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 10


def _serve(data: Path, home: Path, cwd: Path) -> tuple[int, str, float]:
    """Run `mtlrec serve --data DATA`; its exit status, stderr and seconds taken (it is killed after 30 s)."""
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True", "FEAST_USAGE": "False",
           "MTLREC_ONLINE_STORE": "sqlite"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("MTLREC_DEBUG", None)
    t = time.monotonic()
    proc = subprocess.Popen(launcher.command(free_port(), data=data), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        err = "(still running after 30 s)"
    finally:
        stop_group(proc.pid, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    return proc.returncode, err, time.monotonic() - t


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: cannot serve: "), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def store(clean_dataset, tmp_path_factory):
    """A dataset whose feature store is applied (no materialisation: the check needs only the registry)."""
    from feature_repo import store as fstore
    from feature_repo.apply import apply
    from feature_repo.compute import compute_feature_tables

    data = tmp_path_factory.mktemp("preconditions") / "data"
    shutil.copytree(clean_dataset, data, ignore=shutil.ignore_patterns("_gx", "_features"))
    settings = fstore.StoreSettings.for_dataset(data, online="sqlite")
    compute_feature_tables(settings.dataset, settings.tables)
    feast_store = fstore.open_store(settings)
    apply(feast_store, settings)
    return {"data": data, "settings": settings, "feast": feast_store}


def test_serve_without_a_feature_store_or_model_exits_at_once_naming_both(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rc, err, took = _serve(data, tmp_path / "bentoml", cwd=tmp_path)
    assert rc not in (0, None), err
    assert took < DEADLINE_S, f"took {took:.1f} s"
    line = _one_line(err)
    assert f"no feature store for {data}" in line and f"`mtlrec features build {data}`" in line
    assert "no production model" in line and "`mtlrec pipeline" in line and "`mtlrec promote" in line


def test_serve_without_a_production_model_exits_at_once_naming_it(store, tmp_path):
    rc, err, took = _serve(store["data"], tmp_path / "bentoml", cwd=tmp_path)
    assert rc not in (0, None), err
    assert took < DEADLINE_S, f"took {took:.1f} s"
    line = _one_line(err)
    assert "no production model" in line and f"`mtlrec pipeline --data {store['data']}`" in line
    assert "feature" not in line  # the store is there: only the model is named


def test_serve_on_a_store_without_the_feature_service_names_it(store, tmp_path):
    from feature_repo.schema import FEATURE_SERVICE
    from feature_repo import store as fstore

    data = tmp_path / "data"
    shutil.copytree(store["data"], data)
    copy = fstore.StoreSettings.for_dataset(data, online="sqlite")
    fstore.open_store(copy).delete_feature_service(FEATURE_SERVICE)
    rc, err, took = _serve(data, tmp_path / "bentoml", cwd=tmp_path)
    assert rc not in (0, None) and took < DEADLINE_S, (err, took)
    line = _one_line(err)
    assert f"no feature service '{FEATURE_SERVICE}'" in line and f"`mtlrec features build {data}`" in line


def test_the_registry_reader_agrees_with_feast(store):
    from feature_repo.schema import FEATURE_SERVICE
    from feature_repo import store as fstore
    from feature_repo.registry_file import check_servable, feature_services

    settings = store["settings"]
    registry = check_servable(settings)
    assert registry == settings.registry_file
    names = feature_services(registry, settings.project)
    assert names == [fs.name for fs in store["feast"].list_feature_services()] == [FEATURE_SERVICE]
    assert feature_services(registry, "another-project") == []
    # A Redis store never materialised into serves from the dataset's main registry, as the service does.
    redis = fstore.StoreSettings.for_dataset(settings.dataset, online="redis")
    assert check_servable(redis) == settings.registry_file


def test_an_unreadable_registry_or_a_vanished_production_model_is_named(tmp_path, monkeypatch):
    from services import production_pointer
    from feature_repo import store as fstore
    from feature_repo.registry_file import StoreNotBuilt, check_servable

    data = tmp_path / "data"
    (data / "_features").mkdir(parents=True)
    (data / "_features" / "registry.db").write_bytes(b"\x0f\xff\xff")  # wire type 7: not a protobuf message
    with pytest.raises(StoreNotBuilt, match="cannot be read.*rebuild it with `mtlrec features build"):
        check_servable(fstore.StoreSettings.for_dataset(data, online="sqlite"))

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    production_pointer.pointer_path().write_text(json.dumps({"tag": "mtlrec-ranker:gone", "previous": []}))
    with pytest.raises(launcher.NotServable, match=r"mtlrec-ranker:gone.*`mtlrec rollback`"):
        launcher.preflight(data, "sqlite")
