"""A git ref's own service, for ``serve_latency.py --compare``: run from that ref's checkout, by its code alone.

    python benchmarks/ref_server.py BASE STORE REDIS MAX_CANDIDATES WORKERS ACCESS_LOG   (cwd: the ref's checkout)

Builds the ref's small world under BASE with the ref's ``quick_world`` (its generator, its feature store, a
model its own trainer made and promoted: an artifact of today's format may be one the ref cannot read) and
serves it with the ref's ``serve``, found in ``benchmarks.serving`` or, before that module, in
``benchmarks.serve_latency``. Prints ``READY`` and a JSON object (``url``, ``data``) on one line once the
server is ready, and stops it when its standard input closes.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the ref's packages, before anything else of the same name

READY = "ref-server-ready"  # the line's prefix: the ref's world building prints to standard output too


def helpers():
    for name in ("benchmarks.serving", "benchmarks.serve_latency"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "quick_world") and hasattr(module, "serve"):
            return module
    raise SystemExit("this ref has no benchmarks.serving or benchmarks.serve_latency with quick_world and serve")


def main(argv: list[str]) -> int:
    base, store, redis, max_candidates, workers, access_log = argv
    module = helpers()
    data = module.quick_world(Path(base))
    with module.serve(data, store, redis, int(max_candidates), int(workers), access_log == "1") as served:
        print(READY, json.dumps({"url": served.url, "data": str(data)}), flush=True)
        sys.stdin.read()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
