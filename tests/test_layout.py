"""Imports point one way: flows -> services -> feature_repo -> models, and down through models/' rooms.

The layers are what lets each part ship alone: the GPU machine trains from
``models/`` with no Prefect, Feast, GX or BentoML installed, and the bento
packs ``services/``, ``feature_repo/`` and ``models/`` without the pipeline.
The layers themselves are import-linter contracts in ``pyproject.toml`` (``make lint`` runs them); this file
keeps what they cannot say: no import cycle between modules, what the bento packs, what ``feast apply`` reads.
A function-level import counts like a module-level one: it fails just the
same on a machine that lacks the package, only later.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("models", "feature_repo", "services", "flows")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module ``path`` imports, project ones resolved to the most specific module that exists."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return found


def graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: {m for m in imports(path, known) if m in known and m != name} for name, path in known.items()}


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module are import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_circular_import():
    cycles = strongly_connected(graph())
    assert not cycles, "circular imports:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(g) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def bento_files() -> list[Path]:
    """The Python files ``bentoml build`` would pack, chosen by BentoML's own include/exclude matcher."""
    from bentoml._internal.bento.build_config import BentoPathSpec

    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    matcher = BentoPathSpec(spec["include"], spec.get("exclude", []), str(ROOT))
    return sorted(p for p in ROOT.rglob("*.py") if ".venv" not in p.parts
                  and matcher.includes(p.relative_to(ROOT).as_posix()))


def test_bento_packs_no_pipeline():
    """The bento runs what it includes; an import of Prefect or of ``flows`` would fail inside it."""
    included = bento_files()
    assert any(p.name == "service.py" for p in included), "bentofile.yaml includes no service"
    known = project_modules()
    packed = {module_name(p) for p in included}
    bad = []
    for path in included:
        for m in imports(path, known):
            if m.split(".")[0] == "prefect":
                bad.append(f"{module_name(path)} imports {m}")
            elif m in known and m not in packed:
                bad.append(f"{module_name(path)} imports {m}, which the bento does not include")
    assert not bad, "\n".join(bad)


def test_import_contracts_fail_on_a_planted_upward_import():
    """``lint-imports`` (run by ``make lint``) refuses a models/ module that imports the pipeline."""
    path = ROOT / "models" / "_layout_probe.py"
    path.write_text("from flows import pipeline  # noqa: F401\n")
    try:
        res = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    finally:
        path.unlink()
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "models._layout_probe -> flows.pipeline" in res.stdout, res.stdout[-2000:]


@pytest.mark.parametrize("source, expected", [
    ("from . import ranking\n", {"services.ranking"}),
    ("from .production_pointer import set_production\n", {"services.production_pointer"}),
    ("def f():\n    from flows.dev import launcher\n", {"flows.dev.launcher"}),
    ("import prefect\n", {"prefect"}),
])
def test_import_reader(tmp_path, source, expected, monkeypatch):
    """The reader sees relative and function-level imports, or the layer tests above could not fail."""
    path = ROOT / "services" / "_layout_probe.py"
    path.write_text(source)
    try:
        assert imports(path, project_modules()) >= expected
    finally:
        path.unlink()


def test_feast_apply_imports_only_the_definitions():
    """`feast apply` imports every .py under feature_repo/ not in .feastignore; only definitions.py is Feast's."""
    ignored = {line.strip() for line in (ROOT / "feature_repo" / ".feastignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    modules = {p.name for p in (ROOT / "feature_repo").glob("*.py")}
    assert modules - ignored == {"definitions.py"}, f"list these in feature_repo/.feastignore: " \
                                                   f"{sorted(modules - ignored - {'definitions.py'})}"
