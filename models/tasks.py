"""Task specs: what each head predicts, over which rows, and with which loss.

A task set is configuration, not code: architectures build one tower per
task from ``out_dim`` and balancers see one loss per task, so adding an
objective is a YAML edit.

Sample spaces. ``all`` trains on every impression. ``<task>`` (e.g.
``click``) means "conditional on that task being positive". For a binary
task this is trained ESMM-style over the whole impression space: the head
predicts p(task | parent), the product p(parent) * p(task | parent) is fitted
to the task's label on every impression, which avoids the sample-selection
bias of training conversion on clicked rows only. Regression and multiclass
tasks with a parent are trained on the rows where the parent is positive.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

TYPES = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    type: str = "binary"
    label: str | None = None  # column; defaults to the task name
    sample_space: str = "all"  # "all" or the name of the parent task
    num_classes: int = 2  # multiclass only
    loss_weight: float = 1.0  # initial / fixed weight for the balancer
    fusion_weight: float = 1.0  # exponent (product) or weight (sum) at serving
    transform: str | None = None  # regression target transform: "log1p" or None
    optional: bool = False  # dropped when the data has no such label column

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"task {self.name}: type must be one of {TYPES}, not {self.type!r}")

    @property
    def column(self) -> str:
        return self.label or self.name

    @property
    def out_dim(self) -> int:
        return self.num_classes if self.type == "multiclass" else 1

    @property
    def parent(self) -> str | None:
        return None if self.sample_space in ("all", None) else self.sample_space

    @property
    def ranks(self) -> bool:
        """Binary tasks give a probability that ranking can fuse; the others are auxiliary."""
        return self.type == "binary"


@dataclass
class TaskSet:
    tasks: list[TaskSpec] = field(default_factory=list)

    def __post_init__(self):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in {names}")
        for t in self.tasks:
            if t.parent is not None:
                parent = self.get(t.parent)
                if parent.type != "binary":
                    raise ValueError(f"task {t.name}: its sample space {t.parent!r} must be a binary task")
                if names.index(parent.name) > names.index(t.name):
                    raise ValueError(f"task {t.name}: list its parent {parent.name!r} before it")

    @classmethod
    def from_config(cls, items: list[dict], columns=None) -> "TaskSet":
        """Build from YAML entries; with ``columns``, optional tasks without a label column are dropped."""
        specs = [TaskSpec(**item) for item in items]
        if columns is not None:
            cols = set(columns)
            missing = [t for t in specs if t.column not in cols and not t.optional]
            if missing:
                raise ValueError(f"label column(s) {[t.column for t in missing]} not in the data")
            specs = [t for t in specs if t.column in cols]
        return cls(specs)

    def to_config(self) -> list[dict]:
        return [dataclasses.asdict(t) for t in self.tasks]

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def get(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {self.names}")

    def probabilities(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Unconditional predictions per task (p(click), p(click and purchase), dwell, ...)."""
        probs: dict[str, torch.Tensor] = {}
        for t in self.tasks:
            out = outputs[t.name].float()
            if t.type == "binary":
                p = torch.sigmoid(out.squeeze(-1))
                probs[t.name] = p * probs[t.parent] if t.parent else p
            elif t.type == "multiclass":
                probs[t.name] = torch.softmax(out, dim=-1)
            else:
                y = out.squeeze(-1)
                probs[t.name] = torch.expm1(y) if t.transform == "log1p" else y
        return probs

    def losses(self, outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per task, stacked in task order (the balancers' input)."""
        out: list[torch.Tensor] = []
        probs: dict[str, torch.Tensor] = {}
        for t in self.tasks:
            logit = outputs[t.name].float()
            y = labels[t.name]
            if t.type == "binary":
                p = torch.sigmoid(logit.squeeze(-1))
                if t.parent:
                    # ESMM: fit p(parent) * p(task | parent) to the label on every row.
                    p = p * probs[t.parent]
                    out.append(F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y.float()))
                else:
                    out.append(F.binary_cross_entropy_with_logits(logit.squeeze(-1), y.float()))
                probs[t.name] = p
                continue
            mask = labels[t.parent] > 0 if t.parent else None
            if t.type == "multiclass":
                loss = F.cross_entropy(logit, y.long(), reduction="none")
            else:
                target = torch.log1p(y.float().clamp_min(0)) if t.transform == "log1p" else y.float()
                loss = F.mse_loss(logit.squeeze(-1), target, reduction="none")
            if mask is not None:
                # Masked mean without a data-dependent branch: no host sync per step.
                m = mask.float()
                out.append((loss * m).sum() / m.sum().clamp_min(1.0))
            else:
                out.append(loss.mean())
        return torch.stack(out)
