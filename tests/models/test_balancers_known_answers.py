"""Known answers for balancer defects found in review: checkpoint shapes, DDP, GradNorm's layer, zero losses, FAMO.

Each test failed on the code before its fix.
"""

from __future__ import annotations

import inspect
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from flows.data.synth import SynthConfig
from models.balancers import BALANCERS, build_balancer, check_world_size
from models.data.resident import MTLDataModule
from models.training.lightning_module import MTLModule
from models.data.training_table import load_training_table
from models.tasks import TaskSet

SMALL_PARAMS = {
    "shared_bottom": {"bottom": [16, 8], "tower": [8]},
    "mmoe": {"n_experts": 2, "expert": [16, 8], "tower": [8]},
    "ple": {"levels": 2, "n_shared_experts": 1, "n_task_experts": 1, "expert": [16, 8], "tower": [8]},
    "gated": {"n_shared_experts": 2, "expert": [16, 8], "tower": [8]},
}


@pytest.fixture(scope="module")
def tiny_table(synth_with_features):
    cfg = SynthConfig(n_users=100, n_items=50, n_interactions=3000, days=6, seed=0)
    return load_training_table(synth_with_features("balancer-defects", cfg))


def _module(table, architecture: str, balancer: str, batch_size: int = 512):
    info = table.attrs["mtlrec"]
    tasks = TaskSet.resolve("auto", info["declaration"], columns=table.columns)
    feats = info["features"]
    dm = MTLDataModule(table, tasks, feats["categorical"], feats["numeric"], batch_size=batch_size, seed=0,
                       log1p=feats["log1p"])
    module = MTLModule(spec=dm.spec.to_dict(), tasks=tasks.to_config(), architecture=architecture,
                       arch_params=SMALL_PARAMS[architecture], balancer=balancer, embedding_dim=4, lr=3e-3)
    return module, dm


def _trainer(**kw) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, enable_checkpointing=False)
    return L.Trainer(**{**base, **kw})


# ---- 1. DWA's state has one shape from the first epoch to the last ---------------------------------------------


def test_dwa_state_from_any_epoch_loads_into_a_fresh_balancer():
    dwa = build_balancer("dwa", 3)
    epochs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.9, 2.0]), torch.tensor([0.4, 1.8, 1.0]),
              torch.tensor([0.3, 1.0, 0.9])]
    states, weights = [], []
    for losses in epochs:
        dwa.on_epoch_end(losses)
        states.append({k: v.clone() for k, v in dwa.state_dict().items()})
        weights.append(dwa.weights())
    assert {tuple(v.shape) for v in (s["history"] for s in states)} == {(2, 3)}
    for epoch in (0, 3):
        fresh = build_balancer("dwa", 3)
        fresh.load_state_dict(states[epoch])  # strict: same keys, same shapes
        assert torch.equal(fresh.weights(), weights[epoch])
        trained = build_balancer("dwa", 3)
        for losses in epochs:
            trained.on_epoch_end(losses)
        trained.load_state_dict(states[epoch])
        assert torch.equal(trained.weights(), weights[epoch])
    assert torch.equal(weights[0], torch.ones(3))  # one epoch: no ratio yet
    # Epoch 0 loaded, training goes on exactly as it did: epoch 1 has its ratio L(1) / L(0).
    resumed = build_balancer("dwa", 3)
    resumed.load_state_dict(states[0])
    for epoch in (1, 2):
        resumed.on_epoch_end(epochs[epoch])
        assert torch.equal(resumed.weights(), weights[epoch])
        assert torch.allclose(resumed.weights(), 3 * torch.softmax(epochs[epoch] / epochs[epoch - 1] / 2.0, 0))


class _Score(L.Callback):
    """A validation score that falls every epoch: the best checkpoint is epoch 0's."""

    def on_validation_epoch_end(self, trainer, module):
        module.log("score", -float(trainer.current_epoch))


