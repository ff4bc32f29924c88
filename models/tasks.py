"""Task specs: what each head predicts, over which rows, and with which loss.

A task set is configuration, not code: architectures build one tower per
task from ``out_dim`` and balancers see one loss per task, so adding an
objective is a YAML edit. By default the task set is the dataset's own
declaration (``models/contract/declaration.py``), carried in the training table's
metadata; a config may list tasks instead, and an entry naming a declared
task inherits the declaration's fields.

Sample spaces. ``all`` trains on every impression. ``<task>`` (e.g.
``click``) means "conditional on that task being positive". For a binary
task this is trained ESMM-style over the whole impression space: the head
predicts p(task | parent), the product p(parent) * p(task | parent) is fitted
to the task's label on every impression, which avoids the sample-selection
bias of training conversion on clicked rows only. The product's gradient
stays out of the parent's head unless ``parent_gradient: true`` (ESMM's
original form, in which the child's loss trains the parent too). Regression and multiclass
tasks with a parent are trained on the rows where the parent is positive.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.contract.declaration import Declaration, TaskDecl, suggest, topological

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
    gain: float = 1.0  # weight of the label in graded relevance (binary tasks)
    reward: float | None = None  # business value of one positive; None: the gain (binary), 0 (the others)
    # ESMM: whether this task's loss also trains its parent's head through p(parent) in the product. Off (the
    # default), the parent learns from its own labels only, and the child's head still fits the product. With
    # the recipe's weight averaging, off wins on both datasets with parent tasks (default MMoE, seed 0): the
    # e-commerce synthetic's fused NDCG@10 .6414 against .6368 on (a click-only model: .6420), MovieLens'
    # .7299 against .7224 (the best single-task model: .7098), every task's AUC higher too. (Before weight
    # averaging MovieLens went the other way, .6903 off against .7103 on.) benchmarks/README.md has the runs.
    parent_gradient: bool = False
    # Regression: training-split mean and std of the (transformed) target, so the head learns a standardised
    # value whose squared error starts near 1, the scale of the binary tasks' losses, whatever the unit.
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"task {self.name}: type must be one of {TYPES}, not {self.type!r}")
        if self.reward is not None and (not isinstance(self.reward, (int, float)) or isinstance(self.reward, bool)
                                        or not self.reward >= 0 or self.reward == float("inf")):
            raise ValueError(f"task {self.name}: reward must be a number >= 0, not {self.reward!r}")

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
    def reward_value(self) -> float:
        """The declared reward, else what the declaration defaults it to (kept unresolved so a config's gain
        override moves the default with it)."""
        if self.reward is not None:
            return float(self.reward)
        return float(self.gain) if self.type == "binary" else 0.0

    @property
    def ranks(self) -> bool:
        """Binary tasks give a probability that ranking can fuse; the others are auxiliary."""
        return self.type == "binary"


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(TaskSpec))


def spec_of(decl: TaskDecl) -> TaskSpec:
    """The model's view of one declared task."""
    return TaskSpec(name=decl.name, type=decl.type, label=decl.label, sample_space=decl.parent or "all",
                    num_classes=decl.num_classes or 2, loss_weight=decl.loss_weight,
                    fusion_weight=decl.default_fusion_weight, transform=decl.transform, gain=decl.gain,
                    reward=decl.reward)


