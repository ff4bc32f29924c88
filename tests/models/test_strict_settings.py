"""Settings that used to be ignored or misread now fail before any data is read, naming the closest valid one;
single-task baselines follow their own task's metric, so the multi-task model is compared with fair baselines.

Each test failed on the code before its fix: a misspelt monitor logged -1 every epoch and kept epoch 0, a
misspelt ``data.features`` key or feature name trained without those features, an unknown
``model.embedding_dims`` key was dropped, and the purchase baseline followed ``click/auc``, which its one-task
model never logs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import models.training.train as train_module
from flows.data.synth import SynthConfig
from models.scoring.artifact import read_meta
from models.evaluation.baselines import single_task_config, single_task_models
from models.config import ConfigError, load_config
from models.data.resident import MTLDataModule
from models.data.encoder import FeatureSpec
from models.metrics.multitask import evaluate_predictions
from models.training.monitor import check_monitor, logged_metrics, single_task_monitor
from models.data.training_table import load_training_table
from models.tasks import TaskSet
from models.training.train import train

TINY = ["train.max_epochs=1", "train.limit_train_batches=2", "model.params={bottom: [16], tower: [4]}"]
KS = (10, 20, 50)


@pytest.fixture(scope="module")
def data(synth_with_features):
    return synth_with_features("strict-settings", SynthConfig(n_users=200, n_items=80, n_interactions=4000,
                                                              days=8, seed=1))


@pytest.fixture(scope="module")
def table(data):
    return load_training_table(data)


@pytest.fixture(scope="module")
def tasks(table):
    return TaskSet.resolve("auto", table.attrs["mtlrec"]["declaration"], columns=table.columns)


@pytest.fixture
def unread(monkeypatch):
    """The training table cannot be read: a setting checked before reading fails first, with its own error."""
    def refuse(*args, **kwargs):
        raise AssertionError("the training table was read before the settings were checked")

    monkeypatch.setattr(train_module, "load_training_table", refuse)
    monkeypatch.setattr(train_module, "StreamedDataModule", refuse)


# ---- eval.monitor ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("monitor,closest", [("clik/auc", "click/auc"), ("purchse/logloss", "purchase/logloss"),
                                             ("ndcg@100", "ndcg@10"), ("mean_acu", "mean_auc")])
def test_an_unknown_monitor_fails_before_the_table_is_read_naming_the_closest(data, tmp_path, unread, monitor,
                                                                              closest):
    cfg = load_config("shared_bottom", [*TINY, f"eval.monitor={monitor}"])
    with pytest.raises(ConfigError, match=rf"eval\.monitor.*{monitor}.*did you mean '{closest}'"):
        train(cfg, data, tmp_path / "m", progress=False)


def test_a_metric_the_task_does_not_have_is_refused(tasks):
    """dwell is a regression: it logs an RMSE, never an AUC, so monitoring its AUC would log -1 every epoch."""
    with pytest.raises(ConfigError, match="dwell/auc"):
        check_monitor("dwell/auc", tasks, KS)
    regression_only = TaskSet([_alone(tasks.get("dwell"))])
    with pytest.raises(ConfigError, match="mean_auc"):  # no binary task: no AUC to average, no logloss to sum
        check_monitor("mean_auc", regression_only, KS)
    assert check_monitor("dwell/rmse", regression_only, KS) == "dwell/rmse"


@pytest.mark.parametrize("monitor", ["click/auc", "purchase/gauc", "loss", "mean_auc", "ndcg@10", "recall@20",
                                     "reward@50", "fused/ndcg@20", "dwell/rmse", "purchase/recall@10"])
def test_every_metric_the_run_logs_may_be_monitored(tasks, monitor):
    assert check_monitor(monitor, tasks, KS) == monitor


def test_the_checked_names_are_exactly_what_validation_logs(table, tasks):
    """``logged_metrics`` lists without data what ``evaluate_predictions`` logs (its finite values) on data."""
    rng = np.random.default_rng(0)
    labels = np.nan_to_num(np.stack([table[t.column].to_numpy(dtype=np.float64) for t in tasks], axis=1))
    probs = {t.name: rng.random(len(table)) for t in tasks}
    out = evaluate_predictions(tasks, probs, labels, table["user_id"].astype(str).to_numpy(), ks=KS)
    assert {k for k, v in out.items() if np.isfinite(v)} == logged_metrics(tasks, KS)


# ---- single-task baselines -------------------------------------------------------------------------------------

@pytest.mark.parametrize("monitor,own", [("click/auc", "purchase/auc"), ("mean_auc", "purchase/auc"),
                                         ("loss", "purchase/logloss"), ("click/logloss", "purchase/logloss"),
                                         ("ndcg@10", "purchase/ndcg@10"), ("click/gauc", "purchase/gauc"),
                                         ("dwell/rmse", "purchase/auc")])
def test_a_baseline_monitors_its_own_task_with_the_same_kind_of_metric(tasks, monitor, own):
    purchase = TaskSet([_alone(tasks.get("purchase"))])
    assert single_task_monitor(monitor, purchase, KS) == own
    dwell = TaskSet([_alone(tasks.get("dwell"))])
    assert single_task_monitor(monitor, dwell, KS) == "dwell/rmse"  # a regression's loss, whatever the kind


def test_a_baseline_trains_with_fixed_weights_and_its_own_monitor(tasks):
    cfg = load_config("mmoe", ["balancer.name=gradnorm", "balancer.params={alpha: 1.0}", "eval.monitor=click/auc"])
    purchase = [t for t in tasks.to_config() if t["name"] == "purchase"][0]
    single = single_task_config(cfg, purchase, "click/auc")
    assert single["balancer"] == {"name": "fixed", "params": {}}
    assert single["eval"]["monitor"] == "purchase/auc" and single["eval"]["ks"] == cfg["eval"]["ks"]
    assert single["tasks"] == [{**purchase, "sample_space": "all"}] and single["model"] == cfg["model"]
    assert cfg["eval"]["monitor"] == "click/auc" and cfg["balancer"]["name"] == "gradnorm"  # not edited in place


def test_baselines_of_a_click_monitored_model_follow_their_own_auc(data, table, tmp_path):
    cfg = load_config("shared_bottom", [*TINY, "train.max_epochs=2", "eval.monitor=click/auc"])
    train(cfg, data, tmp_path / "mtl", progress=False, table=table)
    singles = single_task_models(tmp_path / "mtl", data, tmp_path / "single", table=table)
    assert set(singles) == {"click", "purchase"}
    for name, path in singles.items():
        meta = read_meta(path)
        assert meta["training"]["monitor"] == f"{name}/auc"
        assert meta["config"]["balancer"]["name"] == "fixed"
        logged = pd.read_csv(next((path / "logs" / "csv").glob("version_*/metrics.csv")))
        scores = logged[f"val/{name}/auc"].dropna()
        assert len(scores) == 2 and (scores > 0).all()  # an AUC each epoch, not the -1 of an unlogged metric
        assert meta["training"]["best_checkpoint_score"] == pytest.approx(scores.max())


# ---- data.features and model.embedding_dims ---------------------------------------------------------------------

@pytest.mark.parametrize("features,match", [
    ("{categoricals: [user_id, item_id], numeric: [age]}", r"data\.features\.categoricals.*did you mean "
                                                            r"'data\.features\.categorical'"),
    ("{categorical: [user_id, itme_id], numeric: [age]}", r"data\.features\.categorical.*itme_id.*did you mean "
                                                           r"'item_id'"),
    ("{categorical: [user_id], numeric: [age, log_prices]}", r"log_prices.*did you mean 'log_price'"),
    ("{categorical: [user_id], numeric: [age], log1p: [agee]}", r"data\.features\.log1p.*agee.*did you mean 'age'"),
    ("{categorical: user_id}", r"data\.features\.categorical must be a list"),
])
def test_data_features_are_strict(data, tmp_path, unread, features, match):
    cfg = load_config("shared_bottom", [*TINY, f"data.features={features}"])
    with pytest.raises(ConfigError, match=match):
        train(cfg, data, tmp_path / "m", progress=False)


def test_a_data_module_refuses_a_feature_the_table_lacks(table, tasks):
    with pytest.raises(ValueError, match=r"usr_id.*did you mean 'user_id'"):
        MTLDataModule(table, tasks, ["usr_id", "item_id"], ["age"])
    with pytest.raises(ValueError, match=r"agee.*did you mean 'age'"):
        MTLDataModule(table, tasks, ["user_id"], ["agee"])


@pytest.mark.parametrize("dims,match", [("{huor: 4}", r"model\.embedding_dims.*huor.*did you mean 'hour'"),
                                        ("{age: 4}", r"age.*numeric.*'age#bins'"),
                                        ("{hour: 0}", r"model\.embedding_dims\.hour.*positive"),
                                        ("{hour: four}", r"model\.embedding_dims\.hour.*positive")])
def test_embedding_dims_name_categorical_features_with_positive_widths(data, tmp_path, unread, dims, match):
    cfg = load_config("shared_bottom", [*TINY, f"model.embedding_dims={dims}"])
    with pytest.raises(ConfigError, match=match):
        train(cfg, data, tmp_path / "m", progress=False)


def test_embedding_dims_apply_to_categoricals_and_numeric_bins(data, table, tmp_path):
    cfg = load_config("shared_bottom", [*TINY, "data.numeric_bins=all",
                                        "model.embedding_dims={hour: 3, log_price#bins: 5}"])
    meta = train(cfg, data, tmp_path / "m", progress=False, table=table)
    assert meta["features"]["widths"]["hour"] == 3 and meta["features"]["widths"]["log_price#bins"] == 5


def test_a_spec_refuses_widths_for_features_it_does_not_have(table):
    spec = FeatureSpec.fit(table, ["user_id", "hour"], ["age"])
    with pytest.raises(ValueError, match=r"huor.*did you mean 'hour'"):
        spec.size_embeddings("auto", {"huor": 4})
    assert spec.size_embeddings("auto", {"hour": 4, "age#bins": 6}).widths["hour"] == 4  # age unbinned: no slot


def _alone(task):
    """A task trained by itself, on every impression (what a single-task baseline is)."""
    import dataclasses

    return dataclasses.replace(task, sample_space="all")