def test_dwa_best_checkpoint_of_an_earlier_epoch_loads_after_training(tiny_table, tmp_path):
    L.seed_everything(0, verbose=False)
    module, dm = _module(tiny_table, "shared_bottom", "dwa", batch_size=1024)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="score", mode="max", save_top_k=1, filename="best")
    trainer = _trainer(max_epochs=4, enable_checkpointing=True, callbacks=[ckpt, _Score()])
    trainer.fit(module, datamodule=dm)
    assert float(ckpt.best_model_score) == 0.0  # the best is the first epoch's
    assert not torch.equal(module.balancer.weights(), torch.ones(3))  # four epochs: DWA has moved them
    best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    # what models.training.train does after fit: failed with "size mismatch for balancer.history"
    module.load_state_dict(best)
    assert torch.equal(module.balancer.weights(), torch.ones(3))
    fresh, _ = _module(tiny_table, "shared_bottom", "dwa", batch_size=1024)
    fresh.load_state_dict(best)


# ---- 2. gradient-surgery balancers refuse DDP ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gradnorm", "pcgrad"])
def test_gradient_surgery_balancers_refuse_more_than_one_process(name):
    assert BALANCERS[name].manual
    with pytest.raises(ValueError, match=rf"balancer '{name}'.*2 processes.*loss-weighting balancer "
                                         r"\(dwa, famo, fixed, uncertainty\) or train on a single device"):
        check_world_size(name, 2)
    check_world_size(name, 1)
    for safe in ("dwa", "famo", "fixed", "uncertainty"):
        check_world_size(safe, 8)


def test_train_refuses_pcgrad_under_ddp_before_loading_data(tmp_path):
    from models.config import load_config
    from models.training.train import train

    cfg = load_config("mmoe", ["balancer.name=pcgrad", "train.devices=2", "train.strategy=ddp",
                               "train.accelerator=cpu"])
    with pytest.raises(ValueError, match="'pcgrad'.*single device"):
        train(cfg, tmp_path / "no-such-data", tmp_path / "out", progress=False)


def test_ddp_spawn_on_two_cpu_ranks_refuses_gradnorm(tiny_table):
    """Two gloo processes (Lightning's ddp_spawn): each rank's setup refuses before the first step."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("no gloo backend")
    module, dm = _module(tiny_table, "shared_bottom", "gradnorm", batch_size=1024)
    trainer = _trainer(max_epochs=1, strategy="ddp_spawn", devices=2)
    with pytest.raises(Exception, match="'gradnorm'.*single device"):
        trainer.fit(module, datamodule=dm)


# ---- 3. GradNorm measures the last shared layer's weight -------------------------------------------------------

LAST_SHARED_WEIGHT = {
    "shared_bottom": "bottom.2.weight",
    "mmoe": "experts.weights.1",
    "ple": "levels.1.shared_experts.weights.1",
    "gated": "shared_experts.weights.1",
}


@pytest.mark.parametrize("architecture", sorted(LAST_SHARED_WEIGHT))
def test_gradnorm_measures_the_weight_of_the_last_shared_layer(tiny_table, architecture, monkeypatch):
    from models.balancers import gradnorm

    module, dm = _module(tiny_table, architecture, "gradnorm")
    names = {id(p): n for n, p in module.arch.named_parameters()}
    measured: list[str] = []
    real = torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        if isinstance(inputs, (list, tuple)) and all(isinstance(p, nn.Parameter) for p in inputs):
            measured.extend(names.get(id(p), "?") for p in inputs if id(p) in names)
        return real(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(gradnorm.torch.autograd, "grad", spy)
    losses, extra = module._losses(next(iter(dm.train_dataloader())))
    module.balancer.backward(losses, module.arch.shared_parameters(), extra)
    assert set(measured) == {LAST_SHARED_WEIGHT[architecture]}, measured
    layer = dict(module.arch.named_parameters())[measured[0]]
    assert layer.ndim >= 2 and "bias" not in measured[0] and "gate" not in measured[0]


@pytest.mark.parametrize("architecture", sorted(LAST_SHARED_WEIGHT))
def test_without_an_architecture_hook_the_last_shared_weight_is_found_by_name(tiny_table, architecture, monkeypatch):
    from models.balancers.surgery import last_shared_layer

    module, _ = _module(tiny_table, architecture, "gradnorm")
    for hook in ("last_shared_weight", "last_shared_layer"):  # as an architecture without the hook
        monkeypatch.setattr(type(module.arch), hook, None, raising=False)
    index, name = last_shared_layer(module.arch)
    assert name == LAST_SHARED_WEIGHT[architecture]
    assert module.arch.shared_parameters()[index] is dict(module.arch.named_parameters())[name]


# ---- 4. a task loss of exactly 0 -------------------------------------------------------------------------------


def _gradnorm_with_a_zero_first_loss(model_lr: float, steps: int = 20):
    """Two identical tasks; the second's first batch has no positive, so its loss is exactly 0."""
    torch.manual_seed(0)
    shared, head = nn.Linear(3, 4, bias=False), nn.Linear(4, 1)
    balancer = build_balancer("gradnorm", 2)
    opt = torch.optim.SGD([*shared.parameters(), *head.parameters()], lr=model_lr)
    wopt = torch.optim.SGD(balancer.parameters(), lr=0.05)
    x = torch.randn(32, 3)
    y = x.sum(1, keepdim=True)
    seen = []
    for step in range(steps):
        loss = (head(shared(x)) - y).pow(2).mean()
        losses = torch.stack([loss, loss * 0.0 if step == 0 else loss])
        seen.append(loss.item())
        opt.zero_grad()
        wopt.zero_grad()
        balancer.backward(losses, [shared.weight])
        opt.step()
        wopt.step()
    return balancer, seen


