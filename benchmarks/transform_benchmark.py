"""Transform benchmark: raw BSON batches to a Parquet bucket, in memory on one core.

    python benchmarks/transform_benchmark.py [--documents 100000] [--messy 50000] [--rss 10000,50000,100000,280000]

Prints, in one run over the same in-memory batches: Aries (`BucketConverter`, the
schema, Parquet), pymongoarrow (its own inferred schema, Parquet), pymongoarrow
plus a canonical `_doc` column (python-bsonjs), and the decode floor
(`bson.decode_all`), in documents/s, MB/s of raw BSON and as a ratio to
pymongoarrow + `_doc`; for an events set shaped like sync_benchmark.py's, for the
same with a UUID in each document, for orders with an array of line items, for events
with one document in 50 carrying a map, a UUID and an array of documents, and for a
messy set (MongoDB's sample datasets next to the repository, in
`../shared/datasets/mongodb-sample`, else generated, plus maps, hostile names, type
conflicts, Decimal128, UUIDs and a 2 MB document). Then the peak RSS of writing
one bucket, in a fresh process per bucket size, against the bucket's raw size.
Everything runs with the allocators a bucket writer starts with
(`engine.WRITER_MEMORY_ENV`), and, as in a writer, with what was alive before the
conversion frozen out of the garbage collector's way.

pymongoarrow pins its own pyarrow; where it is not installed its rows say so.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import bson
import bsonjs
import pyarrow as pa
import pyarrow.parquet as pq
from bson import Binary, Decimal128, Int64, ObjectId, json_util

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from sync_benchmark import event  # noqa: E402

from aries_assets.core import schema as s  # noqa: E402
from aries_assets.core.engine import WRITER_MEMORY_ENV  # noqa: E402
from aries_assets.core.snapshot import convert_to_parquet  # noqa: E402

# Raw BSON per batch the contenders get (the whole set in one batch: each converts it its own way).
BATCH_BYTES = 32 * 1024 * 1024
SAMPLE_DIRS = [
    REPO.parent / "shared" / "datasets" / "mongodb-sample",
    REPO / "aries_assets" / "demo" / "data",
]
UTC = datetime.UTC


# --- data ---------------------------------------------------------------------------------------


def events(count: int) -> list[dict]:
    rng = random.Random(1)
    apps = [ObjectId() for _ in range(50)]
    return [event(rng, i, apps) for i in range(count)]


def sample_documents() -> tuple[list[dict], str]:
    for folder in SAMPLE_DIRS:
        files = sorted(folder.glob("*.jsonl"))
        if files:
            documents = [
                json_util.loads(line)
                for path in files
                for line in path.read_text().splitlines()
                if line.strip()
            ]
            return documents, str(
                folder.relative_to(REPO.parent) if folder.is_relative_to(REPO.parent) else folder
            )
    return [], "generated only"


def hostile_documents(rng: random.Random, i: int) -> dict:
    names = [
        "with space",
        "dotted.name",
        'double"quote',
        "$dollar",
        "",
        "Ünïcödé",
        "名前",
        "Name",
        "name",
        "🎉",
    ]
    doc = {
        "_id": ObjectId(),
        "price": Decimal128(f"{rng.randint(0, 9999)}.{rng.randint(0, 999):03d}"),
        "uuid": Binary(uuid.UUID(int=rng.getrandbits(128)).bytes, 4),
        "at": datetime.datetime(2020, 1, 1, tzinfo=UTC) + datetime.timedelta(minutes=i),
        "maybe": i if i % 50 else f"s{i}",  # an int field with rare strings: outliers
        "big": Int64(2**40 + i),
        "scores": {f"{rng.getrandbits(64):016x}": rng.random() for _ in range(3)},  # a map
        "items": [{"sku": f"s{i}", "qty": i}, {"sku": None}],
        "nothing": None,
    }
    for j, name in enumerate(names):
        doc[name] = f"{name}-{j}"
    return doc


def messy(count: int) -> tuple[list[dict], str]:
    """The sample datasets, repeated with fresh `_id`s, with hostile documents mixed in."""
    samples, origin = sample_documents()
    rng = random.Random(2)
    documents = []
    for i in range(count - 1):
        if samples and i % 4:
            doc = dict(samples[i % len(samples)])
            doc["_id"] = ObjectId()
        else:
            doc = hostile_documents(rng, i)
        documents.append(doc)
    documents.append({"_id": ObjectId(), "blob": "x" * (2 * 1024 * 1024), "bytes": Binary(b"\xff" * 1024)})
    return documents, origin


def mostly_plain(count: int) -> list[dict]:
    """Events, one in 50 with a map, a UUID and an array of documents: each chunk mostly plain."""
    rng = random.Random(3)
    documents = events(count)
    for i in range(0, count, 50):
        odd = hostile_documents(rng, i)
        documents[i] = dict(documents[i], uuid=odd["uuid"], scores=odd["scores"], items=odd["items"])
    return documents


def with_uuids(count: int) -> list[dict]:
    """Events, each with a UUID (BSON binary subtype 4), as many collections key users by."""
    rng = random.Random(4)
    return [dict(d, user=Binary(uuid.UUID(int=rng.getrandbits(128)).bytes, 4)) for d in events(count)]


def orders(count: int) -> list[dict]:
    """Orders with 1 to 5 line items each: an array of documents, as most collections have one."""
    rng = random.Random(5)
    start = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    return [
        {
            "_id": ObjectId(),
            "customer": f"c{rng.randint(0, 999)}",
            "at": start + datetime.timedelta(seconds=i),
            "items": [
                {
                    "sku": f"s{rng.randint(0, 99)}",
                    "qty": rng.randint(1, 5),
                    "price": Decimal128(f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"),
                }
                for _ in range(rng.randint(1, 5))
            ],
        }
        for i in range(count)
    ]


def batches_of(documents: list[dict]) -> list[list[bytes]]:
    """Raw BSON in batches bounded by bytes, as the extract reads them."""
    batches, current, size = [], [], 0
    for document in documents:
        raw = bson.encode(document)
        if current and size + len(raw) > BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
        current.append(raw)
        size += len(raw)
    if current:
        batches.append(current)
    return batches


# --- contenders ---------------------------------------------------------------------------------


def write_parquet(tables) -> int:
    buffer = io.BytesIO()
    writer = None
    for table in tables:
        if writer is None:
            writer = pq.ParquetWriter(buffer, table.schema, compression="zstd")
        writer.write_table(table)
    if writer is not None:
        writer.close()
    return buffer.tell()


def aries(batches: list[list[bytes]]) -> None:
    write_bucket([raw for batch in batches for raw in batch])


def _pymongoarrow_tables(batches: list[list[bytes]], with_doc: bool):
    from pymongoarrow.context import PyMongoArrowContext

    tables = []
    for batch in batches:
        context = PyMongoArrowContext(None)
        context.process_bson_stream(b"".join(batch))
        table = context.finish()
        # Parquet cannot hold pymongoarrow's extension types; their storage it can.
        table = pa.table([_storage(c) for c in table.columns], names=table.column_names)
        if with_doc:
            docs = pa.array(list(map(bsonjs.dumps, batch, itertools.repeat(bsonjs.CANONICAL))), pa.string())
            table = table.append_column("_doc", docs)
        tables.append(table)
    schemas = {t.schema for t in tables}
    if len(schemas) > 1:
        tables = [t.cast(pa.unify_schemas(list(schemas))) for t in tables]
    return tables


def _storage(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if isinstance(column.type, pa.ExtensionType):
        return pa.chunked_array([c.storage for c in column.chunks], column.type.storage_type)
    return column


def pymongoarrow(batches: list[list[bytes]]) -> None:
    write_parquet(_pymongoarrow_tables(batches, with_doc=False))


def pymongoarrow_with_doc(batches: list[list[bytes]]) -> None:
    write_parquet(_pymongoarrow_tables(batches, with_doc=True))


def decode_floor(batches: list[list[bytes]]) -> None:
    for batch in batches:
        bson.decode_all(b"".join(batch))


CONTENDERS: list[tuple[str, Callable]] = [
    ("aries", aries),
    ("pymongoarrow", pymongoarrow),
    ("pymongoarrow + _doc", pymongoarrow_with_doc),
    ("bson.decode_all (floor)", decode_floor),
]


def timed(contenders: list[tuple[str, Callable]], batches, repeat: int) -> dict[str, float | str]:
    """Best time of each contender, taking turns round by round so a busy moment hits them alike."""
    best: dict[str, float | str] = {}
    for _ in range(repeat):
        for label, run in contenders:
            if isinstance(best.get(label), str):
                continue
            started = time.perf_counter()
            try:
                run(batches)
            except ImportError:
                best[label] = "not installed"
                continue
            except Exception as error:  # pymongoarrow cannot take every document: say so, do not stop
                best[label] = f"fails: {type(error).__name__}: {str(error)[:60]}"
                continue
            elapsed = time.perf_counter() - started
            best[label] = min(elapsed, best.get(label, elapsed))
    return best


def report(name: str, documents: list[dict], repeat: int) -> None:
    batches = batches_of(documents)
    count = sum(len(b) for b in batches)
    megabytes = sum(len(r) for b in batches for r in b) / 1e6
    print(f"\n{name}: {count:,} documents, {megabytes:,.1f} MB raw BSON, {len(batches)} batches")
    # As in a bucket writer, what is alive before the conversion (here the generated documents) is
    # out of the collector's way (`engine._worker_start`): every contender alike.
    gc.freeze()
    results = timed(CONTENDERS, batches, repeat)
    gc.unfreeze()
    reference = results["pymongoarrow + _doc"]
    print(f"  {'':26} {'docs/s':>10} {'MB/s':>8} {'vs pma+_doc':>12}")
    for label, seconds in results.items():
        if isinstance(seconds, str):
            print(f"  {label:26} {seconds}")
            continue
        ratio = f"{reference / seconds:.2f}x" if isinstance(reference, float) else "-"
        print(f"  {label:26} {count / seconds:>10,.0f} {megabytes / seconds:>8.1f} {ratio:>12}")


# --- memory -------------------------------------------------------------------------------------


WARM_UP = 1000  # documents of the measured set written first, in the baseline


def rss_child(path: str) -> None:
    """Write one bucket from a file of raw batches, read batch by batch as from MongoDB; print RSS.

    A small bucket of the same set (its first documents) is written first, so imports, the code
    paths the set takes and Arrow's kernels are in the baseline: a writer converts bucket after
    bucket, and what the first leaves loaded is no bucket's cost (a messy set's first bucket in a
    fresh process grows by about 35 MB more, once). A thread samples RSS every few
    milliseconds while the measured bucket is written, and the
    kernel's high-water mark (Linux's `VmHWM`, reset at the baseline) catches any peak between
    two samples. (`ru_maxrss` would not do: it outlives `exec`, so it holds the parent's peak.)
    """
    import threading

    import psutil

    process = psutil.Process()
    write_bucket(next(_batches_from(path))[:WARM_UP])
    _reset_high_water()
    baseline = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # The bucket's documents are held whole, as `BucketDocuments` holds them: they count in the growth.
        write_bucket([raw for batch in _batches_from(path) for raw in batch])
    finally:
        done.set()
        sampler.join()
    print(json.dumps({"baseline": baseline, "peak": max(peak, _high_water())}))


def _reset_high_water() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux 4.0 and later)
    except OSError:
        pass  # not Linux: the samples alone


def _high_water() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_bucket(documents: list[bytes]) -> None:
    """One bucket file as `snapshot.write_bucket` writes it: streamed chunk by chunk, the schema settled."""
    options = s.SchemaOptions()
    with tempfile.TemporaryDirectory() as folder:
        convert_to_parquet(
            os.path.join(folder, "b.parquet"),
            documents,
            lambda stats: s.resolve_schema(stats, None, options),
            options,
        )


def _batches_from(path: str):
    """Each batch as a list of documents, read one document at a time: only the batch is in memory."""
    with open(path, "rb") as source:
        for line in source:
            remaining, batch = int(line), []
            while remaining:
                head = source.read(4)
                batch.append(head + source.read(int.from_bytes(head, "little") - 4))
                remaining -= len(batch[-1])
            yield batch
            del batch


def memory(sizes: list[int], make: Callable[[int], list[dict]], label: str) -> None:
    print(f"\npeak RSS writing one bucket ({label}), a fresh process each:")
    print(
        f"  {'documents':>10} {'raw MB':>8} {'baseline MB':>12} {'peak MB':>8} {'growth MB':>10} {'growth/raw':>11}"
    )
    for size in sizes:
        with tempfile.NamedTemporaryFile(suffix=".bson", delete=False) as handle:
            raw = 0
            for batch in batches_of(make(size)):
                blob = b"".join(batch)
                raw += len(blob)
                handle.write(f"{len(blob)}\n".encode() + blob)
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", handle.name],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        finally:
            os.unlink(handle.name)
        measured = json.loads(out.strip().splitlines()[-1])
        growth = measured["peak"] - measured["baseline"]
        print(
            f"  {size:>10,} {raw / 1e6:>8.1f} {measured['baseline'] / 1e6:>12.0f} {measured['peak'] / 1e6:>8.0f} "
            f"{growth / 1e6:>10.0f} {growth / raw:>10.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--messy", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--rss",
        default="10000,50000,100000,280000",
        help="bucket sizes for the memory rows (50k: the default bucket_size; 280k events: ~64 MB, bucket_bytes)",
    )
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(name not in os.environ for name in WRITER_MEMORY_ENV):
        # Allocators are chosen when a process starts: run as a bucket writer does (every contender alike).
        os.execve(sys.executable, [sys.executable, *sys.argv], {**WRITER_MEMORY_ENV, **os.environ})
    if args.rss_child:
        rss_child(args.rss_child)
        return

    allocators = ", ".join(f"{k}={os.environ.get(k)}" for k in WRITER_MEMORY_ENV)
    print(f"one core, in memory; pyarrow {pa.__version__}, python {sys.version.split()[0]}")
    print(f"allocators as in a bucket writer: {allocators}")
    report("events", events(args.documents), args.repeat)
    report("events, each with a UUID", with_uuids(args.documents), args.repeat)
    report("orders, each with 1 to 5 line items (an array of documents)", orders(args.documents), args.repeat)
    report(
        "events, 1 in 50 with a map, a UUID and an array of documents",
        mostly_plain(args.documents),
        args.repeat,
    )
    documents, origin = messy(args.messy)
    report(f"messy ({origin} + generated hostile cases)", documents, args.repeat)
    sizes = [int(n) for n in args.rss.split(",") if n]
    if sizes:
        memory(sizes, events, "events")
        memory([n for n in sizes if n <= 100_000], lambda n: messy(n)[0], "messy")


if __name__ == "__main__":
    main()
