"""Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla 2018).

Each task learns s_i = log sigma_i^2 and the loss is sum exp(-s_i) L_i + s_i.
Its minimum in s_i is at exp(-s_i) = 1 / L_i, so a noisy task (large
irreducible loss) is weighted down. The paper's 1/2 factor for regression
scales both terms alike and moves neither the optimum nor the ratio between
tasks, so one form serves every task type.
"""

from __future__ import annotations

import torch
from torch import nn

from models.balancers.base import Balancer


class UncertaintyWeighting(Balancer):
    """Homoscedastic uncertainty weighting: Kendall, Gal & Cipolla, "Multi-Task Learning Using
    Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

    Chosen when the tasks are noisy to different degrees: a task whose loss
    cannot go below a high floor (noisy labels) is weighted down instead of
    dominating the sum, at the cost of one learnable scalar per task and no
    extra pass. The loss is ``sum_i w_i (exp(-s_i) L_i + s_i)`` with s_i =
    log sigma_i^2 learned by the model's optimiser (no weight decay) and
    ``w_i`` the configured ``loss_weight``; ``weights()`` are
    ``w_i exp(-s_i)``, what multiplies each loss.

    No hyperparameters: every s_i starts at 0 (weight ``loss_weight``).
    """

    def __init__(self, n_tasks: int, initial_weights=None):
        super().__init__(n_tasks, initial_weights)
        self.log_vars = nn.Parameter(torch.zeros(n_tasks))

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        s = self.log_vars.to(losses.dtype)
        return (self.initial_weights * (torch.exp(-s) * losses + s)).sum()

    def weights(self) -> torch.Tensor:
        return (self.initial_weights * torch.exp(-self.log_vars)).detach()