def test_gradnorm_takes_a_tasks_reference_loss_at_its_first_nonzero_loss():
    # The trunk frozen: both tasks have the same loss at every step, so the same reference and the same rate;
    # nothing may pull their weights apart.
    balancer, seen = _gradnorm_with_a_zero_first_loss(model_lr=0.0)
    assert torch.allclose(balancer.weights(), torch.ones(2), atol=1e-6), balancer.weights()
    assert balancer.initial_losses.tolist() == pytest.approx([seen[0], seen[1]])


def test_gradnorm_weights_stay_sensible_after_a_zero_loss():
    balancer, seen = _gradnorm_with_a_zero_first_loss(model_lr=0.05)
    w = balancer.weights()
    assert torch.isfinite(w).all() and torch.isclose(w.sum(), torch.tensor(2.0), atol=0.1)
    # Task 1's reference was taken one (loss-lowering) step later, so it looks a little slower: a little more weight.
    assert 0.8 < w[0] < 1.0 < w[1] < 1.2, w
    assert balancer.initial_losses.tolist() == pytest.approx([seen[0], seen[1]])


def test_famo_leaves_a_zero_loss_out_of_the_step():
    famo = build_balancer("famo", 3)
    losses = torch.tensor([0.7, 0.0, 1.3], requires_grad=True)
    famo.combine(losses).backward()
    w = famo.weights()
    assert torch.isfinite(w).all() and torch.isfinite(losses.grad).all()
    # z uniform: task i's loss is multiplied by T (1/L_i) / (1/L_0 + 1/L_2), the zero-loss task's by 0.
    expected = torch.tensor([3 / 0.7, 0.0, 3 / 1.3]) / (1 / 0.7 + 1 / 1.3)
    assert torch.allclose(w, expected) and torch.allclose(losses.grad, expected)


def test_famo_update_skips_a_task_whose_loss_was_zero():
    three, two = build_balancer("famo", 3), build_balancer("famo", 2)
    three.combine(torch.tensor([1.0, 0.0, 1.0]))
    three.after_step(torch.tensor([0.5, 0.0, 0.9]))
    two.combine(torch.tensor([1.0, 1.0]))
    two.after_step(torch.tensor([0.5, 0.9]))
    assert torch.isfinite(three.logits).all()
    assert three.logits[1] == 0.0  # untouched
    assert torch.allclose(three.logits[[0, 2]], two.logits)  # the others move as if it were not there
    assert three.logits[2] > three.logits[0]


