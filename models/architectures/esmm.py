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
    """Entire Space Multi-task Model (Ma et al., "Entire Space Multi-Task Model: An Effective Approach
    for Estimating Post-Click Conversion Rate", SIGIR 2018).

    A conversion model trained on clicked impressions only is biased (it is served on every
    impression) and starved of data. ESMM instead fits pCTCVR = pCTR x pCVR on every impression,
    which makes conversion learnable over the entire space; the sharing that lets the rare
    conversion task borrow from clicks is in the input layer. The loss side of that lives in
    ``TaskSet.losses``, so the click tower here also receives the conversion task's gradient.

    Hyperparameters:
        shared (default (128,)): widths of the dense projection all towers read; ``()`` shares only
            the embeddings, as in the paper, and leaves gradient-surgery balancers nothing to act on.
        tower (default (256, 128, 64)): hidden widths of each task's own MLP; deep because almost
            all capacity is per task in ESMM.
        dropout (default 0.0): dropout after every hidden ReLU, projection and towers.
    """

    def __init__(self, in_dim: int, tasks: TaskSet, shared=(128,), tower=(256, 128, 64), dropout: float = 0.0):
        super().__init__(in_dim, tasks)
        shared = list(shared)
        self.shared = mlp(in_dim, shared, dropout, reads_input=True) if shared else nn.Identity()
        self.towers = self.towers_for(shared[-1] if shared else in_dim, list(tower), dropout)

    def forward(self, x):
        h = self.shared(x)
        return Outputs({name: tower(h) for name, tower in self.towers.items()})

    def shared_parameters(self):
        return list(self.shared.parameters())

    def last_shared_weight(self):
        linears = [m for m in self.shared.modules() if isinstance(m, nn.Linear)]
        return linears[-1].weight if linears else None  # None with ``shared: []``: nothing dense is shared
