"""With the real daemon, sensor and runs: outages end exact with no command run."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import dagster as dg
import duckdb
from pymongo import MongoClient

from aries_assets.demo.daemon import running_daemon
from aries_assets.demo.mongo_server import embedded_mongo, free_port
from aries_assets_tests.support import (
    assert_same_documents,
    lake_documents,
    mongo_documents,
    run_cli,
    write_config,
)
from aries_assets_tests.test_warehouse import assert_table_equals_mongo

OUTAGE_SECONDS = 45


def wait_until(check, timeout: float, what: str, log=None, diagnose=None) -> None:
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            check()
            return
        except (AssertionError, duckdb.Error, OSError) as error:
            last_error = error
        time.sleep(2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    state = diagnose() if diagnose else ""
    raise AssertionError(f"{what} not reached in {timeout:.0f}s: {str(last_error)[:600]}\n{state}\n{tail}")


def lake_and_runs(folder, home) -> str:
    """What a failure needs to be understood after the temporary directory is gone: the ledger, each
    file's time, digest and values, and what each run materialized."""
    import datetime
    import json

    import pyarrow.parquet as pq

    lines = []
    ledger = folder / "_aries" / "ledger.json"
    if ledger.exists():
        body = json.loads(ledger.read_text())
        body.pop("lowers", None)
        lines.append(f"ledger: {json.dumps(body)[:2000]}")
    for path in sorted(folder.glob("*.parquet"), key=lambda p: p.stat().st_mtime):
        meta = {k.decode(): v.decode() for k, v in (pq.read_metadata(path).metadata or {}).items()}
        values = sorted(set(map(str, pq.read_table(path, columns=["v"]).column("v").to_pylist())))
        when = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%H:%M:%S.%f")[:12]
        digest = meta.get("aries.content_sha256", "")[:12]
        lines.append(f"file {path.name}: {when} digest {digest} v {values[:5]}")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        for run in instance.get_runs():
            written = []
            for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
                materialization = entry.dagster_event.event_specific_data.materialization
                if materialization.asset_key.path[-1] == folder.name:
                    written.append(materialization.partition)
            lines.append(f"run {run.run_id[:8]} {run.job_name} {run.status.value}: {written}")
            for entry in instance.all_logs(run.run_id):
                if entry.user_message and folder.name in entry.user_message and ":" in entry.user_message:
                    when = datetime.datetime.fromtimestamp(entry.timestamp).strftime("%H:%M:%S.%f")[:12]
                    lines.append(f"  {when} {entry.user_message[:300]}")
    return "\n".join(lines)


