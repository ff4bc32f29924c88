"""Training throughput of MMoE through the project's own path (``models.training.train.train``), as the GPU needs it.

The model is the reference shape: 8 experts of MLP 256-128, embedding dim 16, 20 categorical and 60
numeric features, tasks click and purchase (ESMM-style). Rows are synthetic with planted logistic
structure, so AUC is meaningful for the bf16-against-fp32 check. Samples/s counts only the training
batches of epochs after the first (compile and allocator warm-up excluded), timed between the first and
last batch with one device synchronisation each.

One run reports, as one JSON file (``--json``) and a printed table:

- bf16-mixed (the GPU default) at each ``--batch``, eager and each ``--compile`` mode;
- fp32 at the first batch size, and the AUC gap to bf16 on the same validation rows, both tasks;
- a row per ``--balancers`` at the first batch size, as a ratio to fixed weights;
- peak device memory (host RSS on the CPU) and the time from the call to the first step;
- ``--stream-rows N``: one streamed epoch (``data.stream=true``) over a generated N-row parquet, with
  samples/s and peak host and device memory.

Needs only torch, Lightning, numpy, pandas and pyarrow (``tests/models/test_gpu_path.py`` runs it with every
other package hidden, ``benchmarks/gpu_machine.py``):

    python benchmarks/train_throughput.py                                  # CPU: 200k rows, batch 4096
    python benchmarks/train_throughput.py --rows 4000000 --batch 16384 65536 --compile default \
        --fp32 --balancers fixed uncertainty dwa famo gradnorm pcgrad --stream-rows 100000000 --json gpu.json
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
from models.training.train import train

N_CAT, N_NUM = 20, 60
TASKS = "tasks=[{name: click, type: binary}, {name: purchase, type: binary, sample_space: click}]"


def make_table(rows: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cards = np.geomspace(10, 100_000, N_CAT).astype(int)
    data: dict[str, np.ndarray] = {}
    logit = np.full(rows, -2.0)
    for j, card in enumerate(cards):
        codes = rng.zipf(1.3, rows) % card
        effect = np.random.default_rng(1000 + j).normal(0, 0.5, card)  # the same effects in every chunk
        logit += effect[codes] / np.sqrt(N_CAT / 4)
        data[f"c{j}"] = codes.astype(np.int64)
    num = rng.normal(0, 1, (rows, N_NUM)).astype(np.float32)
    w = np.random.default_rng(999).normal(0, 0.3, N_NUM)
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


def write_stream_table(path: Path, rows: int, chunk: int = 2_000_000) -> Path:
    """An N-row training parquet written a chunk at a time (never all in memory), with the metadata the
    streamed path reads; timestamps continue across chunks so the time split holds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {"declaration": None, "features": {"categorical": [f"c{j}" for j in range(N_CAT)],
                                              "numeric": [f"n{j}" for j in range(N_NUM)], "log1p": []}}
    writer = None
    start = pd.Timestamp("2026-01-01", tz="UTC")
    for i, at in enumerate(range(0, rows, chunk)):
        df = make_table(min(chunk, rows - at), seed=i)
        df["event_timestamp"] = start + pd.to_timedelta(np.arange(at, at + len(df)), unit="s")
        table = pa.Table.from_pandas(df, preserve_index=False)
        if writer is None:
            schema = table.schema.with_metadata({b"mtlrec": json.dumps(meta).encode()})
            writer = pq.ParquetWriter(path, schema)
        writer.write_table(table.cast(writer.schema), row_group_size=min(chunk, 1_000_000))
    writer.close()
    return path


class Throughput(L.Callback):
    def __init__(self):
        self.epochs: list[tuple[int, float]] = []
        self._t = 0.0
        self._n = 0
        self.called = time.perf_counter()
        self.first_step_s: float | None = None

    def _sync(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer, module):
        self._n = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.called
        if batch_idx == 0:
            self._sync(module)
            self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._n += batch[0].shape[0]
        if batch_idx == trainer.num_training_batches - 1:
            self._sync(module)
            self.epochs.append((self._n, time.perf_counter() - self._t))


