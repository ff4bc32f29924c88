"""Which features a dataset gets, derived from its declaration and the columns its tables carry.

The feature views are not a fixed list: a short-video log with likes and
follows gets windowed counts and rates of likes and follows, a shop gets them
of clicks and purchases, and a log without item categories gets no category
features. ``derive`` decides this once, from the dataset; the result is
written beside the feature tables (``schema.json``), so that Feast's
definitions (``feature_repo/definitions.py``), the computation
(``feature_repo/compute.py``), the training table's metadata and the
served path all read the same answer. Pure Python: no Feast import.

Per view:

- ``user_profile`` / ``item_profile``: the contract's optional attributes that
  are present (age, gender, segment; category, price and log price), the
  declared ``attributes``, and when the entity appeared;
- ``user_activity`` / ``item_popularity``: impressions, and for every declared
  binary task its count and rate over 1, 7 and 30 days (the rate of a task
  with a parent is per parent positive: purchases per click); the user's top
  category over 30 days by the primary task, when items have a category;
- ``context`` (on demand): hour, weekday, item age, user tenure, and whether
  the item is in the user's top category (when there are categories).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.contract.declaration import Declaration

if TYPE_CHECKING:  # pandas is imported where it is used: `mtlrec serve`'s precondition reads this module
    import pandas as pd

WINDOWS = (1, 7, 30)  # days
SCHEMA_FILE = "schema.json"
VIEWS = ("user_profile", "user_activity", "item_profile", "item_popularity")
ENTITY_OF = {"user_profile": "user", "user_activity": "user", "item_profile": "item", "item_popularity": "item"}
JOIN_KEY = {"user": "user_id", "item": "item_id"}
FEATURE_SERVICE = "mtl_ranking_v1"  # the one feature service models train and serve on (definitions.py builds it)
TOP_WINDOW = WINDOWS[-1]


def count_column(prefix: str, task: str, w: int) -> str:
    return f"{prefix}_{task}_count_{w}d"


def rate_column(prefix: str, task: str, w: int) -> str:
    return f"{prefix}_{task}_rate_{w}d"


def impressions_column(prefix: str, w: int) -> str:
    return f"{prefix}_impressions_{w}d"


TOP_CATEGORY = f"user_top_category_{TOP_WINDOW}d"


@dataclass
class FeatureSchema:
    """Everything that depends on the dataset's shape; JSON-able, written beside the feature tables."""

    views: dict[str, dict[str, str]]  # view -> {column: int | float | string}
    context: dict[str, str]  # on-demand outputs
    context_inputs: list[str]  # view columns the on-demand transform reads
    categorical: list[str]  # the model's categorical inputs (view, context and log columns)
    numeric: list[str]
    log1p: list[str]  # numeric inputs that are counts: log1p before standardising
    log_context: dict[str, str] = field(default_factory=dict)  # request-time columns of the log -> string | float
    declaration: dict[str, Any] = field(default_factory=dict)
    has_category: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSchema":
        return cls(**d)

    def save(self, tables_dir: Path | str) -> Path:
        path = Path(tables_dir) / SCHEMA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, tables_dir: Path | str) -> "FeatureSchema":
        path = Path(tables_dir) / SCHEMA_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: compute the feature tables first "
                                    "(`mtlrec features build DATASET`)")
        return cls.from_dict(json.loads(path.read_text()))

    @property
    def item_columns(self) -> list[str]:
        """Every column that describes an item (profile and popularity): what a sampled negative takes."""
        return ["item_id", *self.views["item_profile"], *self.views["item_popularity"]]

    def model_features(self) -> dict[str, list[str]]:
        return {"categorical": list(self.categorical), "numeric": list(self.numeric), "log1p": list(self.log1p)}


def kind_of(series: pd.Series) -> str:
    """A column's feature kind: numbers (and booleans, datetimes) are numeric, the rest categorical strings."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series) \
            or pd.api.types.is_datetime64_any_dtype(series):
        return "float"
    return "string"


def activity_schema(prefix: str, declaration: Declaration) -> dict[str, str]:
    cols: dict[str, str] = {}
    for w in WINDOWS:
        cols[impressions_column(prefix, w)] = "int"
        for t in declaration.binary:
            cols[count_column(prefix, t.name, w)] = "int"
            cols[rate_column(prefix, t.name, w)] = "float"
    return cols


def derive(declaration: Declaration, users: pd.DataFrame, items: pd.DataFrame,
           interactions: pd.DataFrame) -> FeatureSchema:
    """The schema for tables shaped like these (only dtypes and column names are read)."""
    user_profile: dict[str, str] = {}
    if "age" in users:
        user_profile["age"] = "float"
    for c in ("gender", "segment"):
        if c in users:
            user_profile[c] = "string"
    for c in declaration.attributes.get("users", ()):
        user_profile[c] = kind_of(users[c])
    user_profile["user_since_ts"] = "float"

    has_category = "category" in items
    item_profile: dict[str, str] = {}
    if has_category:
        item_profile["category"] = "string"
    if "price" in items:
        item_profile.update({"price": "float", "log_price": "float"})
    for c in declaration.attributes.get("items", ()):
        item_profile[c] = kind_of(items[c])
    item_profile["item_since_ts"] = "float"

    user_activity = activity_schema("user", declaration)
    if has_category:
        user_activity[TOP_CATEGORY] = "string"
    views = {"user_profile": user_profile, "user_activity": user_activity, "item_profile": item_profile,
             "item_popularity": activity_schema("item", declaration)}
    seen: dict[str, str] = {}
    for view, cols in views.items():
        for c in cols:
            if c in seen or c in ("user_id", "item_id", "event_timestamp"):
                raise ValueError(f"feature column {c!r} of {view} clashes with {seen.get(c, 'a key column')}: "
                                 "rename the attribute or task that produces it")
            seen[c] = view

    context = {"hour": "int", "dow": "int", "item_age_days": "float", "user_tenure_days": "float"}
    inputs = ["user_since_ts", "item_since_ts"]
    if has_category:
        context["top_category_match"] = "int"
        inputs += ["category", TOP_CATEGORY]

    log_context = {c: kind_of(interactions[c]) for c in ("device", "position", *declaration.context)
                   if c in interactions}
    categorical = ["user_id", "item_id"]
    numeric: list[str] = []
    for view in ("user_profile", "item_profile"):
        for c, kind in views[view].items():
            if c.endswith("_since_ts") or c == "price":  # ages come from the context view; price as log price
                continue
            (categorical if kind == "string" else numeric).append(c)
    for c, kind in log_context.items():
        (categorical if kind == "string" else numeric).append(c)
    categorical += ["hour", "dow"]
    numeric += ["item_age_days", "user_tenure_days"]
    if has_category:
        categorical.append(TOP_CATEGORY)
        numeric.append("top_category_match")
    log1p: list[str] = []
    for prefix in ("user", "item"):
        for w in WINDOWS:
            numeric.append(impressions_column(prefix, w))
            log1p.append(impressions_column(prefix, w))
            numeric += [rate_column(prefix, t.name, w) for t in declaration.binary]
    return FeatureSchema(views=views, context=context, context_inputs=inputs, categorical=categorical,
                         numeric=numeric, log1p=log1p, log_context=log_context, declaration=declaration.to_dict(),
                         has_category=has_category)
