"""A bucket writer's freed memory, given back to the system when it piles up.

glibc's malloc keeps what a chunk frees for later allocations. Allocations of other
sizes cannot always reuse it, so a writer's resident memory creeps up chunk by chunk:
on the messy benchmark set, 35 MB over a 16 MB bucket, while Arrow held 12 MB at
most. `malloc_trim` gives the free pages back, but returning them after every chunk
costs the next chunk's allocations a page fault each (conversion ran 10 to 25%
slower). So a write gives them back only once it has grown past the bucket's own
bytes (and past a floor under which the ratio means nothing): what a writer holds
stays near the bucket's size plus one chunk's transient copies.

Where there is no glibc (macOS, musl) or no `/proc`, nothing is trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

# Below this much growth a write never trims: a small bucket's fixed costs are not a leak.
FLOOR_BYTES = 8 * 1024 * 1024


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), or None."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return None


class HeapWatch:
    """Watches one bucket write: `after_chunk` trims the heap once the writer has grown past the
    bucket's raw bytes since the write began."""

    def __init__(self, bucket_bytes: int) -> None:
        self.start = resident_bytes() if _TRIM is not None else None
        self.limit = max(bucket_bytes, FLOOR_BYTES)
        self.trims = 0

    def after_chunk(self) -> None:
        if self.start is None:
            return
        now = resident_bytes()
        if now is not None and now - self.start > self.limit:
            _TRIM(0)
            self.trims += 1
