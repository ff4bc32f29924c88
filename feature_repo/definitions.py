"""Feast objects: entities ``user`` and ``item``, four batch views, one on-demand view, one service.

The batch views read parquet tables that ``feature_repo/compute.py`` writes
(one row per entity and snapshot time, ``event_timestamp`` = when the values
became true); their columns follow the dataset's declaration and tables
(``feature_repo/schema.py``, saved as ``schema.json`` beside the tables).
Aggregates are daily snapshots taken at midnight UTC over the days strictly
before it, so a point-in-time join can never see an interaction at or after
the impression it is joined to.

``build(tables_dir)`` returns the objects for a given table location (the
pipeline applies them per dataset); the module-level objects let
``feast apply`` run in this directory on ``MTLREC_FEATURE_TABLES`` (default
``../data/synth/_features/tables``; ``models.settings``) once that directory's tables exist.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, RequestSource, ValueType
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64, String

from feature_repo.engines import batch_source
from feature_repo.schema import ENTITY_OF, FEATURE_SERVICE, JOIN_KEY, SCHEMA_FILE, FeatureSchema
from feature_repo.transforms import REQUEST_FIELDS, context_features
from models.settings import get_settings

TYPES = {"int": Int64, "float": Float64, "string": String}


def _fields(schema: dict[str, str]) -> list[Field]:
    return [Field(name=n, dtype=TYPES[t]) for n, t in schema.items()]


def build(tables_dir: str | Path, schema: FeatureSchema | None = None, engine: str = "duckdb") -> dict[str, object]:
    """Every Feast object, keyed by name, reading the tables (and their ``schema.json``) under ``tables_dir``.

    ``engine``: the offline engine whose source type the views read through (``feature_repo/engines.py``).
    """
    tables_dir = Path(tables_dir).resolve()
    schema = schema or FeatureSchema.load(tables_dir)
    entities = {name: Entity(name=name, join_keys=[key], value_type=ValueType.STRING,
                             description=f"a {name}, keyed by its contract id")
                for name, key in JOIN_KEY.items()}
    views = {}
    for name, columns in schema.views.items():
        source = batch_source(f"{name}_source", str(tables_dir / f"{name}.parquet"), "event_timestamp", engine)
        views[name] = FeatureView(name=name, entities=[entities[ENTITY_OF[name]]], ttl=timedelta(0),
                                  schema=_fields(columns), source=source, online=True)
    request = RequestSource(name="request_context", schema=_fields(REQUEST_FIELDS))

    @on_demand_feature_view(sources=[views["user_profile"], views["user_activity"], views["item_profile"], request],
                            schema=_fields(schema.context), mode="pandas")
    def context(inputs: pd.DataFrame) -> pd.DataFrame:
        from feature_repo.transforms import context_features as fn

        return fn(inputs)

    service = FeatureService(name=FEATURE_SERVICE, features=[*views.values(), context],
                             description="the feature set the ranking models train and serve on")
    return {**entities, **views, "context": context, FEATURE_SERVICE: service}


_TABLES = get_settings().feature_tables
if (_TABLES / SCHEMA_FILE).exists():  # `feast apply` in this directory: the objects of that dataset's tables
    _objects = build(_TABLES, engine=get_settings().offline_engine)
    user, item = _objects["user"], _objects["item"]
    user_profile, user_activity = _objects["user_profile"], _objects["user_activity"]
    item_profile, item_popularity = _objects["item_profile"], _objects["item_popularity"]
    context, mtl_ranking_v1 = _objects["context"], _objects[FEATURE_SERVICE]
__all__ = ["FEATURE_SERVICE", "JOIN_KEY", "build", "context_features"]
