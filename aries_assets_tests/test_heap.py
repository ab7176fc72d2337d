"""A bucket writer gives freed memory back once it has grown past its bucket (`core/heap.py`)."""

from __future__ import annotations

import sys

from aries_assets.core import heap

MB = 1024 * 1024


def test_the_heap_is_trimmed_only_past_the_buckets_own_bytes(monkeypatch):
    trims = []
    real = heap._TRIM
    monkeypatch.setattr(heap, "_TRIM", lambda pad: trims.append(pad) or (real(pad) if real else 0))
    resident = [300 * MB]
    monkeypatch.setattr(heap, "resident_bytes", lambda: resident[0])

    watch = heap.HeapWatch(bucket_bytes=20 * MB)
    resident[0] += 15 * MB  # a chunk's copies, held by the allocator: under the bucket's size
    watch.after_chunk()
    assert trims == []
    resident[0] += 10 * MB  # past it: given back
    watch.after_chunk()
    assert trims == [0] and watch.trims == 1

    small = heap.HeapWatch(bucket_bytes=1 * MB)  # a small bucket: its fixed costs are no leak
    resident[0] += heap.FLOOR_BYTES - 1
    small.after_chunk()
    assert small.trims == 0
    resident[0] += 2
    small.after_chunk()
    assert small.trims == 1


def test_resident_memory_is_read_where_linux_tells_it():
    resident = heap.resident_bytes()
    if sys.platform.startswith("linux"):
        assert resident is not None and 10 * MB < resident < 64 * 1024 * MB
        assert heap._TRIM is not None, "glibc's malloc_trim"
    else:
        assert resident is None
