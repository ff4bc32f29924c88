"""What would cost or break on a GPU, checked on the CPU: settings, precision, ranks, compiled weights."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.scoring.artifact import Scorer, read_meta
from models.balancers import build_balancer
from models.config import load_config
from models.data.resident import time_split
from models.balancers import check_precision
from models.training.train import train, world_size
from tests.models.test_calibration import _table

SMALL = ["train.max_epochs=1", "train.batch_size=256", "model.embedding_dim=4",
         "model.params={bottom: [16], tower: [8]}", "balancer.name=fixed"]


def test_more_than_one_device_is_ddp_whatever_the_strategy_is_called():
    assert world_size({"devices": 2, "strategy": "auto"}, "gpu") == 2
    assert world_size({"devices": 2, "strategy": "ddp_find_unused_parameters_true"}, "gpu") == 2
    assert world_size({"devices": [0, 1, 2], "strategy": "auto"}, "gpu") == 3
    assert world_size({"devices": 2, "num_nodes": 2}, "gpu") == 4
    assert world_size({"devices": 1, "strategy": "auto"}, "gpu") == 1
    assert world_size({"devices": "auto"}, "cpu") == 1


def test_a_gradient_surgery_balancer_is_refused_under_fp16_before_training():
    check_precision("pcgrad", "bf16-mixed")
    check_precision("famo", "16-mixed")
    for name in ("pcgrad", "gradnorm"):
        with pytest.raises(ValueError, match="grad scaler"):
            check_precision(name, "16-mixed")
    cfg = load_config("shared_bottom", [*SMALL, "balancer.name=gradnorm", "train.precision=16-mixed"])
    with pytest.raises(ValueError, match="grad scaler"):
        train(cfg, "<never read>", "/nonexistent", progress=False)


def test_a_compiled_run_writes_an_artifact_the_scorer_loads(tmp_path):
    """train.compile compiles the architecture in place: the weights keep their names (no ``_orig_mod.``),
    and the artifact scores as training evaluated it. (The eager backend: what is checked is the naming.)"""
    table = _table(n=3000)
    cfg = load_config("shared_bottom", [*SMALL, "train.compile={backend: eager}"])
    meta = train(cfg, "<table>", tmp_path / "m", progress=False, table=table)
    scorer = Scorer.load(tmp_path / "m")  # strict load
    assert not any("_orig_mod" in k for k in scorer.state_dict())
    rows = time_split(table, 0.1, 0.1)[2]
    from models.metrics import functional as metrics

    assert metrics.auc(scorer.predict(rows)["click"], rows["click"].to_numpy()) == pytest.approx(
        meta["metrics"]["test"]["click/auc"], abs=1e-6)
    assert read_meta(tmp_path / "m")["config"]["train"]["compile"] == {"backend": "eager"}


def test_validation_under_bf16_scores_in_fp32(tmp_path):
    """Trained under bf16 autocast, validated in fp32: the scores are as distinct as fp32's, not tied into a
    few hundred bf16 values."""
    table = _table(n=6000)
    cfg = load_config("shared_bottom", [*SMALL, "train.precision=bf16-mixed",
                                        "model.params={bottom: [32], tower: [8]}"])
    from models.training.lightning_module import MTLModule

    seen = {}
    original = MTLModule._stack

    def stack(outs):
        probs, labels = original(outs)
        seen.setdefault("click", probs["click"])
        return probs, labels

    MTLModule._stack = staticmethod(stack)
    try:
        train(cfg, "<table>", tmp_path / "m", progress=False, table=table)
    finally:
        MTLModule._stack = staticmethod(original)
    scores = seen["click"]
    assert len(np.unique(scores)) > 0.9 * len(scores)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, name: str, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    balancer = build_balancer(name, 3)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard: different losses
    for step in range(40):
        losses = torch.rand(3, generator=g) + 0.5
        balancer.combine(losses)
        if balancer.needs_after_step:
            balancer.after_step(losses * (0.9 + 0.1 * torch.rand(3, generator=g)))
        if step % 10 == 9:
            balancer.on_epoch_end(losses)
    out[rank] = balancer.state_dict()
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["famo", "dwa"])
def test_a_balancer_learns_the_same_state_on_every_rank(name):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(_free_port(), name, out), nprocs=2, join=True)
        states = [dict(out[0]), dict(out[1])]
    assert states[0].keys() == states[1].keys()
    learnt = [k for k in states[0] if k != "prev_losses"]  # FAMO's record of its own rank's last losses
    assert learnt
    for k in learnt:
        torch.testing.assert_close(states[0][k], states[1][k], msg=f"{name}.{k} differs across ranks")
