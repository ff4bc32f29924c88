"""This machine's memory, as the stages that choose between a resident and a spilling path see it.

Apart from ``models.data.streamed`` (torch, Lightning) so that the feature stage, which asks it to size DuckDB,
does not pay seconds of imports for a number. In a container the limit that kills the process is its cgroup's,
not the host's RAM, so the smaller of the two counts.
Tests make the machine smaller by replacing ``memory_bytes`` here; every caller looks it up here at call time.
"""

from __future__ import annotations

import os
from pathlib import Path

MEMORY_SHARE = 0.25  # of memory: past it a training table streams and the aggregates leave numpy for DuckDB

# cgroup v2, then v1: where a container's memory limit is read.
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def memory_bytes() -> int:
    """The host's physical memory, or the container's cgroup limit where that is smaller."""
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume the table fits
        host = 1 << 62
    limit = cgroup_limit()
    return min(host, limit) if limit else host


def cgroup_limit(paths: tuple[Path, ...] | None = None) -> int | None:
    """The first cgroup memory limit set; None where there is none ("max", or v1's huge "unlimited" value)."""
    for path in paths or CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit():
            return None
        value = int(text)
        return value if 0 < value < (1 << 60) else None
    return None
