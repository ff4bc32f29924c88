"""The GPU benchmark's path imports only what the GPU machine has (torch, Lightning, numpy, pandas,
pyarrow, PyYAML): run here at a tiny size with every other package of this project made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _as_on_the_gpu_machine(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_machine.py"), str(script), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(ROOT)})


def test_the_stand_in_really_hides_the_other_packages(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib.util, sys\n"
                     "for name in ('prefect', 'feast', 'great_expectations', 'bentoml', 'pydantic_settings', "
                     "'duckdb', 'typer', 'safetensors', 'tensorboard'):\n"
                     "    assert importlib.util.find_spec(name) is None, name\n"
                     "    try:\n        __import__(name)\n    except ModuleNotFoundError:\n        pass\n"
                     "    else:\n        sys.exit(f'{name} imported')\n"
                     "import torch, lightning, numpy, pandas, pyarrow, yaml\nprint('ok')\n")
    run = _as_on_the_gpu_machine(probe)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_the_throughput_benchmark_runs_with_only_the_gpu_machines_packages(tmp_path):
    out = tmp_path / "throughput.json"
    run = _as_on_the_gpu_machine(ROOT / "benchmarks" / "train_throughput.py", "--rows", "3000", "--batch", "512",
                                 "--epochs", "1", "--json", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["runs"] and all(r["samples_per_s"] > 0 for r in result["runs"])
