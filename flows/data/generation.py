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

from models import contract

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
