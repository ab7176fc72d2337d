"""Sync benchmark: Aries against the raw cursor drain of the same server, and memory at 10x size.

    python benchmarks/sync_benchmark.py [--documents 200000] [--factor 10] [--mongodb-uri URI]

Prints, in one run: the time to drain the collection through a raw-BSON cursor
(the floor any exporter pays), the time of `aries sync`, their ratio, and the
peak RSS of the sync's process tree; then the peak RSS for a collection
`--factor` times larger, to show memory follows the bucket size, not the
collection size. Uses SecantusDB unless --mongodb-uri (or MONGODB_URI) is given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from bson import Decimal128, ObjectId
from pymongo import MongoClient

from aries_assets.demo.mongo_server import embedded_mongo

BUCKET_SIZE = 50_000


def event(rng: random.Random, i: int, apps: list[ObjectId]) -> dict:
    return {
        "_id": ObjectId(),
        "app_id": rng.choice(apps),
        "type": rng.choice(["page_view", "track", "identify", "error"]),
        "at": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=i),
        "bytes": rng.randint(100, 5_000_000),
        "amount": Decimal128(f"{rng.randint(0, 99999)}.{rng.randint(0, 99):02d}"),
        "context": {
            "ip": f"10.0.{rng.randint(0, 255)}.{rng.randint(0, 255)}",
            "library": {"name": "analytics.js", "version": "4.1.0"},
        },
        "tags": rng.sample(["a", "b", "c", "d", "e"], 2),
    }


def fill(client: MongoClient, name: str, count: int) -> None:
    coll = client.bench[name]
    if coll.estimated_document_count() == count:
        return
    coll.drop()
    rng = random.Random(1)
    apps = [ObjectId() for _ in range(50)]
    batch = []
    for i in range(count):
        batch.append(event(rng, i, apps))
        if len(batch) == 10_000:
            coll.insert_many(batch, ordered=False)
            batch = []
    if batch:
        coll.insert_many(batch, ordered=False)


def drain_seconds(client: MongoClient, name: str) -> float:
    started = time.monotonic()
    for _ in client.bench[name].find_raw_batches({}, batch_size=100_000).sort("_id", 1):
        pass
    return time.monotonic() - started


def run_sync(uri: str, name: str, workdir: Path, workers: int, infer: bool = True) -> tuple[float, int, int]:
    """Seconds, peak RSS of the whole process tree, and of its largest single process."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.yaml"
    config.write_text(
        f'mongo: {{uri: "{uri}"}}\nlake: {{url: "{workdir / "lake"}"}}\n'
        f"collections:\n  - {{database: bench, collection: {name}, bucket_size: {BUCKET_SIZE}, "
        f"infer_schema: {str(infer).lower()}}}\n"
    )
    env = {**os.environ, "DAGSTER_HOME": str(workdir / "dagster_home")}
    started = time.monotonic()
    process = psutil.Popen(
        [
            sys.executable,
            "-m",
            "aries_assets.cli",
            "sync",
            "--config",
            str(config),
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    peak_tree = peak_single = 0
    while process.poll() is None:
        with contextlib.suppress(psutil.Error):
            rss = [p.memory_info().rss for p in [process, *process.children(recursive=True)]]
            peak_tree, peak_single = max(peak_tree, sum(rss)), max(peak_single, max(rss))
        time.sleep(0.1)
    if process.returncode != 0:
        raise SystemExit(f"aries sync failed with exit code {process.returncode}")
    return time.monotonic() - started, peak_tree, peak_single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=200_000)
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mongodb-uri", default=os.environ.get("MONGODB_URI"))
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        uri = args.mongodb_uri or stack.enter_context(embedded_mongo(":memory:"))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aries-bench-")))
        client = stack.enter_context(MongoClient(uri))
        mb = 1024 * 1024
        rows = []
        runs = [
            ("events", args.documents, False),  # the baseline: `_id` and `_doc` only
            ("events", args.documents, True),
            ("events_large", args.documents * args.factor, True),
        ]
        for name, count, infer in runs:
            print(f"loading {count:,} documents into bench.{name} ...", file=sys.stderr, flush=True)
            fill(client, name, count)
            # The large run is there for memory; its drain would only repeat the small one's rate.
            drain = drain_seconds(client, name) if count == args.documents else float("nan")
            label = f"{name}{'' if infer else ' (no inference)'}"
            seconds, peak_tree, peak_single = run_sync(
                uri, name, workdir / label.replace(" ", "_"), args.workers, infer
            )
            rows.append((label, count, drain, seconds, peak_tree, peak_single))
            print(f"  {label}: drain {drain:.1f}s, sync {seconds:.1f}s", file=sys.stderr, flush=True)

    server = "given" if args.mongodb_uri else "SecantusDB"
    print(f"\nbucket_size {BUCKET_SIZE:,}, {args.workers} workers, server: {server}")
    header = (
        "collection",
        "documents",
        "raw drain s",
        "aries sync s",
        "ratio",
        "docs/s",
        "peak RSS tree MB",
        "largest proc MB",
    )
    print(
        f"{header[0]:<28}{header[1]:>11}{header[2]:>13}{header[3]:>14}{header[4]:>7}{header[5]:>9}{header[6]:>18}{header[7]:>17}"
    )
    for label, count, drain, seconds, tree, single in rows:
        print(
            f"{label:<28}{count:>11,}{drain:>13.1f}{seconds:>14.1f}{seconds / drain:>7.2f}"
            f"{count / seconds:>9,.0f}{tree / mb:>18.0f}{single / mb:>17.0f}"
        )
    baseline, inferred, large = rows
    print(
        f"\ntype inference adds {inferred[3] / baseline[3] - 1:+.1%} to the sync time ({baseline[3]:.1f}s -> {inferred[3]:.1f}s)"
    )
    print(
        f"{large[1] // inferred[1]}x the documents -> {large[5] / inferred[5]:.2f}x the largest process's peak RSS"
    )


if __name__ == "__main__":
    main()
