"""Hard sharing: one bottom MLP for all tasks, a tower each. The baseline every MTL paper beats."""

from __future__ import annotations

from torch import nn

from models.architectures.base import Architecture, Outputs, mlp
from models.tasks import TaskSet


class SharedBottom(Architecture):
    """Shared-bottom hard parameter sharing (Caruana, "Multitask Learning", Machine Learning 28(1), 1997).

    Every task reads one representation, so related tasks regularise each other and a rare task
    borrows the frequent one's features; the price is that conflicting tasks fight over the same
    units (the seesaw the expert architectures try to avoid). It is here as the reference point
    the others must beat.

    Hyperparameters:
        bottom (default (256, 128)): widths of the shared ReLU MLP; its last width is the shared
            representation every tower reads, and the place task conflicts show up.
        tower (default (64,)): hidden widths of each task's own MLP before its output layer; the
            only capacity a task does not share.
        dropout (default 0.0): dropout after every hidden ReLU, bottom and towers; off by default
            because the recommender's data is large relative to these widths.
    """

    def __init__(self, in_dim: int, tasks: TaskSet, bottom=(256, 128), tower=(64,), dropout: float = 0.0):
        super().__init__(in_dim, tasks)
        self.bottom = mlp(in_dim, list(bottom), dropout, reads_input=True)
        self.towers = self.towers_for(list(bottom)[-1], list(tower), dropout)

    def forward(self, x):
        h = self.bottom(x)
        return Outputs({name: tower(h) for name, tower in self.towers.items()})

    def shared_parameters(self):
        return list(self.bottom.parameters())

    def last_shared_weight(self):
        linears = [m for m in self.bottom if isinstance(m, nn.Linear)]
        return linears[-1].weight if linears else None
