"""Gated shared / task-specific decomposition: shared-private multi-task learning with a learned mix.

Each task's input is a per-dimension sigmoid gate between a shared
representation (from shared experts) and its own specific one. Two extra
signals keep the parts honest: an orthogonality penalty between shared and
specific representations, so the specific part does not just copy the shared
one, and auxiliary heads that must predict each task from its specific part
alone, so that part carries task signal.

The penalty is a correlation of batch-centred pre-activations, not a cosine
of the ReLU outputs: non-negative vectors have a positive cosine unless they
never fire together, so the only way to lower that is to switch units off,
and most shared and specific units die. A correlation of pre-activations
ignores biases and scale altogether, so it can only be lowered by pointing
units in different directions, never by pushing them below zero.
"""

from __future__ import annotations

import torch
from torch import nn

from models.architectures.base import Architecture, Outputs
from models.architectures.batched import BatchedMLP
from models.architectures.factored import InputLinear
from models.tasks import TaskSet


def orthogonality(shared: torch.Tensor, specific: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared correlation between the shared units [B, H] and each task's specific units [T, B, K].

    DSN's difference loss ||S^T P||_F^2 on batch-centred, unit-norm columns, divided by H * K: 0 when
    no specific unit is linearly predictable from the shared units, 1 when all point the same way.
    Centring is what lets it reach 0; an uncentred cosine of non-negative activations is positive
    unless the units never fire together. The mean rather than DSN's sum keeps one ``ortho_weight``
    right at any width: the sum of H * K squared correlations has a sampling floor near H * K / B even
    for independent units, which at the default widths would outweigh the task losses.
    """
    s = shared.float()
    s = nn.functional.normalize(s - s.mean(0, keepdim=True), dim=0, eps=eps)
    p = specific.float()
    p = nn.functional.normalize(p - p.mean(1, keepdim=True), dim=1, eps=eps)
    return torch.einsum("bh,tbk->thk", s, p).pow(2).mean()


class GatedDecomposition(Architecture):
    """Shared-private decomposition with an orthogonality (difference) loss, after the shared-private
    model of Liu, Qiu & Huang ("Adversarial Multi-task Learning for Text Classification", ACL 2017)
    and the difference loss of Domain Separation Networks (Bousmalis et al., NeurIPS 2016); the
    per-dimension gate that fuses the two parts and the auxiliary heads are this project's own.

    In a plain shared-private model nothing stops the private part from relearning what the shared
    part already knows, wasting its capacity, or the shared part from absorbing task-specific
    signal and carrying the conflicts with it. The difference loss makes the two parts encode
    different directions; the gate then lets each task choose, per dimension, how much of each it
    uses, rather than concatenating them.

    Hyperparameters:
        n_shared_experts (default 4): experts in the shared part, mixed by one softmax gate; several
            experts let the shared part cover inputs on which the tasks agree in different ways.
        expert (default (128, 64)): widths of every expert's and every specific branch's ReLU MLP;
            the last is the width of both representations, the gate and the towers.
        tower (default (64,)): hidden widths of each task's MLP on its fused representation, and of
            its auxiliary MLP on its specific part alone.
        dropout (default 0.0): dropout after every hidden ReLU, experts, specific branches and towers.
        ortho_weight (default 1.0): weight of the difference loss, the mean squared correlation
            between shared and specific units (in [0, 1]; see ``orthogonality``). About 0.04 at
            initialisation on a small input, a few percent of a click log loss, so it shapes the
            representations without competing with the tasks; 0 turns the decomposition into a
            plain gated shared-private model.
        aux_weight (default 0.1): weight of the auxiliary losses (the module adds aux_weight times
            their sum), which make each specific part predict its task on its own so it carries
            task signal rather than noise the gate learns to ignore.
    """

    def __init__(self, in_dim: int, tasks: TaskSet, n_shared_experts: int = 4, expert=(128, 64), tower=(64,),
                 dropout: float = 0.0, ortho_weight: float = 1.0, aux_weight: float = 0.1):
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
        e, e_pre = self.shared_experts.forward_with_pre(x)  # [E, B, H] each
        w = torch.softmax(self.shared_gate(x), dim=-1).to(e.dtype)
        shared = torch.einsum("be,ebh->bh", w, e)  # [B, H]
        specific, specific_pre = self.specific.forward_with_pre(x)  # [T, B, H] each
        g = torch.sigmoid(self.fuse_gates(x)).view(x.shape[0], len(self.tasks), self.hidden).transpose(0, 1)
        fused = g * shared.unsqueeze(0) + (1 - g) * specific
        names = list(self.towers)
        logits = {n: self.towers[n](fused[i]) for i, n in enumerate(names)}
        aux = {n: self.aux_towers[n](specific[i]) for i, n in enumerate(names)}
        # The shared side's pre-activation is mixed by the same gate as its output.
        ortho = orthogonality(torch.einsum("be,ebh->bh", w, e_pre), specific_pre)
        return Outputs(logits, aux_logits=aux, penalty=self.ortho_weight * ortho)

    def shared_parameters(self):
        # The fuse gates and the specific branches are [T, ...] blocks, one slice per task: not shared.
        return [*self.shared_experts.parameters(), *self.shared_gate.parameters()]

    def last_shared_weight(self):
        return self.shared_experts.weights[-1]  # the shared branch's last layer, not the gate that mixes it
