"""A new user's first run, timed: fresh clone, ``make install``, ``make run`` to the printed answer.

Clones ``--source`` (default: this checkout's committed HEAD) into ``--work``, times ``make install``, then
``make run`` ``--repeats`` times (``make clean`` between, so each run generates its data, builds its
features and trains from nothing, as on a fresh clone; the install is kept) in three phases:

- install: ``make install``;
- pipeline: from ``make run`` to its ``==> ranking service`` line (dataset generation, Prefect server,
  deployment, worker, and the whole flow run: validation, features, training, evaluation, gate);
- first answer: from there to the printed answer (service start and one /rank request).

Prints each run and the median of the repeats, and the ``make run`` time per stage from the run's summary
(``reports/run-*.json``). ``--json PATH`` writes it all. Run it on idle cores:

    .venv/bin/python benchmarks/first_run.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_lines(cmd: list[str], cwd: Path, env: dict, log: Path) -> list[tuple[float, str]]:
    """Runs ``cmd``, returning each output line with the seconds since start; raises on a non-zero exit."""
    t0 = time.monotonic()
    lines = []
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip("\n")))
            fh.write(f"{lines[-1][0]:8.1f} {line}")
        code = proc.wait()
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}: see {log}")
    return lines


def when(lines: list[tuple[float, str]], prefix: str) -> float:
    return next(t for t, line in lines if line.startswith(prefix))


def machine() -> str:
    cores = os.cpu_count()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{cores} cores, {model}, {platform.system()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=str(ROOT), help="the repository to clone (a path or URL)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mtlrec-first-run"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    clone = args.work / "clone"
    subprocess.run(["rm", "-rf", str(clone)], check=True)
    args.work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", args.source, str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MTLREC_", "BENTOML_", "VIRTUAL_ENV"))}
    t = time.monotonic()
    timed_lines(["make", "install"], clone, env, args.work / "install.log")
    install = time.monotonic() - t
    print(f"install: {install:.0f} s", flush=True)
    runs = []
    try:
        for i in range(args.repeats):
            subprocess.run(["make", "clean"], cwd=clone, env=env, capture_output=True)
            # A new user's model store is empty: each run its own, so the gate judges against popularity.
            store = args.work / f"bentoml-{i}"
            subprocess.run(["rm", "-rf", str(store)], check=True)
            lines = timed_lines(["make", "run"], clone, {**env, "BENTOML_HOME": str(store)},
                                args.work / f"run-{i}.log")
            pipeline = when(lines, "==> ranking service")
            answered = when(lines, "==> done in")
            summaries = sorted((clone / "reports").glob("run-*.json"), key=lambda p: p.stat().st_mtime)
            stages = json.loads(summaries[-1].read_text()).get("stage_seconds") if summaries else None
            summary = json.loads(summaries[-1].read_text()) if summaries else {}
            gate = summary.get("decision") or {}
            runs.append({"pipeline_s": round(pipeline, 1), "first_answer_s": round(answered - pipeline, 1),
                         "after_install_s": round(answered, 1), "stages_s": stages,
                         "promoted": summary.get("promoted"), "gain_over_popularity": gate.get("delta"),
                         "interval": gate.get("ci")})
            print(f"run {i + 1}: pipeline {pipeline:.0f} s, first answer {answered - pipeline:.0f} s more, "
                  f"{answered:.0f} s after the install" + (f"; stages {stages}" if stages else "")
                  + f"; promoted {runs[-1]['promoted']}, NDCG gain {gate.get('delta')} {gate.get('ci')}", flush=True)
    finally:
        subprocess.run(["make", "stop"], cwd=clone, env=env, capture_output=True)
    median = {k: statistics.median(r[k] for r in runs) for k in ("pipeline_s", "first_answer_s", "after_install_s")}
    out = {"machine": machine(), "install_s": round(install, 1), "runs": runs, "median": median,
           "source": subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True,
                                    text=True).stdout.strip()}
    print(f"\n{out['machine']}; {out['source'][:7]}\n| phase | median of {len(runs)} |\n|---|---:|\n"
          f"| install | {install:.0f} s (once) |\n| pipeline | {median['pipeline_s']:.0f} s |\n"
          f"| first answer | {median['first_answer_s']:.0f} s |\n"
          f"| end of install to answer | {median['after_install_s']:.0f} s |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
