"""The model registry: every model in BentoML's store, production as one pointer file.

BentoML keeps registered models (``weights.safetensors`` + ``model.json``,
labels, metadata) under ``$BENTOML_HOME/models``. It has no notion of "the
production model", so that lives beside it in ``$BENTOML_HOME/mtlrec/``:

- ``production.json``: ``{"tag", "previous", "changed", "reason", "fusion",
  "fusion_previous", ...}`` (the model, and the fusion version it serves),
  replaced whole with ``os.replace`` after an fsync, so a reader (or a crash)
  sees the old pointer or the new one, never a torn mix; ``serving()`` reads
  both in one read;
- ``evaluations/<name>/<version>.json``: the evaluation of each model; the
  gate promotes nothing without one;
- ``fusion/<name>/<version>/f<N>.json``: the model's accepted fusion weightings
  (``services/fusion_versions.py``): the production pointer also names the live
  one, and a model promotion or rollback moves it with the model;
- ``audit.jsonl``: one line per promotion, rollback, evaluation and fusion
  move, append-only.

Two things about BentoML's store shape this module. It resolves
``$BENTOML_HOME`` once per process and caches it (a ``simple_di``
singleton), so changing the variable later would leave BentoML writing to
the old home while the pointer follows the new one; every call here opens the
store at the home read from the environment *now* and passes it explicitly.
And it copies a model straight into its final directory, so a crash while
registering leaves a partial model that BentoML will list; the weights' sha256
is kept in the metadata and checked before a model can become production.

The lock, the atomic writes and the audit log are ``services/registry_io.py``,
shared with the fusion versions. Fault injection: with
``MTLREC_REGISTRY_CRASH_BEFORE_REPLACE=1`` in the environment, every atomic
write of the registry dies with ``os._exit(70)`` after the temporary file is
written and synced but before it replaces the real one, which is how the
tests prove a killed promotion leaves production alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from models.scoring.artifact import META, WEIGHTS, read_meta, sha256
from services import fusion_versions
from services.fusion_versions import FusionVersion, Serving
from services.registry_io import RegistryError, audit, home, pointer, pointer_path, registry_dir
# what callers of the registry use from its two helpers, re-exported under the registry's name
from services.fusion_versions import DECLARED as DECLARED, FusionChanged as FusionChanged, serving as serving
from services.registry_io import (CRASH_HOOK as CRASH_HOOK, audit_events as audit_events,
                                  audit_path as audit_path)
from services.registry_io import atomic_write_json as _atomic_write_json
from services.registry_io import clean_stale_temp_files as _clean_stale_temp_files
from services.registry_io import json_safe as _json_safe
from services.registry_io import locked as _locked
from services.registry_io import now as _now

log = logging.getLogger(__name__)

DEFAULT_NAME = "mtlrec-ranker"
HISTORY = 20  # previous production tags kept for rollback
KEY_METRICS = ("fused/ndcg@10", "fused/recall@10", "mean_auc")  # plus every task's AUC


class ModelNotFound(RegistryError):
    pass


class NotEvaluated(RegistryError):
    pass


class ProductionChanged(RegistryError):
    """Production moved between the gate's judgement and the pointer write: the decision is stale."""

    def __init__(self, judged_against: str | None, now: str | None):
        super().__init__(f"the gate judged against {judged_against or 'no production model'}, but production is now "
                         f"{now or 'empty'}")
        self.judged_against, self.now = judged_against, now


# --- the model store -----------------------------------------------------------------------------------------------

def _store():
    # BentoML's usage tracking would post every model save to t.bentoml.com and, in doing so, resolve (and create)
    # its cached default home; a registry should do neither unless asked, so opt out unless the user chose.
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    from bentoml._internal.models import ModelStore

    models = home() / "models"
    models.mkdir(parents=True, exist_ok=True)
    return ModelStore(models)


def _get(tag: str):
    """The BentoML model for ``tag``; BentoML also accepts ``name`` (latest) and a unique version prefix."""
    from bentoml.exceptions import BentoMLException, NotFound

    try:
        return _store().get(tag)
    except NotFound:
        raise ModelNotFound(f"model {tag!r} is not in the BentoML store at {home() / 'models'}") from None
    except (BentoMLException, ValueError) as e:  # ambiguous version prefix, unreadable model.yaml, malformed tag
        raise ModelNotFound(f"model {tag!r} cannot be read from the BentoML store at {home() / 'models'}: {e}") \
            from None


