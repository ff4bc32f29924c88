"""Shared fixtures: a small clean dataset, made once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.data.synth import SynthConfig, generate

SMALL = SynthConfig(n_users=200, n_items=100, n_interactions=5000, days=10, seed=0)


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
