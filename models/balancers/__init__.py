"""Balancers by name, as the YAML configs call them: how task losses (or gradients) combine into one update."""

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


def check_world_size(name: str, world_size: int) -> None:
    """Refuse a gradient-surgery balancer in a multi-process (DDP) run, before any step is taken.

    DDP averages the gradients of one backward pass across ranks. PCGrad then
    overwrites the shared gradients with its own rank's projection of its own
    per-task gradients, and GradNorm's task weights get their gradient from
    ``autograd.grad`` outside DDP's reduction: either way the ranks' replicas
    drift apart without an error. Loss-weighting balancers have one backward
    pass that DDP reduces as usual.
    """
    cls = BALANCERS.get(name)
    if cls is not None and cls.manual and int(world_size) > 1:
        safe = ", ".join(sorted(n for n, c in BALANCERS.items() if not c.manual))
        raise ValueError(
            f"balancer {name!r} is a gradient-surgery balancer and cannot train across {int(world_size)} processes "
            f"(DDP): each rank would use its own per-task gradients after DDP averaged them, and the replicas "
            f"would drift apart. Use a loss-weighting balancer ({safe}) or train on a single device "
            f"(train.devices=1).")


def check_precision(balancer: str, precision: str) -> None:
    """Refuse fp16 with a gradient-surgery balancer: they take their per-task gradients with
    ``torch.autograd.grad`` outside Lightning's grad scaler, which would then unscale gradients it never
    scaled. bf16 needs no scaler and is fine."""
    cls = BALANCERS.get(balancer)
    if cls is not None and cls.manual and str(precision).startswith("16"):
        raise ValueError(f"balancer {balancer!r} takes per-task gradients outside the fp16 grad scaler: train it "
                         f"with train.precision=bf16-mixed or 32-true, not {precision!r}")


__all__ = ["BALANCERS", "Balancer", "build_balancer", "check_precision", "check_world_size"]
