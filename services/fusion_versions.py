"""Fusion versions: the weightings a model may be served with, each accepted by a gate, and which one is live.

Fusion weights change what production ranks as much as a new model does, so they go live the way a model
does: a gate accepts them (``models.decisions.fusion_tuning.accept``), the registry keeps them as a version, the
production pointer names the live one, and every move is audited and can be rolled back. Under
``$BENTOML_HOME/mtlrec/``:

- ``fusion/<name>/<version>/f<N>.json``: one record per accepted weighting of a model (``f1``, ``f2``, ...,
  numbered per model and never reused): its weights, the tuning report and the decision that accepted it.
  Written once; a fusion rollback marks the rolled-back record ``withdrawn``, so it never comes back with
  a later promotion of its model.
- ``production.json`` carries ``"fusion": {"id", "weights", ...}``, the production model's live weighting
  (``weights`` null for the model's declared ones, ``id`` "declared"), and ``"fusion_previous"``, the ids a
  fusion rollback goes back to, newest first; the model's declared weights are the floor below them.

A model's current weighting, the one a new proposal must beat: production's live one for the production
model; otherwise its latest version not withdrawn, which becomes the live one when the model is promoted
or rolled back to; otherwise its declared weights.

Tags here are full ``name:version`` tags; ``services.model_store`` and ``services.production_pointer`` take what
a user typed (a unique version prefix too) and resolve it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.registry_io import (RegistryError, atomic_write_json, audit, clean_stale_temp_files, json_safe, locked,
                                  now, pointer, pointer_path, registry_dir)

DECLARED = "declared"
HISTORY = 20  # fusion ids kept on the pointer for rollback


class FusionChanged(RegistryError):
    """The model's current weighting changed between the decision and its commit: the decision is stale."""

    def __init__(self, tag: str, judged_against: str, now_current: str):
        super().__init__(f"the proposal for {tag} was judged against its fusion {judged_against}, but it is now "
                         f"served with {now_current}: tune again against the new one")
        self.judged_against, self.now = judged_against, now_current


@dataclass(frozen=True)
class Serving:
    """What production serves: the model's tag, its fusion version id, and that version's weights.

    ``fusion`` is "declared" and ``weights`` None when the model ranks with its declared weights. A serving
    worker compares ``(tag, fusion)`` with what it serves, and swaps weights alone when only ``fusion`` moved.
    """

    tag: str
    fusion: str = DECLARED
    weights: dict[str, float] | None = field(default=None, hash=False)


@dataclass(frozen=True)
class FusionVersion:
    """An accepted weighting as kept: ``live`` when it became production's weighting as it was kept."""

    tag: str
    id: str
    weights: dict[str, float]
    live: bool


def serving() -> Serving | None:
    """Production's model and live weighting, from one read of the pointer (None before any promotion)."""
    p = pointer()
    return serving_of(p) if p else None


def serving_of(record: dict[str, Any]) -> Serving:
    live = record.get("fusion") or {}
    return Serving(record["tag"], live.get("id", DECLARED), live.get("weights"))


# --- records -------------------------------------------------------------------------------------------------------

def _dir(full: str) -> Path:
    name, version = full.split(":", 1)
    return registry_dir() / "fusion" / name / version


def _number(fid: str) -> int:
    return int(fid[1:])


def versions(full: str) -> list[dict[str, Any]]:
    """Every fusion version of a model, oldest first, withdrawn ones included."""
    d = _dir(full)
    if not d.is_dir():
        return []
    records = [json.loads(p.read_text()) for p in d.glob("f*.json") if p.stem[1:].isdigit()]
    return sorted(records, key=lambda r: _number(r["id"]))


def _active(full: str) -> list[dict[str, Any]]:
    return [r for r in versions(full) if not r.get("withdrawn")]


def latest(full: str) -> dict[str, Any] | None:
    """The model's latest version not withdrawn, or None: what it is served with once it is production."""
    active = _active(full)
    return active[-1] if active else None


def current(full: str) -> Serving:
    """The weighting the model is served with now, or would be if promoted: what a proposal must beat."""
    p = pointer()
    if p and p["tag"] == full:
        return serving_of(p)
    record = latest(full)
    return Serving(full, record["id"], record["weights"]) if record else Serving(full)


def pointer_fields(full: str) -> dict[str, Any]:
    """The fusion fields of a pointer that makes ``full`` production: its latest version, the older ones below."""
    active = _active(full)
    if not active:
        return {"fusion": _live(DECLARED, None, "the model's declared weights"), "fusion_previous": []}
    return {"fusion": _live(active[-1]["id"], active[-1]["weights"], "the model's latest accepted version"),
            "fusion_previous": [r["id"] for r in reversed(active[:-1])][:HISTORY]}


