"""Soft sharing with cross-stitch units (Misra et al. 2016).

Each task has its own column MLP; after every layer a learned T x T mix
(initialised near identity) lets each column borrow from the others. Because
of that mix every column carries every task's gradient, so the columns and the
stitch units together are ``shared_parameters``: gradient-surgery balancers
de-conflict the whole trunk, as for the other architectures. An optional
``tie_l2`` adds an L2 penalty pulling the columns' weights together.
"""

from __future__ import annotations

import torch
from torch import nn

from models.architectures.base import Architecture, Outputs
from models.architectures.batched import BatchedMLP
from models.tasks import TaskSet


class CrossStitch(Architecture):
    """Cross-stitch networks (Misra et al., "Cross-stitch Networks for Multi-task Learning", CVPR 2016),
    with the optional L2 tie between columns of soft parameter sharing (Duong et al., ACL 2015).

    Hard sharing fixes in advance how much tasks share; cross-stitch units learn it per layer: each
    task keeps its own column, and a learned linear mix of the columns' activations decides how much
    each borrows from the others. Near-identity initialisation starts close to independent per-task
    models and leaves it to training to decide how much they mix.

    Hyperparameters:
        hidden (default (128, 64)): widths of each task's column, one cross-stitch unit after each
            layer; the last is what the towers read.
        tower (default (32,)): hidden widths of each task's MLP on top of its column.
        dropout (default 0.0): dropout after every hidden ReLU, columns and towers.
        self_weight (default 0.9): initial diagonal of each stitch (a column's weight on itself); the
            rest, 1 - self_weight, is spread evenly over the other columns, so each row sums to 1
            (the paper's (0.9, 0.1) for two tasks).
        tie_l2 (default 0.0): weight of an L2 penalty pulling the columns' layer weights towards their
            mean; a second, parameter-level form of sharing for tasks too similar for mixing alone.
    """

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
        logits = {name: tower(h[i]) for i, (name, tower) in enumerate(self.towers.items())}
        penalty = None
        if self.tie_l2 > 0:
            penalty = self.tie_l2 * sum(((w - w.mean(0, keepdim=True)) ** 2).sum()
                                        for layer in self.layers for w in layer.weights)
        return Outputs(logits, penalty=penalty)

    def shared_parameters(self):
        # A stitch sends column s's output into every task's path, so each column's weights carry every
        # task's gradient (through the off-diagonal mix), not just its own task's.
        return [*self.layers.parameters(), *self.stitches]

    def mixing_parameters(self):
        return list(self.stitches)

    def last_shared_weight(self):
        return self.layers[-1].weights[-1]  # [T, in, out]: the last column layer, before the last stitch
