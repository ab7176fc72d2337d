"""Change-stream latency with the real daemon: a write in MongoDB until the Parquet file shows it.

    python benchmarks/latency_benchmark.py [--seconds 60] [--collections 150] [--mongodb-uri URI]

Runs what a deployment runs: `aries sync` once, then `dagster-daemon` with the
change sensors on and the shipped dagster.yaml. Two measurements, in one run:

1. one collection, one insert a second for `--seconds`: write -> Parquet p50/p95/max;
2. `--collections` collections in one database, one insert every two seconds into
   a random one: change -> lake p50/p95/max across collections.

Each also once more for the writes made after the first write was visible: the first
writes wait for the first run's process to start (a cold start); the later ones show how
fast a running daemon follows the stream.

The baseline is the sensor interval itself (a change waits for the next tick).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from bson import ObjectId
from pymongo import MongoClient

from aries_assets.demo.daemon import running_daemon
from aries_assets.demo.mongo_server import embedded_mongo
from aries_assets.sensors import SENSOR_INTERVAL


def visible(folder: Path, marker: str) -> bool:
    """Does a bucket file of the collection hold the marker? Newest files first: inserts land there."""
    for path in sorted(folder.glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        with contextlib.suppress(Exception):
            if any(marker in d for d in pq.read_table(path, columns=["_doc"]).column("_doc").to_pylist()):
                return True
    return False


def summary(name: str, latencies: list[float]) -> str:
    p95 = statistics.quantiles(latencies, n=20)[18] if len(latencies) > 1 else latencies[0]
    return (
        f"{name:<44} n={len(latencies):<4} p50 {statistics.median(latencies):5.1f}s   "
        f"p95 {p95:5.1f}s   max {max(latencies):5.1f}s"
    )


def measure(
    coll_of, folder_of, names: list[str], writes: int, every: float, daemon_log: Path
) -> tuple[list[float], list[float]]:
    """Insert one marked document every `every` seconds into a random collection; time until visible.

    Returns every write's latency, and those of the writes made once the first write was
    visible: the cold start (the first run's process start) is paid by the first writes only.
    """
    rng = random.Random(3)
    pending: dict[str, tuple[str, float]] = {}
    latencies: list[float] = []
    issued: list[tuple[float, float]] = []  # (written at, latency)
    next_write = time.monotonic()
    written = 0
    deadline = time.monotonic() + writes * every + 180
    while (written < writes or pending) and time.monotonic() < deadline:
        if written < writes and time.monotonic() >= next_write:
            name = rng.choice(names)
            marker = f"m{written}-{ObjectId()}"
            coll_of(name).insert_one({"_id": ObjectId(), "marker": marker})
            pending[marker] = (name, time.monotonic())
            written += 1
            next_write += every
        for marker, (name, started) in list(pending.items()):
            if visible(folder_of(name), marker):
                latencies.append(time.monotonic() - started)
                issued.append((started, latencies[-1]))
                del pending[marker]
        time.sleep(0.1)
    if pending:
        tail = daemon_log.read_text()[-3000:] if daemon_log.exists() else ""
        raise SystemExit(f"{len(pending)} writes never reached the lake; daemon log tail:\n{tail}")
    first_seen = min(at + latency for at, latency in issued)
    return latencies, [latency for at, latency in issued if at >= first_seen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="one insert a second for this long")
    parser.add_argument("--collections", type=int, default=150)
    parser.add_argument("--spread-writes", type=int, default=30, help="writes across the many collections")
    parser.add_argument("--mongodb-uri", default=os.environ.get("MONGODB_URI"))
    args = parser.parse_args()
    results = []
    with contextlib.ExitStack() as stack:
        uri = args.mongodb_uri or stack.enter_context(embedded_mongo(":memory:"))
        client = stack.enter_context(MongoClient(uri))
        for part, names in (("one", ["events"]), ("many", [f"c{i:03d}" for i in range(args.collections)])):
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"aries-latency-{part}-")))
            db = f"latency_{part}"
            client.drop_database(db)
            for name in names:
                client[db][name].insert_many(
                    [{"_id": ObjectId(), "n": i} for i in range(5000 if part == "one" else 20)]
                )
            config = work / "aries.yaml"
            collections = "".join(
                f"  - {{database: {db}, collection: {n}, bucket_size: 1000}}\n" for n in names
            )
            config.write_text(
                f'mongo: {{uri: "{uri}"}}\nlake: {{url: "{work / "lake"}"}}\ncollections:\n{collections}'
            )
            env = {**os.environ, "ARIES_CONFIG": str(config), "DAGSTER_HOME": str(work / "dagster_home")}
            print(f"[{part}] first sync of {len(names)} collections ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "aries_assets.cli", "sync"], env=env, check=True, capture_output=True
            )
            print(f"[{part}] first sync took {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
            with running_daemon(work, config):
                time.sleep(10)  # the daemon and its first ticks are up
                folder = lambda name, work=work, db=db: work / "lake" / db / name  # noqa: E731
                coll = lambda name, db=db: client[db][name]  # noqa: E731
                if part == "one":
                    latencies, warm = measure(coll, folder, names, args.seconds, 1.0, work / "daemon.log")
                    label = "one collection, one insert a second"
                else:
                    latencies, warm = measure(
                        coll, folder, names, args.spread_writes, 2.0, work / "daemon.log"
                    )
                    label = f"{len(names)} collections, one insert every 2 s"
                results.append(summary(label, latencies))
                results.append(summary("  writes after the first was visible", warm))
            print("\n".join(results[-2:]), file=sys.stderr, flush=True)
    print(
        f"\nwrite -> Parquet with the daemon (sensor interval {SENSOR_INTERVAL}s, the baseline a change waits for):"
    )
    for line in results:
        print("  " + line)


if __name__ == "__main__":
    main()
