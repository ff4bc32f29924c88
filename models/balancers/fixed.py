"""Fixed weights from the task specs: the baseline every balancer is compared with."""

from __future__ import annotations

from models.balancers.base import Balancer


class FixedWeights(Balancer):
    pass
