"""No host read per training step, for every balancer: the count of reads of a tensor's value by the host
during training does not grow with the number of steps.

On a GPU every such read (``Tensor.item``, ``.cpu()``, ``.tolist()``, ``.numpy()``, a Python ``if``,
``float`` or ``int`` on a tensor) waits for the queue of kernels the host has launched ahead to drain.
The CPU cannot tell a device tensor from a host one, so every read is counted here, except Adam's of its
step counter, which it keeps on the host unless ``capturable`` (never a device sync).
Per-epoch reads (validation metrics, early stopping, the epoch's logged means, the weight trace's one
copy per epoch) are the same for 5 steps and for 25.
"""

from __future__ import annotations

import sys
from collections import Counter

import lightning as L
import pytest
import torch

from models.balancers import BALANCERS
from models.config import load_config
from models.training.train import train
from tests.models.test_calibration import _table

# Adam's step counter is a host tensor unless capturable: its reads are no device sync. (torch.optim.swa_utils,
# where AveragedModel tests its device-side counter, is not excluded.)
HOST_STEP_COUNTER = {"torch.optim.adam", "torch.optim.adamw", "torch.optim.optimizer"}
READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class _Counting(L.Callback):
    def __init__(self, counts: Counter):
        self.counts = counts

    def on_train_start(self, trainer, module):
        self.counts["on"] = 1

    def on_train_end(self, trainer, module):
        self.counts["on"] = 0


@pytest.fixture
def count_reads(monkeypatch):
    counts: Counter = Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _original=original, _name=name, **kwargs):
            if counts["on"]:
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller not in HOST_STEP_COUNTER:
                    counts[_name] += 1
                    counts["total"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return counts


@pytest.mark.parametrize("balancer", sorted(BALANCERS))
def test_host_reads_do_not_grow_with_the_steps(balancer, count_reads, tmp_path):
    table = _table(n=8000)
    totals = {}
    for steps in (5, 25):  # 25 > log_every_n_steps: a logged step value would be read at step 10 and 20
        count_reads.clear()
        cfg = load_config("mmoe", [f"balancer.name={balancer}", "train.max_epochs=1", "train.batch_size=128",
                                   f"train.limit_train_batches={steps}", "train.ema=0.9", "model.embedding_dim=4",
                                   "model.params={n_experts: 2, expert: [8], tower: [4]}"])
        train(cfg, "<table>", tmp_path / f"m{steps}", progress=False, table=table,
              callbacks=[_Counting(count_reads)])
        totals[steps] = count_reads["total"]
    assert totals[25] == totals[5], f"{balancer}: {totals[5]} host reads in 5 steps, {totals[25]} in 25"
