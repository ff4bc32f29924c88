"""Each balancer against a case whose answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.balancers import BALANCERS, build_balancer
from models.balancers.pcgrad import project_conflicts


def test_pcgrad_removes_the_conflicting_component():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    out = project_conflicts(torch.stack([g1, g2]), torch.tensor([0, 1]))
    # g1 projected onto the normal plane of g2: g1 - (g1.g2 / |g2|^2) g2 = [0.5, 0.5]
    assert torch.allclose(out[0], torch.tensor([0.5, 0.5]))
    assert torch.dot(out[0], g2).abs() < 1e-6
    # g2 - (g2.g1 / |g1|^2) g1 = [0, 1]
    assert torch.allclose(out[1], torch.tensor([0.0, 1.0]))
    assert torch.dot(out[1], g1).abs() < 1e-6


def test_pcgrad_leaves_agreeing_gradients_alone():
    g = torch.tensor([[1.0, 0.5], [0.2, 1.0]])
    assert torch.allclose(project_conflicts(g, torch.tensor([1, 0])), g)


def _two_task_model():
    torch.manual_seed(0)
    shared, a, b = nn.Linear(2, 2, bias=False), nn.Linear(2, 1), nn.Linear(2, 1)
    return shared, a, b


def test_pcgrad_writes_surgery_on_shared_and_plain_sum_elsewhere():
    shared, a, b = _two_task_model()
    x = torch.randn(16, 2)
    h = shared(x)
    la, lb = a(h).pow(2).mean(), (b(h) + 3).pow(2).mean()
    losses = torch.stack([la, lb])
    ga = torch.autograd.grad(la, shared.weight, retain_graph=True)[0].reshape(-1)
    gb = torch.autograd.grad(lb, shared.weight, retain_graph=True)[0].reshape(-1)
    balancer = build_balancer("pcgrad", 2, [1.0, 1.0])
    balancer.backward(losses, [shared.weight])
    order = torch.randperm(2, generator=torch.Generator().manual_seed(0))
    expected = project_conflicts(torch.stack([ga, gb]), order).sum(0)
    assert torch.allclose(shared.weight.grad.reshape(-1), expected, atol=1e-6)
    assert a.weight.grad is not None and b.weight.grad is not None
    assert a.weight.grad.abs().sum() > 0 and b.weight.grad.abs().sum() > 0


def test_uncertainty_weights_approach_inverse_noise_variance():
    """Two regression tasks with noise std 0.2 and 1.0: exp(-s) -> 1/sigma^2, ratio ~ 25."""
    torch.manual_seed(0)
    balancer = build_balancer("uncertainty", 2)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=0.05)
    w_true = torch.randn(4, 2)
    for _ in range(600):
        x = torch.randn(256, 4)
        y = x @ w_true + torch.randn(256, 2) * torch.tensor([0.2, 1.0])
        losses = ((model(x) - y) ** 2).mean(0)
        opt.zero_grad()
        balancer.combine(losses).backward()
        opt.step()
    w = balancer.weights()
    assert w[0] > w[1]
    assert 1 / 0.04 * 0.5 < w[0] < 1 / 0.04 * 1.5
    assert 0.6 < w[1] < 1.4
    assert 12 < (w[0] / w[1]) < 50


def test_dwa_equal_at_first_then_favours_the_slower_task():
    dwa = build_balancer("dwa", 2)
    assert torch.allclose(dwa.weights(), torch.ones(2))
    dwa.on_epoch_end(torch.tensor([1.0, 1.0]))
    assert torch.allclose(dwa.weights(), torch.ones(2))
    dwa.on_epoch_end(torch.tensor([0.5, 0.95]))  # task 0 halved, task 1 barely moved
    w = dwa.weights()
    assert w[1] > w[0] and torch.isclose(w.sum(), torch.tensor(2.0))
    ratio = torch.tensor([0.5, 0.95])
    assert torch.allclose(w, 2 * torch.softmax(ratio / 2.0, 0))


def test_gradnorm_raises_the_weight_of_the_slower_task_and_keeps_the_sum():
    torch.manual_seed(0)
    shared, a, b = _two_task_model()
    balancer = build_balancer("gradnorm", 2, alpha=1.5)
    opt = torch.optim.SGD([*shared.parameters(), *a.parameters(), *b.parameters()], lr=0.05)
    wopt = torch.optim.SGD(balancer.parameters(), lr=0.05)
    x = torch.randn(64, 2)
    ya, yb = x[:, :1] * 2.0, torch.sin(3 * x[:, 1:]) * 3.0  # task b is harder: its loss falls slower
    for _ in range(60):
        h = shared(x)
        losses = torch.stack([(a(h) - ya).pow(2).mean(), (b(h) - yb).pow(2).mean()])
        opt.zero_grad()
        wopt.zero_grad()
        balancer.backward(losses, [shared.weight])
        opt.step()
        wopt.step()
    balancer.backward(torch.stack([(a(shared(x)) - ya).pow(2).mean(), (b(shared(x)) - yb).pow(2).mean()]),
                      [shared.weight])  # renormalises
    w = balancer.weights()
    assert w[1] > w[0]
    assert torch.isclose(w.sum(), torch.tensor(2.0), atol=1e-4)


def test_famo_moves_weight_to_the_task_that_improved_less():
    famo = build_balancer("famo", 2)
    assert list(famo.parameters()) == []  # its logits are stepped by its own optimiser
    for _ in range(20):
        famo.combine(torch.tensor([1.0, 1.0]))
        famo.after_step(torch.tensor([0.5, 0.99]))  # task 0 fell a lot, task 1 hardly
    w = famo.weights()
    assert w[1] > w[0] and torch.isclose(w.sum(), torch.tensor(2.0))


def test_fixed_weights_are_the_config_weights():
    fixed = build_balancer("fixed", 3, [1.0, 0.5, 0.2])
    assert torch.allclose(fixed.weights(), torch.tensor([1.0, 0.5, 0.2]))
    assert fixed.combine(torch.tensor([1.0, 2.0, 5.0])) == pytest.approx(3.0)


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_weights_are_detached_vectors(name):
    b = build_balancer(name, 3)
    w = b.weights()
    assert w.shape == (3,) and not w.requires_grad


def test_unknown_balancer_or_parameter_is_named():
    with pytest.raises(ValueError, match="nash"):
        build_balancer("nash", 2)
    with pytest.raises(ValueError, match="alhpa"):
        build_balancer("gradnorm", 2, alhpa=1.0)
