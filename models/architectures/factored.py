"""First layers that exploit a ranking request's shape: most input columns are the same on every row.

Scoring one user against hundreds of candidates, the user's embeddings and features, the device and
the hour are identical on every row; only the item's columns vary. A first layer computes
``x W + b``, which splits as ``x[:, varying] W[varying] + (x[0, same] W[same] + b)``: the constant
part once, the varying part per row. With a quarter of the columns varying that removes most of the
first layer's work, the largest matmul of the expert architectures. It only applies at inference
(no autograd, eval mode) and when few columns vary, so training and offline evaluation on mixed
rows take the ordinary path; the two differ by float rounding only.

Consecutive requests share their varying columns (the item's), so the varying rows of each first layer's
weight are gathered once per set of columns and kept (``Gathered``), and the several first layers of one
forward pass (experts, gates) find the columns once (``split_columns`` remembers the last input per thread).
"""

from __future__ import annotations

import threading

import torch
from torch import nn

MAX_VARYING = 0.5  # above this share of varying columns the split saves too little to pay for the gather
MIN_ROWS = 8
KEEP = 4  # gathered weights kept per layer: the sets of varying columns a service sees are few

_last = threading.local()  # the last input split_columns looked at on this thread, and its answer


def split_columns(x: torch.Tensor) -> torch.Tensor | None:
    """The varying column indices of a 2-D inference batch, or None when splitting does not pay."""
    if x.dim() != 2 or x.shape[0] < MIN_ROWS or torch.is_grad_enabled():
        return None
    seen = getattr(_last, "seen", None)
    if seen is not None and seen[0] is x:  # held, so no other tensor can have its identity
        return seen[1]
    same = (x == x[:1]).all(0)
    varying = (~same).nonzero().squeeze(1)
    split = None if varying.numel() > MAX_VARYING * x.shape[1] else varying
    _last.seen = (x, split)
    return split


class Gathered:
    """``weight`` restricted to the varying columns, per set of columns, until the weight changes.

    Keyed by the columns and the weight's version counter, which every in-place update (an optimiser
    step, ``load_state_dict``) moves: validation during training splits too, with weights that change
    between batches. ``dim`` is the weight's input dimension.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.kept: dict[tuple, torch.Tensor] = {}

    def __call__(self, weight: torch.Tensor, varying: torch.Tensor) -> torch.Tensor:
        key = (weight._version, varying.numel(), varying.cpu().numpy().tobytes())
        got = self.kept.get(key)
        if got is None:
            got = weight.index_select(self.dim, varying)
            if len(self.kept) >= KEEP:
                self.kept.pop(next(iter(self.kept)), None)
            self.kept[key] = got
        return got


def _constant_row(x: torch.Tensor, varying: torch.Tensor) -> torch.Tensor:
    """The first row with its varying columns zeroed: times the full weight it gives the constant part
    without gathering the weight's constant rows (a copy of most of the layer per request)."""
    row = x[0].clone()
    row[varying] = 0
    return row


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, varying: torch.Tensor,
           gathered: Gathered | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (weight [out, in]) computed as constant part + varying part."""
    base = torch.nn.functional.linear(_constant_row(x, varying), weight, bias)
    if varying.numel() == 0:
        return base.expand(x.shape[0], -1)
    part = gathered(weight, varying) if gathered is not None else weight[:, varying]
    return torch.addmm(base, x[:, varying], part.T)


def batched(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, varying: torch.Tensor,
            gathered: Gathered | None = None) -> torch.Tensor:
    """``baddbmm(bias, x expanded to n, weight)`` (weight [n, in, out], bias [n, 1, out]), split likewise."""
    base = bias + torch.matmul(_constant_row(x, varying), weight).unsqueeze(1)  # [n, 1, out]
    n = weight.shape[0]
    if varying.numel() == 0:
        return base.expand(n, x.shape[0], -1)
    part = gathered(weight, varying) if gathered is not None else weight[:, varying, :]
    return torch.baddbmm(base, x[:, varying].unsqueeze(0).expand(n, -1, -1), part)


class InputLinear(nn.Linear):
    """``nn.Linear`` for layers that read the encoder's output; same parameters, same state dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gathered = Gathered(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = None if self.training else split_columns(x)
        return super().forward(x) if split is None else linear(x, self.weight, self.bias, split, self.gathered)