def test_mongodb_down_after_a_burst_converges_with_no_command(workdir):
    port, storage = free_port(), workdir / "mongo"
    warehouse = workdir / "warehouse.duckdb"
    config = workdir / "aries.yaml"
    rng = random.Random(7)
    with embedded_mongo(storage, port=port) as uri:
        with MongoClient(uri) as client:
            client.app.events.insert_many([{"_id": i, "v": 0} for i in range(2_000)])
        write_config(
            config,
            uri,
            str(workdir / "lake"),
            [{"database": "app", "collection": "events", "bucket_size": 250}],
            warehouse={"url": f"duckdb:///{warehouse}"},
        )
        assert run_cli("sync", "--workers", "1")[0] == 0
    folder = workdir / "lake" / "app" / "events"

    def exact(client) -> None:
        expected = mongo_documents(client, "app", "events")
        assert_same_documents(expected, lake_documents(folder))
        assert_table_equals_mongo(f"duckdb:///{warehouse}", "app", client.app.events)

    with running_daemon(workdir, config) as daemon:
        log = workdir / "daemon.log"
        with embedded_mongo(storage, port=port) as uri, MongoClient(uri) as client:
            coll = client.app.events
            time.sleep(8)  # the daemon is up and ticking
            for i in range(300):  # a burst: updates all over, inserts past the end, deletes
                roll = rng.random()
                if roll < 0.6:
                    coll.update_one({"_id": rng.randrange(2_000)}, {"$set": {"v": i}})
                elif roll < 0.9:
                    coll.insert_one({"_id": 10_000 + i, "v": i})
                else:
                    coll.delete_one({"_id": rng.randrange(2_000)})
        # MongoDB is down for a while right after the burst.
        time.sleep(OUTAGE_SECONDS)
        with embedded_mongo(storage, port=port) as uri, MongoClient(uri) as client:
            wait_until(lambda: exact(client), 150, "lake and warehouse equal to MongoDB", log)
            # `aries sync` while the daemon may be writing: it waits for the lease or finds nothing to do.
            client.app.events.update_one({"_id": 7}, {"$set": {"v": "late"}})
            done = subprocess.run(
                [sys.executable, "-m", "aries_assets.cli", "sync", "--config", str(config)],
                cwd=workdir,
                env={**os.environ, "DAGSTER_HOME": str(daemon.home)},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            wait_until(lambda: exact(client), 60, "exact after a sync beside the daemon", log)


def test_a_run_killed_with_kill_9_is_repaired_by_the_next_ticks(client, mongo_uri, database, workdir):
    """The run's process dies mid-write: its lease expires, the sensor marks the run failed and
    asks again, and the lake ends exact, with no command run."""
    coll = client[database].events
    coll.insert_many([{"_id": i, "v": 0, "pad": "x" * 2_000} for i in range(20_000)])
    config = workdir / "aries.yaml"
    write_config(
        config,
        mongo_uri,
        str(workdir / "lake"),
        [{"database": database, "collection": "events", "bucket_size": 500}],
        sync={"lease_seconds": 5, "linger_seconds": 0},
    )
    folder = workdir / "lake" / database / "events"
    with running_daemon(workdir, config) as daemon:
        log = workdir / "daemon.log"
        # The first load is the daemon's own run: kill its process while it writes.
        deadline = time.monotonic() + 120
        while not daemon.run_processes():
            assert time.monotonic() < deadline, "no run started:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        # Killed once its first bucket file lands, of 40: mid-write however fast the machine.
        while not any(folder.glob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.02)
        victims = daemon.run_processes()
        assert victims, "the run finished before it could be killed; make the collection larger"
        for process in victims:
            process.kill()
        coll.update_one({"_id": 3}, {"$set": {"v": "after the kill"}})
        wait_until(
            lambda: assert_same_documents(
                mongo_documents(client, database, "events"), lake_documents(folder)
            ),
            180,
            "lake equal to MongoDB after the killed run",
            log,
        )
        assert not [p for p in folder.rglob("*.tmp")], "no temporary file left"


def test_a_serving_run_killed_with_kill_9_is_repaired_by_the_next_ticks(client, mongo_uri, database, workdir):
    """A run serving the stream dies while it rewrites buckets: it is marked failed (by the code
    server that launched it, or by the sensor once its heartbeat expires), a new serving run is
    requested, and the lake ends exact, with no command run."""
    coll = client[database].events
    coll.insert_many([{"_id": i, "v": 0, "pad": "x" * 2_000} for i in range(20_000)])
    other = client[database].other
    other.insert_many([{"_id": i, "v": 0} for i in range(100)])
    config = workdir / "aries.yaml"
    write_config(
        config,
        mongo_uri,
        str(workdir / "lake"),
        [
            {"database": database, "collection": "events", "bucket_size": 500},
            {"database": database, "collection": "other", "bucket_size": 50},
        ],
        sync={"lease_seconds": 5, "linger_seconds": 60},
    )
    assert run_cli("sync", "--workers", "1")[0] == 0
    with running_daemon(workdir, config) as daemon:
        log = workdir / "daemon.log"
        time.sleep(5)  # the daemon is up and ticking
        changed = time.time()
        coll.update_many({}, {"$set": {"v": 1}})  # every bucket dirty: a long rewrite
        other.update_one({"_id": 3}, {"$set": {"v": 1}})
        deadline = time.monotonic() + 120
        while not daemon.run_processes():
            assert time.monotonic() < deadline, "no run started:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        # Killed once it has rewritten its first bucket file, of 40: mid-write however fast the machine.
        folder = workdir / "lake" / database / "events"
        while time.monotonic() < deadline and not any(
            p.stat().st_mtime > changed for p in folder.glob("*.parquet")
        ):
            time.sleep(0.02)
        victims = daemon.run_processes()
        assert victims, "the run finished before it could be killed"
        for process in victims:
            process.kill()
        coll.update_one({"_id": 3}, {"$set": {"v": "after the kill"}})
        other.insert_one({"_id": 1_000, "v": "after the kill"})
        for name in ("events", "other"):
            wait_until(
                lambda name=name: assert_same_documents(
                    mongo_documents(client, database, name),
                    lake_documents(workdir / "lake" / database / name),
                ),
                240,
                f"{name}: lake equal to MongoDB after the killed serving run",
                log,
                diagnose=lambda name=name: lake_and_runs(workdir / "lake" / database / name, daemon.home),
            )
        with dg.DagsterInstance.from_config(str(daemon.home)) as instance:
            runs = instance.get_runs(filters=dg.RunsFilter(job_name=f"serve__{database}"))
        statuses = [r.status for r in runs]
        assert dg.DagsterRunStatus.FAILURE in statuses, f"the killed serving run is marked failed: {statuses}"
        later = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.STARTED}
        assert later & set(statuses), f"a later serving run did the work: {statuses}"
        assert not [p for p in (workdir / "lake").rglob("*.tmp")], "no temporary file left"
