"""The registry against a real BentoML store in a temporary BENTOML_HOME, with real trained models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services import model_store, production_pointer, registry_io
from services.production_pointer import Serving
from models.scoring.artifact import Scorer, read_meta

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Two tiny models (seed 0 and seed 1) on one small dataset, trained once for the module."""
    from flows.data.synth import SynthConfig, generate
    from feature_repo.build import build_all
    from models.config import load_config
    from models.training.train import train

    tmp = tmp_path_factory.mktemp("registry")
    data = tmp / "data"
    generate(data, SynthConfig(n_users=60, n_items=30, n_interactions=2000, days=4, seed=0))
    build_all(data, materialize_online=False)
    overrides = ["train.max_epochs=1", "model.params={bottom: [16], tower: [8]}"]
    for name, extra in (("a", []), ("b", ["seed=1"])):
        train(load_config("shared_bottom", overrides + extra), data, tmp / name, progress=False)
    return {"data": data, "a": tmp / "a", "b": tmp / "b"}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(h))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "True")
    monkeypatch.delenv(registry_io.CRASH_HOOK, raising=False)
    return h


@pytest.fixture
def evaluated(trained, home) -> tuple[str, str]:
    """Models A and B registered and evaluated, nothing promoted yet."""
    a, b = model_store.register(trained["a"]), model_store.register(trained["b"])
    for tag in (a, b):
        test_metrics = read_meta(model_store.artifact_path(tag))["metrics"]["test"]
        model_store.record_evaluation(tag, {"fused/ndcg@10": test_metrics["fused/ndcg@10"]})
    return a, b


def test_register_round_trip(trained, home):
    tag = model_store.register(trained["a"], labels={"stage": "test"})
    name, version = tag.split(":")
    assert name == model_store.DEFAULT_NAME and version
    path = model_store.artifact_path(tag)
    assert path.is_relative_to(home / "models") and (path / "weights.safetensors").is_file()

    from models.data.training_table import load_training_table

    rows = load_training_table(trained["data"]).head(64)
    want, got = Scorer.load(trained["a"]).predict(rows), Scorer.load(path).predict(rows)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)

    meta, info = read_meta(trained["a"]), model_store.describe(tag)
    assert info["labels"] == {"architecture": "shared_bottom", "balancer": meta["config"]["balancer"]["name"],
                              "feature_service": meta["feature_service"], "data": meta["data"]["fingerprint"][:12],
                              "stage": "test"}
    md = info["metadata"]
    assert md["metrics"]["test"]["fused/ndcg@10"] == pytest.approx(meta["metrics"]["test"]["fused/ndcg@10"])
    assert md["data_fingerprint"] == meta["data"]["fingerprint"]
    assert md["code_version"] == meta["code_version"] and md["feature_service"] == meta["feature_service"]
    assert md["config"]["architecture"] == "shared_bottom" and md["config"]["seed"] == 0
    # a unique version prefix resolves to the full tag, which is what the pointer must hold
    assert model_store.resolve(f"{name}:{version[:8]}") == tag


def test_store_follows_BENTOML_HOME_within_one_process(trained, home, tmp_path, monkeypatch):
    """BentoML caches its home on first use; the registry must not, or models and pointer would split."""
    tag = model_store.register(trained["a"])
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "other"))
    assert model_store.list_models() == []
    with pytest.raises(model_store.ModelNotFound, match=tag):
        model_store.artifact_path(tag)
    monkeypatch.setenv("BENTOML_HOME", str(home))
    assert [m["tag"] for m in model_store.list_models()] == [tag]


def test_set_production_refuses_unevaluated_and_unknown(trained, home):
    tag = model_store.register(trained["a"])
    with pytest.raises(production_pointer.NotEvaluated, match=tag):
        production_pointer.set_production(tag, reason="no evaluation")
    with pytest.raises(model_store.ModelNotFound, match="mtlrec-ranker:nosuchversion"):
        production_pointer.set_production("mtlrec-ranker:nosuchversion", reason="typo")
    assert production_pointer.production() is None and not production_pointer.pointer_path().exists()
    assert model_store.evaluation_of(tag) is None


