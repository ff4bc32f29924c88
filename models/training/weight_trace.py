"""Every optimiser step's task weights, in ``task_weights.csv``, without a host sync per step.

Lightning's own ``weight/<task>`` logging reaches the loggers only every
``log_every_n_steps`` steps, and logging every step through it would copy a
scalar to the host after every step, which on a GPU stalls the step queue.
Here each step's weights stay where the balancer computed them (a detached
tensor, on the GPU when training runs there); once per epoch they are stacked
and copied to the host in one transfer, then appended to the CSV. A callback
rather than code in the module, so that automatic and manual optimisation are
traced alike and the module stays unaware of files.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("mtlrec.train")

FILENAME = "task_weights.csv"


class WeightTrace(L.Callback):
    """Appends ``step,epoch,<task>...`` rows to ``path``: one per optimiser step, flushed once per epoch.

    ``step`` is ``trainer.global_step`` after the step (1 for the first one),
    the count checkpoints and resumed runs go by. Its weights are the
    balancer's once that step's batch is over: after the optimiser step and
    after the balancer's own per-batch update (FAMO's ``after_step``), so
    within an epoch they are the weights the next step starts from. Read
    after the step rather than before it because only then does the row show
    what the step did to the weights, and the last row is the trained model's.
    An epoch-end update (DWA) comes after the epoch's last row and first
    shows in the next epoch's first row.

    The module's ``weight/<task>`` logs (``metrics.csv``, TensorBoard) are
    epoch means, read inside ``training_step``: before the step under
    automatic optimisation, after it under manual optimisation.

    A step is only noted at batch end and its weights are read at the next
    hook that follows (the next batch's start, or the end of the epoch, of
    training or of a failed run): the module's own ``on_train_batch_end``
    (FAMO's logit update) runs after every callback's, and what is read is
    then final for the step. FAMO's weights are its effective multipliers,
    set in the step itself, so its step k is row k + 1 here, as under manual
    optimisation.

    Only global rank 0 records and writes: under DDP every rank takes the
    same steps, and a file written by one process needs no locking.
    """

    def __init__(self, path: str | Path, task_names: list[str] | None = None):
        self.path = Path(path)
        self.task_names = list(task_names) if task_names is not None else None
        self._rows: list[tuple[int, int, torch.Tensor]] = []
        self._pending: tuple[int, int] | None = None  # (step, epoch) whose weights are not read yet
        self._last_step: int | None = None

    # ---- Lightning hooks ----------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._rows, self._pending, self._last_step = [], None, trainer.global_step
        if not trainer.is_global_zero:
            return
        if self.task_names is None:
            self.task_names = [t.name for t in module.tasks]
        resumed = trainer.global_step > 0
        if resumed and self.path.exists():
            return  # a resumed run continues its own file
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:  # a fresh run into the same directory starts a fresh file
            csv.writer(f).writerow(["step", "epoch", *self.task_names])

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._read_pending(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if step == self._last_step:
            return  # no optimiser step in this batch (gradient accumulation): no row
        self._last_step = step
        self._pending = (step, trainer.current_epoch)

    def on_train_epoch_end(self, trainer, module) -> None:
        self._read_pending(module)
        self.flush()

    def on_train_end(self, trainer, module) -> None:
        self._read_pending(module)
        self.flush()

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        # Keep what the crashed run recorded; a failure here (a broken CUDA context) must not hide the original.
        try:
            self._read_pending(module)
            self.flush()
        except Exception as e:  # noqa: BLE001
            log.warning("task weights of the last epoch were not written to %s: %s", self.path, e)

    # ---- recording --------------------------------------------------------------------------
    def _read_pending(self, module) -> None:
        if self._pending is None:
            return
        step, epoch = self._pending
        self._pending = None
        # clone: a balancer may hand out a buffer it later changes in place; stays on the device, no sync
        self._rows.append((step, epoch, module.balancer.weights().detach().clone()))

    def flush(self) -> None:
        """Write the recorded rows: the one host transfer of the epoch."""
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        values = torch.stack([w.float() for _, _, w in rows]).cpu().tolist()
        with self.path.open("a", newline="") as f:
            writer = csv.writer(f)
            for (step, epoch, _), w in zip(rows, values):
                writer.writerow([step, epoch, *w])
