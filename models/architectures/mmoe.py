"""Multi-gate mixture of experts (Ma et al. 2018): shared experts, one softmax gate per task.

Experts run as one batched matmul per layer and all task gates as one linear
layer, so the cost per step does not grow with a Python loop over experts.
"""

from __future__ import annotations

import torch

from models.architectures.base import Architecture, Outputs
from models.architectures.batched import BatchedMLP
from models.architectures.factored import InputLinear
from models.tasks import TaskSet


class MMoE(Architecture):
    """Multi-gate Mixture-of-Experts (Ma et al., "Modeling Task Relationships in Multi-task Learning
    with Multi-gate Mixture-of-Experts", KDD 2018).

    A shared bottom forces every task onto one representation; MMoE lets each task weight a pool of
    shared experts per example, so weakly related tasks can drift onto different experts instead of
    fighting over the same units, while related ones still share.

    Hyperparameters:
        n_experts (default 8): size of the shared expert pool. More experts give unrelated tasks room
            to separate; past a few per task they mostly add cost.
        expert (default (256, 128)): widths of each expert's ReLU MLP; the last is the width the
            gates mix and the towers read.
        tower (default (64,)): hidden widths of each task's own MLP on its mixture.
        dropout (default 0.0): dropout after every hidden ReLU, experts and towers.

    The gates are one linear layer with a row block per task: each task's loss reaches only its own
    block, so they are task parameters, not shared ones.
    """

    def __init__(self, in_dim: int, tasks: TaskSet, n_experts: int = 8, expert=(256, 128), tower=(64,),
                 dropout: float = 0.0):
        super().__init__(in_dim, tasks)
        self.experts = BatchedMLP(n_experts, in_dim, list(expert), dropout)
        self.gates = InputLinear(in_dim, n_experts * len(tasks))
        self.n_experts = n_experts
        self.towers = self.towers_for(self.experts.out_dim, list(tower), dropout)

    def forward(self, x):
        e = self.experts(x)  # [E, B, H]
        g = torch.softmax(self.gates(x).view(x.shape[0], len(self.tasks), self.n_experts), dim=-1)  # [B, T, E]
        mixed = torch.einsum("bte,ebh->tbh", g.to(e.dtype), e)
        return Outputs({name: tower(mixed[i]) for i, (name, tower) in enumerate(self.towers.items())})

    def shared_parameters(self):
        return list(self.experts.parameters())

    def last_shared_weight(self):
        return self.experts.weights[-1]  # [E, in, out]: every expert's last layer, which all gates mix
