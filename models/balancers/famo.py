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

from models.balancers.base import Balancer, ranks_mean


class FAMO(Balancer):
    """FAMO: Liu, Liu, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

    Chosen for what gradient-surgery methods promise (every task's loss falls
    at a similar rate) at the cost of loss weighting: one extra forward pass
    per step instead of one backward pass per task. The step descends
    ``sum_i w_i z_i log L_i / c`` with z = softmax(xi) and c = sum_j z_j / L_j
    (detached), so task i's loss is multiplied by ``T * w_i * z_i / (c L_i)``:
    the logarithm makes a task's share independent of its loss scale, and c
    keeps the step size that of one loss. ``w_i`` is the task's configured
    ``loss_weight``, a prior on top of what FAMO learns; the factor T puts the
    weights on the same scale as the other balancers' (all ``loss_weight``
    when the tasks are balanced). ``weights()`` returns exactly those
    multipliers of the last step, so the logged weights are what trained.

    A task whose loss is 0 (a masked task on a batch without its parent
    event) or not finite takes no part in that step: log 0 would make c
    enormous and shrink every other task's gradient to nothing, and its
    improvement ratio is undefined.

    ``lr`` (default 0.025): the step size of the Adam optimiser that moves the
    task logits xi; the paper's value. ``gamma`` (default 1e-3): weight decay
    on xi, which pulls the weights back towards equal so that an early
    imbalance is forgotten; the paper's value. ``eps`` (default 1e-8): losses
    at or below it count as zero.
    """

    needs_after_step = True

    def __init__(self, n_tasks: int, initial_weights=None, lr: float = 0.025, gamma: float = 1e-3,
                 eps: float = 1e-8):
        super().__init__(n_tasks, initial_weights)
        self.lr, self.gamma, self.eps = lr, gamma, eps
        self.register_buffer("logits", torch.zeros(n_tasks))
        self.register_buffer("prev_losses", torch.ones(n_tasks))
        # What multiplied each task's loss in the last step (before any: the configured weights).
        self.register_buffer("effective", self.initial_weights.clone(), persistent=False)
        self._opt_state: tuple[torch.Tensor, torch.optim.Optimizer] | None = None

    def _xi(self) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        """A leaf copy of the logits with its own Adam, rebuilt if the module moved device."""
        if self._opt_state is None or self._opt_state[0].device != self.logits.device:
            xi = self.logits.clone().requires_grad_(True)
            self._opt_state = (xi, torch.optim.Adam([xi], lr=self.lr, weight_decay=self.gamma))
        return self._opt_state

    def _active(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(losses) & (losses > self.eps)

    def weights(self) -> torch.Tensor:
        return self.effective.detach().clone()

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        self.prev_losses = losses.detach().float()
        active = self._active(losses.detach())
        w = self.initial_weights.to(losses.dtype)
        z = torch.softmax(self.logits, dim=0).to(losses.dtype)
        # Inactive tasks enter as log 1 = 0 with weight 0: no branch on the data, so no host sync.
        d = torch.where(active, losses, torch.ones_like(losses))
        inv = torch.where(active, z / d.detach(), torch.zeros_like(z))
        c = torch.where(inv.sum() > 0, inv.sum(), torch.ones_like(inv.sum()))  # no task active: no step
        scale = (self.n_tasks * w / c).detach()
        with torch.no_grad():
            self.effective = (scale * inv).float()
        return (torch.where(active, scale * z * d.log(), torch.zeros_like(z))).sum()

    def after_step(self, new_losses: torch.Tensor) -> None:
        xi, opt = self._xi()
        # Every rank learns from the losses of the whole batch (all ranks' shards), so the logits stay equal.
        prev = ranks_mean(self.prev_losses)
        new = ranks_mean(new_losses.detach().float().to(self.prev_losses.device))
        active = self._active(prev) & self._active(new)
        delta = torch.where(active, prev.clamp_min(self.eps).log() - new.clamp_min(self.eps).log(),
                            torch.zeros_like(new))
        # A skipped task gets the weighted mean improvement of the others: its softmax gradient is then exactly 0
        # and the others move as in a softmax over them alone.
        z = torch.softmax(xi.detach(), dim=0)
        za = torch.where(active, z, torch.zeros_like(z))
        mean = (za * delta).sum() / torch.where(za.sum() > 0, za.sum(), torch.ones_like(za.sum()))
        delta = torch.where(active, delta, mean)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.softmax(xi, dim=-1), xi, grad_outputs=delta)
        opt.zero_grad()
        xi.grad = grad
        opt.step()
        with torch.no_grad():
            self.logits.copy_(xi)