def resolve(tag: str) -> str:
    """The full ``name:version`` of a model in the store, so pointers never hold "latest" or a prefix."""
    return str(_get(tag).tag)


def artifact_path(tag: str) -> Path:
    """The model's directory in the store; ``Scorer.load(artifact_path(tag))`` works on it directly."""
    return Path(_get(tag).path)


# --- registering ---------------------------------------------------------------------------------------------------

def register(artifact_dir: Path | str, *, name: str = DEFAULT_NAME, labels: dict[str, str] | None = None) -> str:
    """Copy a trained artifact into the store as a new version of ``name``; return its ``name:version``."""
    import bentoml

    src = Path(artifact_dir)
    if not (src / WEIGHTS).is_file() or not (src / META).is_file():
        raise RegistryError(f"{src} is not a model artifact: it needs {WEIGHTS} and {META}")
    meta = read_meta(src)
    digest = sha256(src / WEIGHTS)
    cfg = meta.get("config") or {}
    fp = (meta.get("data") or {}).get("fingerprint")
    all_labels = {
        "architecture": (cfg.get("model") or {}).get("architecture"),
        "balancer": (cfg.get("balancer") or {}).get("name"),
        "feature_service": meta.get("feature_service"),
        "data": fp[:12] if fp else None,
        **(labels or {}),
    }
    all_labels = {str(k): str(v) for k, v in all_labels.items() if v is not None}
    metadata = _simple({
        "metrics": meta.get("metrics", {}),
        "data_fingerprint": fp,
        "data_rows": (meta.get("data") or {}).get("rows"),
        "feature_service": meta.get("feature_service"),
        "config": _config_summary(cfg, meta),
        "code_version": meta.get("code_version"),
        "artifact_created": meta.get("created"),
        "source": str(src.resolve()),
        "weights_sha256": digest,
    })
    # only the two files of the artifact contract; checkpoints/ and logs/ stay behind (and hold pickles)
    with bentoml.models.create(name, labels=all_labels, metadata=metadata, _model_store=_store()) as m:
        for f in (WEIGHTS, META):
            shutil.copy2(src / f, Path(m.path) / f)
        tag = str(m.tag)
    log.info("registered %s from %s", tag, src)
    return tag


def _config_summary(cfg: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    model, train = cfg.get("model") or {}, cfg.get("train") or {}
    return {
        "architecture": model.get("architecture"), "params": model.get("params"),
        "embedding_dim": model.get("embedding_dim"), "balancer": cfg.get("balancer"),
        "tasks": [t.get("name") for t in meta.get("tasks") or cfg.get("tasks") or []],
        "seed": cfg.get("seed"), "epochs": (meta.get("training") or {}).get("epochs"),
        "max_epochs": train.get("max_epochs"), "lr": train.get("lr"), "batch_size": train.get("batch_size"),
    }


def _simple(x: Any) -> Any:
    """What BentoML's metadata validator and YAML accept: no None (it rejects it), no NaN, string keys."""
    if isinstance(x, dict):
        return {str(k): s for k, v in x.items() if (s := _simple(v)) is not None}
    if isinstance(x, (list, tuple)):
        return [s for v in x if (s := _simple(v)) is not None]
    if isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item"):  # numpy scalars
        return _simple(x.item())
    return None if x is None else str(x)


def _check_intact(model) -> None:
    """Refuse a model torn by a crash during ``register`` (BentoML writes in place, not via rename)."""
    path, tag = Path(model.path), str(model.tag)
    missing = [f for f in (WEIGHTS, META) if not (path / f).is_file()]
    if missing:
        raise RegistryError(f"model {tag} is incomplete in the store: missing {', '.join(missing)}")
    want = model.info.metadata.get("weights_sha256")
    if want and sha256(path / WEIGHTS) != want:
        raise RegistryError(f"model {tag}: {WEIGHTS} does not match the sha256 recorded at registration")


# --- evaluations ---------------------------------------------------------------------------------------------------

def _evaluation_path(tag: str) -> Path:
    name, version = tag.split(":", 1)
    return registry_dir() / "evaluations" / name / f"{version}.json"


def record_evaluation(tag: str, evaluation: dict[str, Any]) -> str:
    """Keep the evaluation of a registered model; one file per tag, so two recorders cannot lose each other's."""
    full = resolve(tag)
    path = _evaluation_path(full)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path, {"tag": full, "recorded": _now(), "evaluation": _json_safe(evaluation)})
    audit({"event": "evaluated", "tag": full})
    return full


