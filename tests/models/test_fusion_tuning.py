"""Fusion weights tuned offline: the search, the fusion gate, its versions in the registry, and the simulator check.

The search only proposes; a proposal goes live only if it beats the weighting the model is served with
now on the test split, per user, by a paired bootstrap interval that excludes 0. So a tune that is worse
(or no better than noise) changes nothing, and an accepted one becomes a fusion version the production
pointer names, audited and rolled back like a model.

The acceptance check is the simulator: on a synthetic log the generator's own probabilities are known, so
the *expected* reward of a ranking (each task's reward times its probability, discounted by rank) can be
computed without label noise, and tuned weights must earn more of it than the declared ones on the test
split, which the search never saw.

Where the check has something to find matters. On the default synthetic world (purchase weakly tied to
price, purchase worth 5 clicks) even the generator's own probabilities gain only about 1% from 1:1 to the
best ratio (2.4415 -> 2.4691), because P(click and purchase) ranks much as P(click) does; a small 2-epoch
MMoE's tuned weights there earned the same as the declared ones within noise (seeds 7 / 8: 1.68128 vs
1.68129, 3.04154 vs 3.04154), a coin flip, not an effect. The simulator test below uses a world where
the two disagree (``price_effect=3``: purchases fall steeply with price for price-sensitive users, clicks
ignore it) and a purchase worth 20 clicks: the truth gains 6.9% there (9.7512 -> 10.4226), and the default
recipe's MMoE, tuned, earned 8.2709 -> 8.6257 (+4.3%, seed 7, the FAMO balancer, the default since 2026-12-02).
With uncertainty weighting, the earlier default: 8.1160 -> 8.4668 (+4.3%, seed 7), 10.0644 -> 10.1165 (+0.5%,
seed 8) and 7.1342 -> 7.3434 (+2.9%, seed 9) (``parent_gradient`` off; on, seed 7 gave 8.2749 -> 8.5759, +3.6%).
With 2 or 4 epochs of a small MMoE instead, tuning was as often worse as better: the purchase head must be
trained to be worth weighting.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.data.synth import SynthConfig, generate
from models.contract import tables as contract
from models.contract.declaration import Declaration
from models.decisions.fusion_tuning import OffPolicyEvidence, accept, cem, rounded

REWARDS = {"click": 1.0, "purchase": 5.0}


def test_cem_finds_a_planted_optimum_on_the_simplex():
    target = np.array([0.6, 0.3, 0.1])
    best, value, history = cem(lambda w: -float(np.sum((w - target) ** 2)), 3, iterations=15, samples=32, seed=0)
    assert best.sum() == pytest.approx(1.0) and (best > 0).all()
    np.testing.assert_allclose(best, target, atol=0.03)
    assert history == sorted(history) and value == history[-1]  # the best so far never gets worse


def test_cem_never_returns_worse_than_its_start():
    start = np.array([0.2, 0.8])
    _, value, _ = cem(lambda w: -abs(w[1] - 0.8), 2, start=start, iterations=2, samples=4, seed=1)
    assert value >= -abs(start[1] - 0.8)


def test_cem_is_seeded():
    f = lambda w: float(w[0] * (1 - w[0]) + 0.1 * w[1])  # noqa: E731
    a, b = cem(f, 3, seed=3)[0], cem(f, 3, seed=3)[0]
    np.testing.assert_array_equal(a, b)


def _per_user(seed: int = 0, users: int = 500) -> np.ndarray:
    """reward@10 of one weighting per user: heavy-tailed, as real users are."""
    return np.random.default_rng(seed).gamma(2.0, 1.0, users)


def test_the_fusion_gate_accepts_only_a_gain_whose_interval_excludes_zero():
    rng = np.random.default_rng(1)
    current = _per_user()
    better = current + 0.05 + rng.normal(0, 0.2, len(current))
    yes = accept(current, better)
    assert yes.accepted and yes.interval[0] > 0 and yes.users == len(current)
    assert yes.reason.startswith("accepted: reward@10 on the test split") and yes.metric == "reward@10"
    noise = current + rng.normal(0, 0.2, len(current))
    no = accept(current, noise)
    assert not no.accepted and no.interval[0] <= 0 < no.interval[1] and "does not exclude 0" in no.reason
    assert f"{no.difference:+.4f}" in no.reason  # the figures that decided, in the message
    assert not accept(current, current - 0.05).accepted
    same = accept(current, current.copy())
    assert not same.accepted and "as the current weighting does" in same.reason
    assert not accept(np.zeros(0), np.zeros(0)).accepted
    with pytest.raises(ValueError, match="pair up"):
        accept(current, current[:-1])


def test_off_policy_evidence_must_agree_when_there_is_some():
    rng = np.random.default_rng(2)
    current = _per_user()
    better = current + 0.05 + rng.normal(0, 0.2, len(current))
    doubt = accept(current, better, offpolicy=OffPolicyEvidence(-0.01, 0.03, "ips over explored requests"))
    assert not doubt.accepted and "off-policy" in doubt.reason and "[-0.0100, +0.0300]" in doubt.reason
    assert doubt.offpolicy == {"low": -0.01, "high": 0.03, "note": "ips over explored requests"}
    agrees = accept(current, better, offpolicy=OffPolicyEvidence(0.002, 0.03))
    assert agrees.accepted and "off-policy agrees" in agrees.reason
    assert not accept(current, current + rng.normal(0, 0.2, len(current)),
                      offpolicy=OffPolicyEvidence(0.002, 0.03)).accepted  # it adds a check, it waives none


def _report(tuned: dict[str, float]) -> dict:
    """A tuning report as ``tune`` writes it, cut down to what the summary reads."""
    names = list(tuned)
    m = {"reward_ndcg@10": 0.5, "reward@10": 1.0, "ndcg@10": 0.4}
    return {"k": 10, "objectives": names, "weights": tuned, "default_weights": dict.fromkeys(names, 1.0),
            "current_weights": dict.fromkeys(names, 1.0), "current": "declared", "rewards": {"click": 1.0},
            "valid": {"default": m, "current": m, "tuned": m}, "test": {"default": m, "current": m, "tuned": m},
            "rows": {"valid": 10, "test": 10}, "accepted": False, "reason": "declined: test"}


def test_printed_weights_are_the_weights_kept():
    """A weighting pasted back from the printout, as JSON or from the table, is the one judged and kept."""
    from flows.cli.fusion import summary

    tuned = rounded({"click": 0.123456789, "purchase": 1.876543211, "like": 2.0 / 3.0})
    assert tuned == {"click": 0.123457, "purchase": 1.876543, "like": 0.666667}
    text = summary(_report(tuned))
    row = next(line for line in text.splitlines() if line.startswith("| tuned |"))
    assert dict(zip(tuned, map(float, row.strip(" |").split("|")[1:]))) == tuned
    pasted = json.loads(text.split("tuned weights (JSON): ", 1)[1].splitlines()[0])
    assert pasted == tuned


def _registry_home(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "True")


def _accepted(weights: dict[str, float], **report) -> tuple[dict, dict]:
    """A report and the fusion gate's accepting decision, as `mtlrec fusion tune` hands them to the registry."""
    return ({"weights": weights, "k": 10, **report},
            {"accepted": True, "reason": "accepted: test", "metric": "reward@10", "difference": 0.01,
             "interval": [0.005, 0.02]})


