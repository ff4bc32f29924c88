"""Known answers for defects found in the architectures: each test here failed on the code before its fix.

- gated: the orthogonality penalty was an uncentred cosine on ReLU outputs; it could not reach 0,
  dwarfed the task losses at initialisation and killed most shared and specific units.
- PLE: lower levels' task experts and shared gates were missing from ``shared_parameters()``, and
  its experts ignored ``dropout``.
- every architecture: no way to name the last shared weight GradNorm should measure.
- every architecture: class docstrings naming the paper and every hyperparameter.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from models.architectures import ARCHITECTURES, Architecture, build_architecture
from models.tasks import TaskSet, TaskSpec

# Independent tasks: no ``sample_space``, so a parameter gets a task's gradient only through the
# architecture's wiring. (With ESMM's ``sample_space: click`` the click tower also receives the
# conversion loss's gradient, in every architecture: that sharing is the loss's, not the network's.)
INDEPENDENT = TaskSet([
    TaskSpec("click"),
    TaskSpec("like"),
    TaskSpec("genre", type="multiclass", num_classes=4),
    TaskSpec("dwell", type="regression"),
])
SMALL = {
    "shared_bottom": {"bottom": [32, 16], "tower": [8]},
    "cross_stitch": {"hidden": [32, 16], "tower": [8]},
    "mmoe": {"n_experts": 3, "expert": [32, 16], "tower": [8]},
    "ple": {"levels": 2, "n_shared_experts": 2, "n_task_experts": 1, "expert": [32, 16], "tower": [16]},
    "esmm": {"shared": [32], "tower": [32, 16]},
    "gated": {"n_shared_experts": 2, "expert": [32, 16], "tower": [8]},
}
VARIANTS = [(name, params) for name, params in sorted(SMALL.items())] + [
    ("ple", {**SMALL["ple"], "levels": 1}),
    ("ple", {**SMALL["ple"], "levels": 3}),
]
IN_DIM = 12


def _independent_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=g)
    return x, {
        "click": (x[:, 0] > 0).float(),
        "like": (x[:, 1] - x[:, 2] > 0).float(),
        "genre": torch.randint(0, 4, (n,), generator=g),
        "dwell": x[:, 3] + 0.1 * torch.randn(n, generator=g),
    }


def _task_grad_masks(arch: Architecture, tasks: TaskSet, x, y) -> dict[str, torch.Tensor]:
    """Per parameter name, a [T, *shape] bool tensor: which elements each task's loss reaches."""
    names, params = zip(*arch.named_parameters())
    losses = tasks.losses(arch(x).logits, y)
    masks = {n: [] for n in names}
    for i in range(len(tasks)):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for n, p, g in zip(names, params, grads):
            masks[n].append(torch.zeros_like(p, dtype=torch.bool) if g is None else g != 0)
    return {n: torch.stack(m) for n, m in masks.items()}


# ---- 1. gated: the orthogonality penalty ------------------------------------------------------

def test_gated_penalty_at_initialisation_is_small_next_to_a_log_loss():
    torch.manual_seed(0)
    tasks = TaskSet([TaskSpec("click"), TaskSpec("like")])
    arch = build_architecture("gated", IN_DIM, tasks)  # the defaults, ortho_weight included
    x, y = _independent_batch(512)
    out = arch(x)
    bce = tasks.losses(out.logits, {"click": y["click"], "like": y["like"]})[0]
    assert out.penalty >= 0
    assert out.penalty < 0.1 * bce, (float(out.penalty), float(bce))  # was 8.8 against 0.69


def test_gated_penalty_is_zero_for_orthogonal_centred_representations():
    """Shared experts read only input column 0, specific branches only column 1, and the two columns
    are centred and orthogonal over the batch: the pre-activations are orthogonal after centring, so
    the penalty must vanish (the uncentred cosine of the ReLU outputs did not)."""
    torch.manual_seed(0)
    tasks = TaskSet([TaskSpec("click"), TaskSpec("like")])
    arch = build_architecture("gated", 2, tasks, n_shared_experts=2, expert=[8], tower=[4], ortho_weight=1.0)
    with torch.no_grad():
        arch.shared_experts.weights[0][:, 1, :] = 0
        arch.specific.weights[0][:, 0, :] = 0
        arch.shared_gate.weight.zero_()  # a constant mixture of the shared experts
    raw = torch.randn(64, 2)
    q, _ = torch.linalg.qr(raw - raw.mean(0))  # orthonormal columns, both orthogonal to the ones vector
    x = q * 8.0 + torch.tensor([0.5, -1.0])  # offsets too: centring must remove them
    out = arch(x)
    assert float(out.penalty.detach()) < 1e-8, float(out.penalty.detach())


