"""Feast objects: entities ``user`` and ``item``, a request source, four batch views, one on-demand view, one service.

Laid out as Feast's own template: entities, sources, feature views, the
on-demand view, the feature service. The entities and the request source are
the same for every dataset and are declared once, below. The views' columns
follow the dataset's declaration and tables (``feature_repo/schema.py``, saved
as ``schema.json`` beside the tables), so the sources, views, on-demand view
and service are made for one tables directory by the functions below, and
``build(tables_dir)`` returns them all: the pipeline applies them per dataset
(``feature_repo/apply.py``).

Aggregates are daily snapshots taken at midnight UTC over the days strictly
before it, so a point-in-time join can never see an interaction at or after
the impression it is joined to.

``feast apply`` run in this directory imports this file as the top-level
module ``definitions``; then, and only then, the objects of one dataset's
tables become module attributes for it to find (``for_feast_apply``: the
tables ``MTLREC_FEATURE_TABLES`` names, default
``../data/synth/_features/tables``; ``models.settings``).
"""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, RequestSource, ValueType
from feast.on_demand_feature_view import OnDemandFeatureView, on_demand_feature_view
from feast.types import Float64, Int64, String

from feature_repo.engines import batch_source
from feature_repo.schema import (ENTITY_OF, FEATURE_SERVICE, TOP_CATEGORY, TOP_WINDOW, WINDOWS, FeatureSchema,
                                 count_column, impressions_column, rate_column)
from models.contract.declaration import Declaration

# ---- Entities: whose features a row holds, and the key it is joined on ------------------------------------------

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
              description="a user, keyed by its contract id")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
              description="an item, keyed by its contract id")

# ---- Request source: what an impression (training) or a ranking request (serving) brings besides the keys --------

request_context = RequestSource(name="request_context", schema=[
    Field(name="request_ts", dtype=Float64, description="when the impression or request happened, epoch seconds"),
])

# ---- Sources and feature views: one parquet table per view, its columns following the dataset --------------------

TYPES = {"int": Int64, "float": Float64, "string": String}
_WINDOWS = ", ".join(map(str, WINDOWS[:-1])) + f" and {WINDOWS[-1]}"
VIEW_DESCRIPTIONS = {
    "user_profile": "the user's attributes and when the user first appeared",
    "user_activity": f"the user's impressions and, per binary task, positives and rates over {_WINDOWS} days",
    "item_profile": "the item's attributes and when the item first appeared",
    "item_popularity": f"the item's impressions and, per binary task, positives and rates over {_WINDOWS} days",
}


def sources(tables_dir: Path, schema: FeatureSchema, engine: str) -> dict[str, object]:
    """Each view's source: ``<view>.parquet`` under ``tables_dir``, read through the offline engine's source type
    (``feature_repo/engines.py``), its rows stamped ``event_timestamp``."""
    return {name: batch_source(f"{name}_source", str(tables_dir / f"{name}.parquet"), "event_timestamp", engine)
            for name in schema.views}


def feature_views(schema: FeatureSchema, view_sources: dict[str, object],
                  entities: dict[str, Entity]) -> dict[str, FeatureView]:
    """The four batch views, with the columns the dataset's schema gives them; no TTL: a value holds until the
    next snapshot replaces it."""
    described = field_descriptions(schema)
    return {name: FeatureView(name=name, entities=[entities[ENTITY_OF[name]]], ttl=timedelta(0),
                              schema=fields(columns, described), source=view_sources[name], online=True,
                              description=VIEW_DESCRIPTIONS.get(name, ""))
            for name, columns in schema.views.items()}


# ---- On-demand view: request-time features, computed by feature_repo/transforms.py ------------------------------

def context_view(schema: FeatureSchema, views: dict[str, FeatureView], request: RequestSource) -> OnDemandFeatureView:
    """``context``: hour, weekday, item age, user tenure and the category cross, from the request time and the
    profile and activity views (the columns are the schema's ``context``)."""
    described = field_descriptions(schema)
    # Its fields carry no description: Feast checks them against the transform's inferred fields, description
    # included, and refuses any difference (feast-dev/feast#3617). The view's description names each instead.
    columns = "; ".join(f"{c}: {described.get(c, c)}" for c in schema.context)

    @on_demand_feature_view(sources=[views["user_profile"], views["user_activity"], views["item_profile"], request],
                            schema=fields(schema.context), mode="pandas",
                            description=f"request-time features, computed by the served path too ({columns})")
    def context(inputs: pd.DataFrame) -> pd.DataFrame:
        from feature_repo.transforms import context_features as fn

        return fn(inputs)

    return context


