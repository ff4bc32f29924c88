"""Where a training step's time goes: the default recipe on the embedded data, split by part.

Trains the default model (``--config``, default ``mmoe`` with FAMO) through ``models.training.train.train`` on a
dataset's Feast training set (``data/synth`` by default, built if missing) for ``--epochs`` epochs, with
timers around each part of the loop: fetching the batch (data movement), the training forward pass and
loss, the backward pass, the optimiser step, the balancer's extra work after the step (FAMO's
re-measuring forward pass), the weight average's update, Lightning's ``self.log`` calls, and validation
once per epoch. Prints ms per step for each part, the share of the step, and training samples/s (steps x
batch over the time spent in training steps, validation excluded).

``--code DIR`` imports ``models`` from another checkout (``git worktree add /tmp/before <rev>``) so the loop
before and after a change is measured by the same script on the same machine in one run:

    .venv/bin/python benchmarks/train_loop.py --code /tmp/before --label before
    .venv/bin/python benchmarks/train_loop.py --label after
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Timers:
    """Exclusive times: a part called inside another (the forward pass inside the optimiser step's closure,
    under automatic optimisation) counts for itself only, not also for its caller."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inner: list[float] = []

    def timed(self, part: str, fn, *args, **kwargs):
        self._inner.append(0.0)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - t0
            inner = self._inner.pop()
            self.seconds[part] += elapsed - inner
            self.calls[part] += 1
            if self._inner:
                self._inner[-1] += elapsed

    def wrap(self, owner, name: str, part):
        original = getattr(owner, name, None)
        if original is None:
            return
        timers = self

        def timed(*args, **kwargs):
            return timers.timed(part() if callable(part) else part, original, *args, **kwargs)

        setattr(owner, name, timed)


def code_module(name: str, flat: str):
    """A module of the checkout under test: by its room, or by its flat name in a checkout from before the rooms."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return importlib.import_module(flat)


def instrument(t: Timers) -> None:
    """Timers around the loop's parts (names an older checkout lacks are skipped)."""
    import torch
    from lightning.pytorch.callbacks import EMAWeightAveraging

    data = code_module("models.data.resident", "models.data")
    MTLModule = code_module("models.training.lightning_module", "models.module").MTLModule

    state = {"after_step": False}
    t.wrap(MTLModule, "_losses", lambda: "balancer (FAMO re-measure)" if state["after_step"] else "forward + loss")
    original_after = MTLModule.on_train_batch_end

    def after(self, *args, **kwargs):
        state["after_step"] = True
        try:
            return t.timed("balancer (update)", original_after, self, *args, **kwargs)
        finally:
            state["after_step"] = False

    MTLModule.on_train_batch_end = after
    t.wrap(MTLModule, "backward", "backward")
    t.wrap(torch.optim.AdamW, "step", "optimiser step")
    t.wrap(EMAWeightAveraging, "on_train_batch_end", "weight average")
    try:
        WeightAverage = code_module("models.training.averaging", "models.averaging").WeightAverage
    except ImportError:  # a checkout without its own weight average
        pass
    else:
        t.wrap(WeightAverage, "on_train_batch_end", "weight average")
    t.wrap(MTLModule, "log", "logging")
    t.wrap(MTLModule, "log_dict", "logging")
    t.wrap(MTLModule, "on_train_epoch_end", "logging")  # where a checkout that keeps step rows logs them
    original_iter = data.IndexBatches.__iter__

    def batches(self):
        it = original_iter(self)
        while True:
            try:
                batch = t.timed("data (batch fetch)", next, it)
            except StopIteration:
                return
            yield batch

    data.IndexBatches.__iter__ = batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "synth")
    ap.add_argument("--config", default="mmoe")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--code", type=Path, help="import models from this checkout instead")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from flows.cli.common import ensure_training_set

    if not (args.data / "interactions.parquet").exists():
        from flows.data.synth import SynthConfig, generate

        generate(args.data, SynthConfig())
    ensure_training_set(args.data)
    if args.code:  # the training code under test comes from there; the data and Feast from this checkout
        for name in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
            del sys.modules[name]
        sys.path.insert(0, str(args.code.resolve()))
    import lightning as L
    import torch

    from models.config import load_config

    load_training_table = code_module("models.data.training_table", "models.table").load_training_table
    train = code_module("models.training.train", "models.train").train

    timers = Timers()
    instrument(timers)

    class Clock(L.Callback):
        def __init__(self):
            self.fit = self.valid = 0.0
            self.steps = 0
            self.batch = 0

        def on_train_start(self, trainer, module):
            self._t = time.perf_counter()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batch = max(self.batch, len(batch[0]))

        def on_validation_epoch_start(self, trainer, module):
            self._v = time.perf_counter()

        def on_validation_end(self, trainer, module):
            self.valid += time.perf_counter() - self._v

        def on_train_end(self, trainer, module):
            self.fit = time.perf_counter() - self._t
            self.steps = trainer.global_step

    clock = Clock()
    table = load_training_table(args.data)
    cfg = load_config(args.config, [f"train.max_epochs={args.epochs}", "train.patience=100", *args.overrides])
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        meta = train(cfg, args.data, Path(tmp) / "model", progress=False, table=table, callbacks=[clock])
    training = clock.fit - clock.valid
    rows, accounted = [], 0.0
    for part in ("data (batch fetch)", "forward + loss", "backward", "optimiser step", "balancer (FAMO re-measure)",
                 "balancer (update)", "weight average", "logging"):
        s = timers.seconds.get(part, 0.0)
        accounted += s
        rows.append((part, s))
    rows.append(("other (Lightning's loop and hooks)", max(training - accounted, 0.0)))
    steps = max(clock.steps, 1)
    out = {"label": args.label, "code": str(args.code or ROOT), "steps": clock.steps, "batch": clock.batch,
           "epochs": meta["training"]["epochs"], "threads": torch.get_num_threads(),
           "train_seconds": round(training, 2), "validation_seconds": round(clock.valid, 2),
           "samples_per_s": round(clock.steps * clock.batch / training) if training > 0 else None,
           "parts_ms_per_step": {p: round(1000 * s / steps, 3) for p, s in rows},
           "validation_share_of_epoch": round(clock.valid / clock.fit, 3) if clock.fit else None}
    print(f"{args.label or 'run'}: {clock.steps} steps of {clock.batch} rows, {torch.get_num_threads()} threads; "
          f"{out['samples_per_s']} samples/s in training steps; validation {clock.valid:.1f} s "
          f"({100 * (out['validation_share_of_epoch'] or 0):.0f}% of the fit)")
    print("| part | ms per step | share |\n|---|---:|---:|")
    for p, s in rows:
        print(f"| {p} | {1000 * s / steps:.2f} | {100 * s / training:.0f}% |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