def test_promote_rollback_and_audit(evaluated):
    a, b = evaluated
    assert production_pointer.set_production(a, reason="first") == a
    assert production_pointer.set_production(b, reason="better") == b
    p = production_pointer.pointer()
    assert p["tag"] == b and p["previous"] == [a] and p["reason"] == "better"
    assert [m["tag"] for m in model_store.list_models() if m["production"]] == [b]

    assert production_pointer.rollback(reason="b misbehaves") == a
    assert production_pointer.production() == a and production_pointer.pointer()["previous"] == []
    listed = {m["tag"]: m for m in model_store.list_models()}
    assert listed[a]["production"] and not listed[b]["production"] and listed[a]["evaluated"]
    assert "fused/ndcg@10" in listed[a]["metrics"]
    with pytest.raises(registry_io.RegistryError, match="nothing to roll back"):
        production_pointer.rollback()

    events = [(e["event"], e.get("tag")) for e in registry_io.audit_events() if e["event"] != "evaluated"]
    assert events == [("promote", a), ("promote", b), ("rollback", a)]
    assert all("time" in e for e in registry_io.audit_events())


def test_killed_promotion_leaves_production_intact(evaluated, home):
    """Kill a real process between writing the new pointer and renaming it over the old one."""
    a, b = evaluated
    production_pointer.set_production(a, reason="first")
    before = production_pointer.pointer_path().read_bytes()
    env = {**os.environ, "BENTOML_HOME": str(home), registry_io.CRASH_HOOK: "1"}
    probe = f"from services import production_pointer; production_pointer.set_production({b!r}, 'x')"
    proc = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 70, proc.stderr
    # it died with the new pointer written beside the old one, not over it
    assert list(registry_io.registry_dir().glob(".production.json.*.tmp"))
    assert production_pointer.pointer_path().read_bytes() == before
    assert json.loads(before)["tag"] == production_pointer.production() == a
    assert [e["tag"] for e in registry_io.audit_events() if e["event"] == "promote"] == [a]
    # and the dead process left no lock behind
    assert production_pointer.set_production(b, reason="retry") == b


def test_torn_model_is_never_promoted_and_does_not_break_listing(evaluated, home):
    """BentoML copies a model in place; a crash mid-register leaves a partial directory in the store."""
    a, b = evaluated
    weights = model_store.artifact_path(b) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(registry_io.RegistryError, match="sha256"):
        production_pointer.set_production(b, reason="torn")
    (home / "models" / model_store.DEFAULT_NAME / "half").mkdir()  # no model.yaml at all
    assert {m["tag"] for m in model_store.list_models()} == {a, b}
    assert production_pointer.production() is None


