"""models/settings.py: every MTLREC_* variable is one typed setting, read at call time, listed by `mtlrec settings`."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from models import settings
from models.settings import Settings, SettingsError, get_settings

ROOT = Path(__file__).resolve().parents[2]
# Where the code, its configuration and its documentation live; data and build outputs are not searched.
SKIP_DIRS = {".git", ".venv", "data", "artifacts", "reports", "gx_output", ".mtlrec", "lightning_logs",
             "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}
SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".md", ".cfg", ".ini", ".sh", ".txt"}
# MTLREC_* names that are not mtlrec's settings, each with the reason.
NOT_SETTINGS = {
    "MTLREC_IMAGE": "prefect.yaml's commented k8s deployment: a template variable Prefect substitutes at deploy time",
}
# A whole name: MTLREC_ then capitals, digits and underscores, not cut short (``MTLREC_STORE_*`` is a family).
NAME = re.compile(r"\bMTLREC_[A-Z0-9_]+(?![\w*])")


def _source_files():
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for f in files:
            path = Path(top) / f
            if path.suffix in SUFFIXES or f in ("Makefile", "run"):
                yield path


def test_every_mtlrec_name_in_the_code_is_a_setting():
    """A new variable cannot bypass the Settings: any MTLREC_* name anywhere in the source tree must be a field."""
    found: dict[str, set[str]] = {}
    for path in _source_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for name in NAME.findall(text):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert "MTLREC_WORKERS" in found and "MTLREC_ONLINE_STORE" in found  # the search does search
    strays = {n: sorted(where) for n, where in found.items() if n not in settings.names() and n not in NOT_SETTINGS}
    assert not strays, f"MTLREC_* names that are no field of models.settings.Settings (declare them there): {strays}"


def test_every_field_is_a_variable_with_a_description():
    for field, info in Settings.model_fields.items():
        assert info.description and len(info.description) > 20, field
        assert settings.env_name(field).startswith("MTLREC_")
    assert len(set(settings.names())) == len(Settings.model_fields)


def test_values_come_out_typed(monkeypatch, tmp_path):
    monkeypatch.setenv("MTLREC_WORKERS", "3")
    monkeypatch.setenv("MTLREC_STORE_COOLDOWN_MS", "250.5")
    monkeypatch.setenv("MTLREC_ACCESS_LOG", "0")
    monkeypatch.setenv("MTLREC_DEBUG", "true")
    monkeypatch.setenv("MTLREC_ONLINE_STORE", "Redis")
    monkeypatch.setenv("MTLREC_DATASET", str(tmp_path))
    monkeypatch.setenv("MTLREC_ADMIN_TOKEN", "s3cret")
    s = get_settings()
    assert s.workers == 3 and isinstance(s.workers, int)
    assert s.store_cooldown_ms == 250.5 and isinstance(s.store_cooldown_ms, float)
    assert s.access_log is False and s.debug is True
    assert s.online_store == "redis"
    assert s.dataset == tmp_path and isinstance(s.dataset, Path)
    assert s.admin_token.get_secret_value() == "s3cret" and "s3cret" not in repr(s)
    # Defaults that follow the worker count, unless set.
    assert (s.keepalive_requests, s.reload_poll_s) == (16, 2.0)
    monkeypatch.setenv("MTLREC_KEEPALIVE_REQUESTS", "0")
    assert get_settings().keepalive_requests == 0


def test_defaults_and_empty_variables(monkeypatch):
    for name in settings.names():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MTLREC_WORKERS", "")  # empty counts as unset
    s = get_settings()
    assert (s.workers, s.online_store, s.max_candidates, s.access_log) == (1, "sqlite", 1000, True)
    assert (s.keepalive_requests, s.reload_poll_s) == (0, 0.0)
    assert s.admin_token.get_secret_value() == ""


def test_read_at_call_time_not_at_import(monkeypatch):
    from services.schemas import max_candidates

    monkeypatch.setenv("MTLREC_MAX_CANDIDATES", "7")
    assert max_candidates() == 7
    monkeypatch.setenv("MTLREC_MAX_CANDIDATES", "9")
    assert max_candidates() == 9


@pytest.mark.parametrize("name, value", [
    ("MTLREC_WORKERS", "two"), ("MTLREC_WORKERS", "0"), ("MTLREC_STORE_READ_TIMEOUT_MS", "fast"),
    ("MTLREC_ACCESS_LOG", "maybe"), ("MTLREC_ONLINE_STORE", "mongo"), ("MTLREC_REGISTRY_CRASH_BEFORE_REPLACE", "x")])
def test_a_bad_value_is_an_error_naming_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=re.escape(name)) as err:
        get_settings()
    assert isinstance(err.value, ValueError) and len(str(err.value).splitlines()) == 1


def test_store_settings_read_the_environment_per_call(monkeypatch, tmp_path):
    from feature_repo.store import StoreSettings

    monkeypatch.setenv("MTLREC_ONLINE_STORE", "redis")
    monkeypatch.setenv("MTLREC_REDIS", "10.0.0.1:6380,db=2")
    monkeypatch.setenv("MTLREC_FEAST_PROJECT", "elsewhere")
    s = StoreSettings.for_dataset(tmp_path)
    assert (s.online, s.redis, s.project) == ("redis", "10.0.0.1:6380,db=2", "elsewhere")
    assert StoreSettings.for_dataset(tmp_path, online="sqlite").online == "sqlite"  # an argument wins
    monkeypatch.delenv("MTLREC_ONLINE_STORE")
    assert StoreSettings.for_dataset(tmp_path).online == "sqlite"


def test_mtlrec_settings_prints_every_variable(monkeypatch):
    monkeypatch.setenv("MTLREC_WORKERS", "4")
    monkeypatch.setenv("MTLREC_ADMIN_TOKEN", "s3cret")
    typo = "MTLREC_" + "WORKRES"  # spelt out it would be a stray name for the test above
    monkeypatch.setenv(typo, "2")
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    for name in settings.names():
        assert f"{name}=" in result.output, name
    assert "MTLREC_WORKERS=4\n" in result.output
    assert "s3cret" not in result.output and "MTLREC_ADMIN_TOKEN=(set)" in result.output
    assert f"{typo}: not a setting" in result.output


def test_mtlrec_settings_refuses_a_bad_value_in_one_line():
    env = {**os.environ, "MTLREC_WORKERS": "two"}
    env.pop("MTLREC_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "flows.cli", "settings"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "error: MTLREC_WORKERS='two': Input should be a valid integer, unable to parse string as an integer"]


def test_the_configuration_page_lists_every_variable():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert settings.markdown_table() in page, "docs/configuration.md's table is stale: paste " \
                                              "`mtlrec settings --markdown` over it"
    markdown = CliRunner().invoke(app, ["settings", "--markdown"])
    assert markdown.exit_code == 0 and markdown.output == settings.markdown_table()


def test_no_other_models_module_needs_pydantic_settings():
    """models/ must run on a GPU machine with only torch, Lightning, numpy, pandas, pyarrow and PyYAML."""
    offenders = []
    for path in (ROOT / "models").rglob("*.py"):
        if path.name == "settings.py" and path.parent.name == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.startswith(("pydantic_settings", "models.settings")) for n in names) or (
                    isinstance(node, ast.ImportFrom) and node.module == "models"
                    and any(a.name == "settings" for a in node.names)):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