# ---- 5. FAMO: loss_weight, the logged weights, the re-measurement's precision ----------------------------------


def test_famo_honours_loss_weight_and_reports_what_multiplies_each_loss():
    famo = build_balancer("famo", 2, [2.0, 1.0])
    losses = torch.tensor([1.0, 1.0], requires_grad=True)
    famo.combine(losses).backward()
    assert torch.allclose(famo.weights(), torch.tensor([2.0, 1.0]))  # balanced tasks: the configured weights
    assert torch.allclose(losses.grad, famo.weights())
    famo.after_step(torch.tensor([0.5, 0.9]))  # task 1 improved less: it gains weight
    for values in ([0.3, 2.0], [1.5, 0.2]):
        losses = torch.tensor(values, requires_grad=True)
        famo.combine(losses).backward()
        assert torch.allclose(losses.grad, famo.weights()), values  # logged == effective
    plain = build_balancer("famo", 2)
    plain.combine(torch.tensor([1.0, 1.0]))
    plain.after_step(torch.tensor([0.5, 0.9]))
    plain.combine(torch.tensor([1.5, 0.2]))
    assert torch.allclose(famo.weights(), plain.weights() * torch.tensor([2.0, 1.0]))


def test_famo_logs_its_effective_weights_in_training(tiny_table):
    module, dm = _module(tiny_table, "shared_bottom", "famo")
    seen = []
    real = module.balancer.combine

    def combine(losses):
        leaf = losses.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(real(leaf), leaf)
        out = real(losses)
        seen.append((grad, module.balancer.weights()))
        return out

    module.balancer.combine = combine
    _trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1).fit(module, datamodule=dm)
    assert len(seen) == 3
    for grad, logged in seen:
        assert torch.allclose(grad, logged)


def test_famo_remeasures_under_the_training_steps_autocast(tiny_table):
    module, dm = _module(tiny_table, "shared_bottom", "famo")
    calls = []
    real = module.arch.forward

    def forward(x):
        out = real(x)
        calls.append((torch.is_grad_enabled(), module.trainer.training, torch.is_autocast_enabled("cpu"),
                      next(iter(out.logits.values())).dtype))
        return out

    module.arch.forward = forward
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, precision="bf16-mixed")
    trainer.fit(module, datamodule=dm)
    steps = [c for c in calls if c[0] and c[1]]
    remeasured = [c for c in calls if not c[0] and c[1]]
    assert len(steps) == 2 and len(remeasured) == 2
    assert all(c[2:] == (True, torch.bfloat16) for c in steps)
    assert all(c[2:] == (True, torch.bfloat16) for c in remeasured), remeasured


# ---- 6. every balancer names its paper and documents its hyperparameters ---------------------------------------

PAPERS = {
    "uncertainty": ("Kendall", "CVPR 2018"),
    "gradnorm": ("Chen", "ICML 2018"),
    "dwa": ("Liu, Johns & Davison", "CVPR 2019"),
    "pcgrad": ("Yu", "NeurIPS 2020"),
    "famo": ("Liu, Liu, Stone & Liu", "NeurIPS 2023"),
    "fixed": ("loss_weight", "baseline"),
}


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_each_balancer_names_its_paper_and_documents_every_hyperparameter(name):
    cls = BALANCERS[name]
    doc = cls.__dict__.get("__doc__") or ""
    for needed in PAPERS[name]:
        assert needed in doc, (name, needed)
    signature = inspect.signature(cls.__init__).parameters
    for p in set(signature) - {"self", "n_tasks", "initial_weights"}:
        assert f"``{p}``" in doc, (name, p)
        said = re.search(r"\(default ([-+0-9.e]+)", doc[doc.index(f"``{p}``"):])
        assert said and float(said.group(1)) == signature[p].default, (name, p)