def test_cli(evaluated):
    from typer.testing import CliRunner

    from flows.cli.registry import app as models_app

    a, b = evaluated
    production_pointer.set_production(a, reason="first")
    production_pointer.set_production(b, reason="second")
    run = CliRunner().invoke
    out = run(models_app, ["list"])
    assert out.exit_code == 0
    marked = [line for line in out.output.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and b in marked[0]
    shown = run(models_app, ["show", a])
    assert shown.exit_code == 0 and json.loads(shown.output)["metadata"]["config"]["architecture"] == "shared_bottom"
    assert run(models_app, ["show", "mtlrec-ranker:nosuchversion"]).exit_code == 2
    back = run(models_app, ["rollback", "--reason", "cli"])
    assert back.exit_code == 0 and production_pointer.production() == a
    assert production_pointer.pointer()["reason"] == "cli"
    assert run(models_app, ["rollback"]).exit_code == 1


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def _one_line_error(res: subprocess.CompletedProcess, *words: str) -> None:
    assert res.returncode != 0, res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert lines and lines[-1].startswith("error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    for w in words:
        assert w in lines[-1], lines[-1]


def test_promoting_while_the_production_model_is_gone_is_one_clear_line(trained, evaluated, home, tmp_path):
    import shutil

    a, b = evaluated
    production_pointer.set_production(a)
    shutil.rmtree(model_store.artifact_path(a))
    res = _cli("promote", b, "--data", str(trained["data"]), "--report-dir", str(tmp_path / "reports"),
               env={"BENTOML_HOME": str(home)})
    _one_line_error(res, a, "no longer in the model store", "mtlrec rollback")
    assert production_pointer.production() == a  # nothing moved


def test_a_killed_promotion_leaves_no_temp_file_behind(trained, evaluated, home):
    a, b = evaluated
    env = {"BENTOML_HOME": str(home), registry_io.CRASH_HOOK: "1"}
    probe = f"from services import production_pointer; production_pointer.set_production({a!r})"
    died = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**os.environ, **env}, capture_output=True)
    assert died.returncode == 70 and production_pointer.production() is None
    assert list(registry_io.registry_dir().glob(".production.json.*.tmp"))  # the killed writer's temp file
    production_pointer.commit_decision(b, judged_against=None, promote=True, gate={"delta": 0.1})
    assert production_pointer.production() == b and not list(registry_io.registry_dir().glob(".production.json.*.tmp"))


def test_compare_and_set_refuses_a_stale_judgement(trained, evaluated, home):
    a, b = evaluated
    production_pointer.commit_decision(a, judged_against=None, promote=True, gate={"delta": 0.1})
    with pytest.raises(production_pointer.ProductionChanged, match="now " + a):
        production_pointer.commit_decision(b, judged_against=None, promote=True, gate={"delta": 0.2})
    assert production_pointer.production() == a
    with pytest.raises(production_pointer.ProductionChanged):
        production_pointer.set_production(b, expected=None)
    assert production_pointer.set_production(b, expected=a) == b
    gates = [e for e in registry_io.audit_events() if e["event"] == "gate"]
    assert [(g["candidate"], g["production"]) for g in gates] == [(a, None)]  # the refused one wrote nothing


def test_command_line_failures_are_one_line(trained, tmp_path):
    """Malformed manifest, missing directory, a config typo: one line naming the problem, exit non-zero."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained["data"], bad, ignore=shutil.ignore_patterns("_features", "_gx"))
    (bad / "dataset.yaml").write_text("name: x\nsource: y\nstart: [\n")
    _one_line_error(_cli("features", "build", str(bad)), "dataset.yaml", "not valid YAML")
    missing = tmp_path / "nowhere"
    _one_line_error(_cli("features", "build", str(missing)), "dataset.yaml is missing")
    assert not missing.exists()
    _one_line_error(_cli("train", "--config", "mmoe", "--data", str(trained["data"]), "--out", str(tmp_path / "o"),
                         "--set", "train.max_epoch=1"), "train.max_epochs")
    _one_line_error(_cli("evaluate", "--model", "mtlrec-ranker:nope", "--data", str(trained["data"])),
                    "mtlrec-ranker:nope")


def test_scorer_load_checks_the_weights_checksum(trained, tmp_path):
    import shutil

    from models.scoring.artifact import CorruptModel

    copy = tmp_path / "m"
    shutil.copytree(trained["a"], copy)
    Scorer.load(copy)
    raw = bytearray((copy / "weights.safetensors").read_bytes())
    raw[-8:] = bytes(8)  # same size, different bytes
    (copy / "weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CorruptModel, match="sha256"):
        Scorer.load(copy)


# ---- fusion versions: accepted weightings, live behind the same pointer ------------------------------------------

def _accepted(weights: dict[str, float], difference: float = 0.01) -> tuple[dict, dict]:
    """A tuning report and the fusion gate's accepting decision, as ``mtlrec fusion tune`` hands them over."""
    return ({"weights": weights, "k": 10},
            {"accepted": True, "reason": "accepted: test", "metric": "reward@10", "difference": difference,
             "interval": [difference / 2, difference * 2]})


