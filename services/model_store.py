"""The model store: every registered model in BentoML's store, and what is recorded about each one.

BentoML keeps registered models (``weights.safetensors`` + ``model.json``,
labels, metadata) under ``$BENTOML_HOME/models``. Beside it, in
``$BENTOML_HOME/mtlrec/``, each model may have side records:

- ``evaluations/<name>/<version>.json``: the evaluation of the model; the
  gate promotes nothing without one;
- ``fusion/<name>/<version>/f<N>.json``: the model's accepted fusion
  weightings (``services/fusion_versions.py``; read here by a tag a user typed).

Which model is production, and moving it, is ``services/production_pointer.py``;
the registry's files, its lock and its audit log are ``services/registry_io.py``.

Two things about BentoML's store shape this module. It resolves
``$BENTOML_HOME`` once per process and caches it (a ``simple_di``
singleton), so changing the variable later would leave BentoML writing to
the old home while the pointer follows the new one; every call here opens the
store at the home read from the environment *now* and passes it explicitly.
And it copies a model straight into its final directory, so a crash while
registering leaves a partial model that BentoML will list; the weights' sha256
is kept in the metadata and checked (``check_intact``) before a model can
become production.
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
from services.registry_io import RegistryError, atomic_write_json, audit, home, json_safe, now, pointer, registry_dir

log = logging.getLogger("services.registry")  # one logger for the registry, shared with services/registry_io.py

DEFAULT_NAME = "mtlrec-ranker"
KEY_METRICS = ("fused/ndcg@10", "fused/recall@10", "mean_auc")  # plus every task's AUC


class ModelNotFound(RegistryError):
    pass


# --- the store -----------------------------------------------------------------------------------------------------

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


def check_intact(tag: str) -> str:
    """The full tag of a model whose files are as registered; RegistryError for one torn by a crash."""
    model = _get(tag)
    _check_intact(model)
    return str(model.tag)


def _check_intact(model) -> None:
    """Refuse a model torn by a crash during ``register`` (BentoML writes in place, not via rename)."""
    path, tag = Path(model.path), str(model.tag)
    missing = [f for f in (WEIGHTS, META) if not (path / f).is_file()]
    if missing:
        raise RegistryError(f"model {tag} is incomplete in the store: missing {', '.join(missing)}")
    want = model.info.metadata.get("weights_sha256")
    if want and sha256(path / WEIGHTS) != want:
        raise RegistryError(f"model {tag}: {WEIGHTS} does not match the sha256 recorded at registration")


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


# --- evaluations ---------------------------------------------------------------------------------------------------

def _evaluation_path(tag: str) -> Path:
    name, version = tag.split(":", 1)
    return registry_dir() / "evaluations" / name / f"{version}.json"


def record_evaluation(tag: str, evaluation: dict[str, Any]) -> str:
    """Keep the evaluation of a registered model; one file per tag, so two recorders cannot lose each other's."""
    full = resolve(tag)
    path = _evaluation_path(full)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"tag": full, "recorded": now(), "evaluation": json_safe(evaluation)})
    audit({"event": "evaluated", "tag": full})
    return full


def is_evaluated(full: str) -> bool:
    """Whether the model (a full tag) has an evaluation record."""
    return _evaluation_path(full).is_file()


def evaluation_of(tag: str) -> dict[str, Any] | None:
    """The recorded evaluation of ``tag``, or None when it was never evaluated (or is not in the store)."""
    try:
        full = resolve(tag)
    except ModelNotFound:
        return None
    path = _evaluation_path(full)
    return json.loads(path.read_text())["evaluation"] if path.is_file() else None


# --- fusion versions, by a tag a user typed (services/fusion_versions.py keeps them on full tags) ------------------

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


def list_fusion(tag: str) -> list[dict[str, Any]]:
    """Every fusion version of ``tag``, oldest first, withdrawn ones included."""
    return fusion_versions.versions(resolve(tag))


# --- listing -------------------------------------------------------------------------------------------------------

def _production() -> str | None:
    """The production tag, read from the pointer (``services/production_pointer.py`` moves it)."""
    p = pointer()
    return p["tag"] if p else None


def list_models(name: str | None = DEFAULT_NAME) -> list[dict[str, Any]]:
    """Registered models, newest first, with key metrics; ``name=None`` lists every model in the store."""
    store, base = _store(), home() / "models"
    names = [name] if name else sorted(d.name for d in base.iterdir() if d.is_dir())
    current = _production()
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
                "evaluated": is_evaluated(tag), "production": tag == current,
            }))
    return [row for _, row in sorted(rows, key=lambda r: r[0], reverse=True)]


def describe(tag: str) -> dict[str, Any]:
    """Everything the registry knows about one model: for ``mtlrec models show``."""
    m = _get(tag)
    full = str(m.tag)
    return {"tag": full, "path": str(m.path), "created": m.creation_time.isoformat(timespec="seconds"),
            "labels": dict(m.info.labels), "metadata": m.info.metadata, "evaluation": evaluation_of(full),
            "fusion": fusion_of(full), "fusion_current": fusion_versions.current(full).fusion,
            "production": full == _production()}