def test_registry_keeps_accepted_weights_as_versions_per_model(tmp_path, monkeypatch, rewarded_model):
    from services import model_store, production_pointer, registry_io

    _registry_home(tmp_path, monkeypatch)
    tag = model_store.register(rewarded_model["artifact"])
    other = model_store.register(rewarded_model["artifact"])
    assert model_store.fusion_of(tag) is None and model_store.fusion_of("mtlrec-ranker:nosuchversion") is None
    kept = production_pointer.accept_fusion(tag, *_accepted({"click": 0.4, "purchase": 1.6},
                                                  test={"tuned": {"reward@10": float("nan")}}),
                                  judged_against="declared")
    assert (kept.tag, kept.id, kept.live) == (tag, "f1", False)
    assert model_store.fusion_of(tag)["weights"] == {"click": 0.4, "purchase": 1.6}
    assert model_store.fusion_of(tag)["test"]["tuned"]["reward@10"] is None  # stored as JSON, NaN as null
    assert model_store.fusion_of(other) is None  # versions are per model
    assert production_pointer.accept_fusion(tag, *_accepted({"click": 1.0, "purchase": 3.0}),
                                            judged_against="f1").id == "f2"
    assert model_store.fusion_of(tag)["weights"] == {"click": 1.0, "purchase": 3.0}  # the latest accepted
    assert [r["id"] for r in model_store.list_fusion(tag)] == ["f1", "f2"]  # the earlier one is kept
    assert model_store.describe(tag)["fusion"]["weights"]["purchase"] == 3.0
    assert model_store.describe(tag)["fusion_current"] == "f2"
    assert any(e["event"] == "fusion accepted" and e["tag"] == tag for e in registry_io.audit_events())
    with pytest.raises(registry_io.RegistryError, match="finite numbers >= 0"):
        production_pointer.accept_fusion(tag, *_accepted({"click": -1.0}), judged_against="f2")
    with pytest.raises(model_store.ModelNotFound):
        production_pointer.accept_fusion("mtlrec-ranker:nosuchversion", *_accepted({"click": 1.0}),
                                         judged_against="declared")