W1, W2 = {"click": 0.8, "purchase": 1.2}, {"click": 0.5, "purchase": 1.5}


def test_an_accepted_fusion_of_production_goes_live_through_the_pointer(evaluated):
    """A weighting reaches production only as a version the pointer names, so every worker can see it move."""
    a, _ = evaluated
    production_pointer.set_production(a, reason="first")
    assert production_pointer.serving() == Serving(a, "declared", None)
    kept = production_pointer.accept_fusion(a, *_accepted(W1), judged_against="declared")
    assert (kept.id, kept.live, kept.weights) == ("f1", True, W1)
    assert production_pointer.serving() == Serving(a, "f1", W1) and production_pointer.serving().weights == W1
    p = production_pointer.pointer()
    assert p["tag"] == a and p["previous"] == [] and p["fusion"]["id"] == "f1" and p["fusion_previous"] == []
    production_pointer.accept_fusion(a, *_accepted(W2), judged_against="f1")
    assert production_pointer.serving() == Serving(a, "f2", W2)
    assert production_pointer.pointer()["fusion_previous"] == ["f1"]
    assert model_store.fusion_of(a)["weights"] == W2
    moves = [(e["event"], e["fusion"], e["from"]) for e in registry_io.audit_events()
             if e["event"].startswith("fusion")]
    assert moves == [("fusion accepted", "f1", "declared"), ("fusion promote", "f1", "declared"),
                     ("fusion accepted", "f2", "f1"), ("fusion promote", "f2", "f1")]


def test_a_stale_or_declined_fusion_decision_changes_nothing(evaluated):
    a, _ = evaluated
    production_pointer.set_production(a, reason="first")
    production_pointer.accept_fusion(a, *_accepted(W1), judged_against="declared")
    before = production_pointer.pointer_path().read_bytes()
    with pytest.raises(production_pointer.FusionChanged, match="judged against its fusion declared"):
        production_pointer.accept_fusion(a, *_accepted(W2), judged_against="declared")  # f1 went live in between
    report, decision = _accepted(W2)
    with pytest.raises(registry_io.RegistryError, match="declined"):
        production_pointer.accept_fusion(a, report, {**decision, "accepted": False}, judged_against="f1")
    with pytest.raises(registry_io.RegistryError, match="finite numbers >= 0"):
        production_pointer.accept_fusion(a, *_accepted({"click": -1.0}), judged_against="f1")
    assert production_pointer.pointer_path().read_bytes() == before
    assert [r["id"] for r in model_store.list_fusion(a)] == ["f1"]


def test_rollback_fusion_serves_the_previous_version_then_the_declared_weights(evaluated):
    a, _ = evaluated
    with pytest.raises(registry_io.RegistryError, match="no model was ever promoted"):
        production_pointer.rollback_fusion()
    production_pointer.set_production(a, reason="first")
    production_pointer.accept_fusion(a, *_accepted(W1), judged_against="declared")
    production_pointer.accept_fusion(a, *_accepted(W2), judged_against="f1")
    assert production_pointer.rollback_fusion("f2 misbehaves") == Serving(a, "f1", W1)
    assert production_pointer.serving() == Serving(a, "f1", W1)
    assert production_pointer.pointer()["fusion_previous"] == []
    assert model_store.fusion_of(a)["weights"] == W1  # the rolled-back version never comes back with the model
    assert [r["id"] for r in model_store.list_fusion(a) if r.get("withdrawn")] == ["f2"]
    assert production_pointer.rollback_fusion("f1 too") == Serving(a, "declared", None)
    with pytest.raises(registry_io.RegistryError, match="already serves its declared fusion weights"):
        production_pointer.rollback_fusion()
    assert model_store.fusion_of(a) is None and production_pointer.production() == a
    rollbacks = [(e["fusion"], e["from"], e["reason"]) for e in registry_io.audit_events()
                 if e["event"] == "fusion rollback"]
    assert rollbacks == [("f1", "f2", "f2 misbehaves"), ("declared", "f1", "f1 too")]
    # ids are never reused
    assert production_pointer.accept_fusion(a, *_accepted(W2), judged_against="declared").id == "f3"


