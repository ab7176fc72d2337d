"""`aries status`: lag, dirty buckets, the lease holder and warehouse parity, as a table or JSON."""

from __future__ import annotations

import json

from bson import Timestamp

from aries_assets.core.changes import StreamScope, majority_time, record_changes
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import LocalLake
from aries_assets.core.ledger import Lease, LedgerStore
from aries_assets_tests.support import run_cli, write_config


def test_status_reports_dirty_buckets_a_lease_and_lag(client, mongo_uri, database, workdir):
    coll = client[database].events
    coll.insert_many([{"_id": i, "v": i} for i in range(100)])
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": "events", "bucket_size": 30}],
        warehouse={"url": f"duckdb:///{workdir / 'w.duckdb'}"},
    )
    assert run_cli("sync", "--workers", "1")[0] == 0
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    (status,) = json.loads(out)
    assert status["in_step"] and status["documents"] == 100 and status["buckets"] == 4
    assert status["warehouse_rows"] == 100 and status["warehouse_buckets_behind"] == 0
    assert status["lease"] is None and status["dirty_buckets"] == 0

    lake = LocalLake(workdir / "lake")
    source = SourceCollection(database, "events")
    coll.update_one({"_id": 45}, {"$set": {"v": "changed"}})
    record_changes(client, lake, StreamScope(database, "database", (source,)))
    store = LedgerStore(lake, database, "events")
    now = majority_time(client, source)
    store.update(lambda led: setattr(led, "position", Timestamp(now.time - 100, 0)))
    lease = Lease(lake, database, "events", "a test holder")
    lease.acquire(wait=0)
    try:
        code, out, _ = run_cli("status", "--json")
        (status,) = json.loads(out)
    finally:
        lease.release()
    assert status["dirty_buckets"] == 1 and status["waiting_for"] == "1 dirty bucket"
    assert "a test holder" in status["lease"]
    assert 99 <= status["lag_seconds"] <= 160
    assert not status["in_step"]

    code, out, _ = run_cli("status")  # the table form
    assert database in out and "waiting: 1 dirty bucket" in out


def test_status_is_not_in_step_when_nobody_has_read_the_changes_for_a_while(
    client, mongo_uri, database, workdir
):
    """With no sensor running (`aries sync` from cron), nothing records changes between syncs: status
    cannot know the lake is current, and must not say so."""
    client[database].events.insert_many([{"_id": i} for i in range(10)])
    write_config(
        workdir / "aries.yaml", mongo_uri, "./lake", [{"database": database, "collection": "events"}]
    )
    assert run_cli("sync", "--workers", "1")[0] == 0
    store = LedgerStore(LocalLake(workdir / "lake"), database, "events")
    now = majority_time(client, SourceCollection(database, "events"))
    store.update(lambda led: setattr(led, "position", Timestamp(now.time - 300, 0)))
    code, out, err = run_cli("status", "--json")
    assert code == 0, err  # not a failure: nothing is known to be wrong
    (status,) = json.loads(out)
    assert not status["in_step"] and status["dirty_buckets"] == 0
    assert "not read" in status["waiting_for"] and "aries sync" in status["waiting_for"]
    code, out, _ = run_cli("status")
    assert "not read" in out
