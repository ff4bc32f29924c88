"""``mtlrec benchmark``: every architecture (x balancer) on one dataset, several seeds, one report.

Each run trains through the project's own path (``models.train.train``) on
the dataset's Feast training set and is judged by ``models.holdout`` on the
same time-ordered holdout, beside popularity and random (and, on the
synthetic log, the generator's own probabilities: the oracle), under every
protocol ``models.holdout.evaluate`` applies: re-ranking each user's held-out
impressions, each held-out positive among 99 unshown items, and the full
catalogue when it is small. The report is one paper-style results table per
protocol (mean ± std over seeds, best value in bold, relative improvement of
the best model over the best baseline, each ranker's share of the oracle's
gain over random) and PNG plots: NDCG@10 by model, task-weight trajectories,
training curves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.config import CONFIG_DIR, load_config
from models.holdout import evaluate
from models.table import load_training_table
from models.train import train
from models.weight_trace import FILENAME as WEIGHT_TRACE

METRICS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50")
ARCHITECTURES = ("shared_bottom", "cross_stitch", "mmoe", "ple", "esmm", "gated")
BASELINES = ("popularity", "random")
REFERENCES = ("oracle",)  # an upper bound, not a baseline to beat


def run(data: Path | str, out: Path | str, *, configs=ARCHITECTURES, balancers=(None,), seeds=(0, 1),
        overrides: list[str] | None = None, inputs: dict | None = None, log=print) -> dict[str, Any]:
    """``inputs``: what ``models.holdout.evaluate`` needs beyond the table (item columns, context recompute,
    the generator's oracle), built by the caller from the feature repository; the learning core cannot
    import it (imports point down)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = load_training_table(data)
    inputs = inputs or {}
    runs: list[dict[str, Any]] = []
    protocols: dict[str, dict] = {}
    for config in configs:
        for balancer in balancers:
            for seed in seeds:
                extra = [f"seed={seed}"] + ([f"balancer.name={balancer}"] if balancer else []) + list(overrides or [])
                cfg = load_config(config, extra)
                name = f"{config}+{cfg['balancer']['name']}"
                art = out / "runs" / f"{name}-s{seed}"
                t = time.perf_counter()
                meta = train(cfg, data, art, progress=False, table=table)
                result = evaluate(art, table, seed=seed, **inputs)
                for pname, r in result["protocols"].items():
                    protocols.setdefault(pname, r["protocol"])
                runs.append({"model": name, "seed": seed, "seconds": time.perf_counter() - t,
                             "epochs": meta["training"]["epochs"], "artifact": str(art),
                             "rankers": result["rankers"], "tasks": result["tasks"],
                             "protocols": {k: r["rankers"] for k, r in result["protocols"].items()}})
                log(f"{name} seed {seed}: ndcg@10 {result['rankers']['model']['ndcg@10']:.4f} "
                    f"({time.perf_counter() - t:.0f}s)")
    by_protocol = {name: summarise(runs, name) for name in protocols}
    report = {"data": str(data), "protocol": protocols.get("rerank"), "protocols": protocols, "seeds": list(seeds),
              "overrides": list(overrides or []), "runs": runs, "summary": by_protocol["rerank"],
              "summaries": by_protocol}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))
    plots(runs, report["summary"], out)
    return report


