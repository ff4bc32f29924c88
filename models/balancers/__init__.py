"""Balancers by name, as the YAML configs call them."""

from __future__ import annotations

import inspect

from models.balancers.base import Balancer
from models.balancers.dwa import DWA
from models.balancers.famo import FAMO
from models.balancers.fixed import FixedWeights
from models.balancers.gradnorm import GradNorm
from models.balancers.pcgrad import PCGrad
from models.balancers.uncertainty import UncertaintyWeighting

BALANCERS: dict[str, type[Balancer]] = {
    "fixed": FixedWeights,
    "uncertainty": UncertaintyWeighting,
    "dwa": DWA,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
    "famo": FAMO,
}


def build_balancer(name: str, n_tasks: int, initial_weights=None, **params) -> Balancer:
    if name not in BALANCERS:
        raise ValueError(f"unknown balancer {name!r}; choose one of {sorted(BALANCERS)}")
    cls = BALANCERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "n_tasks", "initial_weights"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"balancer {name!r} has no parameter(s) {unknown}; it takes {sorted(accepted)}")
    return cls(n_tasks, initial_weights, **params)


__all__ = ["BALANCERS", "Balancer", "build_balancer"]
