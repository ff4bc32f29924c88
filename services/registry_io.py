"""The registry's files: where they live, the lock every writer takes, whole-file replaces, the audit log.

The production pointer (``services/production_pointer.py``), the model store's evaluation records
(``services/model_store.py``) and the fusion versions (``services/fusion_versions.py``) all write through
here, so a model promotion and a fusion promotion serialise on one lock, replace the one ``production.json``
the same atomic way, and tell one story in one audit log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from models.settings import env_name, get_settings

log = logging.getLogger("services.registry")

CRASH_HOOK = env_name("registry_crash_before_replace")  # the variable's name, for tests that set it


class RegistryError(ValueError):
    """A registry operation refused; the message names the tag and the reason."""


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


def pointer() -> dict[str, Any] | None:
    """The whole production record, or None before the first promotion."""
    path = pointer_path()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:  # cannot happen through this module: writes are whole-file replaces
        raise RegistryError(f"{path} is not valid JSON ({e}); restore it from {audit_path()}") from None


@contextlib.contextmanager
def locked() -> Iterator[None]:
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


def atomic_write_json(path: Path, obj: Any) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory: old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        if get_settings().registry_crash_before_replace:  # fault injection, see services/production_pointer.py
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


def clean_stale_temp_files() -> None:
    """Temp files of the pointer left by a writer killed before its rename (only lock holders write it)."""
    for tmp in registry_dir().glob(f".{pointer_path().name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            log.info("removed %s, left by an interrupted promotion", tmp.name)


def audit(event: dict[str, Any]) -> None:
    """Append one JSON line and fsync it; never rewritten, so it survives whatever happens to the pointer."""
    line = json.dumps({"time": now(), **json_safe(event), "host": socket.gethostname(), "pid": os.getpid()})
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


def json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x if x is None or isinstance(x, (bool, int, float, str)) else str(x)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
