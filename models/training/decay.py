"""Which parameters weight decay pulls towards zero: weights, never biases, normalisation or mixing units.

Decay is a prior that a parameter's best value is small. For a weight matrix
(an expert's, a tower's, an embedding's, a gate's) zero is a neutral point:
a gate whose weights are zero mixes its experts uniformly, a tower layer
with small weights is smooth. For the others it is not: a bias sets an
operating point (decaying it only shifts units towards their ReLU threshold),
a normalisation layer's scale starts at 1, and a cross-stitch unit starts
near the identity (a column's weight on itself), so zero would mean no
column reads even its own task. These are left out wherever they live,
including batched experts' biases ([n, 1, out], three dimensions), which a
rule on ``p.ndim < 2`` alone decayed.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
         nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def is_bias(name: str) -> bool:
    """A bias by the codebase's naming: ``nn.Linear``'s ``bias``, ``BatchedMLP``'s ``biases`` list."""
    return any(part in ("bias", "biases") for part in name.split("."))


def undecayed(model: nn.Module, also: Iterable[nn.Parameter] = ()) -> set[int]:
    """Ids of the parameters decay leaves alone: biases, normalisation layers, vectors and scalars, ``also``."""
    ids = {id(p) for p in also}
    for m in model.modules():
        if isinstance(m, NORMS):
            ids.update(id(p) for p in m.parameters(recurse=False))
    ids.update(id(p) for name, p in model.named_parameters() if is_bias(name) or p.ndim < 2)
    return ids


def decay_groups(model: nn.Module, weight_decay: float, also: Iterable[nn.Parameter] = ()) -> list[dict]:
    """Optimiser parameter groups: the weights with ``weight_decay``, the rest (``undecayed``) with none."""
    skip = undecayed(model, also)
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in skip], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