def test_a_promotion_or_rollback_brings_the_model_s_own_accepted_fusion(evaluated):
    a, b = evaluated
    production_pointer.set_production(a, reason="first")
    production_pointer.accept_fusion(a, *_accepted(W1), judged_against="declared")
    kept = production_pointer.accept_fusion(b, *_accepted(W2), judged_against="declared")
    assert not kept.live and production_pointer.serving() == Serving(a, "f1", W1)  # b is not production
    assert production_pointer.fusion_current(b) == Serving(b, "f1", W2)
    production_pointer.commit_decision(b, judged_against=a, promote=True, gate={"delta": 0.1})
    assert production_pointer.serving() == Serving(b, "f1", W2)
    assert [e["fusion"] for e in registry_io.audit_events() if e["event"] == "promote"] == ["declared", "f1"]
    assert production_pointer.rollback("b misbehaves") == a
    assert production_pointer.serving() == Serving(a, "f1", W1)


def test_the_model_gate_judges_production_with_its_live_fusion(trained, evaluated):
    from flows.promotion import promote
    from models.data.training_table import load_training_table

    a, b = evaluated
    production_pointer.set_production(a, reason="first")
    production_pointer.accept_fusion(a, *_accepted(W1), judged_against="declared")
    production_pointer.accept_fusion(b, *_accepted(W2), judged_against="declared")
    decision = promote(b, load_training_table(trained["data"]))
    assert decision.fusion["reference"] == {"weights": W1, "source": "tuned"}
    assert decision.fusion["candidate"] == {"weights": W2, "source": "tuned"}


def test_fusion_cli_show_and_rollback(evaluated):
    import typer
    from typer.testing import CliRunner

    from flows.cli.fusion import app

    a, b = evaluated
    production_pointer.set_production(a, reason="first")
    production_pointer.accept_fusion(a, *_accepted(W1), judged_against="declared")
    production_pointer.accept_fusion(a, *_accepted(W2, 0.02), judged_against="f1")
    root = typer.Typer()  # as `mtlrec fusion` mounts it
    root.add_typer(app, name="fusion")
    run = CliRunner().invoke
    shown = run(root, ["fusion", "show"])
    assert shown.exit_code == 0, shown.output
    assert f"{a} (production) serves fusion f2" in shown.output
    rows = {line.split("|")[1].strip(): line for line in shown.output.splitlines() if line.startswith("| ")}
    assert rows["f2"].rstrip().endswith("| live |") and "| 0.5 | 1.5 |" in rows["f2"]
    assert "reward@10 +0.0200 [+0.0100, +0.0400] vs f1" in rows["f2"] and "| 1.0 | 1.0 |" in rows["declared"]
    listed = json.loads(run(root, ["fusion", "show", "--model", b, "--json"]).output)
    assert listed == {"tag": b, "production": False, "serves": "declared", "declared": {"click": 1.0, "purchase": 1.0},
                      "versions": []}
    back = run(root, ["fusion", "rollback", "--reason", "cli"])
    assert back.exit_code == 0 and back.output.strip() == f"production {a}: fusion f1 (was f2)"
    assert production_pointer.pointer()["fusion"]["reason"] == "cli"
    run(root, ["fusion", "rollback"])
    refused = run(root, ["fusion", "rollback"])
    assert refused.exit_code == 1 and "already serves its declared fusion weights" in refused.output
