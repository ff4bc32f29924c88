"""Feast objects: entities ``user`` and ``item``, four batch views, one on-demand view, one service.

The batch views read parquet tables that ``flows/features/compute.py`` writes
(one row per entity and snapshot time, ``event_timestamp`` = when the values
became true). Aggregates are daily snapshots taken at midnight UTC over the
days strictly before it, so a point-in-time join can never see an
interaction at or after the impression it is joined to.

``build(tables_dir)`` returns the objects for a given table location (the
pipeline applies them per dataset); the module-level objects let
``feast apply`` run in this directory on ``MTLREC_FEATURE_TABLES`` (default
``../data/synth/_features/tables``).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, FileSource, RequestSource, ValueType
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64, String

from feature_repo.transforms import CONTEXT_OUTPUTS, REQUEST_FIELDS, context_features

WINDOWS = (1, 7, 30)  # days
FEATURE_SERVICE = "mtl_ranking_v1"
TYPES = {"int": Int64, "float": Float64, "string": String}


def activity_schema(prefix: str) -> dict[str, str]:
    """Counts and rates per window; the user view adds its top category."""
    cols: dict[str, str] = {}
    for w in WINDOWS:
        cols.update({f"{prefix}_impressions_{w}d": "int", f"{prefix}_clicks_{w}d": "int",
                     f"{prefix}_purchases_{w}d": "int", f"{prefix}_ctr_{w}d": "float",
                     f"{prefix}_cvr_{w}d": "float"})
    return cols


SCHEMAS: dict[str, dict[str, str]] = {
    "user_profile": {"age": "float", "gender": "string", "segment": "string", "user_since_ts": "float"},
    "user_activity": {**activity_schema("user"), "user_top_category_30d": "string"},
    "item_profile": {"category": "string", "price": "float", "log_price": "float", "item_since_ts": "float"},
    "item_popularity": activity_schema("item"),
}
ENTITY_OF = {"user_profile": "user", "user_activity": "user", "item_profile": "item", "item_popularity": "item"}
JOIN_KEY = {"user": "user_id", "item": "item_id"}


def _fields(schema: dict[str, str]) -> list[Field]:
    return [Field(name=n, dtype=TYPES[t]) for n, t in schema.items()]


def build(tables_dir: str | Path) -> dict[str, object]:
    """Every Feast object, keyed by name, reading the tables under ``tables_dir``."""
    tables_dir = Path(tables_dir).resolve()
    entities = {name: Entity(name=name, join_keys=[key], value_type=ValueType.STRING,
                             description=f"a {name}, keyed by its contract id")
                for name, key in JOIN_KEY.items()}
    views = {}
    for name, schema in SCHEMAS.items():
        source = FileSource(name=f"{name}_source", path=str(tables_dir / f"{name}.parquet"),
                            timestamp_field="event_timestamp")
        views[name] = FeatureView(name=name, entities=[entities[ENTITY_OF[name]]], ttl=timedelta(0),
                                  schema=_fields(schema), source=source, online=True)
    request = RequestSource(name="request_context", schema=_fields(REQUEST_FIELDS))

    @on_demand_feature_view(sources=[views["user_profile"], views["user_activity"], views["item_profile"], request],
                            schema=_fields(CONTEXT_OUTPUTS), mode="pandas")
    def context(inputs: pd.DataFrame) -> pd.DataFrame:
        from feature_repo.transforms import context_features as fn

        return fn(inputs)

    service = FeatureService(name=FEATURE_SERVICE, features=[*views.values(), context],
                             description="the feature set the ranking models train and serve on")
    return {**entities, **views, "context": context, FEATURE_SERVICE: service}


_objects = build(os.environ.get("MTLREC_FEATURE_TABLES", Path(__file__).parent / "../data/synth/_features/tables"))
user, item = _objects["user"], _objects["item"]
user_profile, user_activity = _objects["user_profile"], _objects["user_activity"]
item_profile, item_popularity = _objects["item_profile"], _objects["item_popularity"]
context, mtl_ranking_v1 = _objects["context"], _objects[FEATURE_SERVICE]
__all__ = ["WINDOWS", "FEATURE_SERVICE", "SCHEMAS", "build", "context_features"]