def run(data, batch: int, lr: float, epochs: int, precision: str, compile_mode: str = "eager",
        balancer: str = "fixed", extra: list[str] | None = None) -> dict:
    """One training run; ``data``: a DataFrame (resident) or a parquet path (``extra`` may stream it)."""
    compiled = "false" if compile_mode == "eager" else ("true" if compile_mode == "default" else compile_mode)
    cfg = load_config("mmoe", [
        f"train.batch_size={batch}", f"train.lr={lr}", f"train.max_epochs={epochs}", "train.patience=100",
        f"train.precision={precision}", f"train.compile={compiled}", "train.deterministic=false",
        f"data.features.categorical={[f'c{j}' for j in range(N_CAT)]}",
        f"data.features.numeric={[f'n{j}' for j in range(N_NUM)]}",
        "data.split.valid_fraction=0.05", "data.split.test_fraction=0.0", TASKS, f"balancer.name={balancer}",
        "train.task_checkpoints=1", *(extra or []),
    ])
    meter = Throughput()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    table = data if isinstance(data, pd.DataFrame) else None
    with tempfile.TemporaryDirectory(prefix="mtlrec-tput-") as out:
        meta = train(cfg, "<in-memory>" if table is not None else data, out, progress=False, table=table,
                     callbacks=[meter])
    steady = meter.epochs[1:] or meter.epochs
    samples = sum(n for n, _ in steady)
    seconds = sum(t for _, t in steady)
    valid = meta["metrics"]["valid"]
    return {"batch": batch, "precision": meta["training"]["precision"], "compile": compile_mode,
            "balancer": balancer, "streamed": meta["training"]["streamed"],
            "samples_per_s": samples / seconds if seconds else None,
            "peak_device_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "peak_host_mb": peak_rss_mb(), "first_step_s": meter.first_step_s,
            "val_auc_click": valid.get("click/auc"), "val_auc_purchase": valid.get("purchase/auc"),
            "epochs_timed": len(steady), "train_rows": meta["data"]["rows"]["train"],
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def lr_for(batch: int) -> float:
    return 2e-3 * max(1.0, (batch / 4096) ** 0.5)  # larger batches need a larger step (sqrt scaling)


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4_000_000 if gpu else 200_000)
    ap.add_argument("--batch", type=int, nargs="+", default=[16384, 65536] if gpu else [4096])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                    help="also torch.compile the architecture: default, max-autotune-no-cudagraphs, ...")
    ap.add_argument("--fp32", action="store_true", help="also train in fp32 at the first batch size (AUC gap)")
    ap.add_argument("--balancers", nargs="*", default=[], help="a row each at the first batch size")
    ap.add_argument("--stream-rows", type=int, default=0, help="one streamed epoch over a parquet of N rows")
    ap.add_argument("--stream-dir", type=Path, help="where the streamed parquet goes (default: a temp dir)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    t = time.perf_counter()
    df = make_table(args.rows)
    print(f"table: {args.rows:,} rows, {N_CAT} categorical + {N_NUM} numeric features ({time.perf_counter() - t:.1f}s)")
    precision = "auto"  # bf16-mixed on a GPU, fp32 on the CPU
    runs = []

    def record(r: dict, what: str) -> dict:
        r["run"] = what
        runs.append(r)
        print(json.dumps(r), flush=True)
        return r

    first = args.batch[0]
    for b in args.batch:
        for mode in ["eager", *args.compile]:
            record(run(df, b, lr_for(b), args.epochs, precision, mode), f"batch {b} {mode}")
    out = {"torch": torch.__version__, "lightning": L.__version__, "rows": args.rows, "runs": runs}
    if args.fp32:
        base = next(r for r in runs if r["batch"] == first and r["compile"] == "eager")
        f = record(run(df, first, lr_for(first), args.epochs, "32-true"), f"batch {first} fp32")
        out["auc_gap_vs_fp32"] = {task: base[f"val_auc_{task}"] - f[f"val_auc_{task}"]
                                  for task in ("click", "purchase")}
    if args.balancers:
        rows = {name: record(run(df, first, lr_for(first), args.epochs, precision, balancer=name),
                             f"balancer {name}") for name in args.balancers}
        fixed = rows.get("fixed") or next(r for r in runs if r["batch"] == first and r["compile"] == "eager")
        out["balancer_ratio_to_fixed"] = {n: fixed["samples_per_s"] / r["samples_per_s"] for n, r in rows.items()}
    if args.stream_rows:
        with tempfile.TemporaryDirectory(prefix="mtlrec-stream-", dir=args.stream_dir) as tmp:
            t = time.perf_counter()
            path = write_stream_table(Path(tmp) / "training.parquet", args.stream_rows)
            out["stream_table_s"] = time.perf_counter() - t
            r = record(run(str(path), first, lr_for(first), 1, precision, extra=["data.stream=true"]),
                       f"streamed {args.stream_rows:,} rows")
            resident = next(x for x in runs if x["batch"] == first and x["compile"] == "eager")
            out["stream_ratio_to_resident"] = resident["samples_per_s"] / r["samples_per_s"]
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print("\n| run | device | precision | samples/s | peak device MB | peak host MB | first step s | "
          "AUC click | AUC purchase |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        dev = f"{r['peak_device_mb']:,.0f}" if r["peak_device_mb"] is not None else "-"
        print(f"| {r['run']} | {r['device']} | {r['precision']} | {r['samples_per_s']:,.0f} | {dev} | "
              f"{r['peak_host_mb']:,.0f} | {r['first_step_s']:.1f} | {r['val_auc_click']:.4f} | "
              f"{r['val_auc_purchase']:.4f} |")
    for key in ("auc_gap_vs_fp32", "balancer_ratio_to_fixed", "stream_ratio_to_resident"):
        if key in out:
            print(f"{key}: {json.dumps(out[key])}")


if __name__ == "__main__":
    main()