def test_gated_orthogonality_is_a_bounded_scale_and_shift_free_correlation():
    from models.architectures.gated import orthogonality

    raw = torch.randn(256, 12)
    q, _ = torch.linalg.qr(raw - raw.mean(0))
    s, p = q[:, :5], q[:, 5:]
    assert float(orthogonality(s, p.unsqueeze(0))) < 1e-10
    # Non-negative, uncorrelated after centring: an uncentred cosine would be far from 0 here.
    assert float(orthogonality(s + 3.0, (p + 3.0).unsqueeze(0))) < 1e-10
    same = orthogonality(s, s.unsqueeze(0))  # s^T s = I: one unit correlation per row of a 5 x 5 matrix
    assert torch.isclose(same, torch.tensor(1 / 5))
    a, b = torch.randn(256, 6), torch.randn(2, 256, 7)
    assert torch.isclose(orthogonality(a, b), orthogonality(3 * a - 1, 0.5 * b + 2), atol=1e-6)
    assert 0 <= float(orthogonality(a, b)) <= 1
    assert torch.isclose(orthogonality(a[:, :1], (2 * a[:, :1] + 1).unsqueeze(0)), torch.tensor(1.0))


def _dead_fraction(h: torch.Tensor) -> float:
    """[n, B, H] post-ReLU activations: the share of units never positive over the batch."""
    return float((h <= 0).all(1).float().mean())


def test_gated_units_stay_alive_after_training_with_the_default_penalty():
    torch.manual_seed(0)
    tasks = TaskSet([TaskSpec("click"), TaskSpec("like")])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, IN_DIM, generator=g)
    z = x @ torch.randn(IN_DIM, 2, generator=g) / IN_DIM ** 0.5 + 0.5 * torch.randn(256, 2, generator=g)
    y = {"click": (z[:, 0] > 0).float(), "like": (z[:, 1] > 0.3).float()}
    # Half the default widths, to keep the test quick; ortho_weight and aux_weight are the defaults.
    arch = build_architecture("gated", IN_DIM, tasks, n_shared_experts=4, expert=[64, 32], tower=[16])
    opt = torch.optim.Adam(arch.parameters(), lr=3e-3)
    for _ in range(150):
        out = arch(x)
        loss = (tasks.losses(out.logits, y).sum() + arch.aux_weight * tasks.losses(out.aux_logits, y).sum()
                + out.penalty)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        shared, specific = arch.shared_experts(x), arch.specific(x)
    assert _dead_fraction(shared) < 0.3, _dead_fraction(shared)  # was 0.5
    assert _dead_fraction(specific) < 0.3, _dead_fraction(specific)  # was 0.9


def test_batched_mlp_keeps_the_pre_activation_when_scoring():
    from models.architectures.batched import BatchedMLP

    mlp = BatchedMLP(3, IN_DIM, [16, 8]).eval()
    x = torch.randn(32, IN_DIM)
    with torch.no_grad():  # the path that applies ReLU in place
        h, pre = mlp.forward_with_pre(x)
        plain = mlp(x)
    assert (pre < 0).any()
    assert torch.equal(h, torch.relu(pre)) and torch.equal(h, plain)


# ---- 2. shared_parameters() and PLE's dropout ---------------------------------------------------

@pytest.mark.parametrize("name,params", VARIANTS,
                         ids=[f"{n}-levels{p['levels']}" if n == "ple" else n for n, p in VARIANTS])
def test_every_parameter_two_tasks_reach_is_shared(name, params):
    """Each element reached by two task losses belongs to a parameter in shared_parameters(); a
    parameter whose elements each reach only one task (a gate row per task) may stay out. And
    nothing in shared_parameters() is reached by fewer than two tasks."""
    torch.manual_seed(0)
    arch = build_architecture(name, IN_DIM, INDEPENDENT, **params)
    x, y = _independent_batch()
    masks = _task_grad_masks(arch, INDEPENDENT, x, y)
    shared = {id(p) for p in arch.shared_parameters()}
    by_name = dict(arch.named_parameters())
    missing = [n for n, m in masks.items() if int(m.sum(0).max()) >= 2 and id(by_name[n]) not in shared]
    assert not missing, f"{name}: reached by several tasks but not shared: {missing}"
    lonely = [n for n, m in masks.items() if id(by_name[n]) in shared and int(m.flatten(1).any(1).sum()) < 2]
    assert not lonely, f"{name}: shared but reached by fewer than two tasks: {lonely}"


