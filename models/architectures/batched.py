"""Several same-shaped MLPs evaluated as one batched matmul per layer.

Experts (MMoE, PLE, the gated decomposition) and cross-stitch columns are
stacks of identical MLPs. A Python loop of ``nn.Linear`` launches one kernel
per expert per layer; stacking the weights as [n, in, out] runs each layer as
one ``baddbmm``, which is what keeps an H100 busy at large batch sizes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.architectures import factored


class BatchedMLP(nn.Module):
    def __init__(self, n: int, in_dim: int, hidden: list[int] | tuple[int, ...], dropout: float = 0.0):
        super().__init__()
        dims = [in_dim, *hidden]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            w = torch.empty(n, a, b)
            for k in range(n):  # the same init nn.Linear would give each expert
                nn.init.kaiming_uniform_(w[k].T, a=math.sqrt(5))
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.empty(n, 1, b).uniform_(-1 / math.sqrt(a), 1 / math.sqrt(a))))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.n = n
        self.out_dim = dims[-1]
        self.gathered = factored.Gathered(dim=1)  # the first layer's varying rows, when scoring a request

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in] shared by all, or [n, B, in] one input each; returns [n, B, out]."""
        return self.forward_with_pre(x, keep_pre=False)[0]

    def forward_with_pre(self, x: torch.Tensor, keep_pre: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output and the last layer's pre-activation (before ReLU and dropout), [n, B, out] each.

        The pre-activation is what a decorrelation penalty should see: after the ReLU every unit is
        non-negative, so two units can only be made uncorrelated without centring by switching them off.
        """
        split = None if self.training else factored.split_columns(x)
        h = x.unsqueeze(0).expand(self.n, -1, -1) if x.dim() == 2 else x
        in_place = not torch.is_grad_enabled()  # scoring: no autograd graph needs ``pre`` kept
        last = len(self.weights) - 1
        pre = None
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            first = i == 0 and split is not None
            pre = factored.batched(x, w, b, split, self.gathered) if first else torch.baddbmm(b, h, w)
            # In place when scoring: a fresh [n, B, out] output per layer costs an allocation and another pass
            # over memory, a fifth of a 1,000-candidate forward pass. An expanded view cannot be written in place,
            # nor a pre-activation the caller asked to keep.
            own = in_place and pre.is_contiguous() and not (keep_pre and i == last)
            h = self.dropout(pre.relu_() if own else torch.relu(pre))
        return h, (pre if keep_pre else None)
