"""A split first load: `_id`-range runs of one collection at once (a backfill), then one settling run."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap
import threading
import time

import dagster as dg
import pytest
from bson.max_key import MaxKey

from aries_assets.config import load_config
from aries_assets.core.changes import collection_scope, load_scope_token
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import LocalLake
from aries_assets.core.ledger import Lease, LeaseHeld, LedgerStore, lease_file
from aries_assets.core.ordering import sort_key
from aries_assets.definitions import build_definitions
from aries_assets_tests.support import (
    assert_same_documents,
    lake_documents,
    lake_tables,
    mongo_documents,
    run_cli,
    write_config,
)
from aries_assets_tests.test_sensor import tick

# --- the lease: range runs share the collection, a collection writer excludes them ---------------


def test_range_leases_share_the_collection_and_a_collection_writer_excludes_them(tmp_path):
    lake = LocalLake(tmp_path)
    first = Lease(lake, "db", "coll", "range run 1", range_key="first")
    second = Lease(lake, "db", "coll", "range run 2", range_key="int-500")
    first.acquire(wait=0)
    second.acquire(wait=0)  # another range of the same collection: at the same time
    with pytest.raises(LeaseHeld, match="range first"):
        Lease(lake, "db", "coll", "range run 3", range_key="first").acquire(wait=0)
    assert Lease(lake, "db", "coll", "sync").try_acquire().range in ("first", "int-500")
    waited: list = []
    writer = Lease(lake, "db", "coll", "sync", ttl=5)
    releaser = threading.Timer(1.5, lambda: (first.release(), second.release()))
    releaser.start()
    started = time.monotonic()
    # Time spent behind range runs does not count against the wait: they end, or expire if they died.
    writer.acquire(wait=0.2, on_wait=waited.append)
    assert time.monotonic() - started >= 1.4 and waited and waited[0].range is not None
    with pytest.raises(LeaseHeld, match="sync"):
        Lease(lake, "db", "coll", "range run 4", range_key="first").acquire(wait=0)
    writer.release()
    Lease(lake, "db", "coll", "range run 4", range_key="first").acquire(wait=0)


def test_a_range_lease_taken_over_by_a_collection_writer_is_lost(tmp_path):
    lake = LocalLake(tmp_path)
    stale = Lease(lake, "db", "coll", "range run", range_key="first", ttl=0.3)
    assert stale.try_acquire() is None  # taken, but never renewed: as if its holder were paused
    time.sleep(0.4)
    writer = Lease(lake, "db", "coll", "sync")
    writer.acquire(wait=0)
    stale.renew()
    with pytest.raises(LeaseHeld, match="taken over"):
        stale.check()
    stale.release()  # a lost lease gives nothing back: the writer keeps it
    assert writer.current().holder == "sync" and not writer.current().expired
    writer.release()


# --- a split first load, end to end --------------------------------------------------------------

RANGE_RUN = textwrap.dedent(
    """
    import os, sys, time
    import dagster as dg
    from aries_assets.config import load_config
    from aries_assets.core import engine
    from aries_assets.definitions import build_definitions
    if len(sys.argv) > 4:
        # Each bucket written, the run holds (and renews its lease) until the file named exists.
        write = engine._WriteJob.run
        def held(job, lake):
            written = write(job, lake)
            deadline = time.monotonic() + 120
            while not os.path.exists(sys.argv[4]) and time.monotonic() < deadline:
                time.sleep(0.05)
            return written
        engine._WriteJob.run = held
    defs = build_definitions(load_config(sys.argv[1]))
    job = defs.resolve_job_def(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, partition_key=sys.argv[3], raise_on_error=False)
    print("ok" if result.success else "failed", flush=True)
    """
)


class RangeLeaseWatch:
    """Polls lease.json: how many range runs held the collection at once, and whether any does now."""

    def __init__(self, lake_dir, database: str, collection: str) -> None:
        self.path = lake_dir / lease_file(database, collection)
        self.most = 0
        self.live = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                body = json.loads(self.path.read_text())
            except (OSError, ValueError):
                body = {}
            self.live = sum(1 for r in body.get("ranges", {}).values() if r["expires_at"] > time.time())
            self.most = max(self.most, self.live)
            time.sleep(0.02)

    def __enter__(self) -> RangeLeaseWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def test_a_split_first_load_runs_its_ranges_at_once_and_a_sync_during_them_waits(
    client, mongo_uri, database, workdir
):
    rng = random.Random(12)
    total = 12_000
    client[database].events.insert_many(
        [{"_id": i, "v": i, "s": "x" * rng.randrange(200)} for i in range(total)]
    )
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": "events", "bucket_size": 100}],
        sync={"workers": 1},
    )
    code, out, err = run_cli("split", f"{database}.events", "--runs", "4")
    assert code == 0, err
    own = collection_scope(SourceCollection(database, "events"))
    marked, _ = load_scope_token(LocalLake(workdir / "lake"), own)
    assert marked is not None, "its own stream is marked, as a first load's is: the sensor joins it by token"
    name = f"{database}__events"
    assert "dagster job backfill" in out and f"-j load__{name}" in out

    lake = LocalLake(workdir / "lake")
    ledger = LedgerStore(lake, database, "events").load()
    assert len(ledger.ranges) == 4 and sorted(ledger.dirty) == sorted(ledger.ranges)
    keys = ledger.bucket_map().keys
    bounds = ledger.lowers[1:] + [MaxKey()]
    for lower, upper in zip(ledger.lowers, bounds, strict=True):
        inside = sum(1 for i in range(total) if sort_key(lower) <= sort_key(i) < sort_key(upper))
        assert total * 0.15 < inside < total * 0.35, "ranges of about equal size"

    defs = build_definitions(load_config())
    with dg.DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions(name)) == sorted(keys)
        # The sensor leaves a split first load to its range runs.
        assert tick(defs, instance, f"changes__{database}").run_requests == []

    release = workdir / "release-the-range-runs"
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                RANGE_RUN,
                str(workdir / "aries.yaml"),
                f"load__{name}",
                key,
                str(release),
            ],
            cwd=workdir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for key in keys
    ]
    sync = None
    try:
        for run in runs:
            assert run.stdout.readline().strip() == "ready", run.stderr.read()
        with RangeLeaseWatch(workdir / "lake", database, "events") as watch:
            for run in runs:
                run.stdin.write("go\n")
                run.stdin.flush()
            deadline = time.monotonic() + 60
            while watch.live == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert watch.live, "no range run took its lease"
            # Changes while the ranges load: the stream records them, the settling run writes them.
            coll = client[database].events
            for i in range(30):
                roll = rng.random()
                if roll < 0.5:
                    coll.update_one({"_id": rng.randrange(total)}, {"$set": {"v": -i}})
                elif roll < 0.8:
                    coll.insert_one({"_id": total + i, "v": i})
                else:
                    coll.delete_one({"_id": rng.randrange(total)})
            # A whole-collection sync started now waits for the range runs (held after a bucket each,
            # however fast this machine is), then settles once they are done.
            sync = subprocess.Popen(
                [sys.executable, "-m", "aries_assets.cli", "sync", "--workers", "1", "--plain"],
                cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            waiting = sync.stderr.readline()
            while waiting and "waiting for the lease held by" not in waiting:
                waiting = sync.stderr.readline()
            assert "range" in waiting, f"the sync did not wait for the range runs: {waiting!r}"
            assert watch.live, "the range runs still hold the lease"
            release.touch()
            out, err = sync.communicate(timeout=300)
            assert sync.returncode == 0, err
            # Changes inside a range being cut mark their documents, not the range: few rewrites.
            written = int(re.search(r"(\d+) written", out).group(1))
            assert written <= 35, out
            results = [run.communicate(timeout=300) for run in runs]
        assert all(o.strip().endswith("ok") for o, _ in results), results
        assert watch.most >= 2, "the range runs overlapped in time"
    finally:
        release.touch()
        for process in [*runs, *([sync] if sync else [])]:
            process.kill()

    folder = workdir / "lake" / database / "events"
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))
    ledger = LedgerStore(lake, database, "events").load()
    assert not ledger.ranges and not ledger.dirty and ledger.unsettled is None
    sizes = [t.num_rows for t in lake_tables(folder).values()]
    assert len(sizes) == len(ledger.lowers) and max(sizes) <= 200
    assert len(sizes) >= total // 100, "each range was cut into buckets of bucket_size"
    with dg.DagsterInstance.get() as instance:
        records = instance.get_run_records(dg.RunsFilter(tags={"aries/split": name}))
        assert len(records) == 4 and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
        # Nothing left: the sensor asks for no run.
        assert tick(defs, instance, f"changes__{database}").run_requests == []
    before, _ = load_scope_token(lake, own)
    assert run_cli("split", f"{database}.events", "--runs", "4")[0] == 2, "a loaded collection is not split"
    assert load_scope_token(lake, own)[0] == before, "a refused split leaves the stream's token as it was"
