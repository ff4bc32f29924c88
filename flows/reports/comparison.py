"""The report of ``mtlrec benchmark`` for people: one results table per protocol, and the plots.

Tables: mean ± std over seeds, the best value in bold, the relative improvement of the best model over the
best baseline, each ranker's share of the oracle's gain over random. Plots: NDCG@10 by model, task-weight
trajectories, training curves. The runs and their summary are ``models.evaluation.comparison``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from models.evaluation.comparison import BASELINES, METRICS, REFERENCES
from models.training.weight_trace import FILENAME as WEIGHT_TRACE


def write(report: dict[str, Any], out: Path | str) -> Path:
    """``report.md`` and its PNGs into ``out``, beside the runs' ``results.json``."""
    out = Path(out)
    (out / "report.md").write_text(markdown(report))
    plots(report["runs"], report["summary"], out)
    return out / "report.md"


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
    """Every step's task weights (``models.training.weight_trace``): Lightning's own log keeps only every 10th step."""
    path = artifact / "logs" / WEIGHT_TRACE
    return pd.read_csv(path) if path.exists() else pd.DataFrame()
