"""The balancer interface: task losses in, one update direction out; no model knowledge.

Two kinds, one interface (in the manner of LibMTL's AbsWeighting and
nash-mtl's WeightMethod):

- loss weighting (fixed, uncertainty, DWA, FAMO): ``combine(losses)`` returns
  a scalar; Lightning's automatic optimisation backpropagates it.
- gradient methods (GradNorm, PCGrad): ``manual = True``; the
  module calls ``backward(losses, shared_parameters)``, which
  sets ``.grad`` on every parameter itself: per-task gradients on the shared
  dense parameters (never the embedding tables), the plain weighted sum
  everywhere else.

``weights()`` returns the current task weights (a detached tensor) so they can
be logged every step; ``on_epoch_end(mean_losses)`` and ``after_step(...)``
let history-based methods (DWA, FAMO) update themselves. ``bind(architecture)``
is called once with the architecture, for a method that must pick a part of it
(GradNorm's last shared layer).

Gradient methods are single-process only: under DDP each rank would rewrite
the shared gradients DDP has just averaged (PCGrad) or leave its own
parameters out of DDP's reduction (GradNorm's weights), and the replicas would
drift apart. ``models.balancers.check_world_size`` refuses that combination
before training starts.
"""

from __future__ import annotations

import torch
from torch import nn


def ranks_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the DDP ranks (itself in one process).

    A balancer that learns from the losses it sees (FAMO's logits, DWA's history) would otherwise learn
    something different on each rank, each from its own shard of the batch, and the buffer broadcast
    would keep rank 0's; reduced, every rank takes the same update. One collective on the device, no
    host read.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


class Balancer(nn.Module):
    manual: bool = False  # True: needs per-task gradients, so manual optimisation

    def __init__(self, n_tasks: int, initial_weights: list[float] | None = None):
        super().__init__()
        self.n_tasks = n_tasks
        w = torch.tensor(initial_weights if initial_weights is not None else [1.0] * n_tasks, dtype=torch.float32)
        self.register_buffer("initial_weights", w)

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        """Scalar loss from the stacked task losses (shape [T])."""
        return (self.weights() * losses).sum()

    def weights(self) -> torch.Tensor:
        return self.initial_weights

    def bind(self, architecture: nn.Module) -> None:
        """Called once with the architecture the balancer will train; most need nothing from it."""

    def backward(self, losses: torch.Tensor, shared_parameters: list[nn.Parameter],
                 extra_loss: torch.Tensor | None = None) -> None:
        """Set gradients on all parameters. The default: backpropagate ``combine`` (+ extra)."""
        total = self.combine(losses)
        if extra_loss is not None:
            total = total + extra_loss
        total.backward()

    def on_epoch_end(self, mean_losses: torch.Tensor) -> None:
        """Called with the epoch's mean task losses (DWA uses the last two)."""

    def after_step(self, new_losses: torch.Tensor) -> None:
        """Called with the task losses re-measured after the optimiser step (FAMO)."""

    needs_after_step: bool = False  # True: the module re-measures losses after each step
