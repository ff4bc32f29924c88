"""GradNorm (Chen et al. 2018): equalise the tasks' gradient magnitudes on the shared trunk.

Learnable weights w_i are pushed so that ||grad_W (w_i L_i)|| approaches the
mean norm times r_i^alpha, where r_i is task i's relative inverse training
rate (L_i / L_i(0) over its mean): a task that trains slower gets a larger
gradient. W is the last shared weight tensor, as in the paper: one extra
gradient norm per task, not a full per-task backward. Weights are
renormalised to sum to T before each step.
"""

from __future__ import annotations

import torch
from torch import nn

from models.balancers.base import Balancer


class GradNorm(Balancer):
    manual = True

    def __init__(self, n_tasks: int, initial_weights=None, alpha: float = 1.5):
        super().__init__(n_tasks, initial_weights)
        self.alpha = alpha
        self.task_weights = nn.Parameter(self.initial_weights.clone())
        self.register_buffer("initial_losses", torch.zeros(n_tasks))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def weights(self) -> torch.Tensor:
        return self.task_weights.detach().clone()

    def backward(self, losses, shared_parameters, representation=None, extra_loss=None) -> None:
        with torch.no_grad():
            self.task_weights.clamp_(min=1e-3)
            self.task_weights.mul_(self.n_tasks / self.task_weights.sum())
            first = ~self.started
            self.initial_losses.copy_(torch.where(first, losses.detach().float(), self.initial_losses))
            self.started.fill_(True)
        w = self.task_weights
        total = (w.detach().to(losses.dtype) * losses).sum() + (extra_loss if extra_loss is not None else 0.0)
        layer = [p for p in shared_parameters if p.ndim >= 2][-1:] or shared_parameters[-1:]
        if layer:
            norms = torch.stack([
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], layer, retain_graph=True)]).norm()
                for i in range(self.n_tasks)]).detach().float()
            g = w * norms  # ||grad(w_i L_i)|| = w_i ||grad L_i||, differentiable in w
            ratio = losses.detach().float() / self.initial_losses.clamp_min(1e-12)
            r = ratio / ratio.mean().clamp_min(1e-12)
            target = (g.mean() * r.pow(self.alpha)).detach()
            (gw,) = torch.autograd.grad((g - target).abs().sum(), w)
        else:
            gw = torch.zeros_like(w)
        total.backward()
        w.grad = gw
