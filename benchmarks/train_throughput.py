"""Training throughput of MMoE through the project's own path (Lightning module + data module).

The model is the issue's reference shape: 8 experts of MLP 256-128, embedding
dim 16, 20 categorical and 60 numeric features, tasks click and purchase
(ESMM-style). Rows are synthetic with planted logistic structure, so AUC is
meaningful for the bf16-vs-fp32 check. Samples/s counts only the training
batches of epochs after the first (compile and allocator warm-up excluded),
timed between the first and last batch with one device synchronisation each.

Needs only torch, Lightning, numpy and pandas:

    python benchmarks/train_throughput.py                        # CPU: 200k rows, batch 4096
    python benchmarks/train_throughput.py --rows 4000000 --batch 16384 65536 --compare-fp32   # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import peak_rss_mb
from models.config import load_config
from models.train import train

N_CAT, N_NUM = 20, 60


def make_table(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cards = np.geomspace(10, 100_000, N_CAT).astype(int)
    data: dict[str, np.ndarray] = {}
    logit = np.full(rows, -2.0)
    for j, card in enumerate(cards):
        codes = rng.zipf(1.3, rows) % card
        effect = rng.normal(0, 0.5, card)
        logit += effect[codes] / np.sqrt(N_CAT / 4)
        data[f"c{j}"] = codes.astype(np.int64)
    num = rng.normal(0, 1, (rows, N_NUM)).astype(np.float32)
    w = rng.normal(0, 0.3, N_NUM)
    logit += num @ w / np.sqrt(N_NUM / 8)
    for j in range(N_NUM):
        data[f"n{j}"] = num[:, j]
    p_click = 1 / (1 + np.exp(-logit))
    click = rng.random(rows) < p_click
    p_buy = 1 / (1 + np.exp(-(-1.5 + 0.8 * num[:, 0] - 0.5 * num[:, 1])))
    df = pd.DataFrame(data)
    df["user_id"] = (df["c0"].astype(str))
    df["item_id"] = (df["c19"].astype(str))
    df["event_timestamp"] = pd.date_range("2026-01-01", periods=rows, freq="s", tz="UTC")
    df["click"] = click.astype(np.int8)
    df["purchase"] = (click & (rng.random(rows) < p_buy)).astype(np.int8)
    return df


class Throughput(L.Callback):
    def __init__(self):
        self.epochs: list[tuple[int, float]] = []
        self._t = 0.0
        self._n = 0

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, module):
        self._n = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == 0:
            self._sync(module)
            self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._n += batch[0].shape[0]
        if batch_idx == trainer.num_training_batches - 1:
            self._sync(module)
            self.epochs.append((self._n, time.perf_counter() - self._t))


def run(df: pd.DataFrame, batch: int, lr: float, epochs: int, precision: str, compile_: bool) -> dict:
    cfg = load_config("mmoe", [
        f"train.batch_size={batch}", f"train.lr={lr}", f"train.max_epochs={epochs}", "train.patience=100",
        f"train.precision={precision}", f"train.compile={str(compile_).lower()}", "train.deterministic=false",
        f"data.features.categorical={[f'c{j}' for j in range(N_CAT)]}",
        f"data.features.numeric={[f'n{j}' for j in range(N_NUM)]}",
        "data.split.valid_fraction=0.05", "data.split.test_fraction=0.0",
        "tasks=[{name: click, type: binary}, {name: purchase, type: binary, sample_space: click}]",
        "balancer.name=fixed",
    ])
    meter = Throughput()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="mtlrec-tput-") as out:
        meta = train(cfg, "<in-memory>", out, progress=False, table=df, callbacks=[meter])
    steady = meter.epochs[1:] or meter.epochs
    samples = sum(n for n, _ in steady)
    seconds = sum(t for _, t in steady)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else peak_rss_mb())
    return {"batch": batch, "precision": meta["training"]["precision"], "samples_per_s": samples / seconds,
            "peak_mb": peak, "val_auc_click": meta["metrics"]["valid"]["click/auc"],
            "val_auc_purchase": meta["metrics"]["valid"]["purchase/auc"], "epochs_timed": len(steady),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4_000_000 if gpu else 200_000)
    ap.add_argument("--batch", type=int, nargs="+", default=[16384, 65536] if gpu else [4096])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the architecture")
    ap.add_argument("--compare-fp32", action="store_true", help="also train in fp32 and report the AUC gap")
    args = ap.parse_args()
    t = time.perf_counter()
    df = make_table(args.rows)
    print(f"table: {args.rows:,} rows, {N_CAT} categorical + {N_NUM} numeric features ({time.perf_counter() - t:.1f}s)")
    results = []
    for b in args.batch:
        lr = 2e-3 * max(1.0, (b / 4096) ** 0.5)  # larger batches need a larger step (sqrt scaling)
        r = run(df, b, lr, args.epochs, "auto", args.compile)
        if args.compare_fp32 and gpu:
            f = run(df, b, lr, args.epochs, "32-true", args.compile)
            r["fp32_val_auc_click"], r["fp32_samples_per_s"] = f["val_auc_click"], f["samples_per_s"]
            r["auc_gap_vs_fp32"] = r["val_auc_click"] - f["val_auc_click"]
        results.append(r)
        print(json.dumps(r))
    print(f"\n{'device':<24} {'batch':>7} {'precision':>10} {'samples/s':>12} {'peak MB':>9} {'val AUC click':>14}")
    for r in results:
        print(f"{r['device']:<24} {r['batch']:>7} {r['precision']:>10} {r['samples_per_s']:>12,.0f} "
              f"{r['peak_mb']:>9,.0f} {r['val_auc_click']:>14.4f}")


if __name__ == "__main__":
    main()
