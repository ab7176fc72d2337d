"""Change-stream latency: a write in MongoDB until the Parquet file shows it, with the daemon running.

    python benchmarks/latency_benchmark.py [--writes 20] [--mongodb-uri URI]

Runs what a deployment runs: `aries sync` once, then `dagster-daemon` with the
change sensors on. Each of `--writes` updates sets a marker on one document;
the time until a bucket file holds the marker is the end-to-end latency
(sensor tick + run launch + bucket rewrite). Prints p50/p95, then how many
change events per second the sensor's catch-up reads and maps to buckets.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from bson import ObjectId
from pymongo import MongoClient

from aries_assets.core import changes
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import LocalLake
from aries_assets.demo.mongo_server import embedded_mongo
from aries_assets.sensors import SENSOR_INTERVAL

ROOT = Path(__file__).resolve().parent.parent


def marker_visible(lake: Path, marker: str) -> bool:
    for path in lake.glob("*.parquet"):
        with contextlib.suppress(Exception):
            docs = pq.read_table(path, columns=["_doc"]).column("_doc").to_pylist()
            if any(marker in d for d in docs):
                return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20)
    parser.add_argument("--events", type=int, default=50_000, help="change events for the mapping rate")
    parser.add_argument("--mongodb-uri", default=os.environ.get("MONGODB_URI"))
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        uri = args.mongodb_uri or stack.enter_context(embedded_mongo(":memory:"))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="aries-latency-")))
        client = stack.enter_context(MongoClient(uri))
        coll = client.latency.events
        coll.drop()
        coll.insert_many([{"_id": ObjectId(), "n": i, "marker": ""} for i in range(5000)])
        config = work / "aries.yaml"
        config.write_text(
            f'mongo: {{uri: "{uri}"}}\nlake: {{url: "{work / "lake"}"}}\n'
            "collections:\n  - {database: latency, collection: events, bucket_size: 1000}\n"
        )
        home = work / "dagster_home"
        home.mkdir()
        shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
        env = {**os.environ, "ARIES_CONFIG": str(config), "DAGSTER_HOME": str(home)}
        subprocess.run(
            [sys.executable, "-m", "aries_assets.cli", "sync", "--workers", "1"],
            env=env,
            check=True,
            capture_output=True,
        )
        daemon = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dagster-daemon")),
                "run",
                "-w",
                str(ROOT / "workspace.yaml"),
            ],
            env=env,
            cwd=home,
            stdout=subprocess.DEVNULL,
            stderr=open(work / "daemon.log", "wb"),  # noqa: SIM115
        )
        stack.callback(daemon.wait, 30)
        stack.callback(daemon.terminate)
        lake = work / "lake" / "latency" / "events"
        ids = [d["_id"] for d in coll.find({}, {"_id": 1})]
        time.sleep(10)  # the daemon's first sensor tick adopts `aries sync`'s token
        latencies = []
        for i in range(args.writes):
            marker = f"m{i}-{ObjectId()}"
            started = time.monotonic()
            coll.update_one({"_id": ids[(i * 397) % len(ids)]}, {"$set": {"marker": marker}})
            while not marker_visible(lake, marker):
                if time.monotonic() - started > 180 or daemon.poll() is not None:
                    log = (work / "daemon.log").read_text()[-2000:]
                    raise SystemExit(f"write {i} not in the lake after 180s; daemon log tail:\n{log}")
                time.sleep(0.2)
            latencies.append(time.monotonic() - started)
            print(f"  write {i + 1}/{args.writes}: {latencies[-1]:.1f}s", file=sys.stderr, flush=True)

        # Mapping rate: read N change events from the stream and map them to buckets.
        source = SourceCollection("latency", "events")
        store = LocalLake(work / "lake")
        token = changes.current_token(coll)
        coll.insert_many([{"n": i} for i in range(args.events)])
        started = time.monotonic()
        plan = changes.plan_sync(
            source, coll, store, 1000, token, max_events=10 * args.events, max_seconds=600
        )
        seconds = time.monotonic() - started

    quantiles = statistics.quantiles(latencies, n=20)  # p95 interpolated between the two slowest writes
    print(
        f"\nwrite -> Parquet latency over {len(latencies)} writes "
        f"(daemon, sensor interval {SENSOR_INTERVAL}s, one run per bucket):"
    )
    print(f"  p50 {statistics.median(latencies):.1f}s   p95 {quantiles[18]:.1f}s   max {max(latencies):.1f}s")
    print(
        f"change events read and mapped to buckets: {plan.events:,} in {seconds:.1f}s = {plan.events / seconds:,.0f} events/s"
    )


if __name__ == "__main__":
    main()
