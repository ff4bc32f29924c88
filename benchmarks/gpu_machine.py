"""Run a script as the GPU machine would: only torch, Lightning, numpy, pandas, pyarrow and PyYAML there.

Every other third-party package this project installs is made unimportable (and absent from the
installed distributions that libraries probe), so a script that would fail there for an import fails here
the same way:

    .venv/bin/python benchmarks/gpu_machine.py benchmarks/train_throughput.py --rows 4000 --batch 512
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import runpy
import sys

# What the project installs that the GPU machine lacks (pyproject.toml's dependencies and what they pull in).
ABSENT = {
    "typer", "rich", "tensorboard", "tensorboardX", "safetensors", "prefect", "fastapi", "feast", "ibis", "duckdb",
    "great_expectations", "bentoml", "starlette", "pydantic", "pydantic_settings", "pydantic_core", "uvicorn",
    "psutil", "redis", "psycopg2", "matplotlib", "sklearn", "scipy", "sqlalchemy", "httpx",
}
DISTRIBUTIONS = {"tensorboardx": "tensorboardX", "great-expectations": "great_expectations",
                 "pydantic-settings": "pydantic_settings", "psycopg2-binary": "psycopg2",
                 "scikit-learn": "sklearn", "ibis-framework": "ibis"}


class _PathFinder(importlib.machinery.PathFinder):
    """The import system's path finder, blind to the absent packages: ``import`` raises
    ModuleNotFoundError and ``importlib.util.find_spec`` answers None, as where they are not installed."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            return None
        return super().find_spec(name, path, target)


def _absent_distribution(name: str) -> bool:
    key = name.lower().replace("_", "-")
    return DISTRIBUTIONS.get(key, name) in ABSENT or name in ABSENT or name.replace("-", "_") in ABSENT


def install() -> None:
    sys.meta_path[:] = [_PathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    for blocked in [m for m in sys.modules if m.split(".")[0] in ABSENT]:
        del sys.modules[blocked]
    for name in ("distribution", "version"):  # what libraries probe to decide whether a package is there
        setattr(importlib.metadata, name, _hiding(getattr(importlib.metadata, name)))


def _hiding(probe):
    def probed(name):
        if _absent_distribution(name):
            raise importlib.metadata.PackageNotFoundError(name)
        return probe(name)

    return probed


if __name__ == "__main__":
    install()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
