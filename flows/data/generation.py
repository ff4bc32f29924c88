"""What the synthetic generators share: the time span, the chunked write of the log, the manifest's range.

Each scenario (``synth`` for a shop, ``short_video`` for a feed) draws its own world and its own
impressions; writing them is the same: draw a chunk, sort it in time, append it to one parquet file
through Arrow, so ten million impressions never sit in memory at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.contract import tables as contract

US_PER_DAY = 86_400 * 1_000_000


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def time_span(end: str, days: int) -> tuple[int, int, int]:
    """(start, span, end) of the log in epoch microseconds; ``end`` is fixed so a seed gives the same tables."""
    end_us = int(contract.utc(end).value // 1000)
    span_us = days * US_PER_DAY
    return end_us - span_us, span_us, end_us


def write_impressions(path: Path, total: int, chunk_rows: int, draw: Callable[[int], dict[str, np.ndarray]],
                      to_table: Callable[[dict[str, np.ndarray]], pa.Table],
                      observe: Callable[[dict[str, np.ndarray]], None] | None = None) -> dict[str, np.ndarray] | None:
    """Draw ``total`` impressions ``chunk_rows`` at a time and append each chunk to one parquet file.

    Returns the last chunk's arrays (its rows are spread over the whole span like any other's), from which
    the generators report their ground truth; ``observe`` sees every chunk (for rates).
    """
    last = None
    writer = None
    try:
        remaining = total
        while remaining > 0:
            n = min(chunk_rows, remaining)
            d = draw(n)
            table = to_table(d)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            if observe is not None:
                observe(d)
            last = d
            remaining -= n
    finally:
        if writer is not None:
            writer.close()
    return last


def declared_range(start_us: int, end_us: int, users: pd.DataFrame, items: pd.DataFrame) -> tuple[str, str]:
    """The manifest's time range: from the earliest signup, launch or impression to the log's end."""
    first = min(start_us, int(users[contract.TIMESTAMP].min().value // 1000),
                int(items[contract.TIMESTAMP].min().value // 1000))
    return (pd.Timestamp(first, unit="us", tz="UTC").isoformat(), pd.Timestamp(end_us, unit="us", tz="UTC").isoformat())


def redrawn(data: Path | str, source: str, config_type, world, declaration):
    """``(cfg, hidden world)`` of a dataset this generator wrote, drawn again from its manifest's seed and
    sizes (users and items are the first draws, so they repeat exactly); None if ``source`` did not write it,
    or if its binary tasks are no longer the ``declaration`` the generator wrote (a log whose labels were
    renamed after it was drawn: the generator's probabilities are for objectives it no longer declares)."""
    manifest = contract.Manifest.load(data)
    if manifest is None or manifest.source != source:
        return None
    fields = config_type.__dataclass_fields__
    cfg = config_type(**{k: v for k, v in manifest.params.items() if k in fields})
    if callable(declaration):  # a generator whose declared tasks depend on its config
        declaration = declaration(cfg)
    if {(t.name, t.column) for t in manifest.declaration.binary} != {(t.name, t.column) for t in declaration.binary}:
        return None
    start_us, span_us, _ = time_span(cfg.end, cfg.days)
    return cfg, world(cfg, np.random.default_rng(cfg.seed), start_us, span_us)[2]


def impression_inputs(rows: pd.DataFrame, devices, unknown_device: int) -> tuple[np.ndarray, ...]:
    """What the generators' probabilities read from log rows: user and item indices (ids are ``u<n>``,
    ``i<n>``), hour, device code (``unknown_device`` for others) and position (1 when missing)."""
    code = {d: k for k, d in enumerate(devices)}
    u = rows["user_id"].astype(str).str[1:].astype(np.int64).to_numpy()
    i = rows["item_id"].astype(str).str[1:].astype(np.int64).to_numpy()
    hour = pd.to_datetime(rows[contract.TIMESTAMP], utc=True).dt.hour.to_numpy()
    device = rows["device"].astype(str).map(code).fillna(unknown_device).astype(np.int64).to_numpy()
    position = pd.to_numeric(rows["position"], errors="coerce").fillna(1).to_numpy(np.float64)
    return u, i, hour, device, position
