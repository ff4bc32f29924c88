"""Single-task baselines that respect the user's time: chosen tasks, a budget of their own, a cache, progress."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.data.synth import SynthConfig
from models.scoring.artifact import read_meta
from models.evaluation.baselines import BaselineError, single_task_models
from models.config import load_config
from models.training.train import train

TINY = ["train.max_epochs=2", "train.limit_train_batches=2", "model.params={bottom: [16], tower: [4]}"]


@pytest.fixture(scope="module")
def data(synth_with_features):
    return synth_with_features("baseline-budget", SynthConfig(n_users=200, n_items=80, n_interactions=4000,
                                                              days=10, seed=5))


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline-budget") / "mtl"
    train(load_config("shared_bottom", TINY), data, out, progress=False)
    return out


def test_only_the_named_tasks_with_their_own_budget_and_an_unknown_task_named(model, data, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mtlrec.train"):
        singles = single_task_models(model, data, tmp_path, tasks=["purchase"], overrides=["train.max_epochs=1"],
                                     cache=tmp_path / "cache")
    assert set(singles) == {"purchase"}
    assert read_meta(singles["purchase"])["training"]["epochs"] == 1  # the baselines' budget, not the model's 2
    assert "single-task baseline 1/1 (purchase): training" in caplog.text
    assert "epoch 1/1" in caplog.text  # training's per-epoch line
    with pytest.raises(BaselineError, match="'purchse'.*purchase"):
        single_task_models(model, data, tmp_path, tasks=["purchse"])


def test_a_baseline_trained_on_the_same_table_and_settings_is_reused(model, data, tmp_path, caplog):
    cache = tmp_path / "cache"
    first = single_task_models(model, data, tmp_path, tasks=["click"], cache=cache)
    made = (first["click"] / "model.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="mtlrec.train"):
        again = single_task_models(model, data, tmp_path, tasks=["click"], cache=cache)
    assert again == first and (again["click"] / "model.json").stat().st_mtime_ns == made
    assert "(click): reusing" in caplog.text
    other = single_task_models(model, data, tmp_path, tasks=["click"], overrides=["train.max_epochs=1"], cache=cache)
    assert other["click"] != first["click"]  # another budget is another baseline


def test_evaluate_takes_tasks_and_a_baseline_budget_and_refuses_them_alone(model, data, tmp_path):
    runner = CliRunner()
    cache = tmp_path / "cache"
    ok = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(data), "--single-task",
                             "--tasks", "click", "--baseline-set", "train.max_epochs=1",
                             "--baseline-cache", str(cache), "--unshown", "0", "--json"])
    assert ok.exit_code == 0, ok.output
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["click"]
    bad = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(data), "--single-task",
                              "--tasks", "clik", "--baseline-cache", str(cache)])
    assert bad.exit_code == 2 and "did you mean 'click'" in bad.output
    alone = runner.invoke(app, ["evaluate", "--model", str(model), "--data", str(data), "--tasks", "click"])
    assert alone.exit_code == 2 and "add --single-task" in alone.output
