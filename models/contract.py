"""The data contract: the three tables every stage reads, defined once.

It lives in ``models/`` because that is the one package every other imports
and it depends on nothing heavier than pandas; the generator, the MovieLens
mapping, validation, Feast and training all read column names and rules from
here instead of repeating them.

A dataset is a directory holding ``users.parquet``, ``items.parquet``,
``interactions.parquet`` and ``dataset.yaml`` (its manifest: where it came
from, its declared time range and which optional columns it carries).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

# The dtype kinds a column may have, each with the pandas dtype names that
# satisfy it. Ids are strings so that any source's keys fit without a mapping.
DTYPE_NAMES: dict[str, list[str]] = {
    "string": ["object", "str", "string", "string[python]", "string[pyarrow]", "large_string[pyarrow]"],
    "int": ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "Int8", "Int16", "Int32", "Int64"],
    "binary": ["int8", "int16", "int32", "int64", "uint8", "bool", "Int8", "Int64"],
    "float": ["float16", "float32", "float64", "Float32", "Float64"],
    "timestamp": ["datetime64[ns, UTC]", "datetime64[us, UTC]", "datetime64[ms, UTC]", "datetime64[s, UTC]"],
}


@dataclass(frozen=True)
class Column:
    """One column of a contract table and the rules validation applies to it."""

    name: str
    kind: str  # a key of DTYPE_NAMES
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
        Column("category", "string", doc="primary category: a feature and the diversity signal"),
        Column("price", "float", required=False, nullable=True, max_null_rate=0.2, min_value=0.0),
    ),
)

INTERACTIONS = Table(
    name="interactions",
    key=None,
    min_rows=100,
    columns=(
        Column("user_id", "string", doc="must exist in users"),
        Column("item_id", "string", doc="must exist in items"),
        Column(TIMESTAMP, "timestamp", doc="impression time (UTC)"),
        Column("click", "binary", domain=(0, 1), doc="1 if the impression was clicked"),
        Column("purchase", "binary", domain=(0, 1), doc="1 if it converted; implies click"),
        Column("device", "string", required=False, nullable=True, max_null_rate=0.05,
               doc="context: device the impression was shown on"),
        Column("position", "int", required=False, min_value=0, max_value=1000,
               doc="context: slot the item was shown in"),
        Column("dwell", "float", required=False, min_value=0.0,
               doc="optional float label: seconds spent after a click, 0 without one"),
        Column("rating", "float", required=False, min_value=0.0, max_value=5.0,
               doc="optional float label: explicit rating after a click, 0 without one"),
    ),
)

TABLES: dict[str, Table] = {t.name: t for t in (USERS, ITEMS, INTERACTIONS)}
LABELS = ("click", "purchase")
FLOAT_LABELS = ("dwell", "rating")
MANIFEST = "dataset.yaml"


@dataclass
class Manifest:
    """What a dataset declares about itself; validation holds it to this."""

    name: str
    source: str
    start: str  # ISO-8601 UTC, inclusive
    end: str  # ISO-8601 UTC, inclusive
    rows: dict[str, int] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

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
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    @classmethod
    def load(cls, directory: Path) -> "Manifest | None":
        path = Path(directory) / MANIFEST
        if not path.exists():
            return None
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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


def coerce_timestamps(df: pd.DataFrame, column: str = TIMESTAMP) -> pd.DataFrame:
    """Timestamps may arrive as ISO strings or naive datetimes; downstream wants UTC datetimes."""
    if column not in df:
        return df
    dtype = df[column].dtype
    if isinstance(dtype, pd.DatetimeTZDtype) and str(dtype.tz) == "UTC":
        return df
    df = df.copy()
    if isinstance(dtype, pd.DatetimeTZDtype):
        df[column] = df[column].dt.tz_convert("UTC")
    else:
        df[column] = pd.to_datetime(df[column], utc=True, errors="coerce", format="ISO8601")
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
