"""The ranking service as a child process: ``mtlrec serve`` started, waited on until ready, stopped.

Tests, the latency benchmark and ``make run`` all start the service the way a user does, through
``mtlrec serve``, and wait for ``/readyz`` (a model loaded and the online store answering).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from flows.dev.processes import free_port, stop_group, wait_until_ok

ROOT = Path(__file__).resolve().parents[2]


class NotServable(RuntimeError):
    """Something the service needs is missing; the message names each missing piece and the command that makes it."""


def preflight(data: Path | str, online: str | None = None) -> None:
    """Refuse, in a second or two, to serve without a feature store, its feature service or a production model.

    ``mtlrec serve`` checks this before it starts BentoML: there, a worker that cannot start is restarted
    forever and ``/healthz`` never answers. Read from the same places the service reads (``MTLREC_ONLINE_STORE``,
    ``BENTOML_HOME``), without importing Feast. A store that goes away after the start is the service's business
    (503 until it is back), not this check's.
    """
    from services import production_pointer, registry_io
    from feature_repo.registry_file import StoreNotBuilt, check_servable
    from feature_repo.store import StoreSettings

    problems = []
    if not Path(data).is_dir():
        problems.append(f"no dataset at {data}: make one with `mtlrec data synth --out {data}`, "
                        f"then `mtlrec features build {data}`")
    else:
        try:
            check_servable(StoreSettings.for_dataset(data, online=online), shown=data)
        except StoreNotBuilt as e:
            problems.append(str(e))
    try:
        if production_pointer.production_artifact() is None:
            problems.append(f"no production model in the registry at {registry_io.home()}: train and promote one with "
                            f"`mtlrec pipeline --data {data}`, or promote an evaluated model with "
                            f"`mtlrec promote TAG --data {data}`")
    except registry_io.RegistryError as e:  # production names a model the store no longer holds; the message says so
        problems.append(str(e))
    try:
        from models.settings import get_settings
        from services.feedback_token import Tokens

        Tokens.from_settings(get_settings().feedback_secret.get_secret_value())
    except (OSError, ValueError) as e:
        problems.append(f"no feedback secret: {e} (set MTLREC_FEEDBACK_SECRET, or make {registry_io.home() / 'mtlrec'} "
                        "writable so that one is generated there)")
    if problems:
        raise NotServable("cannot serve: " + "; ".join(problems))


def command(port: int, *, data: Path | str | None = None, online: str | None = None, workers: int | None = None,
            host: str = "127.0.0.1") -> list[str]:
    """``mtlrec serve`` with these options, run by this interpreter (no PATH lookup)."""
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--host", host, "--port", str(port)]
    if data is not None:
        cmd += ["--data", str(data)]
    if online:
        cmd += ["--online", online]
    if workers:
        cmd += ["--workers", str(workers)]
    return cmd


@dataclass
class Served:
    url: str
    pid: int  # `mtlrec serve` execs bentoml: with one worker this process runs the service itself
    log: Path | None


@contextlib.contextmanager
def serving(env: dict[str, str] | None = None, *, port: int | None = None, data: Path | str | None = None,
            online: str | None = None, workers: int | None = None, probe: str = "/readyz", timeout: float = 90,
            log: Path | None = None):
    """Start the service on a free loopback port, yield it once ``probe`` answers 200, stop it and its workers."""
    port = port or free_port()
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "FEAST_USAGE": "False", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        proc = subprocess.Popen(command(port, data=data, online=online, workers=workers), cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            wait_until_ok(url + probe, timeout=timeout, what="mtlrec serve", proc=proc, log=log)
            yield Served(url=url, pid=proc.pid, log=log)
        finally:
            stop_group(proc.pid, timeout=15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
