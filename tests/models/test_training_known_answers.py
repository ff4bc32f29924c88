"""The learning core, round three: any task name, FAMO's re-measure, the decay groups, ESMM's log-space loss.

Each test failed on the code before its fix.
"""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from models.architectures import ARCHITECTURES
from models.scoring.artifact import WEIGHTS, Scorer
from models.config import load_config
from models.data.resident import MTLDataModule
from models.contract.declaration import Declaration
from models.training.lightning_module import MTLModule
from models.tasks import TaskSet, _log1mexp
from models.training.train import train

# Names that are attributes of every torch module (methods, or the ``training`` flag ``train()`` assigns).
NAMES = ("forward", "update", "train", "type", "training")

SMALL_PARAMS = {
    "shared_bottom": {"bottom": [16, 8], "tower": [8]},
    "cross_stitch": {"hidden": [16, 8], "tower": [8]},
    "mmoe": {"n_experts": 2, "expert": [16, 8], "tower": [8]},
    "ple": {"levels": 2, "n_shared_experts": 1, "n_task_experts": 1, "expert": [16, 8], "tower": [8]},
    "esmm": {"shared": [16], "tower": [16, 8]},
    "gated": {"n_shared_experts": 2, "expert": [16, 8], "tower": [8]},
}


def _table(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    """A training table whose tasks are named after torch.nn.Module attributes, one of each task type."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 40, n), rng.integers(0, 30, n)
    forward = (rng.random(n) < 0.2 + 0.5 * (items % 2)).astype(np.int64)
    df = pd.DataFrame({
        "user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items],
        "event_timestamp": pd.date_range("2026-01-01", periods=n, freq="min", tz="UTC"),
        "x": rng.normal(size=n), "forward": forward,
        "update": forward * (rng.random(n) < 0.5), "training": (rng.random(n) < 0.3).astype(np.int64),
        "train": rng.normal(size=n) + items % 3, "type": rng.integers(0, 3, n)})
    df.attrs["mtlrec"] = {
        "declaration": {"tasks": [{"name": "forward"}, {"name": "update", "parent": "forward"},
                                  {"name": "training"}, {"name": "train", "type": "regression"},
                                  {"name": "type", "type": "multiclass", "num_classes": 3}]},
        "features": {"categorical": ["user_id", "item_id"], "numeric": ["x"], "log1p": []}}
    return df


# ---- 1. any valid identifier is a task name ----------------------------------------------------------------------


def test_the_declaration_accepts_names_that_are_module_attributes():
    decl = Declaration.from_dict(_table(10).attrs["mtlrec"]["declaration"])
    assert [t.name for t in decl.tasks] == ["forward", "update", "training", "train", "type"]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_tasks_named_forward_update_train_type_train_and_score(architecture, tmp_path):
    table = _table()
    cfg = load_config(architecture, ["train.max_epochs=1", "train.batch_size=512", "train.ema=false",
                                     f"model.params={SMALL_PARAMS[architecture]}"])
    meta = train(cfg, "<table>", tmp_path / "m", progress=False, table=table)
    assert [t["name"] for t in meta["tasks"]] == ["forward", "update", "training", "train", "type"]
    assert np.isfinite(meta["metrics"]["valid"]["forward/auc"])
    scorer = Scorer.load(tmp_path / "m")
    probs = scorer.predict(table.tail(50))
    assert set(probs) == set(NAMES)
    assert probs["type"].shape == (50, 3) and np.all(probs["update"] <= probs["forward"] + 1e-6)
    # Each head is its own: the tower of task "train" is not the module's train() method.
    arch = scorer.arch
    assert isinstance(arch.towers["train"], torch.nn.Module) and list(arch.towers) == list(NAMES[:2]) + [
        "training", "train", "type"]
    arch.train()
    assert arch.training and arch.towers["training"].training


def test_an_artifact_with_task_named_heads_from_before_still_loads(tmp_path):
    """Artifacts written when heads were keyed by the bare task name load and score the same."""
    table = _table()
    cfg = load_config("gated", ["train.max_epochs=1", "train.batch_size=512", "train.ema=false",
                                "tasks=[{name: forward}, {name: update}]",
                                f"model.params={SMALL_PARAMS['gated']}"])
    train(cfg, "<table>", tmp_path / "m", progress=False, table=table)
    new = Scorer.load(tmp_path / "m")
    want = new.predict(table.tail(50))
    state = load_file(str(tmp_path / "m" / WEIGHTS))
    old = {}
    for k, v in state.items():  # rewrite the keys as the old layout had them: arch.towers.<task>.…
        parts = k.split(".")
        if parts[1] in ("towers", "aux_towers"):
            parts[2] = parts[2].split("_", 1)[1]
        old[".".join(parts)] = v
    assert any(k.startswith("arch.towers.forward.") for k in old)
    save_file(old, str(tmp_path / "m" / WEIGHTS))
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta.pop("weights_sha256")
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    got = Scorer.load(tmp_path / "m").predict(table.tail(50))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# ---- 2. FAMO's re-measure sees the inputs of the step it measures -------------------------------------------------


def _module(architecture: str, balancer: str = "famo", lr: float = 3e-3, **params) -> tuple[MTLModule, MTLDataModule]:
    table = _table()
    tasks = TaskSet.resolve("auto", table.attrs["mtlrec"]["declaration"], columns=table.columns)
    dm = MTLDataModule(table, tasks, ["user_id", "item_id"], ["x"], batch_size=256, seed=0)
    module = MTLModule(spec=dm.spec.to_dict(), tasks=tasks.to_config(), architecture=architecture,
                       arch_params={**SMALL_PARAMS[architecture], **params}, balancer=balancer, embedding_dim=4,
                       lr=lr)
    return module, dm


def _fit(module: MTLModule, dm: MTLDataModule, batches: int) -> None:
    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, enable_checkpointing=False, max_epochs=1, limit_train_batches=batches,
              limit_val_batches=0).fit(module, datamodule=dm)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_famo_re_measures_the_step_on_the_same_masked_inputs(dropout):
    """With a learning rate of 0 no parameter moves, so the re-measured losses are the step's own, to the bit.

    Before, the re-measure drew a fresh unknown-id mask (and fresh dropout masks) and FAMO's Adam turned that
    noise into steps of its full learning rate on the task logits.
    """
    L.seed_everything(0, verbose=False)
    module, dm = _module("mmoe", lr=0.0, dropout=dropout)
    assert module.encoder.oov_rate > 0
    seen = []
    after_step = module.balancer.after_step

    def spy(new_losses):
        seen.append((module.balancer.prev_losses.clone(), new_losses.clone()))
        after_step(new_losses)

    module.balancer.after_step = spy
    _fit(module, dm, batches=6)
    assert len(seen) == 6
    for before, after in seen:
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert module.balancer.logits.abs().max() < 1e-6  # no progress measured, none credited



# ---- 3. weight decay reaches weights only ---------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_decay_leaves_biases_and_mixing_units_out_and_keeps_weights_and_gates_in(architecture):
    module, _ = _module(architecture, balancer="uncertainty")
    groups = module.configure_optimizers().param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(module.parameters()))
    names = {id(p): n for n, p in module.named_parameters()}
    wrongly_decayed, wrongly_exempt = [], []
    for name, p in module.named_parameters():
        parts = name.split(".")
        if parts[-1] == "bias" or "biases" in parts or "stitches" in parts or name.startswith("balancer."):
            wrongly_decayed += [name] if id(p) in decayed else []
        else:  # weights of experts, columns, towers and gates (a gate's weight at 0 mixes uniformly), embeddings
            wrongly_exempt += [] if id(p) in decayed else [name]
    assert wrongly_decayed == [] and wrongly_exempt == []
    if architecture in ("mmoe", "ple", "gated"):
        assert any("gate" in names[i] for i in decayed)
    if architecture == "cross_stitch":
        assert all(id(s) not in decayed for s in module.arch.stitches)
        assert any(p.ndim == 3 and "biases" in n for n, p in module.named_parameters())


def test_decay_leaves_normalisation_layers_out():
    from models.training.decay import decay_groups

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    decayed, kept = decay_groups(net, 0.1)
    assert [p.shape for p in decayed["params"]] == [(4, 3), (1, 4)] and len(kept["params"]) == 4


# ---- 4. ESMM's loss keeps a gradient at every probability ----------------------------------------------------------


def _reference(a: float) -> tuple[float, float]:
    """log(1 - e^a) and its derivative in float64."""
    return math.log(-math.expm1(a)), -math.exp(a) / -math.expm1(a)


@pytest.mark.parametrize("a", [-1e-30, -1e-20, -1e-9, -3e-8, -1e-7, -1e-4, -0.5, -0.7, -1.0, -20.0, -80.0])
def test_log1mexp_value_and_gradient_match_float64(a):
    x = torch.tensor(a, dtype=torch.float32, requires_grad=True)
    y = _log1mexp(x)
    y.backward()
    value, slope = _reference(float(x.detach()))
    assert float(y) == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert float(x.grad) == pytest.approx(slope, rel=1e-4, abs=1e-12)


def test_log1mexp_at_p_one_is_large_finite_and_has_a_gradient():
    x = torch.zeros(3, requires_grad=True)
    y = _log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and (y < -60).all()  # -log(1 - p) of p = 1: a large, finite loss
    assert torch.isfinite(x.grad).all() and (x.grad < 0).all()


def test_a_confident_esmm_negative_gets_the_gradient_of_its_error():
    """A negative scored p(click) p(buy | click) near 1 (logits 20 each) must be pushed down with a gradient near
    the product's own (d/dz of -log(1 - sigmoid(z) p) is about 0.5 here); the clamp at -1e-7 gave it none."""
    tasks = TaskSet.from_config([{"name": "click"}, {"name": "buy", "sample_space": "click"}])
    z_click = torch.full((4, 1), 20.0)
    z_buy = torch.full((4, 1), 20.0, requires_grad=True)
    labels = {"click": torch.ones(4), "buy": torch.zeros(4)}
    loss = tasks.losses({"click": z_click, "buy": z_buy}, labels)[1]
    loss.backward()
    z = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    p = torch.sigmoid(z) * torch.sigmoid(torch.tensor(20.0, dtype=torch.float64))
    (-torch.log1p(-p)).backward()
    assert float(loss) == pytest.approx(float(-torch.log1p(-p)), rel=1e-4)
    torch.testing.assert_close(z_buy.grad.double(), torch.full((4, 1), float(z.grad) / 4, dtype=torch.float64),
                               rtol=1e-3, atol=0)
