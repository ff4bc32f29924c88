"""This machine's memory, as the stages that choose between a resident and a spilling path see it.

Apart from ``models.data.streamed`` (torch, Lightning) so that the feature stage, which asks it to size DuckDB,
does not pay seconds of imports for a number: the training-set build used to import Lightning for it.
Tests make the machine smaller by replacing ``memory_bytes`` here; every caller looks it up here at call time.
"""

from __future__ import annotations

import os

MEMORY_SHARE = 0.25  # of memory: past it a training table streams and the aggregates leave numpy for DuckDB


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume the table fits
        return 1 << 62
