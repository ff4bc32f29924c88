"""Soft sharing with cross-stitch units (Misra et al. 2016).

Each task has its own column MLP; after every layer a learned T x T mix
(initialised near identity) lets each column borrow from the others. What is
shared is the mixing itself, so ``shared_parameters`` are the stitch units:
gradient-surgery balancers de-conflict how much the tasks borrow. An optional
``tie_l2`` adds an L2 penalty pulling the columns' weights together.
"""

from __future__ import annotations

import torch
from torch import nn

from models.architectures.base import Architecture, Outputs
from models.architectures.batched import BatchedMLP
from models.tasks import TaskSet


class CrossStitch(Architecture):
    def __init__(self, in_dim: int, tasks: TaskSet, hidden=(128, 64), tower=(32,), dropout: float = 0.0,
                 self_weight: float = 0.9, tie_l2: float = 0.0):
        super().__init__(in_dim, tasks)
        t = len(tasks)
        dims = [in_dim, *hidden]
        self.layers = nn.ModuleList(BatchedMLP(t, a, [b], dropout) for a, b in zip(dims[:-1], dims[1:]))
        init = torch.full((t, t), (1 - self_weight) / max(t - 1, 1)) if t > 1 else torch.ones(1, 1)
        if t > 1:
            init.fill_diagonal_(self_weight)
        self.stitches = nn.ParameterList(nn.Parameter(init.clone()) for _ in hidden)
        self.towers = self.towers_for(dims[-1], list(tower), dropout)
        self.tie_l2 = tie_l2

    def forward(self, x):
        h = x
        for layer, stitch in zip(self.layers, self.stitches):
            h = torch.einsum("ts,sbh->tbh", stitch, layer(h))
        self.last_representation = h
        logits = {name: tower(h[i]) for i, (name, tower) in enumerate(self.towers.items())}
        penalty = None
        if self.tie_l2 > 0:
            penalty = self.tie_l2 * sum(((w - w.mean(0, keepdim=True)) ** 2).sum() for l in self.layers for w in l.weights)
        return Outputs(logits, penalty=penalty)

    def shared_parameters(self):
        return list(self.stitches)