@dataclass
class TaskSet:
    tasks: list[TaskSpec] = field(default_factory=list)
    primary: str | None = None  # the binary task popularity counts; default: the first binary task

    def __post_init__(self):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in {names}")
        for t in self.tasks:
            if t.parent is not None:
                if t.parent not in names:
                    raise ValueError(f"task {t.name}: its parent {t.parent!r} is not in the task set {names}; add "
                                     f"it, or train {t.name} on every impression (sample_space: all)")
                parent = self.get(t.parent)
                if parent.type != "binary":
                    raise ValueError(f"task {t.name}: its sample space {t.parent!r} must be a binary task")
                if names.index(parent.name) > names.index(t.name):
                    raise ValueError(f"task {t.name}: list its parent {parent.name!r} before it")
        binary = [t.name for t in self.tasks if t.type == "binary"]
        if self.primary not in binary:
            self.primary = binary[0] if binary else None

    @classmethod
    def from_config(cls, items: list[dict], columns=None, primary: str | None = None) -> "TaskSet":
        """Build from complete entries (an artifact's, or a config's); with ``columns``, every label must be there."""
        specs = [_spec(item) for item in items]
        if columns is not None:
            missing = [t.column for t in specs if t.column not in set(columns)]
            if missing:
                raise ValueError(f"label column(s) {missing} not in the data")
        return cls(specs, primary=primary)

    @classmethod
    def resolve(cls, config_tasks, declaration: dict | None, columns=None) -> "TaskSet":
        """The run's task set: ``auto`` (or none) takes the dataset's declaration; a list picks and overrides.

        A list entry that names a declared task starts from the declaration's spec and overrides the keys it
        gives (``{name: like, loss_weight: 2}``); an entry naming no declared task must say what it is.
        """
        decl = Declaration.from_dict(declaration) if declaration else None
        if config_tasks in (None, "auto"):
            if decl is None:
                raise ValueError("the config says tasks: auto, but the training table carries no task declaration "
                                 "(rebuild it with `mtlrec features build DATASET`, or list the tasks in the config)")
            specs = [spec_of(t) for t in topological(decl.tasks)]
            return cls.from_config([dataclasses.asdict(t) for t in specs], columns, primary=decl.primary)
        if not isinstance(config_tasks, list):
            raise ValueError(f"tasks must be auto or a list of task entries, not {config_tasks!r}")
        declared = {t.name: spec_of(t) for t in decl.tasks} if decl else {}
        items = []
        for entry in config_tasks:
            entry = dict(entry)
            if "parent" in entry:  # the declaration's word for the sample space
                parent = entry.pop("parent")
                entry["sample_space"] = parent or "all"
            base = dataclasses.asdict(declared[entry["name"]]) if entry.get("name") in declared else {}
            items.append({**base, **entry})
        names = {i["name"] for i in items}
        order = {t.name: i for i, t in enumerate(topological([_decl_view(i, names) for i in items]))}
        items.sort(key=lambda i: order[i["name"]])
        return cls.from_config(items, columns, primary=decl.primary if decl else None)

    def to_config(self) -> list[dict]:
        return [dataclasses.asdict(t) for t in self.tasks]

    def standardised(self, stats: dict[str, tuple[float, float]]) -> "TaskSet":
        """The same tasks with regression targets' training statistics filled in (``target_stats``)."""
        specs = [dataclasses.replace(t, target_mean=stats[t.name][0], target_std=stats[t.name][1])
                 if t.name in stats else t for t in self.tasks]
        return TaskSet(specs, primary=self.primary)

    def relevance(self) -> str:
        """Human form of the graded relevance the fused ranking is judged on."""
        return " + ".join(f"{t.gain:g}×{t.name}" for t in self.tasks if t.ranks and t.gain)

    def gains(self) -> dict[str, float]:
        return {t.name: t.gain for t in self.tasks if t.ranks and t.gain}

    def rewards(self) -> dict[str, float]:
        """Each ranking objective's business value, for reward-weighted metrics (zero rewards left out)."""
        return {t.name: t.reward_value for t in self.tasks if t.ranks and t.reward_value}

    def reward_relevance(self) -> str:
        """Human form of the reward a ranking earns, for protocols and reports."""
        return " + ".join(f"{v:g}×{k}" for k, v in self.rewards().items())

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def binary(self) -> list[TaskSpec]:
        return [t for t in self.tasks if t.ranks]

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
                y = out.squeeze(-1) * t.target_std + t.target_mean  # the head predicts the standardised target
                probs[t.name] = torch.expm1(y.clamp_min(0)) if t.transform == "log1p" else y  # log1p: y >= 0
        return probs

    def target(self, t: TaskSpec, y: torch.Tensor) -> torch.Tensor:
        """A regression label as the head learns it: transformed, then standardised with training statistics."""
        y = torch.log1p(y.float().clamp_min(0)) if t.transform == "log1p" else y.float()
        return (y - t.target_mean) / t.target_std

    def losses(self, outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """One loss per task, stacked in task order (the balancers' input).

        A NaN label is missing: that row is left out of its task's loss (a mean over the rows whose label is
        known), never read as a negative. A batch with no known label for a task gives it a loss of 0, not
        NaN, which the balancers read as "no signal this step".
        """
        out: list[torch.Tensor] = []
        log_p: dict[str, torch.Tensor] = {}  # log of each binary task's unconditional probability
        for t in self.tasks:
            logit = outputs[t.name].float()
            y = labels[t.name].float()
            known = ~torch.isnan(y)
            y = torch.where(known, y, torch.zeros_like(y))  # any finite value: the row's loss is masked below
            if t.type == "binary":
                z = logit.squeeze(-1)
                if t.parent:
                    # ESMM: fit p(parent) * p(task | parent) to the label on every row, in log space: a product
                    # clamped before the BCE would give a rare positive below the clamp no gradient at all.
                    parent = log_p[t.parent] if t.parent_gradient else log_p[t.parent].detach()
                    lp = F.logsigmoid(z) + parent
                    loss = -(y * lp + (1.0 - y) * _log1mexp(lp))
                else:
                    lp = F.logsigmoid(z)
                    loss = F.binary_cross_entropy_with_logits(z, y, reduction="none")
                log_p[t.name] = lp
                out.append(_masked_mean(loss, known))
                continue
            # Trained where the parent is known to be positive (a missing parent label is not a positive).
            mask = known & (labels[t.parent] > 0) if t.parent else known
            if t.type == "multiclass":
                loss = F.cross_entropy(logit, y.long(), reduction="none")
            else:
                loss = F.mse_loss(logit.squeeze(-1), self.target(t, y), reduction="none")
            out.append(_masked_mean(loss, mask))
        return torch.stack(out)


def _masked_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``loss`` over the rows in ``mask``, 0 when there are none; no data-dependent branch, so no host
    sync per step, and ``where`` rather than a product, so a masked row's value cannot leak in as NaN."""
    m = mask.float()
    return torch.where(mask, loss, torch.zeros_like(loss)).sum() / m.sum().clamp_min(1.0)


LN2 = math.log(2.0)
# Above -LOG1MEXP_EDGE, log(1 - e^a) is continued by its tangent at -LOG1MEXP_EDGE (slope LOG1MEXP_SLOPE): its true
# slope -1/|a| would overflow float32 below about -3e-39, and at a = 0 (p = 1) its value is -inf.
LOG1MEXP_EDGE = 1e-30
LOG1MEXP_SLOPE = -1.0 / math.expm1(LOG1MEXP_EDGE)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0 (the log-probability of a negative), to float32 accuracy wherever a <= -1e-30.

    Maechler's two branches ("Accurately Computing log(1 - exp(-|a|))", 2012): log(-expm1(a)) above -ln 2,
    log1p(-exp(a)) below. Between -1e-30 and 0 (a probability within 1e-30 of 1) the tangent at -1e-30 takes
    over: -70 at p = 1, a large and finite loss whose gradient, -1e30 with respect to ``a``, is about the logit's
    own error once multiplied by d a / d logit (which is below 1e-30 there). A clamp instead gave every
    negative scored above 1 - 1e-7 no gradient at all, the confidently wrong ones ESMM most needs to correct.
    """
    b = a.clamp_max(-LOG1MEXP_EDGE)
    near = b > -LN2
    # Each branch gets only inputs it is finite on: the branch torch.where drops still backpropagates a zero
    # gradient, and zero times an infinite derivative is NaN.
    upper = torch.log(-torch.expm1(torch.where(near, b, -LN2)))
    lower = torch.log1p(-torch.exp(torch.where(near, -LN2, b)))
    # The tangent's part is added only above the edge: below it, a - b is 0 but its gradient would be the
    # difference of two 1e30 terms, which float32 rounds to 0 and so swallows the true gradient.
    tangent = torch.where(a > b, (a - b) * LOG1MEXP_SLOPE, torch.zeros_like(a))
    return torch.where(near, upper, lower) + tangent


def _spec(item: dict) -> TaskSpec:
    if not isinstance(item, dict) or "name" not in item:
        raise ValueError(f"a task entry must be a mapping with a name, not {item!r}")
    unknown = sorted(set(item) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"task {item['name']}: unknown key(s) {unknown}" + suggest(unknown[0], SPEC_FIELDS)
                         + f"; known keys are {list(SPEC_FIELDS)}")
    return TaskSpec(**item)


def _decl_view(item: dict, names: set[str]) -> TaskDecl:
    """Just enough of a declaration to order entries parents-first (a missing parent is TaskSet's to report)."""
    space = item.get("sample_space", "all")
    return TaskDecl(name=item["name"], parent=space if space in names else None)
