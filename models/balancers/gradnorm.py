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
from models.balancers.surgery import last_shared_layer


class GradNorm(Balancer):
    """GradNorm: Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018.

    Chosen when the tasks' losses differ in scale and speed and a fixed
    weighting would let one task's gradient dominate the shared trunk: the
    weights are learned so that every task pulls on the trunk with a similar
    force, a lagging task with more. Measured on the last shared layer's
    weight only (the paper's choice: one gradient norm per task, not a full
    per-task backward). Which parameter that is comes from the architecture
    (``bind``: its ``last_shared_weight()`` if it names one, else the last
    shared parameter named ``weight``/``weights.N`` that is neither a bias
    nor a gate); a bias or a gating layer says little about how hard a task
    pulls on the trunk.

    L_i(0), the reference for task i's training rate, is its first loss that
    is finite and above 0: a masked task on a batch without its parent event
    has loss 0, and a reference of 0 would make its rate infinite for the
    rest of training. Until then, and on any later step where its loss is 0,
    the task takes no part in the balancing (its weight stays where it is).

    ``alpha`` (default 1.5, the paper's setting for its NYUv2 runs): the
    strength of the restoring force towards equal training rates; 0 asks only
    for equal gradient norms, larger values favour lagging tasks more.
    The weights are the model's ``nn.Parameter``s, stepped by the model's
    optimiser, and renormalised to sum to T before every step.
    """

    manual = True

    def __init__(self, n_tasks: int, initial_weights=None, alpha: float = 1.5):
        super().__init__(n_tasks, initial_weights)
        self.alpha = alpha
        self.task_weights = nn.Parameter(self.initial_weights.clone())
        self.register_buffer("initial_losses", torch.zeros(n_tasks))  # 0: not recorded yet
        self._layer: int | None = None  # index into the architecture's shared_parameters()
        self.layer_name: str | None = None

    def bind(self, architecture: nn.Module) -> None:
        found = last_shared_layer(architecture)
        self._layer, self.layer_name = found if found is not None else (None, None)

    def _layer_of(self, shared_parameters: list[nn.Parameter]) -> list[nn.Parameter]:
        if self._layer is not None and self._layer < len(shared_parameters):
            return [shared_parameters[self._layer]]
        # Not bound to an architecture: the last shared tensor that is at least a matrix.
        return [p for p in shared_parameters if p.ndim >= 2][-1:] or shared_parameters[-1:]

    def weights(self) -> torch.Tensor:
        return self.task_weights.detach().clone()

    def backward(self, losses, shared_parameters, extra_loss=None) -> None:
        loss = losses.detach().float()
        with torch.no_grad():
            self.task_weights.clamp_(min=1e-3)
            self.task_weights.mul_(self.n_tasks / self.task_weights.sum())
            active = torch.isfinite(loss) & (loss > 0)
            self.initial_losses.copy_(torch.where(active & (self.initial_losses <= 0), loss, self.initial_losses))
        w = self.task_weights
        total = (w.detach().to(losses.dtype) * losses).sum() + (extra_loss if extra_loss is not None else 0.0)
        layer = self._layer_of(shared_parameters)
        if layer:
            norms = []
            for i in range(self.n_tasks):
                (g,) = torch.autograd.grad(losses[i], layer, retain_graph=True, allow_unused=True)
                norms.append(g.norm() if g is not None else torch.zeros((), device=losses.device))
            norms = torch.stack(norms).detach().float()
            zero = torch.zeros_like(loss)
            n_active = active.sum().clamp_min(1)
            g = w * norms  # ||grad(w_i L_i)|| = w_i ||grad L_i||, differentiable in w
            # Masks by torch.where, not by a branch on the data: no host sync, and a NaN of a skipped task stays out.
            ratio = torch.where(active, loss / self.initial_losses.clamp_min(1e-12), zero)
            r = ratio / (ratio.sum() / n_active).clamp_min(1e-12)
            target = (torch.where(active, g, zero).sum() / n_active * r.pow(self.alpha)).detach()
            (gw,) = torch.autograd.grad(torch.where(active, (g - target).abs(), zero).sum(), w)
        else:
            gw = torch.zeros_like(w)
        total.backward()
        w.grad = gw
