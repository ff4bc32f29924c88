"""Servers the workflow starts as children: a free port, a wait until they answer, a stop that takes their workers.

Prefect's server, the worker and the ranking service all spawn children of their own (uvicorn, circus
workers, flow-run processes), so each is started in its own session and stopped by process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 2.0) -> int:
    """The status a GET of ``url`` answers; 0 while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError, ValueError):
        return 0


def log_tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not Path(log).is_file():
        return ""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


def wait_until_ok(url: str, *, timeout: float, what: str = "the server", proc: subprocess.Popen | None = None,
                  log: Path | None = None) -> None:
    """Return once ``url`` answers 200; fail early, with the end of its log, if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while http_status(url) != 200:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before {url} answered; "
                               f"the end of its log:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s; the end of its log:\n"
                               f"{log_tail(log)}")
        time.sleep(0.25)


def stop_group(pid: int, timeout: float) -> None:
    """SIGTERM the whole process group (the server and the workers it spawned), then SIGKILL what is left."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
