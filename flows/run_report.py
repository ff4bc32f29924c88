"""What one pipeline run leaves behind for people: a summary file, an NDCG@K plot, and artifacts pointing at them.

The gate already writes its own ``gate-<tag>.md|json`` into the report
directory (``flows/stages/promote.py``); this adds the run summary and the plot
beside them, and publishes a markdown artifact that lists every file and a
link artifact to the gate report, so the Prefect UI leads to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact


def ndcg_plot(rankers: dict[str, dict[str, float]], k: int, path: Path) -> Path | None:
    """Bars of NDCG@K per ranker (the model, each objective alone, popularity, random)."""
    metric = f"ndcg@{k}"
    names = [n for n, m in rankers.items() if metric in m]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names)), 3.2))
    ax.bar(names, [rankers[n][metric] for n in names], color=["C0" if n == "model" else "C7" for n in names])
    ax.set_ylabel(f"NDCG@{k} (holdout)")
    ax.tick_params(axis="x", rotation=30, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_markdown(summary: dict[str, Any]) -> str:
    d = summary["decision"]
    verdict = "promoted" if summary["promoted"] else ("already production" if d.get("already_production")
                                                      else "not promoted")
    lines = [f"# Pipeline run: `{summary['tag']}` {verdict}", "",
             f"- data: `{summary['data']}`", f"- config: `{summary['config']}` {summary['overrides']}",
             f"- production now: `{summary['production']}`",
             f"- from cache: {', '.join(summary['cached']) or 'nothing'}"]
    if d.get("delta") is not None:
        lines.append(f"- NDCG@{d['k']}: candidate {d['candidate_ndcg']:.4f} vs {d['reference']} "
                     f"{d['reference_ndcg']:.4f} (gain {d['delta']:+.4f}, interval "
                     f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}])")
    lines += [f"- {r}" for r in d.get("reasons", [])]
    lines += ["", "| file | path |", "|---|---|"] + [f"| {n} | `{p}` |" for n, p in summary["files"].items()]
    return "\n".join(lines)


@task(name="publish-report", retries=0, timeout_seconds=300)
def publish_report(summary: dict[str, Any], rankers: dict[str, dict[str, float]], report_dir: str) -> dict[str, Any]:
    """Write the summary JSON and the plot; publish them as artifacts; return the summary with its file paths."""
    out = Path(report_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stem = summary["tag"].replace(":", "-")
    files: dict[str, str] = {}
    gate_md = out / f"gate-{stem}.md"
    if gate_md.is_file() and not summary["decision"].get("already_production"):
        files["gate report"] = str(gate_md)
        files["gate numbers"] = str(out / f"gate-{stem}.json")
    plot = ndcg_plot(rankers, summary["decision"].get("k") or 10, out / f"ndcg-{stem}.png")
    if plot:
        files["NDCG plot"] = str(plot)
    if summary.get("data_docs"):
        files["Data Docs"] = summary["data_docs"]
    summary_path = out / f"run-{stem}.json"
    files["run summary"] = str(summary_path)
    summary = {**summary, "files": files, "report": files.get("gate report", str(summary_path))}
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    create_markdown_artifact(key="pipeline-report", markdown=summary_markdown(summary),
                             description="what this run decided and where its report files are")
    create_link_artifact(key="pipeline-report-file", link=Path(summary["report"]).as_uri(),
                         link_text=Path(summary["report"]).name,
                         description="the gate report (or run summary) written for this run")
    if plot:
        create_link_artifact(key="ndcg-plot", link=Path(plot).as_uri(), link_text=Path(plot).name,
                             description="NDCG@K of the model, each objective and the baselines on the holdout")
    return summary
