"""Architectures by name, as the YAML configs call them: the shared trunks and task towers any balancer trains."""

from __future__ import annotations

import inspect

from models.architectures.base import Architecture, Outputs
from models.architectures.esmm import ESMM
from models.architectures.gated import GatedDecomposition
from models.architectures.mmoe import MMoE
from models.architectures.ple import PLE
from models.architectures.shared_bottom import SharedBottom
from models.architectures.soft_sharing import CrossStitch
from models.tasks import TaskSet

ARCHITECTURES: dict[str, type[Architecture]] = {
    "shared_bottom": SharedBottom,
    "cross_stitch": CrossStitch,
    "mmoe": MMoE,
    "ple": PLE,
    "esmm": ESMM,
    "gated": GatedDecomposition,
}


def build_architecture(name: str, in_dim: int, tasks: TaskSet, **params) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "in_dim", "tasks"}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"architecture {name!r} has no parameter(s) {unknown}; it takes {sorted(accepted)}")
    return cls(in_dim, tasks, **params)


__all__ = ["ARCHITECTURES", "Architecture", "Outputs", "build_architecture"]
