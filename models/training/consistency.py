"""Consistency regularisation: a penalty that keeps related tasks' predictions coherent with each other.

Cross-task consistency (Zamir et al., "Robust Learning Through Cross-Task Consistency", CVPR 2020) trains
related predictions jointly with a term that penalises outputs no world could produce together. A
recommender's tasks give two such relations:

- **implication** (a funnel): a child event needs its parent (a purchase needs a click), so the child's
  probability is never above the parent's. The penalty is the mean hinge ``relu(p_child - p_parent)``
  over the batch. A child trained ESMM-style (``sample_space: <parent>``) satisfies it by construction
  (its probability is ``p(parent) * p(child | parent)``), so there the term is zero and costs nothing; it
  acts on pairs declared in ``implies`` whose child is trained on every impression.
- **parallel behaviours** (a like and a long view of the same video): neither implies the other, but
  what makes a user like an item also tends to make them watch it. The penalty acts on the tasks' ranked
  scores, not on their shared representations: for each pair in a declared group, ``1 - corr`` of the
  two tasks' logits across the batch (Pearson). Scores, because ranking is what the fused list uses and
  a correlation ignores each head's scale and base rate, so a rare task is not pulled toward a common
  one's probabilities, only its order toward theirs.

Off by default (``weight: 0``): ``benchmarks/README.md`` (consistency table) has the measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.tasks import TaskSet


class ConsistencyError(ValueError):
    """A consistency setting naming a task the run does not have, or pairing tasks that cannot be paired."""


@dataclass(frozen=True)
class Consistency:
    weight: float = 0.0
    implies: tuple[tuple[str, str], ...] = ()  # (child, parent)
    groups: tuple[tuple[str, ...], ...] = ()

    @property
    def active(self) -> bool:
        return self.weight > 0 and bool(self.implies or self.groups)

    @classmethod
    def from_config(cls, raw: dict | None, tasks: TaskSet) -> "Consistency":
        """``{weight, implies: auto | [[child, parent], ...], groups: auto | [[task, ...], ...]}``.

        ``implies: auto`` takes every declared parent of a binary task; ``groups: auto`` puts every binary
        task trained on all impressions into one group (the parallel behaviours of a feed).
        """
        from models.contract.declaration import suggest

        raw = dict(raw or {})
        unknown = sorted(set(raw) - {"weight", "implies", "groups"})
        if unknown:
            raise ConsistencyError(f"model.consistency has no key {unknown[0]!r}"
                                   + suggest(unknown[0], ["weight", "implies", "groups"]))
        weight = raw.get("weight", 0.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConsistencyError(f"model.consistency.weight must be a number >= 0, not {weight!r}")
        binary = [t.name for t in tasks if t.type == "binary"]

        def check(name) -> str:
            if name not in binary:
                raise ConsistencyError(f"model.consistency names {name!r}, which is not a binary task of this "
                                       f"run" + suggest(str(name), binary) + f" (binary tasks: {binary})")
            return name

        implies = raw.get("implies", "auto")
        if implies == "auto":
            pairs = tuple((t.name, t.parent) for t in tasks if t.type == "binary" and t.parent is not None)
        else:
            if not isinstance(implies, list) or any(not isinstance(p, list) or len(p) != 2 for p in implies):
                raise ConsistencyError("model.consistency.implies must be auto or a list of [child, parent] pairs")
            pairs = tuple((check(c), check(p)) for c, p in implies)
        groups = raw.get("groups", [])
        if groups == "auto":
            parallel = tuple(t.name for t in tasks if t.type == "binary" and t.parent is None)
            found = (parallel,) if len(parallel) > 1 else ()
        else:
            if not isinstance(groups, list) or any(not isinstance(g, list) or len(g) < 2 for g in groups):
                raise ConsistencyError("model.consistency.groups must be auto or a list of groups of two or more "
                                       "tasks")
            found = tuple(tuple(check(t) for t in g) for g in groups)
        return cls(weight=float(weight), implies=pairs, groups=found)

    def penalty(self, tasks: TaskSet, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted penalty for one batch's outputs (a scalar; zero when off)."""
        first = next(iter(logits.values()))
        total = torch.zeros((), device=first.device, dtype=torch.float32)
        if not self.active:
            return total
        probs = tasks.probabilities(logits)
        for child, parent in self.implies:
            total = total + torch.relu(probs[child].float() - probs[parent].float()).mean()
        for group in self.groups:
            scores = {t: _score(tasks, t, logits, probs) for t in group}
            for i, a in enumerate(group):
                for b in group[i + 1:]:
                    total = total + (1.0 - _correlation(scores[a], scores[b]))
        return self.weight * total


def _score(tasks: TaskSet, name: str, logits: dict[str, torch.Tensor], probs: dict[str, torch.Tensor]):
    """What a task ranks by, on a scale where a correlation means something: the logit of a task trained on
    every impression, the log of the joint probability of one with a parent (its own head is conditional)."""
    if tasks.get(name).parent is None:
        return logits[name].float().reshape(-1)
    return torch.log(probs[name].float().clamp_min(1e-7)).reshape(-1)


def _correlation(x: torch.Tensor, y: torch.Tensor, floor: float = 1e-2) -> torch.Tensor:
    """Pearson correlation across the batch, with a variance floor; 1 (no penalty) for a single row.

    The floor (in squared logit units) keeps the term's gradient bounded while a head's scores are still
    nearly constant (at initialisation, or for a rare task): a correlation is scale-free, so without it
    the gradient grows as one over the scores' spread and swamps the task's own loss.
    """
    if x.numel() < 2:
        return torch.ones((), device=x.device)
    x = x - x.mean()
    y = y - y.mean()
    return (x * y).mean() / torch.sqrt((x.square().mean() + floor) * (y.square().mean() + floor))
