"""The architecture interface: a shared part, one tower per task, and what counts as shared.

An architecture maps the dense input vector (embeddings and normalised
numeric features, built by ``models.data.encoder.FeatureEncoder``) to one output
per task. It knows nothing of losses or balancers; a balancer that needs
per-task gradients asks it for ``shared_parameters()`` (the dense shared
trunk, never embedding tables), ``last_shared_weight()`` (the one weight
tensor GradNorm measures gradient norms on).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from models.architectures.factored import InputLinear
from models.architectures.heads import TaskModules
from models.tasks import TaskSet


@dataclass
class Outputs:
    """What a forward pass returns.

    ``logits``: one tensor per task, shape [B, out_dim].
    ``aux_logits``: optional extra heads trained on the same labels (e.g. the
    task-specific branch of the gated decomposition); the module adds their
    losses times ``aux_weight``.
    ``penalty``: an extra scalar loss the architecture asks for (orthogonality,
    L2 tie between towers); zero when none.
    """

    logits: dict[str, torch.Tensor]
    aux_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    penalty: torch.Tensor | None = None


def mlp(in_dim: int, hidden: list[int] | tuple[int, ...], dropout: float = 0.0, last_activation: bool = True,
        reads_input: bool = False) -> nn.Sequential:
    """A plain ReLU MLP; every architecture builds experts and towers from it.

    ``reads_input``: the MLP reads the encoder's output, so its first layer may split a request's
    constant columns off (``models.architectures.factored``); towers read mixed representations.
    """
    layers: list[nn.Module] = []
    d = in_dim
    for i, h in enumerate(hidden):
        layers.append(InputLinear(d, h) if i == 0 and reads_input else nn.Linear(d, h))
        if last_activation or i < len(hidden) - 1:
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        d = h
    return nn.Sequential(*layers)


class Architecture(nn.Module):
    """Base class: subclasses set ``self.towers`` (``towers_for``: one per task) and implement ``forward``."""

    def __init__(self, in_dim: int, tasks: TaskSet):
        super().__init__()
        self.in_dim = in_dim
        self.tasks = tasks

    def forward(self, x: torch.Tensor) -> Outputs:  # pragma: no cover - abstract
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """The dense parameters more than one task's loss flows through (gradient surgery acts here).

        Contract: every parameter that receives gradient from two or more task losses is listed,
        except where each task reaches a disjoint slice of it (one gate row or expert column per
        task), since those slices never conflict; the plain weighted sum is right there. A parameter
        left out gets the weighted sum of the task gradients, unprojected, so a shared one missing
        here silently escapes PCGrad's de-conflicting. Embedding tables are never listed.
        """
        raise NotImplementedError

    def last_shared_weight(self) -> nn.Parameter | None:
        """The weight (not bias, not gate) of the last shared layer before the tasks split; None if none.

        GradNorm (Chen et al. 2018) measures each task's gradient norm on this one tensor: the
        last layer all tasks write to is where their gradient magnitudes compete, and one tensor
        keeps that an extra norm per task rather than a full per-task backward. A bias or a gate
        would measure the wrong thing (a bias's gradient is the mean of the error signal; a gate's
        is about routing, not representation). Subclasses override this with the layer they mean;
        the default is the last shared weight matrix by registration order.
        """
        shared = {id(p) for p in self.shared_parameters()}
        found = None
        for name, p in self.named_parameters():
            parts = name.split(".")
            if id(p) in shared and p.ndim >= 2 and not any(q in ("bias", "biases") or "gate" in q for q in parts):
                found = p
        return found

    def mixing_parameters(self) -> list[nn.Parameter]:
        """Units that mix representations around a non-zero starting point (cross-stitch units).

        Weight decay leaves them out (``models.training.decay``): it would pull a mix towards zero, where no column
        reads even its own task, rather than towards the near-identity it starts from. Gates are not listed:
        a gate's weights at zero mix its experts uniformly, a neutral point decay may pull towards.
        """
        return []

    def towers_for(self, out_in_dim: int, hidden: list[int], dropout: float) -> TaskModules:
        """One tower per task ending in that task's output width, keyed by task name (any name: ``heads``)."""
        return TaskModules({
            t.name: nn.Sequential(mlp(out_in_dim, hidden, dropout),
                                  nn.Linear(hidden[-1] if hidden else out_in_dim, t.out_dim))
            for t in self.tasks
        })
