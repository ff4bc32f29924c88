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
        self.last_representation = e
        return Outputs({name: tower(mixed[i]) for i, (name, tower) in enumerate(self.towers.items())})

    def shared_parameters(self):
        return list(self.experts.parameters())
