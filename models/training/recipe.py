"""The default training recipe: batch size, epochs, learning rate and patience from the data's size.

Why a rule instead of fixed numbers: one fixed batch size and epoch count
gives a small log a few dozen optimiser steps, far too few for a multi-task
model, and under-uses a GPU on a large one. What a model needs is enough optimiser *steps*,
at a batch size the device runs well, with a learning rate that suits that
batch size. The rule:

- ``batch_size``: about ``rows / 128`` (so an epoch is at least ~128 steps),
  rounded down to a power of two, between 256 and 4096 on a CPU (16384 on a
  GPU, where small batches starve the device);
- ``max_epochs``: enough epochs for ``STEP_BUDGET`` optimiser steps, between
  2 and 30; early stopping on the validation metric ends a run sooner when it
  has stopped improving;
- ``lr``: 1e-3 at batch 512, growing with the square root of the batch size
  (2e-3 at 2048, 5.7e-3 at 16384), capped at 8e-3: larger batches take fewer,
  less noisy steps and need larger ones, or a rare task loses AUC;
- ``patience``: a fifth of the epochs, at least 3;
- ``ema``: the decay of an exponential moving average of the weights, which
  is what validation, checkpoints and the artifact use. It averages over
  about a sixth of the run's steps, at most ``EMA_HORIZON`` (500): decay
  ``1 - 1/horizon``; none for a run of under ``EMA_MIN_STEPS`` (1,000), which
  is still climbing, so that the average would lag it. Averaging
  the last few hundred steps smooths the noise of small batches, which a
  rare task feels most; its effect on each dataset is measured in
  ``benchmarks/README.md`` (the default recipe's table).

Any of them set to a number in the config is used as given. The resolved
recipe is recorded in the artifact (``model.json``: ``training.recipe``).
"""

from __future__ import annotations

import math
from typing import Any

STEP_BUDGET = 3000
ROWS_PER_STEP = 128  # rows / ROWS_PER_STEP is the batch size aimed at
BATCH_BOUNDS = {"cpu": (256, 4096), "gpu": (256, 16384)}
EPOCH_BOUNDS = (2, 30)
LR_AT_512, LR_MAX = 1e-3, 8e-3
MIN_PATIENCE = 3
EMA_HORIZON, EMA_SHARE = 500, 6  # at most 500 steps, else a sixth of the run's steps
EMA_MIN_STEPS = 1000  # shorter runs keep their last weights
AUTO = "auto"


def _pow2_floor(x: float) -> int:
    return 1 << max(int(math.floor(math.log2(max(x, 1.0)))), 0)


def batch_size(rows: int, accelerator: str) -> int:
    low, high = BATCH_BOUNDS["gpu" if accelerator == "gpu" else "cpu"]
    return int(min(max(_pow2_floor(rows / ROWS_PER_STEP), low), high))


def epochs(rows: int, batch: int) -> int:
    steps = max(math.ceil(rows / batch), 1)
    return int(min(max(math.ceil(STEP_BUDGET / steps), EPOCH_BOUNDS[0]), EPOCH_BOUNDS[1]))


def learning_rate(batch: int) -> float:
    return float(min(LR_AT_512 * math.sqrt(max(batch, 512) / 512), LR_MAX))


def patience(max_epochs: int) -> int:
    return int(max(MIN_PATIENCE, math.ceil(max_epochs / 5)))


def ema_decay(steps: int) -> float:
    """The averaging decay for a run of ``steps`` optimiser steps at most: 0 (no averaging) for a short run."""
    if steps < EMA_MIN_STEPS:
        return 0.0
    return 1.0 - 1.0 / min(EMA_HORIZON, steps // EMA_SHARE)


def resolve(train: dict[str, Any], rows: int, accelerator: str, world_size: int = 1) -> dict[str, Any]:
    """``train`` with every ``auto`` replaced by the rule's value for ``rows`` training rows.

    Under DDP each rank sees ``rows / world_size`` rows per epoch, and the batch size is per rank.
    """
    out = dict(train)
    per_rank = max(rows // max(world_size, 1), 1)
    if out.get("batch_size", AUTO) == AUTO:
        out["batch_size"] = batch_size(per_rank, accelerator)
    out["batch_size"] = int(out["batch_size"])
    if out.get("max_epochs", AUTO) == AUTO:
        out["max_epochs"] = epochs(per_rank, out["batch_size"])
    if out.get("lr", AUTO) == AUTO:
        out["lr"] = learning_rate(out["batch_size"] * max(world_size, 1))
    if out.get("patience", AUTO) == AUTO:
        out["patience"] = patience(int(out["max_epochs"]))
    ema = out.get("ema", AUTO)
    if ema == AUTO:
        out["ema"] = ema_decay(math.ceil(per_rank / out["batch_size"]) * int(out["max_epochs"]))
    elif ema is False or ema is None:
        out["ema"] = 0.0
    out["ema"] = float(out["ema"])
    if not 0.0 <= out["ema"] < 1.0:
        raise ValueError(f"train.ema must be auto, false or a decay in [0, 1), not {ema!r}")
    for key, kind in (("max_epochs", int), ("patience", int), ("lr", float)):
        out[key] = kind(out[key])
    return out


def describe(train: dict[str, Any], rows: int) -> str:
    steps = math.ceil(rows / train["batch_size"])
    ema = f", weights averaged (EMA decay {train['ema']:.4g})" if train.get("ema") else ""
    return (f"batch {train['batch_size']}, lr {train['lr']:.2g}, up to {train['max_epochs']} epochs "
            f"({steps} steps each, {steps * train['max_epochs']} at most), patience {train['patience']}{ema}")


DEFAULT_MONITOR = "mean_auc"


def monitor(name: str | None) -> str:
    """The validation metric early stopping and checkpointing follow; ``auto`` is ``DEFAULT_MONITOR``."""
    return DEFAULT_MONITOR if name in (None, AUTO) else str(name)
