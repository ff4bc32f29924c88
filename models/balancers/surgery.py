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
