"""The production pointer: which registered model is production, with which fusion weighting, and moving it.

BentoML has no notion of "the production model", so it lives beside its
store in ``$BENTOML_HOME/mtlrec/``:

- ``production.json``: ``{"tag", "previous", "changed", "reason", "fusion",
  "fusion_previous", ...}`` (the model, and the fusion version it serves),
  replaced whole with ``os.replace`` after an fsync, so a reader (or a crash)
  sees the old pointer or the new one, never a torn mix; ``serving()`` reads
  both in one read. A model promotion or rollback moves the fusion version
  with the model (``services/fusion_versions.py``);
- ``audit.jsonl``: one line per promotion, rollback, evaluation and fusion
  move, append-only.

A move is a compare-and-set under the registry lock: the gate's decision
(``commit_decision``) and an accepted fusion weighting (``accept_fusion``) are
written only if production is still what they were judged against. Only an
intact model with an evaluation record (``services/model_store.py``) becomes
production.

The lock, the atomic writes and the audit log are ``services/registry_io.py``,
shared with the fusion versions. Fault injection: with
``MTLREC_REGISTRY_CRASH_BEFORE_REPLACE=1`` in the environment, every atomic
write of the registry dies with ``os._exit(70)`` after the temporary file is
written and synced but before it replaces the real one, which is how the
tests prove a killed promotion leaves production alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services import fusion_versions, model_store
from services.fusion_versions import FusionVersion
from services.model_store import ModelNotFound
from services.registry_io import RegistryError, atomic_write_json, audit, clean_stale_temp_files, home, locked, now
# the pointer's record and what it serves: defined below this module, which the fusion versions read them from too
from services.fusion_versions import FusionChanged as FusionChanged, Serving as Serving, serving as serving
from services.registry_io import pointer as pointer, pointer_path as pointer_path

HISTORY = 20  # previous production tags kept for rollback


class NotEvaluated(RegistryError):
    pass


class ProductionChanged(RegistryError):
    """Production moved between the gate's judgement and the pointer write: the decision is stale."""

    def __init__(self, judged_against: str | None, now: str | None):
        super().__init__(f"the gate judged against {judged_against or 'no production model'}, but production is now "
                         f"{now or 'empty'}")
        self.judged_against, self.now = judged_against, now


def production() -> str | None:
    p = pointer()
    return p["tag"] if p else None


def production_artifact() -> Path | None:
    """The production model's directory, or None when nothing is in production.

    Raises ModelNotFound naming the fix when the pointer names a model the store no longer holds.
    """
    current = production()
    if current is None:
        return None
    try:
        return model_store.artifact_path(current)
    except ModelNotFound:
        raise ModelNotFound(f"production points at {current}, which is no longer in the model store at "
                            f"{home() / 'models'}: restore it, or make the previous model production again with "
                            "`mtlrec rollback`") from None


# --- moving the model ----------------------------------------------------------------------------------------------

def set_production(tag: str, reason: str = "", *, expected: str | None | object = ...) -> str:
    """Make ``tag`` production; refuses a model that is missing, torn, or has no evaluation record.

    With ``expected`` (a tag, or None for "nothing in production yet"), the pointer moves only if production
    is still that: a compare-and-set under the registry lock, raising ProductionChanged otherwise.
    """
    full = _promotable(tag)
    with locked():
        old = pointer()
        if expected is not ... and (old["tag"] if old else None) != expected:
            raise ProductionChanged(expected, old["tag"] if old else None)
        _move_pointer(full, reason, old)
    return full


def commit_decision(tag: str, *, judged_against: str | None, promote: bool, gate: dict[str, Any],
                    reason: str = "") -> bool:
    """Record the gate's decision and, if it promotes, move the pointer: one critical section for both.

    The gate judged ``tag`` against ``judged_against`` (the production tag it read, or None). If production
    is no longer that, nothing is written and ProductionChanged is raised: the caller re-gates against the
    new production. Otherwise the gate's audit line, then the pointer and its own audit line, are written
    under the lock, so the audit log and the pointer always tell the same story. Returns whether it moved.
    """
    full = _promotable(tag) if promote else model_store.resolve(tag)
    with locked():
        old = pointer()
        current = old["tag"] if old else None
        if current != judged_against:
            raise ProductionChanged(judged_against, current)
        clean_stale_temp_files()
        audit({"event": "gate", "candidate": full, "production": current, "promote": promote, **gate})
        if promote:
            _move_pointer(full, reason, old)
    return promote


def _promotable(tag: str) -> str:
    full = model_store.check_intact(tag)
    if not model_store.is_evaluated(full):
        raise NotEvaluated(f"model {full} has no evaluation record; evaluate it (record_evaluation) before promoting")
    return full


def _move_pointer(full: str, reason: str, old: dict[str, Any] | None) -> None:
    """Replace the pointer (the caller holds the lock) and audit the move."""
    if old and old["tag"] == full:
        return
    previous = ([old["tag"]] + [t for t in old.get("previous", []) if t != full]) if old else []
    record = {"tag": full, "previous": previous[:HISTORY], "changed": now(), "reason": reason, "action": "promote",
              **fusion_versions.pointer_fields(full)}
    atomic_write_json(pointer_path(), record)
    # after the replace: a crash in between leaves a changed pointer that still says when, why and what came before
    audit({"event": "promote", "tag": full, "from": old["tag"] if old else None, "reason": reason,
           "fusion": record["fusion"]["id"]})


def rollback(reason: str = "rollback") -> str:
    """Make the previous production model production again; the rolled-back one leaves the history."""
    with locked():
        old = pointer()
        if not old or not old.get("previous"):
            raise RegistryError("nothing to roll back to: " + (f"{old['tag']} is the only production model so far"
                                                               if old else "no model was ever promoted"))
        target, rest = old["previous"][0], old["previous"][1:]
        model_store.check_intact(target)
        clean_stale_temp_files()
        record = {"tag": target, "previous": rest, "changed": now(), "reason": reason, "action": "rollback",
                  **fusion_versions.pointer_fields(target)}
        atomic_write_json(pointer_path(), record)
        audit({"event": "rollback", "tag": target, "from": old["tag"], "reason": reason,
               "fusion": record["fusion"]["id"]})
    return target


# --- moving the fusion weighting -----------------------------------------------------------------------------------
# Kept by services/fusion_versions.py on full tags; these take what a user typed (a unique version prefix too).

def fusion_current(tag: str) -> Serving:
    """The weighting ``tag`` is served with now, or would be if promoted: what a tuned proposal must beat."""
    return fusion_versions.current(model_store.resolve(tag))


def accept_fusion(tag: str, report: dict[str, Any], decision: Any, *, judged_against: str,
                  reason: str = "") -> FusionVersion:
    """Keep a weighting the fusion gate accepted as the model's next version; live at once if it is production.

    ``judged_against``: the fusion id the decision compared with (``fusion_current(tag).fusion`` as it was
    read); FusionChanged when that is no longer the model's current weighting.
    """
    return fusion_versions.accept(model_store.resolve(tag), report, decision, judged_against=judged_against,
                                  reason=reason)


def rollback_fusion(reason: str = "fusion rollback") -> Serving:
    """Serve production's previous fusion version again (its declared weights below the first); audited."""
    return fusion_versions.rollback(reason)
