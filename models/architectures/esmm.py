"""ESMM's network (Ma et al. 2018): independent towers over a shared input layer.

What makes ESMM is its training, conversion fitted as click x conversion on
every impression; ``TaskSet.losses`` does that for any architecture whose task
set declares ``sample_space: click``. The network itself shares only the
input: in the paper the embeddings, here also a small dense projection
(``shared``), so gradient-surgery balancers have a dense shared part to act on
(embedding tables are never theirs). With ``shared: []`` nothing dense is
shared and those balancers reduce to the weighted sum.
"""

from __future__ import annotations

from torch import nn

from models.architectures.base import Architecture, Outputs, mlp
from models.tasks import TaskSet


class ESMM(Architecture):
    def __init__(self, in_dim: int, tasks: TaskSet, shared=(128,), tower=(256, 128, 64), dropout: float = 0.0):
        super().__init__(in_dim, tasks)
        shared = list(shared)
        self.shared = mlp(in_dim, shared, dropout, reads_input=True) if shared else nn.Identity()
        self.towers = self.towers_for(shared[-1] if shared else in_dim, list(tower), dropout)

    def forward(self, x):
        h = self.shared(x)
        self.last_representation = h
        return Outputs({name: tower(h) for name, tower in self.towers.items()})

    def shared_parameters(self):
        return list(self.shared.parameters())
