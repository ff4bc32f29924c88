"""PCGrad, projecting conflicting gradients (Yu et al. 2020).

On the shared parameters, each task's gradient is projected onto the normal
plane of every other task gradient it conflicts with (negative dot product),
in a random order per step; the projected gradients are summed. Everything
else (towers, embeddings) gets the plain weighted sum. The projection is
written without data-dependent branches (a clamp instead of an ``if``), so a
GPU step never waits for the host.
"""

from __future__ import annotations

import random

import torch

from models.balancers.base import Balancer
from models.balancers.surgery import extra_gradient, task_gradients, write_gradient


def project_conflicts(grads: torch.Tensor, order) -> torch.Tensor:
    """grads: [T, P]; order: the task indices, a list (or a host tensor). Returns the projected gradients, [T, P]."""
    out = grads.clone()
    norms = (grads * grads).sum(1).clamp_min(1e-20)
    order = order.tolist() if torch.is_tensor(order) else list(order)
    for i in range(grads.shape[0]):
        for j in order:
            if j == i:
                continue
            dot = (out[i] * grads[j]).sum()
            out[i] = out[i] - dot.clamp(max=0.0) / norms[j] * grads[j]
    return out


class PCGrad(Balancer):
    """PCGrad: Yu, Kumar, Gupta, Levine, Hausman & Finn, "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020.

    Chosen when tasks conflict on the shared trunk (one task's gradient
    undoes another's): only the conflicting component of each task's
    gradient is removed, so no task's step makes another's loss worse to
    first order, while agreeing tasks move exactly as under the weighted sum.
    The per-task gradients are the configured ``loss_weight`` times each
    loss's gradient. The projections act on the dense shared parameters only;
    embedding tables and towers get the plain weighted sum. One backward pass
    per task, so a single process only (see ``check_world_size``).

    ``seed`` (default 0): seeds the random order in which each task is
    projected against the others, which the paper draws anew every step so
    that no task is systematically projected last; fixed so that a run
    repeats.
    """

    manual = True

    def __init__(self, n_tasks: int, initial_weights=None, seed: int = 0):
        super().__init__(n_tasks, initial_weights)
        self.rng = random.Random(seed)  # a host generator: the order is Python ints, nothing read off a device

    def backward(self, losses, shared_parameters, extra_loss=None) -> None:
        weighted = self.initial_weights.to(losses.dtype) * losses
        total = weighted.sum() + (extra_loss if extra_loss is not None else 0.0)
        if not shared_parameters:
            total.backward()
            return
        grads = task_gradients(weighted, shared_parameters)
        extra = extra_gradient(extra_loss, shared_parameters)
        order = list(range(self.n_tasks))
        self.rng.shuffle(order)
        merged = project_conflicts(grads, order).sum(0)
        if extra is not None:
            merged = merged + extra
        total.backward()
        write_gradient(shared_parameters, merged)
