"""The task declaration: which behaviours a dataset records, owned by the dataset's ``dataset.yaml``.

A recommender's objectives are the data's, not the code's. A click/purchase
funnel and a short-video log with likes and follows are both just
declarations; validation rules, feature aggregates, default task heads,
evaluation relevance, the gate and the service's objectives are derived from
this one object, and nothing downstream names a behaviour.

```yaml
tasks:
  - {name: click, type: binary}
  - {name: purchase, type: binary, parent: click}   # implies click; trained ESMM-style
  - {name: dwell, type: regression, parent: click, transform: log1p}
  - {name: like, type: binary, gain: 2, reward: 3}  # gain: weight in graded relevance (default 1);
                                                    # reward: business value of one (default: the gain)
primary: click                                      # popularity baseline (default: the first binary task)
context: [network]                                  # extra request-time columns of the log used as features
attributes: {users: [region], items: [author]}      # extra user/item columns used as features
```

Why ``context`` and ``attributes`` are explicit: a column of the log that is
not declared might be an outcome (a label in disguise); using it as a
feature would leak the answer into training and fail silently at serving.
Undeclared columns are reported by name and left out.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any

TYPES = ("binary", "regression", "multiclass")
TRANSFORMS = (None, "log1p")
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")
# Columns of the interaction log that are never labels: keys, time, the contract's context.
RESERVED = ("user_id", "item_id", "event_timestamp", "request_ts")


class DeclarationError(ValueError):
    """A declaration that cannot be used; the message names the task and the fix."""


@dataclass(frozen=True)
class TaskDecl:
    """One declared behaviour. ``label`` defaults to the name; ``parent`` must be a binary task it implies."""

    name: str
    type: str = "binary"
    label: str | None = None
    parent: str | None = None
    gain: float = 1.0  # weight of this label in graded relevance (binary tasks)
    reward: float | None = None  # business value of one positive; None: the gain for binary tasks, 0 for the others
    fusion_weight: float | None = None  # serving default; None: the gain for binary tasks, 0 for the others
    transform: str | None = None  # regression target transform
    num_classes: int | None = None  # multiclass: labels are 0 .. num_classes-1
    min: float | None = None  # regression: declared range of the label
    max: float | None = None
    # Share of rows allowed to lack the label (validation fails above it). A missing label is masked out of the
    # task's loss and metrics, never a negative. 0 by default: complete logs validate unchanged, and a log that
    # starts losing labels is stopped until the dataset says how many it may lack.
    max_null_rate: float = 0.0
    loss_weight: float = 1.0  # initial / fixed weight for the balancer

    @property
    def column(self) -> str:
        return self.label or self.name

    @property
    def binary(self) -> bool:
        return self.type == "binary"

    @property
    def default_fusion_weight(self) -> float:
        if self.fusion_weight is not None:
            return float(self.fusion_weight)
        return float(self.gain) if self.binary else 0.0

    @property
    def default_reward(self) -> float:
        # The gain already says what an event is worth relative to the others; a dataset that declares no
        # rewards should be judged on exactly the relevance it was judged on before rewards existed.
        if self.reward is not None:
            return float(self.reward)
        return float(self.gain) if self.binary else 0.0


FIELDS = tuple(f.name for f in dataclasses.fields(TaskDecl))


@dataclass(frozen=True)
class Limits:
    """Bounds on what a table may hold, so one bad value cannot cost the feature build or a request gigabytes.

    A string or category column is copied into every feature row and join it reaches: one long string, or a
    column of ids posing as categories, can make the training-set build ask for more memory than any machine
    has. Strings longer than ``max_string_length`` and categorical columns with more than
    ``max_categories`` distinct values fail validation; ``columns`` overrides either for one column.
    """

    max_string_length: int = 256
    max_categories: int = 10_000
    columns: dict[str, dict[str, int]] = field(default_factory=dict)

    def string_length(self, column: str) -> int:
        return int(self.columns.get(column, {}).get("max_string_length", self.max_string_length))

    def categories(self, column: str) -> int:
        return int(self.columns.get(column, {}).get("max_categories", self.max_categories))

    @classmethod
    def from_dict(cls, raw: Any) -> "Limits":
        if raw in (None, {}):
            return cls()
        if not isinstance(raw, dict) or set(raw) - {"max_string_length", "max_categories", "columns"}:
            raise DeclarationError("limits must be a mapping of max_string_length, max_categories and columns "
                                   "({column: {max_string_length: N, max_categories: N}})")
        columns = raw.get("columns") or {}
        if not isinstance(columns, dict) or not all(isinstance(v, dict) and set(v) <= {"max_string_length",
                                                                                      "max_categories"}
                                                    for v in columns.values()):
            raise DeclarationError("limits.columns must map column names to {max_string_length, max_categories}")
        values = [raw.get("max_string_length", 1), raw.get("max_categories", 1),
                  *(x for v in columns.values() for x in v.values())]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in values):
            raise DeclarationError("limits must be positive integers")
        return cls(max_string_length=raw.get("max_string_length", cls.max_string_length),
                   max_categories=raw.get("max_categories", cls.max_categories), columns=dict(columns))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.max_string_length != Limits.max_string_length:
            out["max_string_length"] = self.max_string_length
        if self.max_categories != Limits.max_categories:
            out["max_categories"] = self.max_categories
        if self.columns:
            out["columns"] = self.columns
        return out


@dataclass(frozen=True)
class Declaration:
    tasks: tuple[TaskDecl, ...]
    primary: str
    context: tuple[str, ...] = ()
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # users / items -> columns
    limits: Limits = field(default_factory=Limits)

    # ---- reading ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Declaration":
        """Parse the declaration keys of a manifest; every mistake is a DeclarationError naming it."""
        raw = data.get("tasks")
        if not raw:
            raise DeclarationError("dataset.yaml declares no tasks: add `tasks: [{name: click, type: binary}, ...]` "
                                   "naming the behaviours (label columns) of the interaction log")
        if not isinstance(raw, list):
            raise DeclarationError(f"tasks must be a list of mappings, not {type(raw).__name__}")
        tasks = tuple(_task(i, item) for i, item in enumerate(raw))
        _check_graph(tasks)
        binary = [t.name for t in tasks if t.binary]
        if not binary:
            raise DeclarationError("declare at least one binary task: ranking and the popularity baseline need one")
        primary = data.get("primary") or binary[0]
        if primary not in binary:
            raise DeclarationError(f"primary {primary!r} must name a binary task; binary tasks are {binary}"
                                   + suggest(primary, binary))
        context = tuple(_names(data.get("context") or [], "context"))
        attrs_raw = data.get("attributes") or {}
        if not isinstance(attrs_raw, dict) or set(attrs_raw) - {"users", "items"}:
            raise DeclarationError("attributes must be a mapping with keys users and/or items, e.g. "
                                   "{users: [region], items: [author]}")
        # an empty list declares nothing: dropped, so that to_dict (which omits it) round-trips
        attributes = {k: tuple(_names(v or [], f"attributes.{k}")) for k, v in attrs_raw.items() if v}
        labels = {t.column for t in tasks}
        clash = sorted(labels & set(context))
        if clash:
            raise DeclarationError(f"column(s) {clash} are declared both as labels and as context: a label used as "
                                   "a feature leaks the answer")
        return cls(tasks=tasks, primary=primary, context=context, attributes=attributes,
                   limits=Limits.from_dict(data.get("limits")))

    def to_dict(self) -> dict[str, Any]:
        tasks = [{k: v for k, v in dataclasses.asdict(t).items() if v != _DEFAULTS[k] or k in ("name", "type")}
                 for t in self.tasks]
        out: dict[str, Any] = {"tasks": tasks, "primary": self.primary}
        if self.context:
            out["context"] = list(self.context)
        if any(self.attributes.values()):
            out["attributes"] = {k: list(v) for k, v in self.attributes.items() if v}
        if self.limits.to_dict():
            out["limits"] = self.limits.to_dict()
        return out

    # ---- questions downstream asks ------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def labels(self) -> list[str]:
        return [t.column for t in self.tasks]

    @property
    def binary(self) -> list[TaskDecl]:
        return [t for t in self.tasks if t.binary]

    def get(self, name: str) -> TaskDecl:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; declared tasks are {self.names}")

    def relevance(self) -> str:
        """Human form of the graded relevance evaluation uses, for protocols and reports."""
        return " + ".join(f"{_num(t.gain)}×{t.name}" for t in self.binary if t.gain)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TaskDecl)}


def _num(x: float) -> str:
    return f"{x:g}"


def suggest(word: str, options) -> str:
    """' (did you mean X?)' for the closest option, or '' when none is close."""
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _names(values, where: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        raise DeclarationError(f"{where} must be a list of column names")
    bad = [v for v in values if v in RESERVED]
    if bad:
        raise DeclarationError(f"{where} cannot name the key/time column(s) {bad}")
    return values


def _task(i: int, item: Any) -> TaskDecl:
    if not isinstance(item, dict) or "name" not in item:
        raise DeclarationError(f"tasks[{i}] must be a mapping with at least a name, e.g. {{name: click, type: binary}}")
    name = item["name"]
    if not isinstance(name, str) or not NAME.match(name):
        raise DeclarationError(f"tasks[{i}]: name {name!r} must start with a letter and hold only letters, digits "
                               "and _ (at most 48): it names feature columns and API fields")
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise DeclarationError(f"task {name}: unknown key(s) {unknown}" + suggest(unknown[0], FIELDS)
                               + f"; known keys are {list(FIELDS)}")
    kind = item.get("type", "binary")
    if kind not in TYPES:
        raise DeclarationError(f"task {name}: type must be one of {list(TYPES)}, not {kind!r}" + suggest(kind, TYPES))
    for key in ("label", "parent", "transform"):  # names are looked up and hashed: a list here would crash later
        if item.get(key) is not None and not isinstance(item[key], str):
            raise DeclarationError(f"task {name}: {key} must be a name (a string), not {item[key]!r}")
    values = dict(item)
    for key in ("gain", "reward", "fusion_weight", "min", "max", "max_null_rate", "loss_weight"):
        if values.get(key) is not None:
            try:
                values[key] = float(values[key])
            except (TypeError, ValueError):
                raise DeclarationError(f"task {name}: {key} must be a number, not {values[key]!r}") from None
            if not math.isfinite(values[key]):
                raise DeclarationError(f"task {name}: {key} must be a finite number, not {item[key]!r}")
    t = TaskDecl(**values)
    if t.column in RESERVED:
        raise DeclarationError(f"task {name}: its label column {t.column!r} is a key or time column")
    if t.gain < 0 or (t.fusion_weight is not None and t.fusion_weight < 0) or t.loss_weight < 0:
        raise DeclarationError(f"task {name}: gain, fusion_weight and loss_weight must be >= 0")
    if t.reward is not None and t.reward < 0:
        raise DeclarationError(f"task {name}: reward must be >= 0 (the business value of one {name}), "
                               f"not {t.reward:g}")
    if not 0.0 <= t.max_null_rate < 1.0:
        raise DeclarationError(f"task {name}: max_null_rate must be in [0, 1)")
    if t.transform not in TRANSFORMS:
        raise DeclarationError(f"task {name}: transform must be log1p or absent, not {t.transform!r}")
    if t.transform and t.type != "regression":
        raise DeclarationError(f"task {name}: transform applies to regression tasks only")
    if t.type == "multiclass":
        if not isinstance(t.num_classes, int) or t.num_classes < 2:
            raise DeclarationError(f"task {name}: a multiclass task needs num_classes (an integer >= 2)")
    elif t.num_classes is not None:
        raise DeclarationError(f"task {name}: num_classes applies to multiclass tasks only")
    if (t.min is not None or t.max is not None) and t.type != "regression":
        raise DeclarationError(f"task {name}: min/max apply to regression tasks only (binary labels are 0/1)")
    if t.min is not None and t.max is not None and t.min > t.max:
        raise DeclarationError(f"task {name}: min {t.min:g} is above max {t.max:g}")
    if t.transform == "log1p" and t.min is not None and t.min < 0:
        raise DeclarationError(f"task {name}: transform log1p needs values >= 0, but min is {t.min:g}")
    return t


def _check_graph(tasks: tuple[TaskDecl, ...]) -> None:
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DeclarationError(f"duplicate task name(s) {dup}: each behaviour is declared once")
    columns = [t.column for t in tasks]
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise DeclarationError(f"label column(s) {dup} are used by more than one task")
    by_name = {t.name: t for t in tasks}
    for t in tasks:
        if t.parent is None:
            continue
        if t.parent not in by_name:
            raise DeclarationError(f"task {t.name}: unknown parent {t.parent!r}" + suggest(t.parent, names)
                                   + f"; declared tasks are {names}")
        if not by_name[t.parent].binary:
            raise DeclarationError(f"task {t.name}: parent {t.parent!r} is {by_name[t.parent].type}; a parent must "
                                   "be a binary task (the child happens only where the parent is 1)")
    for t in tasks:  # follow parents; revisiting a task is a cycle
        seen = [t.name]
        node = t
        while node.parent is not None:
            if node.parent in seen:
                raise DeclarationError("parent cycle: " + " -> ".join([*seen, node.parent])
                                       + "; a task cannot (indirectly) imply itself")
            seen.append(node.parent)
            node = by_name[node.parent]


def topological(tasks: tuple[TaskDecl, ...] | list[TaskDecl]) -> list[TaskDecl]:
    """Parents before children, otherwise in declared order: ESMM heads need the parent's output first."""
    done: list[TaskDecl] = []
    names: set[str] = set()
    pending = list(tasks)
    while pending:
        for t in pending:
            if t.parent is None or t.parent in names:
                done.append(t)
                names.add(t.name)
                pending.remove(t)
                break
        else:  # only reachable with a cycle, which from_dict refuses
            raise DeclarationError("parent cycle among " + ", ".join(t.name for t in pending))
    return done
