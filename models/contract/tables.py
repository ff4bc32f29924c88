"""The data contract: the three tables every stage reads, defined once.

It lives in ``models/`` because that is the one package every other imports
and it depends on nothing heavier than pandas; the generator, the MovieLens
mapping, validation, Feast and training all read column names and rules from
here instead of repeating them.

A dataset is a directory holding ``users.parquet``, ``items.parquet``,
``interactions.parquet`` and ``dataset.yaml`` (its manifest: where it came
from, its declared time range, and the task declaration of
``models/contract/declaration.py``: which label columns the log carries and what they
mean). The interaction table's label columns are not fixed here: they come
from the declaration (``interactions_table``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from models.contract.declaration import Declaration, DeclarationError, TaskDecl

# The dtype kinds a column may have, each with the pandas dtype names that
# satisfy it. Ids are strings so that any source's keys fit without a mapping.
DTYPE_NAMES: dict[str, list[str]] = {
    "string": ["object", "str", "string", "string[python]", "string[pyarrow]", "large_string[pyarrow]"],
    "int": ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "Int8", "Int16", "Int32", "Int64"],
    "binary": ["int8", "int16", "int32", "int64", "uint8", "bool", "Int8", "Int64", "boolean"],
    "float": ["float16", "float32", "float64", "Float32", "Float64"],
    "timestamp": ["datetime64[ns, UTC]", "datetime64[us, UTC]", "datetime64[ms, UTC]", "datetime64[s, UTC]"],
}
# Great Expectations knows pandas' nullable dtypes (how a label with declared nulls is stored) only by their
# class names ("Int8Dtype"), not by str(dtype) ("Int8"): list both, or a nullable label always fails its type rule.
_GX_NAMES = {"Int8": "Int8Dtype", "Int16": "Int16Dtype", "Int32": "Int32Dtype", "Int64": "Int64Dtype",
             "Float32": "Float32Dtype", "Float64": "Float64Dtype", "boolean": "BooleanDtype", "string": "StringDtype"}
DTYPE_NAMES = {kind: names + [_GX_NAMES[n] for n in names if n in _GX_NAMES] for kind, names in DTYPE_NAMES.items()}
DTYPE_NAMES["number"] = DTYPE_NAMES["int"] + DTYPE_NAMES["float"]


@dataclass(frozen=True)
class Column:
    """One column of a contract table and the rules validation applies to it."""

    name: str
    kind: str  # a key of DTYPE_NAMES, or "any" (declared attributes and context: any type, no type rule)
    required: bool = True
    nullable: bool = False
    max_null_rate: float = 0.0  # only for nullable columns
    domain: tuple | None = None  # allowed values (labels, small categoricals)
    min_value: float | None = None
    max_value: float | None = None
    doc: str = ""


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: str | None  # unique id column, if any
    min_rows: int = 1

    @property
    def file(self) -> str:
        return f"{self.name}.parquet"

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no column {name!r}")

    @property
    def required(self) -> list[str]:
        return [c.name for c in self.columns if c.required]


TIMESTAMP = "event_timestamp"

USERS = Table(
    name="users",
    key="user_id",
    min_rows=10,
    columns=(
        Column("user_id", "string", doc="unique user id"),
        Column(TIMESTAMP, "timestamp", doc="when these attributes became known (UTC)"),
        Column("age", "int", required=False, nullable=True, max_null_rate=0.2, min_value=0, max_value=120),
        Column("gender", "string", required=False, nullable=True, max_null_rate=0.2),
        Column("segment", "string", required=False, nullable=True, max_null_rate=0.2,
               doc="a coarse user group (region, occupation, ...)"),
    ),
)

ITEMS = Table(
    name="items",
    key="item_id",
    min_rows=10,
    columns=(
        Column("item_id", "string", doc="unique item id"),
        Column(TIMESTAMP, "timestamp", doc="when the item became available (UTC)"),
        Column("category", "string", required=False, doc="primary category: a feature and the diversity signal"),
        Column("price", "float", required=False, nullable=True, max_null_rate=0.2, min_value=0.0),
    ),
)

# The log's fixed part: keys, time and the context the contract knows. Labels come from the declaration.
INTERACTIONS = Table(
    name="interactions",
    key=None,
    min_rows=100,
    columns=(
        Column("user_id", "string", doc="must exist in users"),
        Column("item_id", "string", doc="must exist in items"),
        Column(TIMESTAMP, "timestamp", doc="impression time (UTC)"),
        Column("device", "string", required=False, nullable=True, max_null_rate=0.05,
               doc="context: device the impression was shown on"),
        Column("position", "int", required=False, min_value=0, max_value=1000,
               doc="context: slot the item was shown in"),
    ),
)
CONTEXT = ("device", "position")  # request-time columns of the log every dataset may carry

TABLES: dict[str, Table] = {t.name: t for t in (USERS, ITEMS, INTERACTIONS)}
KEYS = ("user_id", "item_id")  # ids: bounded in length, not in how many there are


def label_column(task: TaskDecl) -> Column:
    """The validation rules of one declared label column."""
    null = task.max_null_rate > 0
    if task.type == "binary":
        return Column(task.column, "binary", nullable=null, max_null_rate=task.max_null_rate, domain=(0, 1),
                      doc=f"label of task {task.name}: 1 if it happened")
    if task.type == "multiclass":
        return Column(task.column, "int", nullable=null, max_null_rate=task.max_null_rate,
                      domain=tuple(range(int(task.num_classes))), doc=f"class label of task {task.name}")
    low = task.min if task.min is not None else (0.0 if task.transform == "log1p" else None)
    return Column(task.column, "number", nullable=null, max_null_rate=task.max_null_rate, min_value=low,
                  max_value=task.max, doc=f"value of task {task.name}")


def interactions_table(declaration: Declaration | None) -> Table:
    """The interaction log's contract for one dataset: the fixed columns plus the declared labels and context."""
    if declaration is None:
        return INTERACTIONS
    extra = [label_column(t) for t in declaration.tasks]
    known = {c.name for c in INTERACTIONS.columns}
    extra += [Column(c, "any", required=True, nullable=True, max_null_rate=0.5, doc="declared context")
              for c in declaration.context if c not in known]
    columns = _require(INTERACTIONS.columns, declaration.context) + tuple(extra)
    return dataclasses.replace(INTERACTIONS, columns=columns)


