"""FAMO, fast adaptive multitask optimisation (Liu et al. 2023).

The combined loss is a weighted sum of log-losses, with weights from
softmax(xi). After each step FAMO re-measures the losses and moves xi so that
tasks whose loss fell less get more weight next time: O(1) extra cost, no
per-task gradients. xi is stepped by FAMO's own Adam (lr 0.025, decay 1e-3 as
in the paper), not by the model optimiser, so it is kept out of
``parameters()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.balancers.base import Balancer


class FAMO(Balancer):
    needs_after_step = True

    def __init__(self, n_tasks: int, initial_weights=None, lr: float = 0.025, gamma: float = 1e-3,
                 eps: float = 1e-8):
        super().__init__(n_tasks, initial_weights)
        self.lr, self.gamma, self.eps = lr, gamma, eps
        self.register_buffer("logits", torch.zeros(n_tasks))
        self.register_buffer("prev_losses", torch.ones(n_tasks))
        self._opt_state: tuple[torch.Tensor, torch.optim.Optimizer] | None = None

    def _xi(self) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        """A leaf copy of the logits with its own Adam, rebuilt if the module moved device."""
        if self._opt_state is None or self._opt_state[0].device != self.logits.device:
            xi = self.logits.clone().requires_grad_(True)
            self._opt_state = (xi, torch.optim.Adam([xi], lr=self.lr, weight_decay=self.gamma))
        return self._opt_state

    def weights(self) -> torch.Tensor:
        return (self.n_tasks * torch.softmax(self.logits, dim=0)).detach()

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        self.prev_losses = losses.detach().float()
        z = torch.softmax(self.logits, dim=0).to(losses.dtype)
        d = losses + self.eps
        c = (z / d).sum().detach()
        return (d.log() * z / c).sum()

    def after_step(self, new_losses: torch.Tensor) -> None:
        xi, opt = self._xi()
        delta = (self.prev_losses + self.eps).log() - (new_losses.detach().float() + self.eps).log()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.softmax(xi, dim=-1), xi, grad_outputs=delta)
        opt.zero_grad()
        xi.grad = grad
        opt.step()
        with torch.no_grad():
            self.logits.copy_(xi)
