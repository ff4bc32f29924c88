"""What one pipeline run leaves behind for people: a summary file, the gate's plot, and artifacts pointing at them.

The gate already writes its own ``gate-<tag>.md|json`` into the report
directory (``flows/stages/promote.py``); this adds the run summary and the plot
beside them, and publishes a markdown artifact that lists every file and a
link artifact to the gate report, so the Prefect UI leads to them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact


def gate_plot(decision: dict[str, Any], path: Path) -> Path | None:
    """The candidate's paired NDCG@K difference against each baseline, with its interval, around zero.

    Raw NDCG bars from 0 hide what decides: on a log where random ranking already scores .88, a model at
    .948 and popularity at .918 look alike. The gate decides on the per-user difference and its bootstrap
    interval, so that is what is drawn; a bar whose interval crosses the zero line is no measured gain.
    """
    rows = {name: d for name, d in (decision.get("differences") or {}).items()
            if d.get("delta") is not None and np.isfinite(d["delta"])}
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = decision.get("k") or (decision.get("config") or {}).get("k", 10)
    names = list(rows)
    deltas = np.array([rows[n]["delta"] for n in names])
    lo = np.array([rows[n]["ci"][0] for n in names])
    hi = np.array([rows[n]["ci"][1] for n in names])
    fig, ax = plt.subplots(figsize=(6.0, 0.8 + 0.6 * len(names)))
    y = np.arange(len(names))
    colours = ["C2" if low > 0 else ("C3" if high < 0 else "C7") for low, high in zip(lo, hi)]
    ax.barh(y, deltas, color=colours, height=0.5)
    ax.errorbar(deltas, y, xerr=[deltas - lo, hi - deltas], fmt="none", ecolor="black", capsize=4)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(y, [f"vs {n}\n({rows[n]['users']:,} users)" for n in names], fontsize=8)
    ax.set_xlabel(f"candidate - baseline: NDCG@{k}, mean over users, with its bootstrap interval")
    ax.set_title("promoted" if decision.get("promote") else "not promoted", fontsize=9)
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
def publish_report(summary: dict[str, Any], report_dir: str) -> dict[str, Any]:
    """Write the summary JSON and the plot; publish them as artifacts; return the summary with its file paths."""
    out = Path(report_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stem = summary["tag"].replace(":", "-")
    files: dict[str, str] = {}
    gate_md = out / f"gate-{stem}.md"
    if gate_md.is_file() and not summary["decision"].get("already_production"):
        files["gate report"] = str(gate_md)
        files["gate numbers"] = str(out / f"gate-{stem}.json")
    plot = gate_plot(summary["decision"], out / f"gate-{stem}.png")
    if plot:
        files["gate plot"] = str(plot)
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
        create_link_artifact(key="gate-plot", link=Path(plot).as_uri(), link_text=Path(plot).name,
                             description="the candidate's paired NDCG@K difference against popularity and "
                                         "production, with its interval")
    return summary
