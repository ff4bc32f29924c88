"""The model registry: every model in BentoML's store, production as one pointer file.

BentoML keeps registered models (``weights.safetensors`` + ``model.json``,
labels, metadata) under ``$BENTOML_HOME/models``. It has no notion of "the
production model", so that lives beside it in ``$BENTOML_HOME/mtlrec/``:

- ``production.json``: ``{"tag", "previous", "changed", "reason", ...}``,
  replaced whole with ``os.replace`` after an fsync, so a reader (or a crash)
  sees the old pointer or the new one, never a torn mix;
- ``evaluations/<name>/<version>.json``: the evaluation of each model; the
  gate promotes nothing without one;
- ``fusion/<name>/<version>.json``: the model's tuned fusion weights
  (``mtlrec fusion tune``), which the gate then judges it with;
- ``audit.jsonl``: one line per promotion, rollback and evaluation, append-only.

Two things about BentoML's store shape this module. It resolves
``$BENTOML_HOME`` once per process and caches it (a ``simple_di``
singleton), so changing the variable later would leave BentoML writing to
the old home while the pointer follows the new one; every call here opens the
store at the home read from the environment *now* and passes it explicitly.
And it copies a model straight into its final directory, so a crash while
registering leaves a partial model that BentoML will list; the weights' sha256
is kept in the metadata and checked before a model can become production.

Fault injection: with ``MTLREC_REGISTRY_CRASH_BEFORE_REPLACE=1`` in the
environment, every atomic write here dies with ``os._exit(70)`` after the
temporary file is written and synced but before it replaces the real one,
which is how the tests prove a killed promotion leaves production alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from models.artifact import META, WEIGHTS, read_meta, sha256
from models.settings import env_name, get_settings

log = logging.getLogger(__name__)

DEFAULT_NAME = "mtlrec-ranker"
CRASH_HOOK = env_name("registry_crash_before_replace")  # the variable's name, for tests that set it
HISTORY = 20  # previous production tags kept for rollback
KEY_METRICS = ("fused/ndcg@10", "fused/recall@10", "mean_auc")  # plus every task's AUC


class RegistryError(ValueError):
    """A registry operation refused; the message names the tag and the reason."""


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


# --- where things live ---------------------------------------------------------------------------------------------

def home() -> Path:
    """``$BENTOML_HOME`` as BentoML reads it (default ``~/bentoml``), but read on every call."""
    raw = os.environ.get("BENTOML_HOME") or os.path.join(os.path.expanduser("~"), "bentoml")
    return Path(os.path.expanduser(os.path.expandvars(raw)))


def registry_dir() -> Path:
    d = home() / "mtlrec"
    d.mkdir(parents=True, exist_ok=True)
    return d


def pointer_path() -> Path:
    return registry_dir() / "production.json"


def audit_path() -> Path:
    return registry_dir() / "audit.jsonl"


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


def _fusion_path(tag: str) -> Path:
    name, version = tag.split(":", 1)
    return registry_dir() / "fusion" / name / f"{version}.json"


def record_fusion(tag: str, report: dict[str, Any]) -> str:
    """Keep a model's tuned fusion weights beside it (the report of ``models.fusion_tuning.tune``).

    Kept outside BentoML's model: its files and metadata are the registered weights' provenance and stay as
    registered, while tuning may be rerun on newer data. A rerun replaces the record whole.
    """
    weights = report.get("weights")
    if not isinstance(weights, dict) or not weights or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for v in weights.values()) or not any(weights.values()):
        raise RegistryError(f"fusion weights for {tag} must map objectives to finite numbers >= 0, not all 0; "
                            f"got {weights!r}")
    full = resolve(tag)
    path = _fusion_path(full)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_json(path, {"tag": full, "recorded": _now(), "fusion": _json_safe(report)})
    audit({"event": "fusion tuned", "tag": full, "weights": weights})
    return full


def fusion_of(tag: str) -> dict[str, Any] | None:
    """The recorded fusion tuning of ``tag`` (``{"weights": ..., ...}``), or None when it has none."""
    return _record_of(tag, _fusion_path, "fusion")


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x if x is None or isinstance(x, (bool, int, float, str)) else str(x)


# --- the production pointer ----------------------------------------------------------------------------------------

def pointer() -> dict[str, Any] | None:
    """The whole production record, or None before the first promotion."""
    path = pointer_path()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:  # cannot happen through this module: writes are whole-file replaces
        raise RegistryError(f"{path} is not valid JSON ({e}); restore it from {audit_path()}") from None


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
    record = {"tag": full, "previous": previous[:HISTORY], "changed": _now(), "reason": reason, "action": "promote"}
    _atomic_write_json(pointer_path(), record)
    # after the replace: a crash in between leaves a changed pointer that still says when, why and what came before
    audit({"event": "promote", "tag": full, "from": old["tag"] if old else None, "reason": reason})


def _clean_stale_temp_files() -> None:
    """Temp files of the pointer left by a writer killed before its rename (only lock holders write it)."""
    for tmp in registry_dir().glob(f".{pointer_path().name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            log.info("removed %s, left by an interrupted promotion", tmp.name)


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
        record = {"tag": target, "previous": rest, "changed": _now(), "reason": reason, "action": "rollback"}
        _atomic_write_json(pointer_path(), record)
        audit({"event": "rollback", "tag": target, "from": old["tag"], "reason": reason})
    return target


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise read-modify-write of the pointer across processes; the OS drops the lock if we die."""
    with open(registry_dir() / ".lock", "a") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: single writer assumed
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_write_json(path: Path, obj: Any) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory: old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        if get_settings().registry_crash_before_replace:  # fault injection, see the module docstring
            os._exit(70)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


# --- audit ---------------------------------------------------------------------------------------------------------

def audit(event: dict[str, Any]) -> None:
    """Append one JSON line and fsync it; never rewritten, so it survives whatever happens to the pointer."""
    line = json.dumps({"time": _now(), **_json_safe(event), "host": socket.gethostname(), "pid": os.getpid()})
    with open(audit_path(), "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def audit_events() -> list[dict[str, Any]]:
    path = audit_path()
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line torn by a crash mid-append
            out.append(json.loads(line))
    return out


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
            "fusion": fusion_of(full),
            "production": full == production()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