def _live(fid: str, weights: dict[str, float] | None, reason: str) -> dict[str, Any]:
    return {"id": fid, "weights": weights, "changed": now(), "reason": reason}


# --- accepting and rolling back ------------------------------------------------------------------------------------

def accept(full: str, report: dict[str, Any], decision: Any, *, judged_against: str, reason: str = "") -> FusionVersion:
    """Keep an accepted weighting as the model's next version; if the model is production, make it live.

    ``decision`` is ``models.decisions.fusion_tuning.FusionDecision`` (or its ``to_dict()``); a declined one is refused.
    ``judged_against`` is the fusion id the decision compared with (``current(full).fusion`` when it was
    judged): if the model's current weighting moved since, nothing is written and FusionChanged is raised.
    The record, the pointer and their audit lines are written under the registry lock.
    """
    weights = _valid(full, report.get("weights"))
    decided = decision.to_dict() if hasattr(decision, "to_dict") else dict(decision)
    if decided.get("accepted") is not True:
        raise RegistryError(f"the fusion decision for {full} declined the proposal ({decided.get('reason')}): "
                            "only an accepted weighting becomes a version")
    with locked():
        now_current = current(full)
        if now_current.fusion != judged_against:
            raise FusionChanged(full, judged_against, now_current.fusion)
        fid = f"f{max((_number(r['id']) for r in versions(full)), default=0) + 1}"
        d = _dir(full)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / f"{fid}.json", json_safe({
            "tag": full, "id": fid, "recorded": now(), "weights": weights, "replaces": judged_against,
            "reason": reason, "decision": decided, "report": report}))
        audit({"event": "fusion accepted", "tag": full, "fusion": fid, "from": judged_against, "weights": weights,
               "difference": decided.get("difference"), "interval": decided.get("interval"),
               "metric": decided.get("metric")})
        p = pointer()
        live = bool(p and p["tag"] == full)
        if live:
            previous = [f for f in [judged_against, *p.get("fusion_previous", [])] if f != DECLARED]
            _move(p, fid, weights, previous, "promote", reason or decided.get("reason", ""))
    return FusionVersion(full, fid, weights, live)


def rollback(reason: str = "fusion rollback") -> Serving:
    """Serve production's previous fusion version again (its declared weights below the first); audited.

    The rolled-back version is withdrawn first, so a rollback killed halfway and run again finishes the
    same move instead of rolling back one step further.
    """
    with locked():
        p = pointer()
        if not p:
            raise RegistryError("nothing to roll back: no model was ever promoted")
        live = serving_of(p)
        if live.fusion == DECLARED:
            raise RegistryError(f"nothing to roll back to: {live.tag} already serves its declared fusion weights")
        _withdraw(live.tag, live.fusion, reason)
        records = {r["id"]: r for r in _active(live.tag)}
        rest = [f for f in p.get("fusion_previous", []) if f in records]
        target = rest[0] if rest else DECLARED
        weights = records[target]["weights"] if target != DECLARED else None
        _move(p, target, weights, rest[1:], "rollback", reason)
    return Serving(live.tag, target, weights)


def _move(p: dict[str, Any], fid: str, weights: dict[str, float] | None, previous: list[str], action: str,
          reason: str) -> None:
    """Replace the pointer with production's fusion moved to ``fid`` (the caller holds the lock); audit it."""
    clean_stale_temp_files()
    was = serving_of(p).fusion
    atomic_write_json(pointer_path(), {**p, "fusion": {**_live(fid, weights, reason), "action": action},
                                       "fusion_previous": previous[:HISTORY]})
    audit({"event": f"fusion {action}", "tag": p["tag"], "fusion": fid, "from": was, "weights": weights,
           "reason": reason})


def _withdraw(full: str, fid: str, reason: str) -> None:
    path = _dir(full) / f"{fid}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if not record.get("withdrawn"):
            atomic_write_json(path, {**record, "withdrawn": {"time": now(), "reason": reason}})


def _valid(full: str, weights: Any) -> dict[str, float]:
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for v in weights.values()) or not any(weights.values()):
        raise RegistryError(f"fusion weights for {full} must map objectives to finite numbers >= 0, not all 0; "
                            f"got {weights!r}")
    return {str(k): float(v) for k, v in weights.items()}