def _record_of(tag: str, path_of, key: str) -> dict[str, Any] | None:
    """One of a model's side records (evaluation, fusion), or None when it has none or is not in the store."""
    try:
        full = resolve(tag)
    except ModelNotFound:
        return None
    path = path_of(full)
    return json.loads(path.read_text())[key] if path.is_file() else None


def evaluation_of(tag: str) -> dict[str, Any] | None:
    """The recorded evaluation of ``tag``, or None when it was never evaluated (or is not in the store)."""
    return _record_of(tag, _evaluation_path, "evaluation")


# --- fusion versions -----------------------------------------------------------------------------------------------
# Kept by services/fusion_versions.py on full tags; these take what a user typed (a unique version prefix too).

def fusion_of(tag: str) -> dict[str, Any] | None:
    """The report of the model's latest accepted fusion version (``{"weights": ..., ...}``), or None.

    The weights the gate judges the model with as a candidate, and the ones it serves once promoted.
    """
    try:
        full = resolve(tag)
    except ModelNotFound:
        return None
    record = fusion_versions.latest(full)
    return {**(record.get("report") or {}), "weights": record["weights"]} if record else None


def fusion_current(tag: str) -> Serving:
    """The weighting ``tag`` is served with now, or would be if promoted: what a tuned proposal must beat."""
    return fusion_versions.current(resolve(tag))


def list_fusion(tag: str) -> list[dict[str, Any]]:
    """Every fusion version of ``tag``, oldest first, withdrawn ones included."""
    return fusion_versions.versions(resolve(tag))


def accept_fusion(tag: str, report: dict[str, Any], decision: Any, *, judged_against: str,
                  reason: str = "") -> FusionVersion:
    """Keep a weighting the fusion gate accepted as the model's next version; live at once if it is production.

    ``judged_against``: the fusion id the decision compared with (``fusion_current(tag).fusion`` as it was
    read); FusionChanged when that is no longer the model's current weighting.
    """
    return fusion_versions.accept(resolve(tag), report, decision, judged_against=judged_against, reason=reason)


def rollback_fusion(reason: str = "fusion rollback") -> Serving:
    """Serve production's previous fusion version again (its declared weights below the first); audited."""
    return fusion_versions.rollback(reason)


# --- the production pointer ----------------------------------------------------------------------------------------

def production() -> str | None:
    p = pointer()
    return p["tag"] if p else None


def set_production(tag: str, reason: str = "", *, expected: str | None | object = ...) -> str:
    """Make ``tag`` production; refuses a model that is missing, torn, or has no evaluation record.

    With ``expected`` (a tag, or None for "nothing in production yet"), the pointer moves only if production
    is still that: a compare-and-set under the registry lock, raising ProductionChanged otherwise.
    """
    full = _promotable(tag)
    with _locked():
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
    full = _promotable(tag) if promote else resolve(tag)
    with _locked():
        old = pointer()
        now = old["tag"] if old else None
        if now != judged_against:
            raise ProductionChanged(judged_against, now)
        _clean_stale_temp_files()
        audit({"event": "gate", "candidate": full, "production": now, "promote": promote, **gate})
        if promote:
            _move_pointer(full, reason, old)
    return promote


def _promotable(tag: str) -> str:
    model = _get(tag)
    full = str(model.tag)
    _check_intact(model)
    if not _evaluation_path(full).is_file():
        raise NotEvaluated(f"model {full} has no evaluation record; evaluate it (record_evaluation) before promoting")
    return full


def _move_pointer(full: str, reason: str, old: dict[str, Any] | None) -> None:
    """Replace the pointer (the caller holds the lock) and audit the move."""
    if old and old["tag"] == full:
        return
    previous = ([old["tag"]] + [t for t in old.get("previous", []) if t != full]) if old else []
    record = {"tag": full, "previous": previous[:HISTORY], "changed": _now(), "reason": reason, "action": "promote",
              **fusion_versions.pointer_fields(full)}
    _atomic_write_json(pointer_path(), record)
    # after the replace: a crash in between leaves a changed pointer that still says when, why and what came before
    audit({"event": "promote", "tag": full, "from": old["tag"] if old else None, "reason": reason,
           "fusion": record["fusion"]["id"]})


