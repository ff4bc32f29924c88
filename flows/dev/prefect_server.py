"""A local Prefect server that outlives one command, for deployments, workers and ``prefect deployment run``.

Without ``PREFECT_API_URL`` Prefect starts an ephemeral server inside each
process that runs a flow and stops it when that process ends; a deployment,
the worker that executes it and the ``prefect deployment run`` that starts
it must share one server, so they need a persistent one. This module starts
``prefect server start`` as its own process group (so stopping it stops its
children too), waits for ``/api/health``, and stops it again; ``ensure()``
reuses a server that already answers. ``prefect server start --background`` would do the starting, but it
gives the server pipes that nobody reads (Prefect 3.x, ``cli/_server_utils.py``): the log is lost, and a
chatty server can block on a full pipe. Here the server writes to ``mtlrec-server.log``, which ``make run``
shows when the server fails to start.

    python -m flows.dev.prefect_server start   # prints the API URL; reuses a server that answers
    python -m flows.dev.prefect_server stop    # stops the server that `start` left running

The database is SQLite under ``PREFECT_HOME`` unless a SQLAlchemy URL is
given (``postgresql+asyncpg://user@host:5432/db``); PostgreSQL is what to
use when several workers write at once.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flows.dev.processes import free_port, http_status, log_tail, stop_group, wait_until_ok

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 4200
PID_FILE, LOG_FILE = "mtlrec-server.pid", "mtlrec-server.log"


def api_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    return f"http://{host}:{port}/api"


def healthy(url: str, timeout: float = 2.0) -> bool:
    """True when the API at ``url`` (ending in /api) answers its health check."""
    return http_status(f"{url.rstrip('/')}/health", timeout) == 200


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def sqlite_url(home: Path) -> str:
    return f"sqlite+aiosqlite:///{Path(home).resolve() / 'prefect.db'}"


@dataclass
class Server:
    """A running server: its API URL, and the process when this module started it (None when reused)."""

    url: str
    process: subprocess.Popen | None = None
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for a CLI, worker or flow process that must talk to this server."""
        return {**(os.environ if base is None else base), "PREFECT_API_URL": self.url}

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None:
            return
        stop_group(self.process.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)


def server_env(home: Path, database_url: str | None = None, *, ui: bool = False,
               base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.pop("PREFECT_API_URL", None)  # the server is not a client of some other server
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # the old alias: one name only, the one set below
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url or sqlite_url(home),  # the canonical name wins
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry calls out of a build machine
        "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
    })
    return env


def start(home: Path | str, *, host: str = DEFAULT_HOST, port: int | None = None, database_url: str | None = None,
          ui: bool = False, scheduler: bool = True, timeout: float = 120.0,
          base_env: dict[str, str] | None = None) -> Server:
    """Start ``prefect server start`` in its own process group and wait until it is healthy.

    ``scheduler=False`` keeps deployment schedules from creating runs (tests
    that must not meet a nightly run). Raises with the server's log when it
    exits or stays unhealthy.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    url = api_url(host, port)
    log = home / LOG_FILE
    env = server_env(home, database_url, ui=ui, base=base_env)
    cmd = [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", host, "--port", str(port)]
    cmd += [] if scheduler else ["--no-scheduler"]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    server = Server(url=url, process=proc, log=log, env=env)
    try:
        wait_healthy(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_healthy(server: Server, timeout: float) -> None:
    wait_until_ok(f"{server.url.rstrip('/')}/health", timeout=timeout, what="prefect server", proc=server.process,
                  log=server.log)


def ensure(url: str | None = None, home: Path | str | None = None, database_url: str | None = None) -> Server:
    """The server at ``url`` (default $PREFECT_API_URL, else 127.0.0.1:4200) if it answers, else a new one there.

    A server started here keeps running after this process exits (its pid is
    written to ``PREFECT_HOME/mtlrec-server.pid`` for ``stop()``).
    """
    from urllib.parse import urlparse

    url = url or os.environ.get("PREFECT_API_URL") or api_url()
    if healthy(url):
        return Server(url=url)
    parsed = urlparse(url)
    home = Path(home or prefect_home())
    server = start(home, host=parsed.hostname or DEFAULT_HOST, port=parsed.port or DEFAULT_PORT,
                   database_url=database_url, ui=True)
    (home / PID_FILE).write_text(str(server.process.pid))
    return server


def stop(home: Path | str | None = None) -> bool:
    """Stop the server that ``ensure()`` left running; False when there was none."""
    pid_file = Path(home or prefect_home()) / PID_FILE
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text().strip())
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    try:
        if b"server" in cmdline and any(a.endswith(b"prefect") for a in cmdline):  # never a recycled pid
            stop_group(pid, timeout=20)
            return True
        return False
    finally:
        pid_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m flows.dev.prefect_server", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("--url", help="API URL to reuse or serve (default $PREFECT_API_URL, else 127.0.0.1:4200/api)")
    ap.add_argument("--database", help="SQLAlchemy URL of the server's database (default: SQLite in PREFECT_HOME)")
    args = ap.parse_args(argv)
    if args.action == "stop":
        print("stopped" if stop() else "no server started by this module is running")
        return 0
    server = ensure(args.url, database_url=args.database)
    print(server.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