# ---- the simulator ----------------------------------------------------------------------------------------------
# Sizes: few users with many impressions each, so K=10 is a real cut of each user's list.
WORLD = SynthConfig(n_users=150, n_items=150, n_interactions=40_000, days=12, seed=7)
TRAIN = ["train.max_epochs=2", "train.batch_size=1024", "model.params={n_experts: 3, expert: [64, 32], tower: [16]}"]


def _rewarded_world(data, world: SynthConfig, rewards: dict[str, float]):
    """A synthetic log whose declaration gives these tasks these rewards, with its feature store built."""
    from feature_repo.build import build_all

    generate(data, world)
    manifest = contract.Manifest.load(data)
    declared = manifest.declaration.to_dict()
    for t in declared["tasks"]:
        if t["name"] in rewards:
            t["reward"] = rewards[t["name"]]
    manifest.declare(Declaration.from_dict(declared)).save(data)
    build_all(data, materialize_online=False)
    return data


@pytest.fixture(scope="module")
def rewarded_model(tmp_path_factory):
    """A synthetic log whose declaration gives click reward 1 and purchase 5, and a small MMoE trained on it."""
    from models.config import load_config
    from models.training.train import train

    root = tmp_path_factory.mktemp("fusion")
    data = _rewarded_world(root / "data", WORLD, REWARDS)
    train(load_config("mmoe", TRAIN), data, root / "artifact", progress=False)
    return {"data": data, "artifact": root / "artifact"}


def test_the_artifact_carries_the_declared_rewards(rewarded_model):
    from models.scoring.artifact import read_meta

    tasks = {t["name"]: t for t in read_meta(rewarded_model["artifact"])["tasks"]}
    assert tasks["click"]["reward"] == 1.0 and tasks["purchase"]["reward"] == 5.0 and tasks["dwell"]["reward"] is None


def _fusion_cli(*args: str):
    import typer
    from typer.testing import CliRunner

    from flows.cli.fusion import app

    root = typer.Typer()  # as `mtlrec fusion` mounts it: a one-command app alone would swallow the name
    root.add_typer(app, name="fusion")
    out = CliRunner().invoke(root, ["fusion", *args])
    assert out.exit_code == 0, out.output
    return out


def _in_production(artifact) -> str:
    from services import model_store, production_pointer

    tag = model_store.register(artifact)
    model_store.record_evaluation(tag, {"fused/ndcg@10": 0.5})
    production_pointer.set_production(tag, reason="the model the tune is for")
    return tag


def test_on_the_default_world_the_gate_declines_and_production_is_unchanged(rewarded_model, tmp_path, monkeypatch):
    """Here the declared weights are within noise of the best: whatever the search proposes, nothing moves."""
    from flows.cli.fusion import summary
    from services import model_store, production_pointer, registry_io

    _registry_home(tmp_path, monkeypatch)
    tag = _in_production(rewarded_model["artifact"])
    before, audited = production_pointer.pointer_path().read_bytes(), len(registry_io.audit_events())
    out = _fusion_cli("tune", "--model", tag, "--data", str(rewarded_model["data"]), "--json")
    report = json.loads(out.stdout)
    assert report["accepted"] is False and report["reason"].startswith("declined: reward@10 on the test split")
    assert report["decision"]["interval"][0] <= 0 and report["current"] == "declared"
    assert production_pointer.pointer_path().read_bytes() == before and len(registry_io.audit_events()) == audited
    assert model_store.list_fusion(tag) == [] and \
        production_pointer.serving() == production_pointer.Serving(tag, "declared", None)
    assert f"nothing changed: {tag} keeps fusion declared" in summary(report)


def test_a_proposal_worse_on_the_test_split_is_declined_and_changes_nothing(rewarded_model, tmp_path, monkeypatch):
    """The search may overfit the validation split; here it is made to propose almost purchase-only weights."""
    from models.decisions import fusion_tuning
    from models.scoring.artifact import Scorer
    from services import model_store, production_pointer, registry_io

    _registry_home(tmp_path, monkeypatch)
    tag = _in_production(rewarded_model["artifact"])
    names = [t.name for t in Scorer.load(rewarded_model["artifact"]).tasks.binary]
    purchase_only = np.array([0.99 if n == "purchase" else 0.01 for n in names])
    monkeypatch.setattr(fusion_tuning, "cem", lambda *a, **k: (purchase_only / purchase_only.sum(), 0.0, []))
    before, audited = production_pointer.pointer_path().read_bytes(), len(registry_io.audit_events())
    out = _fusion_cli("tune", "--model", tag, "--data", str(rewarded_model["data"]), "--json")
    report = json.loads(out.stdout)
    assert report["test"]["tuned"]["reward@10"] < report["test"]["current"]["reward@10"]
    assert report["accepted"] is False and report["decision"]["difference"] < 0
    assert production_pointer.pointer_path().read_bytes() == before and len(registry_io.audit_events()) == audited
    assert model_store.list_fusion(tag) == [] and model_store.fusion_of(tag) is None


