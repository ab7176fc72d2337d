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


def test_arrow_gives_its_freed_pages_back_when_asked():
    """jemalloc keeps what Arrow frees for a second; pyarrow's own `release_unused` cannot hand it
    back (pyarrow 25 asks for `arena.MALLCTL_ARENAS_ALL.purge`, a name never expanded)."""
    import ctypes

    import pyarrow as pa

    if not sys.platform.startswith("linux") or "jemalloc" not in pa.supported_memory_backends():
        assert heap.give_back_arrow_pages() is False  # nothing to give back where nothing is kept
        assert heap.arrow_freed_bytes() is None
        return
    jemalloc = pa.jemalloc_memory_pool()
    buffers = [pa.allocate_buffer(MB, memory_pool=jemalloc) for _ in range(64)]
    for buffer in buffers:
        ctypes.memset(buffer.address, 1, buffer.size)  # resident, as a chunk's copies are
    del buffers, buffer
    jemalloc.release_unused()  # pyarrow's own way: a no-op
    # (jemalloc's own count, not the process's resident memory, which a busy test process's other
    # threads move by tens of megabytes.)
    assert heap.arrow_freed_bytes() > 16 * MB, "jemalloc keeps what Arrow freed"
    assert heap.give_back_arrow_pages() is True
    assert heap.arrow_freed_bytes() < MB, "and has given it back to the system"


def test_a_document_larger_than_a_chunk_is_converted_on_pages_the_chunks_before_gave_back(monkeypatch):
    """Its copies (its `_doc`, Arrow's page buffers, some times its size each) need extents larger
    than any a small chunk freed: without the give-back they come on top of what jemalloc kept."""
    import bson

    from aries_assets.core import arrow
    from aries_assets.core import schema as s

    converted, given_back = [], []
    monkeypatch.setattr(heap, "give_back_arrow_pages", lambda: given_back.append(len(converted)) or True)
    small = [bson.encode({"_id": i, "name": f"n{i}" * 50}) for i in range(4000)]
    large = [bson.encode({"_id": 4000 + i, "blob": "x" * (size * MB)}) for i, size in enumerate([3, 2, 3, 4])]
    documents = small[:1000] + [large[0]] + small[1000:2000] + large[1:3] + small[2000:3000] + [large[3]]
    converter = arrow.BucketConverter(s.SchemaOptions(), set(), chunk_bytes=256 * 1024)
    for batch in converter.chunks(documents):
        converted.append(len(batch.docs))
    assert sum(converted) == len(documents)
    # Before the first large document, and before the one larger than it; the two between fit in
    # the extents the first one freed.
    assert len(given_back) == 2, given_back
    assert [converted[at] for at in given_back] == [1, 1], "a large document is a chunk of its own"
    assert [sum(converted[:at]) for at in given_back] == [1000, 3003]


def test_before_a_join_arrows_freed_pages_go_back_once_past_the_buckets_bytes(monkeypatch):
    freed, given_back = [0], []
    monkeypatch.setattr(heap, "arrow_freed_bytes", lambda: freed[0])
    monkeypatch.setattr(heap, "give_back_arrow_pages", lambda: given_back.append(freed[0]) or True)
    watch = heap.HeapWatch(bucket_bytes=20 * MB)
    freed[0] = 15 * MB  # a chunk's copies, kept for the next: under the bucket's size
    watch.before_join()
    assert given_back == []
    freed[0] = 25 * MB
    watch.before_join()
    assert given_back == [25 * MB] and watch.give_backs == 1
    small = heap.HeapWatch(bucket_bytes=1 * MB)  # the floor, as for glibc's heap
    freed[0] = heap.FLOOR_BYTES
    small.before_join()
    assert small.give_backs == 0
    monkeypatch.setattr(heap, "arrow_freed_bytes", lambda: None)  # no jemalloc to ask
    small.before_join()
    assert small.give_backs == 0


def test_a_bucket_joined_after_a_large_document_gives_its_copies_back_first(tmp_path):
    """The last document is 6 MB and brings a new column: its chunk is a run of its own, joined to
    the runs before it once the bucket is written, its copies freed but kept by jemalloc. In a
    process started as a writer is (`WRITER_MEMORY_ENV`), where Parquet's buffers are jemalloc's too."""
    import json
    import os
    import subprocess
    import textwrap

    import pyarrow.parquet as pq

    from aries_assets.core.engine import WRITER_MEMORY_ENV

    script = textwrap.dedent(
        """
        import json, sys
        import bson
        from aries_assets.core import heap, snapshot
        from aries_assets.core import schema as s

        watches = []
        real = heap.HeapWatch.before_join
        heap.HeapWatch.before_join = lambda self: watches.append(self) or real(self)
        documents = [bson.encode({"_id": i, "name": f"n{i}" * 20}) for i in range(3000)]
        documents.append(bson.encode({"_id": 3000, "blob": "x" * (6 << 20)}))
        options = s.SchemaOptions()
        snapshot.convert_to_parquet(sys.argv[1], documents, lambda st: s.resolve_schema(st, None, options), options)
        print(json.dumps([[w.give_backs for w in watches], heap.arrow_freed_bytes() is not None]))
        """
    )
    path = tmp_path / "b.parquet"
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env={**os.environ, **WRITER_MEMORY_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    give_backs, jemalloc = json.loads(done.stdout.strip().splitlines()[-1])
    assert give_backs == [1 if jemalloc else 0], "one join, its copies given back first"
    table = pq.read_table(path)
    assert table.num_rows == 3001 and table.column("blob").to_pylist()[-1] == "x" * (6 * MB)
