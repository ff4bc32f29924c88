"""Each architecture honours the interface: shapes, what is shared, penalties, learning."""

from __future__ import annotations

import pytest
import torch

from models.architectures import ARCHITECTURES, build_architecture
from models.tasks import TaskSet, TaskSpec

TASKS = TaskSet([
    TaskSpec("click"),
    TaskSpec("purchase", sample_space="click"),
    TaskSpec("dwell", type="regression", sample_space="click", transform="log1p"),
])
MULTI = TaskSet([TaskSpec("click"), TaskSpec("genre", type="multiclass", num_classes=5)])
SMALL = {
    "shared_bottom": {"bottom": [32, 16], "tower": [8]},
    "cross_stitch": {"hidden": [32, 16], "tower": [8], "tie_l2": 1e-4},
    "mmoe": {"n_experts": 3, "expert": [32, 16], "tower": [8]},
    "ple": {"levels": 2, "n_shared_experts": 2, "n_task_experts": 1, "expert": [32, 16], "tower": [16]},
    "esmm": {"shared": [32], "tower": [32, 16]},
    "gated": {"n_shared_experts": 2, "expert": [32, 16], "tower": [8]},
}


def _data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    click = (x[:, 0] + 0.5 * x[:, 1] > 0).float()
    purchase = click * (x[:, 2] > 0.5).float()
    dwell = click * torch.exp(1 + x[:, 3].clamp(-2, 2))
    return x, {"click": click, "purchase": purchase, "dwell": dwell}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_shapes_and_shared_parameters(name):
    torch.manual_seed(0)
    arch = build_architecture(name, 12, TASKS, **SMALL[name])
    x, y = _data(64)
    out = arch(x)
    assert set(out.logits) == {"click", "purchase", "dwell"}
    assert all(v.shape == (64, 1) for v in out.logits.values())
    shared = arch.shared_parameters()
    assert shared, "gradient-surgery balancers need a dense shared part"
    tower_ids = {id(p) for p in arch.towers.parameters()}
    assert not tower_ids & {id(p) for p in shared}
    losses = TASKS.losses(out.logits, y)
    for i, task in enumerate(TASKS.names):
        grads = torch.autograd.grad(losses[i], shared, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), task


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_multiclass_heads(name):
    arch = build_architecture(name, 12, MULTI, **SMALL[name])
    out = arch(torch.randn(8, 12))
    assert out.logits["genre"].shape == (8, 5)
    probs = MULTI.probabilities(out.logits)
    assert torch.allclose(probs["genre"].sum(-1), torch.ones(8))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_few_steps_lower_the_loss_and_are_deterministic(name):
    def run():
        torch.manual_seed(0)
        arch = build_architecture(name, 12, TASKS, **SMALL[name])
        opt = torch.optim.Adam(arch.parameters(), lr=3e-3)
        x, y = _data()
        first = last = None
        for _ in range(40):
            out = arch(x)
            loss = TASKS.losses(out.logits, y).sum() + (out.penalty if out.penalty is not None else 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = float(loss.detach()) if first is None else first
            last = float(loss.detach())
        return first, last

    first, last = run()
    assert last < 0.8 * first, (first, last)
    assert run() == (first, last)


def test_gated_decomposition_has_aux_heads_and_an_orthogonality_penalty():
    arch = build_architecture("gated", 12, TASKS, **SMALL["gated"])
    out = arch(torch.randn(32, 12))
    assert set(out.aux_logits) == set(TASKS.names)
    assert out.penalty.ndim == 0 and torch.isfinite(out.penalty) and out.penalty > 0
    grads = torch.autograd.grad(out.penalty, list(arch.specific.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_esmm_probability_of_purchase_is_click_times_conversion():
    arch = build_architecture("esmm", 12, TASKS, **SMALL["esmm"])
    out = arch(torch.randn(16, 12))
    probs = TASKS.probabilities(out.logits)
    cvr = torch.sigmoid(out.logits["purchase"].squeeze(-1))
    assert torch.allclose(probs["purchase"], probs["click"] * cvr)
    assert (probs["purchase"] <= probs["click"]).all()


def test_unknown_names_and_parameters_are_named():
    with pytest.raises(ValueError, match="mmoee"):
        build_architecture("mmoee", 12, TASKS)
    with pytest.raises(ValueError, match="n_expert"):
        build_architecture("mmoe", 12, TASKS, n_expert=4)
