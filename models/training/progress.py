"""One line per training epoch: where the run is and about how long it has left.

Training can run for many minutes with nothing to show: `mtlrec train` (and anything that logs
``mtlrec.train`` at INFO) gets a line per epoch with the steps so far, the time spent, an upper bound on
the time left (the remaining epochs at the mean epoch time; early stopping may end it sooner) and the
monitored metric. The metric is read once per epoch from Lightning's epoch-level values, never per step.
"""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import Timer

log = logging.getLogger("mtlrec.train")


class EpochProgress(L.Callback):
    def __init__(self):
        self._start: float | None = None

    def on_train_start(self, trainer, module):
        self._start = time.monotonic()

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or self._start is None:
            return
        done = trainer.current_epoch + 1
        total = trainer.max_epochs or done
        elapsed = time.monotonic() - self._start
        left = elapsed / done * max(total - done, 0)
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining("train") if timer is not None else None
        if remaining is not None:  # train.max_time: the budget ends it sooner
            left = min(left, max(remaining, 0.0))
        monitor = next((c.monitor for c in trainer.callbacks if getattr(c, "monitor", None)), None)
        value = trainer.callback_metrics.get(monitor) if monitor else None
        shown = f", {monitor} {float(value):.4f}" if value is not None else ""
        log.info("epoch %d/%d: %d steps, %.0f s so far, at most about %.0f s left%s", done, total,
                 trainer.global_step, elapsed, left, shown)