def test_the_gate_judges_a_model_with_its_accepted_weights(rewarded_model, tmp_path, monkeypatch):
    from flows.promotion import promote
    from models.decisions.gate import decide
    from models.data.training_table import load_training_table
    from services import model_store, production_pointer, registry_io

    _registry_home(tmp_path, monkeypatch)
    table = load_training_table(rewarded_model["data"])
    declared = decide(rewarded_model["artifact"], table)
    assert declared.fusion["candidate"] == {"weights": {"click": 1.0, "purchase": 1.0}, "source": "declared"}
    with pytest.raises(ValueError, match=r"name \['like'\], which are not this model's ranking objectives"):
        decide(rewarded_model["artifact"], table, weights={"like": 1.0})
    tag = model_store.register(rewarded_model["artifact"])
    model_store.record_evaluation(tag, {"fused/ndcg@10": 0.5})
    accepted = {"click": 0.7, "purchase": 1.3}
    production_pointer.accept_fusion(tag, *_accepted(accepted), judged_against="declared")
    decision = promote(tag, table)
    assert decision.fusion["candidate"] == {"weights": accepted, "source": "tuned"}
    assert "candidate fused with its tuned weights" in decision.markdown()
    events = [e for e in registry_io.audit_events() if e["event"] == "gate"]
    assert events[-1]["fusion"]["candidate"]["source"] == "tuned"
    # it serves what it was judged with
    assert production_pointer.serving() == production_pointer.Serving(tag, "f1", accepted)


# The simulator: a world where click and purchase disagree about which items to show (purchases fall steeply
# with price for price-sensitive users; clicks ignore price) and a purchase is worth 20 clicks. There the
# generator's own probabilities earn about 7% more expected reward@10 with reward-aligned weights than with
# the declared 1:1, so a model that ranks purchases at all has something to find.
SIMULATOR = SynthConfig(n_users=600, n_items=300, n_interactions=160_000, days=12, seed=7, price_effect=3.0)
SIMULATOR_REWARDS = {"click": 1.0, "purchase": 20.0}


@pytest.mark.timeout(1800)  # trains the default recipe: minutes alone, more beside other work on two cores
def test_accepted_weights_go_live_and_earn_more_expected_reward_in_the_simulator(tmp_path, monkeypatch):
    """Tuned on the validation split's logged labels, accepted on the test split's, judged by the generator's truth.

    Expected reward@10 is reward-weighted DCG@10 with each row's gain its *expected* reward, 1 x P(click) +
    20 x P(click and purchase) from ``synth.oracle``: no label noise in the judgement, so the comparison
    says whether the weights the gate let through rank better, not whether the test split was lucky.
    """
    from models.metrics import functional as metrics
    from models.scoring.artifact import Scorer
    from models.config import load_config
    from models.data.resident import time_split
    from models.fusion import fuse
    from models.data.training_table import load_training_table
    from models.training.train import train
    from flows.data.synth import oracle
    from services import production_pointer, registry_io

    data = _rewarded_world(tmp_path / "data", SIMULATOR, SIMULATOR_REWARDS)
    train(load_config("mmoe"), data, tmp_path / "artifact", progress=False)  # the default recipe
    _registry_home(tmp_path, monkeypatch)
    tag = _in_production(tmp_path / "artifact")
    out = _fusion_cli("tune", "--model", tag, "--data", str(data), "--seed", "1", "--json")
    report = json.loads(out.stdout)
    assert report["accepted"] is True, report["reason"]
    live = production_pointer.serving()
    assert live == production_pointer.Serving(tag, "f1", report["weights"])
    assert report["fusion"] == {"id": "f1", "live": True}
    assert [e["fusion"] for e in registry_io.audit_events() if e["event"] == "fusion promote"] == ["f1"]

    scorer, table = Scorer.load(tmp_path / "artifact"), load_training_table(data)
    _, _, test = time_split(table, 0.1, 0.1)
    truth = oracle(data)(test)
    expected = truth["click"] + SIMULATOR_REWARDS["purchase"] * truth["purchase"]
    probs, users = scorer.predict(test), test["user_id"].to_numpy()

    def expected_reward(weights: dict[str, float]) -> float:
        return metrics.reward_metrics(users, fuse(probs, weights, method=scorer.fusion_method), expected,
                                      (10,))["reward@10"]

    default, tuned = expected_reward(report["default_weights"]), expected_reward(live.weights)
    assert live.weights["purchase"] / live.weights["click"] > 1.0  # towards the purchase, as it pays
    assert tuned > default * 1.005, (live.weights, default, tuned)