def production_artifact() -> Path | None:
    """The production model's directory, or None when nothing is in production.

    Raises ModelNotFound naming the fix when the pointer names a model the store no longer holds.
    """
    current = production()
    if current is None:
        return None
    try:
        return artifact_path(current)
    except ModelNotFound:
        raise ModelNotFound(f"production points at {current}, which is no longer in the model store at "
                            f"{home() / 'models'}: restore it, or make the previous model production again with "
                            "`mtlrec rollback`") from None


def rollback(reason: str = "rollback") -> str:
    """Make the previous production model production again; the rolled-back one leaves the history."""
    with _locked():
        old = pointer()
        if not old or not old.get("previous"):
            raise RegistryError("nothing to roll back to: " + (f"{old['tag']} is the only production model so far"
                                                               if old else "no model was ever promoted"))
        target, rest = old["previous"][0], old["previous"][1:]
        _check_intact(_get(target))
        _clean_stale_temp_files()
        record = {"tag": target, "previous": rest, "changed": _now(), "reason": reason, "action": "rollback",
                  **fusion_versions.pointer_fields(target)}
        _atomic_write_json(pointer_path(), record)
        audit({"event": "rollback", "tag": target, "from": old["tag"], "reason": reason,
               "fusion": record["fusion"]["id"]})
    return target


# --- listing -------------------------------------------------------------------------------------------------------

def list_models(name: str | None = DEFAULT_NAME) -> list[dict[str, Any]]:
    """Registered models, newest first, with key metrics; ``name=None`` lists every model in the store."""
    store, base = _store(), home() / "models"
    names = [name] if name else sorted(d.name for d in base.iterdir() if d.is_dir())
    current = production()
    rows = []
    for n in names:
        versions = [d.name for d in (base / n).iterdir() if d.is_dir()] if (base / n).is_dir() else []
        for v in versions:
            try:  # one by one: BentoML's own list() fails as a whole on a single model torn by a crash
                m = store.get(f"{n}:{v}")
            except Exception as e:  # noqa: BLE001
                log.warning("skipping unreadable model %s:%s: %s", n, v, e)
                continue
            metrics = m.info.metadata.get("metrics") or {}
            split = "test" if metrics.get("test") else "valid"
            tag = str(m.tag)
            rows.append((m.creation_time, {
                "tag": tag, "created": m.creation_time.isoformat(timespec="seconds"),
                "labels": dict(m.info.labels), "split": split,
                "metrics": {k: v for k, v in metrics.get(split, {}).items() if k in KEY_METRICS or k.endswith("/auc")},
                "evaluated": _evaluation_path(tag).is_file(), "production": tag == current,
            }))
    return [row for _, row in sorted(rows, key=lambda r: r[0], reverse=True)]


def find_registered(artifact_dir: Path | str, name: str = DEFAULT_NAME) -> str | None:
    """The tag of a model already registered from these exact weights, so a rerun does not register a twin."""
    want = sha256(Path(artifact_dir) / WEIGHTS)
    base = home() / "models" / name
    if not base.is_dir():
        return None
    store = _store()
    for d in sorted(base.iterdir()):
        if not d.is_dir():
            continue
        try:
            m = store.get(f"{name}:{d.name}")
        except Exception:  # noqa: BLE001 - a torn model is not a match
            continue
        if m.info.metadata.get("weights_sha256") == want:
            try:
                _check_intact(m)
            except RegistryError:
                continue
            return str(m.tag)
    return None


def describe(tag: str) -> dict[str, Any]:
    """Everything the registry knows about one model: for ``mtlrec models show``."""
    m = _get(tag)
    full = str(m.tag)
    return {"tag": full, "path": str(m.path), "created": m.creation_time.isoformat(timespec="seconds"),
            "labels": dict(m.info.labels), "metadata": m.info.metadata, "evaluation": evaluation_of(full),
            "fusion": fusion_of(full), "fusion_current": fusion_versions.current(full).fusion,
            "production": full == production()}

