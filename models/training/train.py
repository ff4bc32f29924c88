"""Training entry point: ``python -m models.train --config C --data D --out O``.

Imports only torch, Lightning, numpy and pandas (never Prefect, Feast, GX or
BentoML), so it runs as is on a GPU machine that has nothing else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from models.scoring.artifact import code_version, fingerprint, save_artifact
from models.training.averaging import WeightAverage
from models.config import load_config, with_defaults
from models.scoring import calibration
from models.training import recipe
from models.balancers import check_precision, check_world_size
from models.data.resident import MTLDataModule
from models.metrics.multitask import mode
from models.data.inputs import check_embedding_dims, resolve_features
from models.training.lightning_module import MTLModule, NonFiniteLoss  # noqa: F401 - NonFiniteLoss: raised by training
from models.training.monitor import resolve_monitor
from models.data.streamed import StreamedDataModule, should_stream
from models.data.training_table import load_training_table, table_columns, table_metadata, training_file
from models.tasks import TaskSet
from models.training.progress import EpochProgress
from models.training.task_checkpoints import TaskCheckpoints, choose, label_counts
from models.training.task_stopping import TaskStopping
from models.training.weight_trace import FILENAME as WEIGHT_TRACE, WeightTrace

log = logging.getLogger("mtlrec.train")


def _device_settings(cfg: dict) -> tuple[str, str, str]:
    """(accelerator, precision, tensor device) from config and what the machine has."""
    t = cfg["train"]
    accelerator = t["accelerator"]
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = t["precision"]
    if precision == "auto":
        precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    resident = t["resident"]
    # Under DDP every rank is its own process (LOCAL_RANK set by Lightning's launcher) and keeps its table on its GPU.
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if accelerator == "gpu" and resident in ("auto", True) \
        else "cpu"
    return accelerator, precision, device


class _NoAdverts(logging.Filter):
    """Lightning advertises a cloud logger at every Trainer start; a run's output is for what the run did."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "\N{ELECTRIC LIGHT BULB} Tip:" not in str(record.msg)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())


