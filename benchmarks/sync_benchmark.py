"""Sync benchmark: a first `aries sync` against the raw cursor drain of the same server.

    python benchmarks/sync_benchmark.py [--documents 150000] [--bucket-size 5000] [--factor 0] [--repeat 3]
        [--mongodb-uri URI]

Prints, in one run: the time to drain the collection through a raw-BSON cursor
(the floor any exporter pays), the time of a first `aries sync` (the whole
command: process start, Dagster run, every bucket written), their ratio, the
number of reads the server answered for each (its `opcounters`: SecantusDB
answers every `_id` range read with a full scan, so reads matter as much as
seconds), and the peak RSS of the sync's process tree. With `--factor N`, the
peak RSS for a collection N times larger, to show memory follows the bucket
size, not the collection size. Uses SecantusDB unless --mongodb-uri is given.
Drains and syncs take turns, `--repeat` of each; the best of each counts (a shared
2-core machine varies by a tenth from one run to the next).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from bson import Decimal128, ObjectId
from pymongo import MongoClient

from aries_assets.demo.mongo_server import embedded_mongo


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


def reads(client: MongoClient) -> int:
    """Queries and getMores the server has answered so far."""
    counters = client.admin.command("serverStatus").get("opcounters", {})
    return int(counters.get("query", 0)) + int(counters.get("getmore", 0))


def drain_seconds(client: MongoClient, name: str) -> tuple[float, int]:
    before = reads(client)
    started = time.monotonic()
    # The fastest ordered drain this server offers: `_id` order through the index, 10k per batch.
    cursor = client.bench[name].find_raw_batches({}, batch_size=10_000).sort("_id", 1).hint([("_id", 1)])
    for _ in cursor:
        pass
    return time.monotonic() - started, reads(client) - before


def run_sync(
    uri: str,
    name: str,
    workdir: Path,
    workers: int,
    bucket_size: int,
    infer: bool = True,
    monitor: bool = False,
) -> tuple[float, float, int, int]:
    """Seconds, the engine's seconds, peak RSS of the whole process tree, and of its largest process.

    Watching the process tree's memory costs CPU the sync shares (two cores): a timed run is not
    watched, and the memory comes from a run of its own (`monitor`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / f"{name}.yaml"
    config.write_text(
        f'mongo: {{uri: "{uri}"}}\nlake: {{url: "{workdir / "lake"}"}}\n'
        f"collections:\n  - {{database: bench, collection: {name}, bucket_size: {bucket_size}, "
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
        stdout=(workdir / "sync.out").open("w"),
        stderr=subprocess.STDOUT,
    )
    peak_tree = peak_single = 0
    while monitor and process.poll() is None:
        with contextlib.suppress(psutil.Error):
            rss = [p.memory_info().rss for p in [process, *process.children(recursive=True)]]
            peak_tree, peak_single = max(peak_tree, sum(rss)), max(peak_single, max(rss))
        time.sleep(0.1)
    process.wait()
    seconds = time.monotonic() - started
    output = (workdir / "sync.out").read_text()
    if process.returncode != 0:
        raise SystemExit(f"aries sync failed with exit code {process.returncode}:\n{output[-3000:]}")
    # The engine's own time, from the summary line: the rest is process start and Dagster's run.
    in_run = re.search(r"([0-9.]+)s schema v", output)
    return seconds, float(in_run.group(1)) if in_run else float("nan"), peak_tree, peak_single


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=150_000)
    parser.add_argument("--bucket-size", type=int, default=5_000)
    parser.add_argument(
        "--factor", type=int, default=0, help="also a collection this many times larger (memory)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--repeat", type=int, default=3, help="drains and syncs of each collection: the best counts"
    )
    parser.add_argument("--mongodb-uri", default=os.environ.get("MONGODB_URI"))
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        uri = args.mongodb_uri or stack.enter_context(embedded_mongo(":memory:"))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aries-bench-")))
        client = stack.enter_context(MongoClient(uri))
        mb = 1024 * 1024
        rows = []
        runs = [
            ("events", args.documents, False),  # `_id` and `_doc` only
            ("events", args.documents, True),
        ]
        if args.factor:
            runs.append(("events_large", args.documents * args.factor, True))
        for name, count, infer in runs:
            print(f"loading {count:,} documents into bench.{name} ...", file=sys.stderr, flush=True)
            fill(client, name, count)
            label = f"{name}{'' if infer else ' (no inference)'}"
            # Taking turns, each a first sync into a lake of its own; the best of each counts.
            drain = seconds = in_run = float("inf")
            ratios = []  # each turn's sync against the drain just before it: the machine's drift cancels
            for turn in range(args.repeat if count == args.documents else 1):  # the larger: memory only
                drained, drain_reads = drain_seconds(client, name)
                before = reads(client)
                synced, synced_in_run, _, _ = run_sync(
                    uri,
                    name,
                    workdir / f"{label.replace(' ', '_')}_{turn}",
                    args.workers,
                    args.bucket_size,
                    infer,
                )
                sync_reads = reads(client) - before
                drain, seconds, in_run = min(drain, drained), min(seconds, synced), min(in_run, synced_in_run)
                ratios.append(synced / drained)
            _, _, peak_tree, peak_single = run_sync(
                uri, name, workdir / (label.replace(" ", "_") + "_rss"), args.workers, args.bucket_size, infer,
                monitor=True,
            )  # fmt: skip
            rows.append(
                (
                    label,
                    count,
                    drain,
                    seconds,
                    in_run,
                    drain_reads,
                    sync_reads,
                    peak_tree,
                    peak_single,
                    ratios,
                )
            )
            print(f"  {label}: drain {drain:.1f}s, sync {seconds:.1f}s", file=sys.stderr, flush=True)

    server = "given" if args.mongodb_uri else "SecantusDB"
    print(f"\nfirst `aries sync`, bucket_size {args.bucket_size:,}, {args.workers} workers, server: {server}")
    header = ("collection", "documents", "drain s", "sync s", "ratio", "in run s", "ratio", "docs/s",
              "drain reads", "sync reads", "RSS tree MB", "largest MB")  # fmt: skip
    print(
        f"{header[0]:<26}{header[1]:>10}{header[2]:>9}{header[3]:>8}{header[4]:>7}{header[5]:>10}{header[6]:>7}"
        f"{header[7]:>9}{header[8]:>13}{header[9]:>12}{header[10]:>13}{header[11]:>12}"
    )
    for label, count, drain, seconds, in_run, drain_reads, sync_reads, tree, single, _ in rows:
        print(
            f"{label:<26}{count:>10,}{drain:>9.1f}{seconds:>8.1f}{seconds / drain:>7.2f}{in_run:>10.1f}"
            f"{in_run / drain:>7.2f}{count / seconds:>9,.0f}{drain_reads:>13}{sync_reads:>12}{tree / mb:>13.0f}"
            f"{single / mb:>12.0f}"
        )
    print("\neach turn's sync / the drain just before it (paired: a slower minute slows both alike):")
    for label, *_, ratios in rows:
        if len(ratios) > 1:
            turns = " ".join(f"{r:.2f}" for r in ratios)
            print(f"  {label:<24} median {statistics.median(ratios):.2f}   turns {turns}")
    baseline, inferred = rows[0], rows[1]
    print(f"\ntype inference adds {inferred[3] / baseline[3] - 1:+.1%} to the sync time")
    print(
        "sync s: the whole `aries sync` command (process start, Dagster run); in run s: the engine's own time"
    )
    if args.factor:
        large = rows[2]
        print(f"{args.factor}x the documents -> {large[8] / inferred[8]:.2f}x the largest process's peak RSS")
    print(f"drain s, sync s, in run s: the best of {args.repeat}, drains and syncs taking turns")
    print("reads: queries + getMores the server answered (opcounters); a range read is one query")
    print("RSS: from a second, watched sync of the same collection (watching costs the timed run CPU)")


if __name__ == "__main__":
    main()