def tables_for(declaration: Declaration | None) -> dict[str, Table]:
    """All three tables' contracts for one dataset; declared attributes become required columns."""
    attrs = declaration.attributes if declaration else {}
    out = {}
    for name, table in TABLES.items():
        if name == "interactions":
            out[name] = interactions_table(declaration)
            continue
        known = {c.name for c in table.columns}
        extra = tuple(Column(c, "any", nullable=True, max_null_rate=0.5, doc="declared attribute")
                      for c in attrs.get(name, ()) if c not in known)
        out[name] = dataclasses.replace(table, columns=_require(table.columns, attrs.get(name, ())) + extra)
    return out


def _require(columns: tuple[Column, ...], declared) -> tuple[Column, ...]:
    """A contract column that is optional becomes required once the declaration names it (features read it)."""
    return tuple(dataclasses.replace(c, required=True) if c.name in declared else c for c in columns)


MANIFEST = "dataset.yaml"


class ManifestError(ValueError):
    """A missing or malformed ``dataset.yaml``; the message names the file and the problem."""


@dataclass
class Manifest:
    """What a dataset declares about itself; validation holds it to this."""

    name: str
    source: str
    start: str  # ISO-8601 UTC, inclusive
    end: str  # ISO-8601 UTC, inclusive
    tasks: list[dict[str, Any]] = field(default_factory=list)  # the task declaration (models/contract/declaration.py)
    primary: str | None = None
    context: list[str] = field(default_factory=list)
    attributes: dict[str, list[str]] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def declaration(self) -> Declaration:
        """The parsed declaration; raises DeclarationError naming what is wrong."""
        d = Declaration.from_dict({"tasks": self.tasks, "primary": self.primary, "context": self.context,
                                   "attributes": self.attributes, "limits": self.limits})
        clash = sorted(set(d.labels) & set(CONTEXT))
        if clash:  # the contract's own context columns are features everywhere: a label there would leak
            raise DeclarationError(f"label column(s) {clash} are context columns of the contract "
                                   f"({', '.join(CONTEXT)}), used as features: give the task another label column")
        return d

    def declare(self, declaration: Declaration) -> "Manifest":
        d = declaration.to_dict()
        self.tasks, self.primary = d["tasks"], d["primary"]
        self.context, self.attributes = d.get("context", []), d.get("attributes", {})
        self.limits = d.get("limits", {})
        return self

    @property
    def start_ts(self) -> pd.Timestamp:
        return utc(self.start)

    @property
    def end_ts(self) -> pd.Timestamp:
        return utc(self.end)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST
        # json round-trip turns numpy scalars into plain types yaml can write.
        data = json.loads(json.dumps(dataclasses.asdict(self), default=_plain))
        data = {k: v for k, v in data.items() if v not in (None, [], {}) or k in ("tasks",)}
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    @classmethod
    def load(cls, directory: Path) -> "Manifest | None":
        """The manifest, or None where there is none; a malformed one raises ManifestError saying what is wrong."""
        path = Path(directory) / MANIFEST
        if not path.exists():
            return None
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} cannot be read: {e}") from None
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ManifestError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path} must be a mapping (name, source, start, end, tasks, ...), "
                                f"not {type(data).__name__}")
        missing = [k for k in ("name", "source", "start", "end") if data.get(k) in (None, "")]
        if missing:
            raise ManifestError(f"{path} lacks {', '.join(missing)}: a manifest names the dataset, its source and "
                                "the time range (start, end: ISO-8601 UTC) its log covers")
        for k in ("start", "end"):
            try:
                utc(data[k])
            except (ValueError, TypeError):
                raise ManifestError(f"{path}: {k} {data[k]!r} is not an ISO-8601 time") from None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def require(cls, directory: Path | str) -> "Manifest":
        """The manifest a dataset must carry: missing is an error, since the task declaration lives there."""
        m = cls.load(Path(directory))
        if m is None:
            raise ManifestError(f"{Path(directory) / MANIFEST} is missing: a dataset declares its time range and "
                                "its tasks there (see docs/data.md, 'Bringing your own data')")
        return m