def summarise(runs: list[dict[str, Any]], protocol: str = "rerank") -> dict[str, dict[str, list[float]]]:
    """``{ranker: {metric: [mean, std]}}`` over seeds, models and baselines alike, under one protocol."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for ranker, m in (r.get("protocols") or {"rerank": r["rankers"]})[protocol].items():
            key = r["model"] if ranker == "model" else ranker
            for metric in (*METRICS, "oracle_gap_share"):
                if metric in m:
                    values.setdefault(key, {}).setdefault(metric, []).append(m[metric])
        for task, t in r["tasks"].items():
            values.setdefault(r["model"], {}).setdefault(f"{task} AUC", []).append(t["auc"])
    return {k: {m: [float(np.mean(v)), float(np.std(v))] for m, v in ms.items()} for k, ms in values.items()}


def markdown(report: dict[str, Any]) -> str:
    split = report["protocol"] or {}
    lines = [f"Split: {split.get('split')}; test {split.get('test_from')} to {split.get('test_to')}, "
             f"{split.get('test_rows', 0):,} impressions of {split.get('users', 0):,} users; relevance: "
             f"{split.get('relevance')}; seeds {report['seeds']} (mean ± std)."
             + (f" Overrides: {report['overrides']}." if report["overrides"] else "")]
    for name, s in (report.get("summaries") or {"rerank": report["summary"]}).items():
        p = (report.get("protocols") or {}).get(name, split)
        lines += ["", f"### {name}", "", f"Candidates: {p.get('candidates')}"
                  + (f"; {p['positives']:,} positives" if "positives" in p else "") + ".", ""]
        lines += _table(s, with_auc=name == "rerank")
    lines += ["", "![NDCG@10 by model](ndcg_by_model.png)", "![task weights](task_weights.png)",
              "![training curves](training_curves.png)"]
    return "\n".join(lines) + "\n"


def _table(s: dict[str, dict[str, list[float]]], with_auc: bool) -> list[str]:
    models = [k for k in s if k not in BASELINES + REFERENCES]
    cols = [b for b in BASELINES + REFERENCES if b in s] + models
    rows = list(METRICS) + (["oracle_gap_share"] if "oracle" in s else [])
    rows += sorted({m for k in models for m in s[k] if m.endswith("AUC")}) if with_auc else []
    lines = ["| metric | " + " | ".join(cols) + " | best model vs best baseline |", "|---|" + "---|" * (len(cols) + 1)]
    for metric in rows:
        best = max((s[c][metric][0] for c in cols if metric in s[c] and c not in REFERENCES), default=None)
        cells = []
        for c in cols:
            if metric not in s[c]:
                cells.append("")
                continue
            mean, std = s[c][metric]
            text = f"{mean:.4f} ± {std:.4f}"
            cells.append(f"**{text}**" if mean == best else text)
        base = max((s[b][metric][0] for b in BASELINES if b in s and metric in s[b]), default=None)
        top = max((s[m][metric][0] for m in models if metric in s[m]), default=None)
        gain = f"{(top - base) / base:+.1%}" if base and top is not None else ""
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {gain} |")
    return lines


def plots(runs: list[dict[str, Any]], summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(names, [summary[n]["ndcg@10"][0] for n in names], yerr=[summary[n]["ndcg@10"][1] for n in names])
    ax.set_ylabel("NDCG@10 (holdout)")
    ax.tick_params(axis="x", rotation=30)
    lo = min(summary[n]["ndcg@10"][0] for n in names)
    ax.set_ylim(max(0.0, lo - 0.05), None)
    fig.tight_layout()
    fig.savefig(out / "ndcg_by_model.png", dpi=100)
    plt.close(fig)

    first = {}
    for r in runs:
        first.setdefault(r["model"], r)
    logs = {m: _csv_log(Path(r["artifact"])) for m, r in first.items()}
    traces = {m: _weight_trace(Path(r["artifact"])) for m, r in first.items()}
    fig, axes = plt.subplots(1, len(traces), figsize=(3.2 * len(traces), 3), squeeze=False)
    for ax, (m, df) in zip(axes[0], traces.items()):
        for c in df.columns.drop(["step", "epoch"], errors="ignore"):
            ax.plot(df["step"], df[c], label=c)
        ax.set_title(m, fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("task weight")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "task_weights.png", dpi=100)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for m, df in logs.items():
        column = "train/loss" if "train/loss" in df else "train/loss_epoch"  # runs logged before epoch-only logs
        if column in df:
            d = df[["epoch", column]].dropna()
            a.plot(d["epoch"], d[column], marker="o", label=m)
        if "val/fused/ndcg@10" in df:
            d = df[["epoch", "val/fused/ndcg@10"]].dropna()
            b.plot(d["epoch"], d["val/fused/ndcg@10"], marker="o", label=m)
    a.set_title("training loss")
    b.set_title("validation NDCG@10 (fused)")
    for ax in (a, b):
        ax.set_xlabel("epoch")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=100)
    plt.close(fig)


def _csv_log(artifact: Path) -> pd.DataFrame:
    files = sorted((artifact / "logs" / "csv").glob("version_*/metrics.csv"))
    return pd.read_csv(files[-1]) if files else pd.DataFrame()


def _weight_trace(artifact: Path) -> pd.DataFrame:
    """Every step's task weights (``models.weight_trace``): Lightning's own log keeps only every 10th step."""
    path = artifact / "logs" / WEIGHT_TRACE
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def available_configs() -> list[str]:
    return [p.stem for p in sorted(CONFIG_DIR.glob("*.yaml")) if p.stem != "base"]
