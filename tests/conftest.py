"""Shared fixtures: a small clean dataset, made once per test session.

And a guard: a test session must leave the checkout as it found it. Every test writes under temporary
directories; ``pytest_sessionfinish`` fails the session if ``git status`` shows files that were not there at
its start, or if a directory the command line writes by default (``reports/``...) appeared.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flows.data.synth import SynthConfig, generate
from models.settings import get_settings

SMALL = SynthConfig(n_users=200, n_items=100, n_interactions=5000, days=10, seed=0)
ROOT = Path(__file__).resolve().parents[1]
# Where the command line writes when not told otherwise: ignored by git, so `git status` alone would not see them.
DEFAULT_OUTPUTS = ("reports", "artifacts", "gx_output", "lightning_logs", ".mtlrec")
_STATE = pytest.StashKey["set[str] | None"]()


def checkout_state() -> set[str] | None:
    """``git status --porcelain`` entries (modified and untracked, not ignored) and which DEFAULT_OUTPUTS exist;
    None when the tests do not run in a git checkout of their own (an sdist, a copied tree) or git is missing."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != ROOT:
            return None
        status = git("status", "--porcelain", "--untracked-files=all")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if status.returncode != 0:
        return None
    return set(status.stdout.splitlines()) | {f"(ignored, written by default) {d}/" for d in DEFAULT_OUTPUTS
                                              if (ROOT / d).exists()}


def pytest_sessionstart(session) -> None:
    if get_settings().skip_clean_check or hasattr(session.config, "workerinput"):  # MTLREC_SKIP_CLEAN_CHECK=1
        return
    session.config.stash[_STATE] = checkout_state()


def pytest_sessionfinish(session, exitstatus) -> None:
    before = session.config.stash.get(_STATE, None)
    if before is None:
        return
    after = checkout_state() or set()
    new = sorted(after - before)
    if not new:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["the tests left files in the checkout (write them under tmp_path instead):", *new]
    if reporter is not None:
        reporter.write("\n")
        reporter.write_sep("=", "checkout not clean", red=True)
        for line in lines:
            reporter.write_line(line)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


SMALL_MMOE = "model.params={n_experts: 2, expert: [32], tower: [8]}"


@pytest.fixture(scope="session")
def clean_dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "data"
    generate(out, SMALL)
    return out


@pytest.fixture
def dataset_copy(clean_dataset, tmp_path) -> Path:
    """A private copy a test may corrupt."""
    out = tmp_path / "data"
    shutil.copytree(clean_dataset, out, ignore=shutil.ignore_patterns("_gx"))
    return out


@pytest.fixture(scope="session")
def synth_with_features(tmp_path_factory):
    """``make(name, cfg)``: a generated dataset with its feature tables and training set built (no online store)."""
    from feature_repo.build import build_all

    def make(name: str, cfg: SynthConfig) -> Path:
        out = tmp_path_factory.mktemp(name)
        generate(out, cfg)
        build_all(out, materialize_online=False)
        return out

    return make


@pytest.fixture(scope="session")
def promoted_world(tmp_path_factory):
    """``make(name, cfg)``: a dataset with its feature store (SQLite online), and a small MMoE trained on it,
    registered, evaluated and promoted in a private ``BENTOML_HOME``: what a served test needs."""
    from feature_repo.build import build_all
    from models.config import load_config
    from models.training.train import train
    from services import model_store, production_pointer

    def make(name: str, cfg: SynthConfig) -> dict:
        base = tmp_path_factory.mktemp(name)
        data, art, home = base / "data", base / "artifact", base / "bentoml"
        generate(data, cfg)
        build_all(data)
        train(load_config("mmoe", ["train.max_epochs=1", SMALL_MMOE]), data, art, progress=False)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("BENTOML_HOME", str(home))
            env.setenv("BENTOML_DO_NOT_TRACK", "True")
            tag = model_store.register(art)
            model_store.record_evaluation(tag, {"fused/ndcg@10": 0.5})
            production_pointer.set_production(tag)
        return {"data": data, "artifact": art, "home": home, "tag": tag, "base": base}

    return make


def _postgres_or_skip():
    try:
        import psycopg2
    except ImportError as exc:
        pytest.fail(f"psycopg2 is a pinned dependency: {exc}")
    import socket

    try:  # nothing listening: the machine has no PostgreSQL, which is a skip, not a failure
        socket.create_connection(("127.0.0.1", 5432), timeout=3).close()
    except OSError as exc:
        pytest.skip(f"needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth): {exc}")
    # a server that answers but refuses us (auth, missing role) is a real failure and says why
    return psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)


@pytest.fixture
def postgres_database():
    """A fresh database on the local PostgreSQL (its name), dropped afterwards with FORCE (a server's pool may
    still hold connections); skips with a message where nothing listens on 127.0.0.1:5432."""
    import uuid

    conn = _postgres_or_skip()
    conn.autocommit = True
    name = f"mtlrec_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