def train(config: dict[str, Any], data: str | Path, out: str | Path, *, progress: bool = True,
          table=None, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Train one model from a config dict; write the artifact to ``out``; return its metadata."""
    t0 = time.perf_counter()
    out = Path(out)
    config = with_defaults(config)  # a hand-built dict gets base.yaml's defaults, checked like a file's
    seed = int(config["seed"])
    L.seed_everything(seed, workers=True, verbose=False)
    if config["train"]["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    accelerator, precision, device = _device_settings(config)
    tc = dict(config["train"])

    world = world_size(tc, accelerator)
    check_world_size(config["balancer"]["name"], world)  # before any data is loaded; MTLModule.setup checks too
    check_precision(config["balancer"]["name"], precision)
    max_snapshots, min_gain = _task_checkpoint_settings(tc)
    _max_time(tc["max_time"])  # a bad budget fails before any data is read

    dc = config["data"]
    model_cfg = config["model"]
    streamed = table is None and should_stream(training_file(data), dc["stream"])
    # The table's own declaration, feature lists and column names (from the parquet's schema, unless the table is
    # given), so that every setting naming a task, a feature or a metric is checked before a row is read.
    if table is None:
        info, columns = table_metadata(data), table_columns(data)
    else:
        info, columns = table.attrs.get("mtlrec") or {}, table.columns
    tasks = TaskSet.resolve(config["tasks"], info.get("declaration"), columns=columns)
    feats = resolve_features(dc["features"], info.get("features"), columns)
    check_embedding_dims(model_cfg["embedding_dims"], feats["categorical"], feats["numeric"],
                         binned=dc["numeric_bins"] != "none")
    monitor = resolve_monitor(config["eval"]["monitor"], tasks, config["eval"]["ks"])
    if not streamed:  # streamed: larger than memory, read a row group at a time (models/data/streamed.py)
        df = load_training_table(data) if table is None else table
    common = dict(batch_size=1, valid_fraction=dc["split"]["valid_fraction"],
                  test_fraction=dc["split"]["test_fraction"], device=device, seed=seed, log1p=feats.get("log1p"),
                  numeric_bins=dc["numeric_bins"], n_bins=dc["n_bins"])
    if streamed:
        dm = StreamedDataModule(training_file(data), tasks, feats["categorical"], feats["numeric"], **common,
                                chunk_rows=int(dc["stream_chunk_rows"]),
                                eval_rows=int(dc["stream_eval_rows"]))
    else:
        dm = MTLDataModule(df, tasks, feats["categorical"], feats["numeric"], **common)
    tasks = tasks.standardised(dm.target_stats)
    dm.spec.size_embeddings(model_cfg["embedding_dim"], model_cfg["embedding_dims"])
    tc = recipe.resolve(tc, dm.train_rows, accelerator, world_size=world)
    dm.use_batch_size(tc["batch_size"])
    fusion = config["eval"]["fusion"]
    log.info("recipe for %d training rows%s: %s; monitor %s", dm.train_rows, " (streamed)" if streamed else "",
             recipe.describe(tc, dm.train_rows), monitor)
    module = MTLModule(
        spec=dm.spec.to_dict(), tasks=tasks.to_config(), architecture=config["model"]["architecture"],
        arch_params=config["model"]["params"], balancer=config["balancer"]["name"],
        balancer_params=config["balancer"]["params"], embedding_dim=model_cfg["embedding_dim"],
        lr=tc["lr"], weight_decay=float(tc["weight_decay"]), grad_clip=float(tc["grad_clip"] or 0),
        ks=tuple(config["eval"]["ks"]), monitor=monitor, fusion=fusion, primary=tasks.primary,
        consistency=model_cfg["consistency"],
    )
    if tc["compile"]:
        # In place (nn.Module.compile): the parameters keep their names, so checkpoints, snapshots and the
        # artifact hold ``arch.*`` keys that the scorer loads, not ``arch._orig_mod.*``.
        module.arch.compile(**compile_options(tc["compile"]))

    direction = mode(monitor)
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", monitor=f"val/{monitor}", mode=direction, save_top_k=1,
                           filename="best", auto_insert_metric_name=False)
    # Every step's task weights; Lightning's weight/<task> logs (TensorBoard) are epoch means.
    callbacks = [ckpt, EarlyStopping(monitor=f"val/{monitor}", mode=direction, patience=int(tc["patience"])),
                 WeightTrace(out / "logs" / WEIGHT_TRACE), EpochProgress(), *(callbacks or [])]
    task_stopping = TaskStopping(int(tc["task_patience"])) if tc["task_patience"] not in (None, False, "off") \
        else None
    if task_stopping is not None and len(tasks) > 1:
        callbacks.append(task_stopping)
    task_ckpts = TaskCheckpoints() if max_snapshots > 1 and sum(t.type == "binary" for t in tasks) > 1 else None
    if task_ckpts is not None:  # before the weight average: it must see the weights validation scored
        callbacks.append(task_ckpts)
    if tc["ema"]:  # validation, the checkpoint and so the artifact hold the averaged weights
        # Parameters only: averaging the buffers would round the encoder's integer offsets and columns (a float
        # average copied back into int64), and the balancer's state is not the model's. No host read per step.
        callbacks.append(WeightAverage(tc["ema"]))
    if progress and sys.stderr.isatty():
        from lightning.pytorch.callbacks import RichProgressBar

        callbacks.append(RichProgressBar())
    trainer = L.Trainer(
        accelerator=accelerator, devices=tc["devices"], strategy=tc["strategy"], precision=precision,
        max_epochs=int(tc["max_epochs"]), max_time=_max_time(tc["max_time"]),
        limit_train_batches=tc["limit_train_batches"] or None,  # None: the whole epoch
        callbacks=callbacks, logger=_loggers(out / "logs"),
        gradient_clip_val=float(tc["grad_clip"] or 0) if module.automatic_optimization else None,
        deterministic=bool(tc["deterministic"]), num_sanity_val_steps=0,
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=10,
    )
    trainer.fit(module, datamodule=dm)
    if not trainer.is_global_zero:  # DDP: rank 0 alone evaluates and writes the artifact
        return {"rank": trainer.global_rank, "training": {"epochs": trainer.current_epoch}}
    base_epoch = None
    if ckpt.best_model_path:
        best = torch.load(ckpt.best_model_path, map_location=module.device, weights_only=True)
        module.load_state_dict(best["state_dict"])
        base_epoch = int(best["epoch"])
    members = {}
    if task_ckpts is not None and base_epoch is not None:
        members = choose(task_ckpts.history, base_epoch, label_counts(tasks, dm.valid_split.labels), max_snapshots,
                         min_gain)
    snapshots = {e: task_ckpts.snapshots[e] for e in members}
    if members:
        log.info("per-task checkpoints: the shared one is epoch %d; %s", base_epoch,
                 "; ".join(f"{', '.join(t)} from epoch {e}" for e, t in members.items()))
    # Calibrated on the validation split (models/scoring/calibration.py); both splits' metrics score what the
    # artifact will.
    valid = module.split_predictions(dm.val_dataloader(), snapshots, members)
    module.calibration = calibration.fit(module.tasks, *valid) if valid else calibration.Calibration()
    valid_metrics = module.evaluate_split(dm.val_dataloader(), valid)
    test_metrics = module.evaluate_split(
        dm.test_dataloader(), module.split_predictions(dm.test_dataloader(), snapshots, members)) \
        if len(dm.test_split) else {}
    meta = {
        "config": config, "tasks": tasks.to_config(), "primary": tasks.primary, "features": dm.spec.to_dict(),
        "declaration": info.get("declaration"), "fusion": {"method": fusion, "relevance": tasks.relevance()},
        "feature_service": info.get("feature_service") or config["feature_service"],
        "metrics": {"valid": valid_metrics, "test": test_metrics}, "calibration": module.calibration.to_dict(),
        "members": [{"epoch": e, "tasks": t} for e, t in members.items()],
        "data": {"path": str(data), "fingerprint": fingerprint(training_file(data)) if table is None else None,
                 "rows": {"train": dm.train_rows, "valid": len(dm.valid_split), "test": len(dm.test_split)},
                 "time_ranges": dm.time_ranges},
        "training": {"epochs": trainer.current_epoch, "best_checkpoint_score": _f(ckpt.best_model_score),
                     "recipe": {**{k: tc[k] for k in ("batch_size", "max_epochs", "lr", "patience", "ema")},
                                "max_time": tc["max_time"]},
                     "monitor": monitor, "streamed": streamed,
                     "stopped_tasks": dict(task_stopping.stopped) if task_stopping is not None else {},
                     "checkpoint_epoch": base_epoch,
                     "seconds": time.perf_counter() - t0, "accelerator": accelerator, "precision": precision,
                     "torch": torch.__version__, "lightning": L.__version__},
        "code_version": code_version(),
    }
    state = module.inference_state()
    for i, e in enumerate(members):
        state.update({f"members.{i}.{k}": v for k, v in snapshots[e].items()})
    save_artifact(out, state, meta)
    return meta


def _max_time(seconds):
    if seconds is None or seconds is False:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"train.max_time must be a number of seconds > 0 or null, not {seconds!r}")
    import datetime

    return datetime.timedelta(seconds=float(seconds))


def _loggers(where: Path) -> list:
    """The CSV log always; TensorBoard's where its package is installed (not on a bare GPU machine)."""
    from importlib.util import find_spec

    loggers = [CSVLogger(where, name="csv")]
    if find_spec("tensorboard") is not None or find_spec("tensorboardX") is not None:
        loggers.insert(0, TensorBoardLogger(where, name="tb"))
    return loggers


def world_size(tc: dict, accelerator: str) -> int:
    """How many processes train: Lightning runs DDP whenever it is given more than one device, whatever the
    strategy's name (``auto`` included), and the recipe scales the learning rate and rows per rank by it."""
    devices = tc.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif devices in ("auto", -1, "-1"):
        n = torch.cuda.device_count() if accelerator == "gpu" else 1
    else:
        n = int(devices)
    if str(tc.get("strategy", "auto")) in ("single_device", "dp"):
        return 1
    return max(n, 1) * int(tc.get("num_nodes", 1) or 1)


def compile_options(setting) -> dict:
    """``train.compile``: true (torch.compile's defaults), a mode (``max-autotune-no-cudagraphs``) or a dict of
    torch.compile's keyword arguments."""
    if setting is True:
        return {}
    if isinstance(setting, str):
        return {"mode": setting}
    if isinstance(setting, dict):
        return dict(setting)
    raise ValueError(f"train.compile must be true, false, a mode or a dict of torch.compile options, not {setting!r}")


def _task_checkpoint_settings(tc: dict) -> tuple[int, float]:
    n, gain = tc["task_checkpoints"], tc["task_checkpoint_gain"]
    if n is None or n is False or n == "off":
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"train.task_checkpoints must be a whole number of snapshots >= 1 (1: one shared "
                         f"checkpoint), not {n!r}")
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain >= 0:
        raise ValueError(f"train.task_checkpoint_gain must be a number of standard errors >= 0, not {gain!r}")
    return n, float(gain)


def _f(x) -> float | None:
    return None if x is None else float(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.train", description="Train a multi-task ranker.")
    ap.add_argument("--config", required=True, help="YAML config (a path, or a name under models/configs/)")
    ap.add_argument("--data", required=True, help="training table parquet, or a dataset directory")
    ap.add_argument("--out", required=True, help="artifact directory to write")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.max_epochs=1 (repeatable)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    cfg = load_config(args.config, args.overrides)
    meta = train(cfg, args.data, args.out, progress=not args.quiet)
    if meta.get("rank", 0):
        return 0
    summary = {k: v for k, v in meta["metrics"]["test" if meta["metrics"]["test"] else "valid"].items()
               if k.startswith("fused/") or k.endswith("/auc")}
    print(json.dumps({"artifact": str(args.out), "epochs": meta["training"]["epochs"],
                      "seconds": round(meta["training"]["seconds"], 1), **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
