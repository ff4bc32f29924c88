"""Per-task checkpoints: a task whose own best epoch clearly beats the shared checkpoint is scored from it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.metrics import functional as metrics
from models.scoring.artifact import Scorer, read_meta
from models.config import load_config
from models.data.resident import time_split
from models.training.task_checkpoints import auc_standard_error, choose
from models.training.train import train
from tests.models.test_calibration import _table


def test_standard_error_shrinks_with_positives():
    assert auc_standard_error(0.8, 25, 5000) > 3 * auc_standard_error(0.8, 1500, 5000)
    assert auc_standard_error(0.8, 0, 5000) == float("inf")


def test_a_common_task_with_a_clear_late_peak_moves_and_a_rare_noisy_one_stays():
    # Shared checkpoint at epoch 6 (the mean's best). long_view (1,500 validation positives) gains .016 by
    # epoch 9, many standard errors; share (25 positives) gains .04 at epoch 4, under one standard error.
    history = {e: {"long_view": 0.78 + 0.005 * e, "share": 0.72} for e in range(10)}
    history[4]["share"] = 0.76
    counts = {"long_view": (1500, 6500), "share": (25, 7975)}
    assert choose(history, 6, counts, max_snapshots=2, min_gain=1.0) == {9: ["long_view"]}
    assert choose(history, 6, counts, max_snapshots=1, min_gain=1.0) == {}
    # With no threshold, the second snapshot goes to the epoch with the larger gain in standard errors.
    assert choose(history, 6, counts, max_snapshots=2, min_gain=0.0) == {9: ["long_view"]}
    assert choose(history, 6, counts, max_snapshots=3, min_gain=0.0) == {4: ["share"], 9: ["long_view"]}


def test_each_moved_task_goes_to_its_best_kept_epoch_and_the_count_is_bounded():
    history = {0: {"a": .70, "b": .70, "c": .70}, 1: {"a": .80, "b": .78, "c": .70},
               2: {"a": .79, "b": .80, "c": .70}, 3: {"a": .70, "b": .70, "c": .90}}
    counts = {t: (2000, 2000) for t in "abc"}
    got = choose(history, 0, counts, max_snapshots=3, min_gain=1.0)
    assert len(got) == 2 and got[3] == ["c"]  # c's own epoch; a and b share the other
    assert sorted(t for ts in got.values() for t in ts) == ["a", "b", "c"]
    # Never a task that has no finite AUC at the shared checkpoint (no positives in validation).
    history[0]["a"] = float("nan")
    assert "a" not in [t for ts in choose(history, 0, counts, 3, 1.0).values() for t in ts]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shared checkpoint picked by click's AUC, so the other heads' best epochs may differ; every gain
    counts (threshold 0), so the artifact holds a second snapshot."""
    table = _table(n=8000, seed=1)
    out = tmp_path_factory.mktemp("task_checkpoints") / "model"
    cfg = load_config("shared_bottom", ["train.max_epochs=6", "train.batch_size=256", "train.lr=0.003",
                                        "train.patience=6", "model.params={bottom: [16], tower: [8]}",
                                        "model.embedding_dim=4", "balancer.name=fixed", "eval.monitor=click/auc",
                                        "train.task_checkpoints=3", "train.task_checkpoint_gain=0"])
    meta = train(cfg, "<table>", out, progress=False, table=table)
    return {"table": table, "out": out, "meta": meta}


def test_training_keeps_a_snapshot_for_a_task_whose_best_epoch_differs(trained):
    meta = trained["meta"]
    assert meta["members"], "no task's best epoch differed from click's: pick another seed"
    base = meta["training"]["checkpoint_epoch"]
    for m in meta["members"]:
        assert m["epoch"] != base and "click" not in m["tasks"]
    assert read_meta(trained["out"])["format_version"] == 3


def test_the_artifact_scores_each_task_as_training_evaluated_it(trained):
    """The scorer, loaded from disk, reproduces the test split's per-task AUC that training recorded: the
    moved tasks come from their snapshot, the others from the shared checkpoint."""
    scorer = Scorer.load(trained["out"])
    assert len(scorer.members) == len(trained["meta"]["members"])
    rows = time_split(trained["table"], 0.1, 0.1)[2]
    probs = scorer.predict(rows)
    for task in ("click", "buy", "follow"):
        want = trained["meta"]["metrics"]["test"][f"{task}/auc"]
        assert metrics.auc(probs[task], rows[task].to_numpy()) == pytest.approx(want, abs=1e-6)
    # Without the members, the moved tasks would score differently: the snapshot is really used.
    moved = trained["meta"]["members"][0]["tasks"][0]
    shared = Scorer(json.loads(json.dumps({**read_meta(trained["out"]), "members": []})))
    state = {k: v for k, v in Scorer.load(trained["out"]).state_dict().items() if not k.startswith("members.")}
    shared.load_state_dict(state)
    assert not np.allclose(shared.eval().predict(rows)[moved], probs[moved])


def test_an_invalid_setting_is_refused_before_training(tmp_path):
    cfg = load_config("shared_bottom", ["train.task_checkpoints=0"])
    with pytest.raises(ValueError, match="train.task_checkpoints"):
        train(cfg, "<table>", tmp_path / "m", progress=False, table=_table(n=600))
