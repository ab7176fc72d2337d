"""Does `make demo` keep up with its trickle? Run queue and change -> lake latency over time.

    python benchmarks/demo_benchmark.py [--minutes 10] [--port PORT] [--mongo-port PORT]

Starts the real demo (`aries demo`: SecantusDB, the seed, a first sync, the trickle and
`dagster dev` with its sensors) in a scratch directory on ports of its own, then every
10 seconds:

- counts the queued and the started runs in the demo's Dagster instance;
- inserts a marker event into `app.events` (an ordinary demo event, so the schema stays as
  it is) and, until the next samples, looks for it in the lake's Parquet files: the time
  from the insert until a bucket file holds it is the change -> lake latency.

Prints a table per minute and a summary: queue length at start, end and max, latency
p50/p95/max, and whether the queue grew (the least-squares slope of queued runs).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from pymongo import MongoClient

from aries_assets.demo.data import make_event
from aries_assets.demo.mongo_server import free_port, mongo_uri

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SECONDS = 10.0
STARTUP_SECONDS = 600  # the seed and first sync on a busy machine
# The queue grew if its fitted line rises by at least this many runs over the measurement.
GROWTH_RUNS = 1.0


@dataclass
class Sample:
    at: float  # seconds since the measurement started
    queued: int
    started: int


@dataclass
class Marker:
    id: str
    written_at: float  # seconds since the measurement started
    latency: float | None = None


@dataclass
class Measurement:
    samples: list[Sample] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)


def start_demo(directory: Path, port: int, mongo_port: int, log: Path) -> subprocess.Popen:
    for name in ("workspace.yaml", "dagster.yaml"):
        shutil.copy(REPO / name, directory / name)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(directory / ".dagster"),
        "ARIES_DEMO_MONGO_PORT": str(mongo_port),
    }
    env.pop("ARIES_CONFIG", None)
    aries = Path(sys.executable).with_name("aries")
    with open(log, "wb") as output:
        return subprocess.Popen(
            [str(aries), "demo", "--port", str(port)],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_ui(demo: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if demo.poll() is not None:
            raise SystemExit(f"aries demo exited early:\n{log.read_text()[-3000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(1)
    raise SystemExit(f"the Dagster UI did not answer within {STARTUP_SECONDS}s:\n{log.read_text()[-3000:]}")


def run_counts(instance) -> tuple[int, int]:
    import dagster as dg

    queued = instance.get_runs_count(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
    started = instance.get_runs_count(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED])
    )
    return queued, started


def lake_ids(folder: Path, newest: int = 2) -> set[str]:
    """The `_id`s in the newest bucket files: an insert lands in the last bucket (or a new one)."""
    ids: set[str] = set()
    files = sorted(folder.glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns, reverse=True)[:newest]
    for path in files:
        with contextlib.suppress(Exception):  # a file replaced while we read it: next poll
            ids.update(pq.read_table(path, columns=["_id"]).column("_id").to_pylist())
    return ids


def measure(client: MongoClient, instance, folder: Path, minutes: float) -> Measurement:
    rng = random.Random()
    app_ids = [a["_id"] for a in client.app.apps.find({}, {"_id": 1})]
    result = Measurement()
    start = time.monotonic()
    next_sample = start
    end = start + minutes * 60
    while True:
        now = time.monotonic()
        if now >= next_sample and now < end + 0.5:
            queued, started = run_counts(instance)
            result.samples.append(Sample(now - start, queued, started))
            event = make_event(rng, app_ids, datetime.datetime.now(datetime.UTC))
            client.app.events.insert_one(event)
            result.markers.append(Marker(str(event["_id"]), time.monotonic() - start))
            print(
                f"  {now - start:6.0f}s  queued {queued:3d}  started {started:3d}  "
                f"pending markers {sum(m.latency is None for m in result.markers)}",
                file=sys.stderr,
                flush=True,
            )
            next_sample += SAMPLE_SECONDS
        pending = [m for m in result.markers if m.latency is None]
        if pending:
            seen = lake_ids(folder)
            for marker in pending:
                if marker.id in seen:
                    marker.latency = time.monotonic() - start - marker.written_at
        if now >= end and (not pending or now >= end + 60):  # a minute's grace for the last markers
            return result
        time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def slope_per_minute(samples: list[Sample]) -> float:
    """Least-squares slope of queued runs against time, in runs per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [s.at / 60 for s in samples]
    ys = [s.queued for s in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0


def fmt(value: float | None) -> str:
    return "    -" if value is None else f"{value:5.1f}"


def report(result: Measurement, minutes: float) -> str:
    lines = [
        "minute  samples  queued avg/max  started avg/max  markers  seen  latency p50/max (s)",
    ]
    rows = max(1, int(-(-minutes // 1)))

    def minute_of(at: float) -> int:  # the sample at the very end belongs to the last minute
        return min(int(at // 60), rows - 1)

    for minute in range(rows):
        samples = [s for s in result.samples if minute_of(s.at) == minute]
        markers = [m for m in result.markers if minute_of(m.written_at) == minute]
        seen = [m.latency for m in markers if m.latency is not None]
        if not samples:
            continue
        lines.append(
            f"{minute + 1:6d}  {len(samples):7d}  "
            f"{statistics.fmean(s.queued for s in samples):6.1f} / {max(s.queued for s in samples):3d}  "
            f"{statistics.fmean(s.started for s in samples):7.1f} / {max(s.started for s in samples):3d}  "
            f"{len(markers):7d}  {len(seen):4d}  "
            f"{fmt(statistics.median(seen) if seen else None)} / {fmt(max(seen) if seen else None)}"
        )
    queued = [s.queued for s in result.samples]
    latencies = [m.latency for m in result.markers if m.latency is not None]
    missing = [m for m in result.markers if m.latency is None]
    slope = slope_per_minute(result.samples)
    rise = slope * (result.samples[-1].at / 60 if result.samples else 0)
    lines += [
        "",
        f"queued runs: start {queued[0]}, end {queued[-1]}, max {max(queued)}; "
        f"slope {slope:+.2f} runs/min ({'GREW' if rise >= GROWTH_RUNS else 'steady'})",
        f"started runs: max {max(s.started for s in result.samples)}",
    ]
    if latencies:
        lines.append(
            f"change -> lake latency: n={len(latencies)}  p50 {statistics.median(latencies):.1f}s  "
            f"p95 {percentile(latencies, 0.95):.1f}s  max {max(latencies):.1f}s"
        )
    if missing:
        lines.append(
            f"markers never seen in the lake (within a minute's grace): {len(missing)} of {len(result.markers)}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to measure (default 10)")
    parser.add_argument("--port", type=int, default=0, help="Dagster UI port (default: a free one)")
    parser.add_argument("--mongo-port", type=int, default=0, help="SecantusDB port (default: a free one)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch directory (its logs, lake, runs)"
    )
    args = parser.parse_args()
    port, mongo_port = args.port or free_port(), args.mongo_port or free_port()

    directory = Path(tempfile.mkdtemp(prefix="aries-demo-bench-"))
    log = directory / "demo.log"
    print(f"aries demo in {directory} (UI port {port}, MongoDB port {mongo_port})", file=sys.stderr)
    demo = start_demo(directory, port, mongo_port, log)
    try:
        began = time.monotonic()
        wait_for_ui(demo, port, log)
        print(f"demo up in {time.monotonic() - began:.0f}s; measuring {args.minutes:g} min", file=sys.stderr)
        os.environ["DAGSTER_HOME"] = str(directory / ".dagster")
        import dagster as dg

        with dg.DagsterInstance.get() as instance, MongoClient(mongo_uri(mongo_port)) as client:
            result = measure(client, instance, directory / ".aries/demo/lake/app/events", args.minutes)
        print(report(result, args.minutes))
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)  # the demo stops everything it started
            try:
                demo.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
        if args.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
