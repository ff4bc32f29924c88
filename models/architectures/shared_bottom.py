"""Hard sharing: one bottom MLP for all tasks, a tower each. The baseline every MTL paper beats."""

from __future__ import annotations

from models.architectures.base import Architecture, Outputs, mlp
from models.tasks import TaskSet


class SharedBottom(Architecture):
    def __init__(self, in_dim: int, tasks: TaskSet, bottom=(256, 128), tower=(64,), dropout: float = 0.0):
        super().__init__(in_dim, tasks)
        self.bottom = mlp(in_dim, list(bottom), dropout, reads_input=True)
        self.towers = self.towers_for(list(bottom)[-1], list(tower), dropout)

    def forward(self, x):
        h = self.bottom(x)
        self.last_representation = h
        return Outputs({name: tower(h) for name, tower in self.towers.items()})

    def shared_parameters(self):
        return list(self.bottom.parameters())
