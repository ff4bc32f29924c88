"""Dynamic weight average (Liu, Johns & Davison 2019).

A task whose loss fell less over the last epoch (ratio L(t-1)/L(t-2) near or
above 1) gets more weight: w = T * softmax(ratio / temperature). It needs no
gradients, only the per-epoch mean losses, so it costs nothing per step.
"""

from __future__ import annotations

import torch

from models.balancers.base import Balancer, ranks_mean


class DWA(Balancer):
    """Dynamic Weight Average: Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019.

    Chosen when per-step cost must stay that of the plain weighted sum: the
    weights come from how fast each task's epoch-mean loss fell, which needs
    no gradient and no extra forward pass. They stay at the configured
    ``loss_weight`` for the first two epochs (no ratio exists yet), then are
    ``loss_weight * T * softmax(ratio / temperature)``.

    ``temperature`` (default 2.0, the paper's T): how strongly a slower task
    is favoured. Large values flatten the weights towards equal; small ones
    let the slowest task take almost all of it.

    The last two epochs' losses live in a fixed [2, T] buffer with a count of
    how many are filled, not in a growing tensor: a checkpoint written after
    any epoch then has the same shapes as a fresh module, so the best
    checkpoint of an early epoch loads into a model that trained longer.
    """

    def __init__(self, n_tasks: int, initial_weights=None, temperature: float = 2.0):
        super().__init__(n_tasks, initial_weights)
        self.temperature = temperature
        self.register_buffer("history", torch.zeros(2, n_tasks))  # row 0: L(t-2), row 1: L(t-1)
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # rows of ``history`` that hold an epoch
        self.register_buffer("current", torch.ones(n_tasks))

    def weights(self) -> torch.Tensor:
        return (self.initial_weights * self.current).detach()

    def on_epoch_end(self, mean_losses: torch.Tensor) -> None:
        with torch.no_grad():
            new = ranks_mean(mean_losses.detach().reshape(-1).to(self.history))  # the same history on every rank
            self.history.copy_(torch.stack([self.history[1], new]))
            self.filled.copy_((self.filled + 1).clamp_max(2))
            ratio = self.history[1] / self.history[0].clamp_min(1e-12)
            dwa = self.n_tasks * torch.softmax(ratio / self.temperature, dim=0)
            self.current.copy_(torch.where(self.filled >= 2, dwa, self.current))
