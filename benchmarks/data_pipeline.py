"""Time dataset generation and Great Expectations validation at 1M and 10M impressions.

Each measurement runs in a fresh process so that its peak resident memory is
its own (ru_maxrss of that process), not the high-water mark of an earlier
step. Prints rows/s and peak memory; figures go in benchmarks/README.md.

    .venv/bin/python benchmarks/data_pipeline.py                # 1M and 10M
    .venv/bin/python benchmarks/data_pipeline.py --sizes 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import generate_log, in_child


def _validate(out: str) -> dict:
    from flows.validation.run import validate_dataset

    return {"success": validate_dataset(out, docs_dir=Path(out) / "gx").success}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="mtlrec-bench-") as tmp:
            out = str(Path(tmp) / "data")
            # Modules imported before the clock starts: rows/s is the work's, not loading the library's.
            gen = in_child(generate_log, out, n, imports=["flows.data.synth"])
            val = in_child(_validate, out, imports=["flows.validation.run"])
            size_mb = sum(f.stat().st_size for f in Path(out).glob("*.parquet")) / 2**20
            shutil.rmtree(out, ignore_errors=True)
        rows.append({"interactions": n, "generate_s": gen["seconds"], "generate_rows_per_s": n / gen["seconds"],
                     "generate_peak_mb": gen["peak_mb"], "validate_s": val["seconds"],
                     "validate_rows_per_s": n / val["seconds"], "validate_peak_mb": val["peak_mb"],
                     "validation_passed": val["success"], "parquet_mb": size_mb})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'impressions':>12} {'gen s':>7} {'gen rows/s':>12} {'gen peak MB':>12} "
          f"{'val s':>7} {'val rows/s':>12} {'val peak MB':>12} {'parquet MB':>11} passed")
    for r in rows:
        print(f"{r['interactions']:>12,} {r['generate_s']:>7.1f} {r['generate_rows_per_s']:>12,.0f} "
              f"{r['generate_peak_mb']:>12,.0f} {r['validate_s']:>7.1f} {r['validate_rows_per_s']:>12,.0f} "
              f"{r['validate_peak_mb']:>12,.0f} {r['parquet_mb']:>11,.0f} {r['validation_passed']}")


if __name__ == "__main__":
    main()
