"""Gated shared / task-specific decomposition, in the manner of WAA-TA.

Each task's input is a per-dimension sigmoid gate between a shared
representation (from shared experts) and its own specific one. Two extra
signals keep the parts honest: an orthogonality penalty between shared and
specific representations, so the specific part does not just copy the shared
one, and auxiliary heads that must predict each task from its specific part
alone, so that part carries task signal.
"""

from __future__ import annotations

import torch
from torch import nn

from models.architectures.base import Architecture, Outputs
from models.architectures.batched import BatchedMLP
from models.architectures.factored import InputLinear
from models.tasks import TaskSet


class GatedDecomposition(Architecture):
    def __init__(self, in_dim: int, tasks: TaskSet, n_shared_experts: int = 4, expert=(128, 64), tower=(64,),
                 dropout: float = 0.0, ortho_weight: float = 0.01, aux_weight: float = 0.1):
        super().__init__(in_dim, tasks)
        expert = list(expert)
        self.shared_experts = BatchedMLP(n_shared_experts, in_dim, expert, dropout)
        self.shared_gate = InputLinear(in_dim, n_shared_experts)
        self.specific = BatchedMLP(len(tasks), in_dim, expert, dropout)
        self.fuse_gates = InputLinear(in_dim, len(tasks) * expert[-1])
        self.towers = self.towers_for(expert[-1], list(tower), dropout)
        self.aux_towers = self.towers_for(expert[-1], list(tower), dropout)
        self.ortho_weight, self.aux_weight = ortho_weight, aux_weight
        self.hidden = expert[-1]

    def forward(self, x):
        e = self.shared_experts(x)
        w = torch.softmax(self.shared_gate(x), dim=-1).to(e.dtype)
        shared = torch.einsum("be,ebh->bh", w, e)  # [B, H]
        specific = self.specific(x)  # [T, B, H]
        g = torch.sigmoid(self.fuse_gates(x)).view(x.shape[0], len(self.tasks), self.hidden).transpose(0, 1)
        fused = g * shared.unsqueeze(0) + (1 - g) * specific
        self.last_representation = shared
        names = list(self.towers)
        logits = {n: self.towers[n](fused[i]) for i, n in enumerate(names)}
        aux = {n: self.aux_towers[n](specific[i]) for i, n in enumerate(names)}
        # Squared cosine overlap between shared and each specific part, averaged.
        s = nn.functional.normalize(shared.float(), dim=0)
        t = nn.functional.normalize(specific.float(), dim=1)
        ortho = torch.einsum("bh,tbk->thk", s, t).pow(2).sum(dim=(1, 2)).mean()
        return Outputs(logits, aux_logits=aux, penalty=self.ortho_weight * ortho)

    def shared_parameters(self):
        return [*self.shared_experts.parameters(), *self.shared_gate.parameters()]
