"""What gradient-surgery balancers share: per-task gradients on the shared parameters.

The shared parameters are the architecture's dense shared trunk, never the
embedding tables: a per-task gradient over a large embedding table would cost
more than the step itself and carries little conflict to resolve.
"""

from __future__ import annotations

import torch
from torch import nn


def task_gradients(losses: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """[T, P] matrix of each task loss's gradient over ``params``, flattened (zeros where unused)."""
    rows = []
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def extra_gradient(extra: torch.Tensor | None, params: list[nn.Parameter]) -> torch.Tensor | None:
    if extra is None or not extra.requires_grad:
        return None
    grads = torch.autograd.grad(extra, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def write_gradient(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Overwrite ``.grad`` of ``params`` with slices of one flat vector."""
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        offset += n


def _is_weight(name: str) -> bool:
    """``...weight`` (an nn.Linear) or ``...weights.N`` (a BatchedMLP's stacked expert weights)."""
    parts = name.split(".")
    return parts[-1] == "weight" or (len(parts) > 1 and parts[-1].isdigit() and parts[-2] == "weights")


def last_shared_layer(architecture: nn.Module) -> tuple[int, str] | None:
    """(index into ``shared_parameters()``, name) of the weight of the architecture's last shared layer.

    The architecture's own ``last_shared_weight()`` decides when it has one and
    it names a parameter. Otherwise, by name, in the
    order ``shared_parameters()`` lists them (each block's layers in forward order): the last shared
    matrix (or stack of expert matrices) named ``weight``/``weights.N`` outside any gate; failing that the
    last one at least 2-D that is no bias and no gate; failing that the last at least 2-D. A bias or a
    gate measures how a task moves an offset or a mixture, not how hard it pulls on the trunk.
    """
    shared = list(architecture.shared_parameters())
    if not shared:
        return None
    names = {id(p): n for n, p in architecture.named_parameters()}
    named = [(i, names.get(id(p), ""), p) for i, p in enumerate(shared)]
    hook = getattr(architecture, "last_shared_weight", None)
    chosen = hook() if callable(hook) else None  # None: the architecture names none, choose by name below
    if chosen is not None:
        for i, name, p in named:
            if p is chosen:
                return i, name
        raise ValueError(f"{type(architecture).__name__}.last_shared_weight() is not one of its shared_parameters()")

    def gate_or_bias(name: str) -> bool:
        return any("gate" in part or "bias" in part for part in name.split("."))

    for keep in (lambda n, p: p.ndim >= 2 and _is_weight(n) and not gate_or_bias(n),
                 lambda n, p: p.ndim >= 2 and not gate_or_bias(n),
                 lambda n, p: p.ndim >= 2):
        found = [(i, n) for i, n, p in named if keep(n, p)]
        if found:
            return found[-1]
    return len(shared) - 1, named[-1][1]
