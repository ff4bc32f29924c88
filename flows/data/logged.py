"""A data source made of the service's own traffic: logged impressions plus the feedback on them.

``mtlrec events export`` writes them as contract tables, so the pipeline
retrains on what the service showed exactly as it trains on any other log
(``mtlrec data landed`` then starts it). The loop closes through the
existing contract, validation and trigger: nothing downstream knows the
rows came from the service.

Labels: an impression without feedback for a task is a 0 for it (shown,
and the event did not happen); an event implies its declared parent (a
purchase reported without its click is still a click). Users and items
are the tables of the dataset the service read its features from, so
every logged id resolves. ``position`` is the slot the item was shown in
(1-based), the contract's context column.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from models import contract
from models.declaration import topological

SOURCE = "flows.data.logged"


def interactions(impressions: pd.DataFrame, feedback: pd.DataFrame, declaration) -> pd.DataFrame:
    """The log in the contract's form: one row per shown item, the declared labels from the feedback."""
    keys = ["request_id", "item_id"]
    events = (feedback.pivot_table(index=keys, columns="event", values="value", aggfunc="first")
              if len(feedback) else pd.DataFrame(index=pd.MultiIndex.from_arrays([[], []], names=keys)))
    rows = impressions.set_index(keys).join(events, how="left").reset_index()
    out = pd.DataFrame({
        "user_id": rows["user_id"].astype(str),
        "item_id": rows["item_id"].astype(str),
        contract.TIMESTAMP: pd.to_datetime(rows["ts"], unit="s", utc=True).dt.floor("us").astype("datetime64[us, UTC]"),
        "position": rows["position"].astype(np.int64),
    })
    context = rows["context"].map(lambda c: c if isinstance(c, dict) else json.loads(c or "{}"))
    for column in ("device", *declaration.context):
        if column != "position" and context.map(lambda c, k=column: k in c).any():
            out[column] = context.map(lambda c, k=column: c.get(k))
    for task in declaration.tasks:
        values = rows[task.name] if task.name in rows else pd.Series(np.nan, index=rows.index)
        out[task.column] = pd.to_numeric(values, errors="coerce").fillna(0.0).to_numpy()
    for task in reversed(topological(declaration.tasks)):  # children first: a grandchild implies its grandparent
        if task.parent:
            parent = declaration.get(task.parent)
            out[parent.column] = np.maximum(out[parent.column], (out[task.column] > 0).astype(float))
    for task in declaration.tasks:
        if task.type in ("binary", "multiclass"):
            out[task.column] = out[task.column].round().astype(np.int8 if task.type == "binary" else np.int64)
    return out.sort_values(contract.TIMESTAMP, kind="stable").reset_index(drop=True)


def export(store, source: Path | str, out: Path | str, since: float | None = None) -> contract.Manifest:
    """Write ``out`` as a dataset: logged impressions since ``since`` (epoch seconds), users and items of ``source``.

    ``store``: a ``services.events.EventStore``. Raises ``ValueError`` when nothing was logged in that window.
    """
    source, out = Path(source), Path(out)
    manifest = contract.Manifest.require(source)
    declaration = manifest.declaration
    impressions, feedback = store.read(since)
    if impressions.empty:
        when = "" if since is None else f" since {pd.Timestamp(since, unit='s', tz='UTC').isoformat()}"
        raise ValueError(f"no impressions in {store.where()}{when}: nothing to export")
    log = interactions(impressions, feedback, declaration)
    tables = contract.load_dataset(source)
    out.mkdir(parents=True, exist_ok=True)
    contract.write_table(tables["users"], out, "users")
    contract.write_table(tables["items"], out, "items")
    contract.write_table(log, out, "interactions")
    first = min(log[contract.TIMESTAMP].min(), tables["users"][contract.TIMESTAMP].min(),
                tables["items"][contract.TIMESTAMP].min())
    exported = contract.Manifest(
        name=f"{manifest.name}-logged", source=SOURCE, start=first.isoformat(),
        end=log[contract.TIMESTAMP].max().isoformat(),
        rows={"users": len(tables["users"]), "items": len(tables["items"]), "interactions": len(log)},
        params={"from": str(source.resolve()), "events": store.where(), "since": since,
                "requests": int(impressions["request_id"].nunique()), "feedback_rows": int(len(feedback))},
        notes="Impressions the ranking service logged, labelled by the feedback on them (mtlrec events export).")
    exported.declare(declaration)
    exported.save(out)
    return exported