# ---- Feature service: what the models train and serve on --------------------------------------------------------

def feature_service(views: dict[str, FeatureView], context: OnDemandFeatureView) -> FeatureService:
    return FeatureService(name=FEATURE_SERVICE, features=[*views.values(), context],
                          description="the feature set the ranking models train and serve on")


def build(tables_dir: str | Path, schema: FeatureSchema | None = None, engine: str = "duckdb") -> dict[str, object]:
    """Every Feast object, keyed by name, reading the tables (and their ``schema.json``) under ``tables_dir``.

    ``engine``: the offline engine whose source type the views read through (``feature_repo/engines.py``).
    Each call hands out its own entities and request source: Feast's apply stamps the objects it registers.
    """
    tables_dir = Path(tables_dir).resolve()
    schema = schema or FeatureSchema.load(tables_dir)
    entities = {"user": copy.deepcopy(user), "item": copy.deepcopy(item)}
    views = feature_views(schema, sources(tables_dir, schema, engine), entities)
    context = context_view(schema, views, copy.deepcopy(request_context))
    return {**entities, **views, "context": context, FEATURE_SERVICE: feature_service(views, context)}


def for_feast_apply() -> dict[str, object]:
    """What ``feast apply`` in this directory registers, keyed by module attribute: the objects of the tables
    ``MTLREC_FEATURE_TABLES`` names (with the request source their on-demand view reads, so Feast finds one)."""
    from feature_repo.schema import SCHEMA_FILE
    from models.settings import get_settings

    settings = get_settings()
    if not (settings.feature_tables / SCHEMA_FILE).is_file():
        raise FileNotFoundError(f"no feature tables at {settings.feature_tables} (MTLREC_FEATURE_TABLES): build them "
                                "with `mtlrec features build DATASET`, or point MTLREC_FEATURE_TABLES at the "
                                "_features/tables of a dataset that has them")
    objects = build(settings.feature_tables, engine=settings.offline_engine)
    return {**objects, "request_context": objects["context"].source_request_sources[request_context.name]}


# ---- Field descriptions: every column's, from the dataset's declaration ------------------------------------------

def fields(columns: dict[str, str], described: dict[str, str] | None = None) -> list[Field]:
    """Feast fields of ``{column: int | float | string}``, each with its description when ``described`` has one."""
    return [Field(name=n, dtype=TYPES[t], description=(described or {}).get(n, "")) for n, t in columns.items()]


def field_descriptions(schema: FeatureSchema) -> dict[str, str]:
    """A description of every column the views and the on-demand view can carry, for this dataset's schema."""
    described = {
        "age": "the user's age", "gender": "the user's gender", "segment": "the user's segment",
        "user_since_ts": "when the user first appeared, epoch seconds",
        "category": "the item's category", "price": "the item's price",
        "log_price": "log(1 + price), the price clipped at 0",
        "item_since_ts": "when the item first appeared, epoch seconds",
        "hour": "hour of the request, UTC", "dow": "weekday of the request, UTC (Monday 0)",
        "item_age_days": "days from the item's first appearance to the request",
        "user_tenure_days": "days from the user's first appearance to the request",
        "top_category_match": "1 when the item's category is the user's top category, else 0",
    }
    if not schema.declaration:
        return described
    declaration = Declaration.from_dict(schema.declaration)
    described[TOP_CATEGORY] = (f"the category with most of the user's {declaration.primary} positives over the "
                               f"{TOP_WINDOW} days before the snapshot ('' when none)")
    for table, columns in declaration.attributes.items():
        for c in columns:
            described[c] = f"the {table.removesuffix('s')}'s {c}, an attribute dataset.yaml declares"
    for prefix in ("user", "item"):
        for w in WINDOWS:
            days = f"over the {w} day{'s' if w > 1 else ''} before the snapshot"
            described[impressions_column(prefix, w)] = f"the {prefix}'s impressions {days}"
            for t in declaration.binary:
                per = f"{t.parent} positive" if t.parent else "impression"
                described[count_column(prefix, t.name, w)] = f"the {prefix}'s {t.name} positives {days}"
                described[rate_column(prefix, t.name, w)] = f"the {prefix}'s {t.name} positives per {per} {days}"
    return described


if __name__ == "definitions":  # `feast apply` in this directory; everything else imports feature_repo.definitions
    globals().update(for_feast_apply())