def utc(value: Any) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_convert("UTC") if ts.tzinfo else ts.tz_localize("UTC")


def _plain(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, pd.Timestamp):
        return o.isoformat()
    return str(o)


def read_table(directory: Path | str, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read one contract table as stored, without coercion (validation judges it raw)."""
    path = Path(directory) / TABLES[table].file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a dataset needs {', '.join(t.file for t in TABLES.values())}")
    return pd.read_parquet(path, columns=columns)


def parquet_batches(path: Path | str, rows: int, columns: list[str] | None = None):
    """A parquet file's record batches of ``rows`` rows, in file order, in memory bounded by one batch.

    Not pre-buffered: with Arrow's default pre-buffering, ``iter_batches`` keeps what it read ahead of every
    row group it has passed, so its allocations grow with the file (measured in benchmarks/README.md).
    Reading is as fast.
    """
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=rows, columns=columns)


# An ISO-8601 text stamp that names its zone ends with a time of day and Z or an offset (+02:00, -0500, +02);
# a date alone ("2024-01-01", whose "-01" is no offset) has none.
_ZONED_TEXT = r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:[zZ]|[+-]\d{2}(?::?\d{2})?)\s*$"


def naive_timestamps(series: pd.Series) -> bool:
    """Whether a timestamp column carries values without a timezone: ``coerce_timestamps`` (and validation)
    take those as UTC, which is wrong for a log written in local time; validation warns, naming the column.

    Datetimes are judged by their dtype; text (ISO-8601) value by value: one stamp without a zone is enough.
    """
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return False
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        return bool(series.notna().any())
    values = series.dropna()
    if values.empty:
        return False
    text = values.astype(str)
    looks_like_time = text.str.contains(r"^\s*\d{4}-\d{2}-\d{2}", regex=True)  # unparseable text is another rule's
    return bool((looks_like_time & ~text.str.contains(_ZONED_TEXT, regex=True)).any())


def coerce_timestamps(df: pd.DataFrame, column: str = TIMESTAMP) -> pd.DataFrame:
    """Timestamps may arrive as ISO strings, naive or nanosecond datetimes; downstream wants UTC microseconds.

    Naive ones (no timezone: ``naive_timestamps``) are taken as UTC; validation warns about them.

    Microseconds because Feast's offline store keeps them and refuses to drop nonzero nanoseconds (a log
    stamped from float epoch seconds has them): the point-in-time join would fail on such a log.
    """
    if column not in df:
        return df
    dtype = df[column].dtype
    if isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) == "UTC" and dtype.unit == "us":
        return df
    df = df.copy()
    if isinstance(dtype, pd.DatetimeTZDtype):
        stamps = df[column].dt.tz_convert("UTC")
    else:
        stamps = pd.to_datetime(df[column], utc=True, errors="coerce", format="ISO8601")
    df[column] = stamps.dt.floor("us").astype("datetime64[us, UTC]")
    return df


def load_dataset(directory: Path | str) -> dict[str, pd.DataFrame]:
    """All three tables, timestamps in UTC: the form every stage after validation uses."""
    return {name: coerce_timestamps(read_table(directory, name)) for name in TABLES}


def write_table(df: pd.DataFrame, directory: Path | str, table: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TABLES[table].file
    df.to_parquet(path, index=False)
    return path
