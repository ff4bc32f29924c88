"""Where one ``/rank`` spends its time, stage by stage, at each candidate count.

In one process it builds the service as a worker does (``RankingService``, impression log on, SQLite store)
and answers the same fixed requests the way ``/rank`` does, timing each stage with a ``Stopwatch``
(``services/stopwatch.py``): parsing and validating the body, the online features, encoding, the forward
pass, calibration, fusion and re-ranking, the answer, the impression log's queue, and the response's JSON.
Then it serves the same model over HTTP (one worker, access log off) and times the same requests one at a
time: what that adds to the in-process stages is BentoML's, the ASGI stack's and the network's. Printed per
candidate count: each stage's mean in milliseconds and its share of the mean HTTP latency; the forward pass
alone (the model's limit, requests/s on one core); and what the impression log costs in CPU per request, on
the request thread (queueing the answer) and on its writer thread (the writer's CPU time over the requests).

    .venv/bin/python benchmarks/rank_profile.py --quick --candidates 100,500
    .venv/bin/python benchmarks/rank_profile.py --quick --candidates 100,500 --json profile.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import quick_world, serve

REQUESTS = 64  # distinct fixed requests, cycled


def service(data: Path, events: str):
    """The service class's worker object, built as BentoML builds it (its module reads the environment)."""
    os.environ.update(MTLREC_DATASET=str(data), MTLREC_EVENTS_URL=events, MTLREC_MAX_CANDIDATES="1000",
                      FEAST_USAGE="False")
    from services.service import RankingService

    return RankingService, RankingService.inner()


def bodies(data: Path, n: int, seed: int = 0) -> list[bytes]:
    users = pd.read_parquet(data / "users.parquet")["user_id"].astype(str).tolist()
    items = pd.read_parquet(data / "items.parquet")["item_id"].astype(str).tolist()
    rng = random.Random(seed)
    return [json.dumps({"user_id": rng.choice(users), "candidates": rng.sample(items, n), "k": 20,
                        "context": {"device": "mobile"}}).encode() for _ in range(REQUESTS)]


def answer_one(api, svc, body: bytes, clock) -> str:
    """What ``/rank`` does with one body: BentoML's validation, the service's ``ranked``, the response's JSON."""
    from services.schemas import RankResponse

    clock.start()
    req = api.input_spec.model_validate_json(body)
    clock.lap("parse and validate")
    out = svc.ranked(svc.live.model, req.user_id, req.candidates, req.context, k=req.k, weights=req.weights,
                     diversity=req.diversity, fusion=req.fusion, novelty=req.novelty, clock=clock)
    text = RankResponse(**out).model_dump_json()
    clock.lap("response")
    return text


def in_process(cls, svc, reqs: list[bytes], n_requests: int) -> tuple[dict[str, float], float]:
    """Mean milliseconds per stage, and the impression log writer thread's CPU milliseconds per request."""
    from services.stopwatch import Stopwatch

    api = cls.apis["rank"]
    warm = Stopwatch()
    for body in reqs[:16]:
        answer_one(api, svc, body, warm)
    svc.events.writer.flush()
    writer_cpu: list[float] = []
    counted = svc.events.writer.on_cpu
    svc.events.writer.on_cpu = lambda seconds: (writer_cpu.append(seconds), counted(seconds))
    clock = Stopwatch()
    for i in range(n_requests):
        answer_one(api, svc, reqs[i % len(reqs)], clock)
    svc.events.writer.flush()  # the writer's work for these requests is theirs
    svc.events.writer.on_cpu = counted
    return {k: 1000 * v / n_requests for k, v in clock.laps.items()}, 1000 * sum(writer_cpu) / n_requests


def forward_alone(svc, reqs: list[bytes], n_requests: int) -> float:
    """Mean milliseconds of the forward pass on already encoded requests."""
    from services import ranking

    model, encoded = svc.live.model, []
    for body in reqs:
        r = json.loads(body)
        cols, _, _ = ranking.model_inputs(svc.reader, r["user_id"], r["candidates"], time.time(), r["context"])
        encoded.append(model.scorer.encode(cols))
    for cat, num in encoded[:8]:
        model.scorer.score_codes(cat, num)
    t = time.perf_counter()
    for i in range(n_requests):
        model.scorer.score_codes(*encoded[i % len(encoded)])
    return 1000 * (time.perf_counter() - t) / n_requests


def over_http(data: Path, reqs: list[bytes], seconds: float) -> float:
    """Mean milliseconds of the same requests over HTTP, one at a time, on a one-worker server."""
    import aiohttp

    async def run(url: str) -> float:
        async with aiohttp.ClientSession(base_url=url, headers={"content-type": "application/json"}) as client:
            for body in reqs[:16]:
                async with client.post("/rank", data=body) as r:
                    await r.read()
            times, stop, i = [], time.perf_counter() + seconds, 0
            while time.perf_counter() < stop:
                t = time.perf_counter()
                async with client.post("/rank", data=reqs[i % len(reqs)]) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                times.append(time.perf_counter() - t)
                i += 1
            return 1000 * sum(times) / len(times)

    with serve(data, "sqlite", "", 1000, workers=1, access_log=False,
               events=f"sqlite:///{tempfile.mkdtemp(prefix='rank-profile-events-')}/events.db") as served:
        return asyncio.run(run(served.url))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a dataset with a feature store; its model is $BENTOML_HOME's production")
    p.add_argument("--quick", action="store_true", help="make a small dataset and model in a temporary directory")
    p.add_argument("--candidates", default="100,500")
    p.add_argument("--requests", type=int, default=400, help="requests timed per candidate count, in process")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds of HTTP requests per candidate count")
    p.add_argument("--json", type=Path, help="write the figures here")
    a = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="rank-profile-") if a.quick else None
    if tmp is not None:
        a.data = quick_world(Path(tmp.name))
    if a.data is None:
        p.error("--data (or --quick) is needed")
    events = f"sqlite:///{tempfile.mkdtemp(prefix='rank-profile-events-')}/events.db"
    cls, svc = service(a.data, events)
    import torch

    print(f"# {os.cpu_count()} CPU(s), torch {torch.__version__}, {torch.get_num_threads()} torch thread(s); "
          f"model {svc.live.model.tag}", flush=True)
    results = {}
    for n in map(int, a.candidates.split(",")):
        reqs = bodies(a.data, n)
        stages, writer_ms = in_process(cls, svc, reqs, a.requests)
        forward = forward_alone(svc, reqs, a.requests)
        http = over_http(a.data, reqs, a.seconds)
        total = sum(stages.values())
        stages["HTTP, ASGI and BentoML"] = max(http - total, 0.0)
        results[n] = {"stages_ms": stages, "http_ms": http, "forward_alone_ms": forward,
                      "forward_limit_rps_per_core": 1000 / forward, "log_writer_cpu_ms": writer_ms,
                      "log_queue_ms": stages.get("impression log", 0.0)}
        print(f"\n## {n} candidates: {http:.2f} ms per request over HTTP (mean, one at a time); "
              f"{total:.2f} ms in process")
        print("| stage | ms | share |\n|---|---:|---:|")
        for stage, ms in stages.items():
            print(f"| {stage} | {ms:.3f} | {ms / http:.1%} |")
        print(f"forward pass alone: {forward:.2f} ms, {1000 / forward:.0f} requests/s per core; impression log: "
              f"{stages['impression log']:.3f} ms on the request thread and {writer_ms:.3f} ms of its writer "
              "thread's CPU per request", flush=True)
    svc.events.close()
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
