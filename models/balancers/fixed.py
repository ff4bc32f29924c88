"""Fixed weights from the task specs: the baseline every balancer is compared with."""

from __future__ import annotations

from models.balancers.base import Balancer


class FixedWeights(Balancer):
    """The weighted sum ``sum_i w_i L_i`` with each task's configured ``loss_weight`` (default 1).

    No paper: the baseline the balancers are compared with, and the right
    choice when the weights are known (or tuned by search), since it adds
    nothing to the step. No hyperparameters beyond the per-task weights.
    """
