"""Progressive layered extraction (Tang et al. 2020): CGC levels of shared and task experts.

At each level a task's gate mixes its own experts with the shared ones; a
shared gate over every expert feeds the next level's shared experts. Task
experts cannot be hijacked by other tasks, which is PLE's answer to the
seesaw effect of MMoE.
"""

from __future__ import annotations

import torch
from torch import nn

from models.architectures.base import Architecture, Outputs
from models.architectures.batched import BatchedMLP
from models.architectures.factored import InputLinear
from models.tasks import TaskSet


class _Level(nn.Module):
    def __init__(self, in_dim: int, n_tasks: int, n_shared: int, n_task: int, expert: list[int], last: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.task_experts = nn.ModuleList(BatchedMLP(n_task, in_dim, expert, dropout) for _ in range(n_tasks))
        self.shared_experts = BatchedMLP(n_shared, in_dim, expert, dropout)
        self.task_gates = nn.ModuleList(InputLinear(in_dim, n_task + n_shared) for _ in range(n_tasks))
        self.shared_gate = None if last else InputLinear(in_dim, n_tasks * n_task + n_shared)

    def forward(self, task_inputs: list[torch.Tensor], shared_input: torch.Tensor):
        shared = self.shared_experts(shared_input)  # [S, B, H]
        outs, own_all = [], []
        for x, experts, gate in zip(task_inputs, self.task_experts, self.task_gates):
            own = experts(x)  # [K, B, H]
            own_all.append(own)
            both = torch.cat([own, shared], dim=0)
            w = torch.softmax(gate(x), dim=-1).to(both.dtype)
            outs.append(torch.einsum("be,ebh->bh", w, both))
        next_shared = None
        if self.shared_gate is not None:
            every = torch.cat([*own_all, shared], dim=0)
            w = torch.softmax(self.shared_gate(shared_input), dim=-1).to(every.dtype)
            next_shared = torch.einsum("be,ebh->bh", w, every)
        return outs, next_shared, shared


class PLE(Architecture):
    """Progressive Layered Extraction (Tang et al., "Progressive Layered Extraction (PLE): A Novel
    Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020).

    MMoE's experts are all shared, so a dominant task can take them over and the others see-saw.
    PLE gives each task experts only its own gate reads (customized gate control, CGC) next to
    shared ones, and stacks such levels so shared knowledge is extracted progressively: a shared
    gate over every expert of a level feeds the next level's shared experts.

    Hyperparameters:
        levels (default 2): stacked extraction levels; the paper's gains come from going past one
            (one level is plain CGC). Each extra level adds a full set of experts.
        n_shared_experts (default 2): shared experts per level, read by every task's gate.
        n_task_experts (default 2): experts per task per level, read only by that task's gate (and,
            below the last level, by the shared gate).
        expert (default (128, 64)): widths of every expert's ReLU MLP; the last is both the level's
            output width and the next level's input.
        tower (default (64,)): hidden widths of each task's own MLP on its last-level mixture.
        dropout (default 0.0): dropout after every hidden ReLU, in the experts of every level and in
            the towers.

    Which parameters are shared follows from the wiring, not the names: below the last level a
    task's experts also feed the shared gate, hence every task, so they are shared parameters; a
    task's gate stays its own only where its output reaches nothing but its own task's path.
    """

    def __init__(self, in_dim: int, tasks: TaskSet, levels: int = 2, n_shared_experts: int = 2,
                 n_task_experts: int = 2, expert=(128, 64), tower=(64,), dropout: float = 0.0):
        super().__init__(in_dim, tasks)
        expert = list(expert)
        dims = [in_dim] + [expert[-1]] * (levels - 1)
        self.levels = nn.ModuleList(
            _Level(d, len(tasks), n_shared_experts, n_task_experts, expert, last=(i == levels - 1), dropout=dropout)
            for i, d in enumerate(dims))
        self.towers = self.towers_for(expert[-1], list(tower), dropout)

    def forward(self, x):
        task_inputs, shared_input = [x] * len(self.tasks), x
        for level in self.levels:
            task_inputs, next_shared, shared = level(task_inputs, shared_input)
            shared_input = next_shared if next_shared is not None else shared_input
        return Outputs({name: tower(task_inputs[i]) for i, (name, tower) in enumerate(self.towers.items())})

    def shared_parameters(self):
        n = len(self.levels)
        params: list[nn.Parameter] = []
        for i, level in enumerate(self.levels):
            params += level.shared_experts.parameters()
            if i < n - 1:  # below the last level: task experts and the shared gate feed the next shared experts
                params += level.task_experts.parameters()
                params += level.shared_gate.parameters()
            if i < n - 2:  # a task gate's mixture feeds its own experts of the next level, shared if that is not last
                params += level.task_gates.parameters()
        return params

    def last_shared_weight(self):
        return self.levels[-1].shared_experts.weights[-1]
