"""Dynamic weight average (Liu, Johns & Davison 2019).

A task whose loss fell less over the last epoch (ratio L(t-1)/L(t-2) near or
above 1) gets more weight: w = T * softmax(ratio / temperature). It needs no
gradients, only the per-epoch mean losses, so it costs nothing per step.
"""

from __future__ import annotations

import torch

from models.balancers.base import Balancer


class DWA(Balancer):
    def __init__(self, n_tasks: int, initial_weights=None, temperature: float = 2.0):
        super().__init__(n_tasks, initial_weights)
        self.temperature = temperature
        self.register_buffer("history", torch.zeros(0, n_tasks))
        self.register_buffer("current", torch.ones(n_tasks))

    def weights(self) -> torch.Tensor:
        return (self.initial_weights * self.current).detach()

    def on_epoch_end(self, mean_losses: torch.Tensor) -> None:
        self.history = torch.cat([self.history, mean_losses.detach().reshape(1, -1).to(self.history)])[-2:]
        if self.history.shape[0] == 2:
            ratio = self.history[1] / self.history[0].clamp_min(1e-12)
            self.current = self.n_tasks * torch.softmax(ratio / self.temperature, dim=0)
