"""`mtlrec benchmark`: runs, a results table a reader can trust, and the plots."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from flows.data.synth import SynthConfig, generate


def test_benchmark_writes_table_and_plots(tmp_path):
    data = tmp_path / "d"
    generate(data, SynthConfig(n_users=200, n_items=80, n_interactions=12_000, days=8, seed=9))
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["benchmark", "--data", str(data), "--out", str(out), "--config", "shared_bottom",
                                   "--config", "mmoe", "--seed", "0", "--seed", "1",
                                   "--set", "train.max_epochs=1", "--set", "model.embedding_dim=4"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "results.json").read_text())
    assert len(report["runs"]) == 4 and report["protocol"]["test_rows"] > 0
    md = (out / "report.md").read_text()
    assert md.startswith("Split: time-ordered")
    sections = {part.split("\n", 1)[0]: part for part in md.split("### ")[1:]}
    assert set(sections) == {"rerank", "unshown-99", "catalogue"} == set(report["summaries"])
    for name, text in sections.items():
        header = next(line for line in text.splitlines() if line.startswith("| metric"))
        assert "popularity" in header and "oracle" in header and "mmoe+famo" in header, name
        assert "shared_bottom+famo" in header and "| oracle_gap_share |" in text, name
        rows = [line for line in text.splitlines() if line.startswith(("| ndcg@10", "| recall@50"))]
        assert len(rows) == 2 and all("**" in r and "±" in r for r in rows), name
        # The bold cell is the largest mean in its row, the oracle (a bound, not a contender) aside.
        s = report["summaries"][name]
        best = max((k for k in s if k != "oracle"), key=lambda k: s[k]["ndcg@10"][0])
        ndcg_row = next(r for r in rows if r.startswith("| ndcg@10"))
        assert f"**{s[best]['ndcg@10'][0]:.4f}" in ndcg_row, name
    assert "click AUC" in sections["rerank"] and "click AUC" not in sections["unshown-99"]
    for run in report["runs"]:  # what task_weights.png plots: one row per optimiser step
        trace = (Path(run["artifact"]) / "logs" / "task_weights.csv").read_text().splitlines()
        assert trace[0].startswith("step,epoch,click,purchase") and len(trace) > 2
    for png in ("ndcg_by_model.png", "task_weights.png", "training_curves.png"):
        assert (out / png).stat().st_size > 5_000


def test_task_weight_plot_without_a_weight_trace(tmp_path):
    """An artifact from before ``task_weights.csv`` existed: its panel stays empty, the report still plots."""
    from flows.reports.comparison import plots

    summary = {"old": {"ndcg@10": [0.2, 0.0]}, "popularity": {"ndcg@10": [0.1, 0.0]}}
    plots([{"model": "old", "artifact": str(tmp_path / "no-such-artifact")}], summary, tmp_path)
    assert (tmp_path / "task_weights.png").stat().st_size > 0
