"""Task-wise early stopping (models/training/task_stopping.py): a task past its own best stops training the model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from models.config import load_config
from models.training.lightning_module import MTLModule
from models.training.task_stopping import TaskStopping, gate
from models.training.train import train


def test_gate_zeroes_a_stopped_tasks_loss_and_gradient_and_keeps_the_others():
    w = torch.ones(3, requires_grad=True)
    losses = torch.stack([w[0] * 2.0, w[1] * 3.0, w[2] * 4.0])
    gated = gate(losses, torch.tensor([1.0, 0.0, 1.0]))
    assert gated.tolist() == [2.0, 0.0, 4.0]  # 0: what every balancer reads as "no signal this step"
    gated.sum().backward()
    assert w.grad.tolist() == [2.0, 0.0, 4.0]
    # One backward per task (gradient surgery): a stopped task's is zero, not an error.
    losses = torch.stack([w[0] * 2.0, w[1] * 3.0, w[2] * 4.0])
    (g,) = torch.autograd.grad(gate(losses, torch.tensor([1.0, 0.0, 1.0]))[1], w, allow_unused=False)
    assert g.abs().sum() == 0


@pytest.fixture
def tiny_module() -> MTLModule:
    from models.data.resident import MTLDataModule
    from models.tasks import TaskSet

    table = _table(200)
    table["watch"] = np.random.default_rng(1).normal(size=len(table))
    tasks = TaskSet.from_config([{"name": "click"}, {"name": "share"}, {"name": "watch", "type": "regression"}])
    dm = MTLDataModule(table, tasks, ["item_id"], ["x"], batch_size=64, seed=0)
    return MTLModule(spec=dm.spec.to_dict(), tasks=tasks.to_config(), architecture="shared_bottom", embedding_dim=4)


def _trainer(epoch: int, metrics: dict[str, float]):
    return SimpleNamespace(sanity_checking=False, current_epoch=epoch, should_stop=False,
                           callback_metrics={k: torch.tensor(v) for k, v in metrics.items()})


def test_a_task_stops_after_patience_epochs_without_its_own_best_and_the_run_stops_when_all_have(tiny_module):
    module = tiny_module
    cb = TaskStopping(patience=2)
    history = [  # click improves throughout; share peaks at epoch 1; watch's RMSE (lower is better) at epoch 2
        {"val/click/auc": 0.60, "val/share/auc": 0.70, "val/watch/rmse": 1.0},
        {"val/click/auc": 0.62, "val/share/auc": 0.75, "val/watch/rmse": 0.9},
        {"val/click/auc": 0.64, "val/share/auc": 0.74, "val/watch/rmse": 0.8},
        {"val/click/auc": 0.66, "val/share/auc": 0.73, "val/watch/rmse": 0.85},
        {"val/click/auc": 0.68, "val/share/auc": 0.76, "val/watch/rmse": 0.9},
    ]
    active = []
    for epoch, metrics in enumerate(history):
        trainer = _trainer(epoch, metrics)
        cb.on_validation_end(trainer, module)
        active.append(module.task_active.tolist())
        assert not trainer.should_stop
    assert active[2] == [1, 1, 1] and active[3] == [1, 0, 1] and active[4] == [1, 0, 0]
    assert cb.stopped == {"share": 3, "watch": 4}  # share's later .76 comes too late: it no longer trains
    for epoch in (5, 6):
        trainer = _trainer(epoch, {"val/click/auc": 0.5})
        cb.on_validation_end(trainer, module)
    assert trainer.should_stop and module.task_active.tolist() == [0, 0, 0]


def test_a_split_without_positives_neither_improves_nor_stops_a_task(tiny_module):
    cb = TaskStopping(patience=1)
    for epoch in range(4):
        cb.on_validation_end(_trainer(epoch, {"val/click/auc": 0.6 + epoch / 100,
                                                    "val/share/auc": float("nan")}), tiny_module)
    assert tiny_module.task_active.tolist()[:2] == [1, 1] and "share" not in cb.stopped


def test_patience_below_one_is_refused():
    with pytest.raises(ValueError, match="task_patience"):
        TaskStopping(0)


def _table(n: int = 4000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 300, n)
    click = (rng.random(n) < 0.2 + 0.4 * (items % 2)).astype(np.int64)
    share = (rng.random(n) < 0.01).astype(np.int64)  # rare and unpredictable: only memorised ids to learn
    df = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, 50, n)], "item_id": [f"i{i}" for i in items],
                       "event_timestamp": pd.date_range("2026-01-01", periods=n, freq="min", tz="UTC"),
                       "x": rng.normal(size=n), "click": click, "share": share})
    df.attrs["mtlrec"] = {"declaration": {"tasks": [{"name": "click"}, {"name": "share"}]},
                          "features": {"categorical": ["user_id", "item_id"], "numeric": ["x"], "log1p": []}}
    return df


def test_famo_gives_a_stopped_tasks_step_share_to_the_others():
    """A rare task's loss is small, so FAMO (shares by weight / loss) gave it most of the step; stopped, it must
    give that share back rather than hold it while sending no gradient."""
    from models.balancers import build_balancer

    famo = build_balancer("famo", 2, [1.0, 1.0])
    losses = torch.tensor([0.5, 0.05], requires_grad=True)
    famo.combine(gate(losses, torch.tensor([1.0, 1.0])))
    assert famo.weights()[1] > 5 * famo.weights()[0]
    famo.combine(gate(losses, torch.tensor([1.0, 0.0]))).backward()
    assert losses.grad[1] == 0 and famo.weights()[1] == 0
    assert famo.weights()[0] == pytest.approx(2.0)  # the whole step: n_tasks x loss_weight over the one task


def test_training_with_task_patience_stops_the_task_that_has_peaked_and_says_so(tmp_path):
    cfg = load_config("shared_bottom", ["train.max_epochs=6", "train.batch_size=256", "train.ema=false",
                                        "train.patience=6", "train.task_patience=1", "eval.monitor=click/auc"])
    meta = train(cfg, "<table>", tmp_path / "m", progress=False, table=_table())
    stopped = meta["training"]["stopped_tasks"]
    assert set(stopped) <= {"click", "share"} and "share" in stopped, stopped
    assert all(0 <= epoch < 6 for epoch in stopped.values())
    off = train(load_config("shared_bottom", ["train.max_epochs=1", "train.batch_size=256", "train.ema=false"]),
                "<table>", tmp_path / "off", progress=False, table=_table())
    assert off["training"]["stopped_tasks"] == {}