def test_ple_experts_apply_dropout_in_training_only():
    torch.manual_seed(0)
    # No tower hidden layers: any randomness must come from the experts.
    arch = build_architecture("ple", IN_DIM, INDEPENDENT, levels=2, n_shared_experts=2, n_task_experts=1,
                              expert=[32, 16], tower=[], dropout=0.5)
    x, _ = _independent_batch()
    arch.train()
    a, b = arch(x).logits, arch(x).logits
    assert any(not torch.equal(a[k], b[k]) for k in a)
    arch.eval()
    c, d = arch(x).logits, arch(x).logits
    assert all(torch.equal(c[k], d[k]) for k in c)


# ---- 3. last_shared_weight() ---------------------------------------------------------------------

EXPECTED_LAST = {
    "mmoe": lambda a: a.experts.weights[-1],
    "ple": lambda a: a.levels[-1].shared_experts.weights[-1],
    "gated": lambda a: a.shared_experts.weights[-1],
    "shared_bottom": lambda a: [m for m in a.bottom if isinstance(m, nn.Linear)][-1].weight,
    "esmm": lambda a: [m for m in a.shared if isinstance(m, nn.Linear)][-1].weight,
    "cross_stitch": lambda a: a.layers[-1].weights[-1],
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_last_shared_weight_is_a_shared_weight_every_task_reaches(name):
    torch.manual_seed(0)
    arch = build_architecture(name, IN_DIM, INDEPENDENT, **SMALL[name])
    w = arch.last_shared_weight()
    assert isinstance(w, nn.Parameter) and w.ndim >= 2
    assert w is EXPECTED_LAST[name](arch)
    (param_name,) = [n for n, p in arch.named_parameters() if p is w]
    assert "bias" not in param_name and "gate" not in param_name, param_name
    assert id(w) in {id(p) for p in arch.shared_parameters()}
    x, y = _independent_batch()
    losses = INDEPENDENT.losses(arch(x).logits, y)
    for i, task in enumerate(INDEPENDENT.names):
        (g,) = torch.autograd.grad(losses[i], [w], retain_graph=True)
        assert g.abs().sum() > 0, task


def test_last_shared_weight_is_none_when_nothing_dense_is_shared():
    assert build_architecture("esmm", IN_DIM, INDEPENDENT, shared=[], tower=[8]).last_shared_weight() is None


def test_default_last_shared_weight_skips_biases_and_gates():
    class Toy(Architecture):
        def __init__(self):
            super().__init__(4, INDEPENDENT)
            self.trunk = nn.Linear(4, 4)
            self.biases = nn.Parameter(torch.zeros(2, 1, 4))  # 3-D, as BatchedMLP's
            self.gate = nn.Linear(4, 2)

        def shared_parameters(self):
            return [*self.trunk.parameters(), self.biases, *self.gate.parameters()]

    toy = Toy()
    assert toy.last_shared_weight() is toy.trunk.weight


# ---- 4. docstrings name the paper and every hyperparameter ---------------------------------------

PAPERS = {
    "shared_bottom": ("Caruana", "Machine Learning", "1997"),
    "cross_stitch": ("Misra", "CVPR", "2016"),
    "mmoe": ("Ma et al.", "KDD", "2018"),
    "ple": ("Tang et al.", "RecSys", "2020"),
    "esmm": ("Ma et al.", "SIGIR", "2018"),
    "gated": ("Bousmalis et al.", "NeurIPS", "2016"),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_class_docstring_names_the_paper_and_every_hyperparameter_with_its_default(name):
    cls = ARCHITECTURES[name]
    doc = " ".join((cls.__doc__ or "").split())
    for word in PAPERS[name]:
        assert word in doc, (name, word)
    for p in list(inspect.signature(cls.__init__).parameters.values())[3:]:  # after self, in_dim, tasks
        assert f"{p.name} (default {p.default!r})" in doc, (name, p.name, p.default)
