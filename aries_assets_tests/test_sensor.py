"""The change-stream sensor against a real server and a real Dagster instance.

The sensor only reads the stream, records dirty buckets in the ledger and requests
one run per collection; the tests then run what it requested, as the daemon would.
"""

from __future__ import annotations

import threading
import time

import dagster as dg
import pyarrow.parquet as pq
import pytest
from bson import ObjectId, Timestamp
from pymongo import MongoClient

from aries_assets.config import load_config
from aries_assets.core.changes import (
    StreamScope,
    collection_scope,
    load_scope_token,
    majority_time,
    record_changes,
    save_scope_token,
    scope_file,
)
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import LocalLake, bucket_map_file
from aries_assets.core.ledger import LedgerStore, ledger_file
from aries_assets.definitions import build_definitions
from aries_assets.demo.mongo_server import embedded_mongo, free_port
from aries_assets_tests.support import (
    assert_same_documents,
    events_config,
    lake_documents,
    mongo_documents,
    run_cli,
    write_config,
)


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, name: str, cursor: str | None = None):
    sensor = defs.resolve_sensor_def(name)
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources=defs.resources
    ) as context:
        return sensor(context)


def apply(defs: dg.Definitions, instance: dg.DagsterInstance, result: dg.SensorResult, expect_success=True):
    """What the daemon does with a SensorResult: run each requested job (here without lingering)."""
    outcomes = []
    for request in result.run_requests:
        job = defs.resolve_job_def(request.job_name)
        op = job.nodes[0].name
        config = dict((request.run_config or {}).get("ops", {}).get(op, {}).get("config", {}))
        outcome = job.execute_in_process(
            instance=instance,
            tags=request.tags,
            run_config={"ops": {op: {"config": {**config, "linger_seconds": 0.0}}}},
            raise_on_error=False,
        )
        assert outcome.success == expect_success
        outcomes.append(outcome)
    return outcomes


def ledger_of(workdir, database, collection="events"):
    return LedgerStore(LocalLake(workdir / "lake"), database, collection).load()


@pytest.fixture
def synced(client, mongo_uri, database, workdir):
    coll = client[database].events
    coll.insert_many([{"_id": ObjectId(), "n": i, "tags": ["a"]} for i in range(50)])
    events_config(workdir, mongo_uri, database, bucket_size=20)
    assert run_cli("sync", "--workers", "1")[0] == 0
    defs = build_definitions(load_config())
    return coll, defs, workdir / "lake" / database / "events", f"changes__{database}"


def test_one_tick_records_the_changes_and_one_run_makes_the_lake_exact(client, database, workdir, synced):
    coll, defs, folder, sensor = synced
    with dg.DagsterInstance.get() as instance:
        assert tick(defs, instance, sensor).run_requests == []  # `aries sync` left nothing to do

        ids = [d["_id"] for d in coll.find({}, {"_id": 1}).sort("_id", 1)]
        coll.update_one({"_id": ids[3]}, {"$set": {"n": -3}})  # bucket 1
        coll.update_one({"_id": ids[25]}, {"$unset": {"tags": ""}})  # bucket 2
        coll.replace_one({"_id": ids[26]}, {"replaced": True})  # bucket 2
        coll.delete_one({"_id": ids[45]})  # bucket 3, the newest
        coll.insert_many([{"_id": ObjectId(), "n": 100 + i} for i in range(35)])  # fills bucket 3, opens more
        result = tick(defs, instance, sensor)
        (request,) = result.run_requests
        assert request.job_name == f"serve__{database}", "a run serving the stream's collections"
        assert request.tags["aries/scope"] == database
        (observation,) = [e for e in result.asset_events if e.asset_key.path[-1] == "events"]
        metadata = {k: v.value for k, v in observation.metadata.items()}
        assert metadata["dirty_buckets"] == 3 and metadata["waiting_for"] == "3 dirty buckets"
        assert metadata["lease"] == "free", "no run writes the collection yet"
        ledger = ledger_of(workdir, database)
        assert sorted(ledger.dirty) == sorted(ledger.bucket_map().keys[:3])

        (outcome,) = apply(defs, instance, result)
        assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))
        after = ledger_of(workdir, database)
        assert not after.dirty, "a bucket leaves the ledger once its file is written"
        assert len(after.bucket_map().keys) >= 5, "the inserts opened new buckets"
        partitions = set(instance.get_dynamic_partitions(f"{database}__events"))
        assert set(after.bucket_map().keys) <= partitions
        materialized = instance.get_materialized_partitions(dg.AssetKey(["lake", database, "events"]))
        assert set(after.bucket_map().keys) <= materialized

        quiet = tick(defs, instance, sensor, result.cursor)
        assert quiet.run_requests == []


def test_an_exclude_added_to_the_config_is_requested_by_the_sensor_with_no_change(
    client, mongo_uri, database, workdir, synced
):
    """The daemon's path: with no document changing, a tick of the new config asks a re-read, and
    its run scrubs the excluded field from every file."""
    coll, _, folder, sensor = synced
    entry = {"database": database, "collection": "events", "bucket_size": 20, "schema": {"exclude": ["tags"]}}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry])
    defs = build_definitions(load_config())
    with dg.DagsterInstance.get() as instance:
        result = tick(defs, instance, sensor)
        (request,) = result.run_requests
        assert request.job_name == f"sync__{database}__events", "a whole-collection read: a run of its own"
        assert ledger_of(workdir, database).reread["reason"].startswith("its files were written with other")
        apply(defs, instance, result)
    expected = mongo_documents(client, database, "events")
    for path in folder.glob("*.parquet"):
        table = pq.read_table(path)
        assert "tags" not in table.column_names, path.name
        assert not [d for d in table.column("_doc").to_pylist() if '"tags"' in d], path.name
    assert len(lake_documents(folder)) == len(expected)
    assert ledger_of(workdir, database).reread is None
    with dg.DagsterInstance.get() as instance:
        assert tick(defs, instance, sensor).run_requests == [], "once rewritten, nothing more to do"


def test_an_idle_collection_still_advances_its_position(client, database, workdir, synced):
    coll, defs, folder, sensor = synced
    lake = LocalLake(workdir / "lake")
    scope = StreamScope(database, "database", (SourceCollection(database, "events"),))
    before = ledger_of(workdir, database).position
    time.sleep(1.1)
    client[database].other.insert_many([{"x": i} for i in range(5)])  # the oplog moves on elsewhere
    recorded, changes = record_changes(client, lake, scope, idle_persist_seconds=0)
    assert changes.caught_up
    after = ledger_of(workdir, database)
    assert after.position > before and not after.dirty


def test_a_change_delivered_after_the_position_passed_its_time_is_still_recorded(
    client, database, workdir, synced
):
    """SecantusDB answers a majority read with an operation time past the events of an update_many it
    is still publishing: a tick caught up at that time moved the position past changes the stream
    delivered only later, and a filter on the position dropped them. 11 buckets were left stale with
    a clean ledger (the kill -9 test, twice on CI). Resumed after its token, the stream records every
    change it delivers."""
    coll, defs, folder, sensor = synced
    lake = LocalLake(workdir / "lake")
    scope = StreamScope(database, "database", (SourceCollection(database, "events"),))
    record_changes(client, lake, scope, idle_persist_seconds=0)  # the scope's token is saved
    first = coll.find_one(sort=[("_id", 1)])
    coll.update_one({"_id": first["_id"]}, {"$set": {"n": -1}})
    # As the tick would have: the position moved past the change before the stream delivered it.
    store = LedgerStore(lake, database, "events")
    changed_at = majority_time(client, SourceCollection(database, "events"))
    store.update(lambda led: led.advance(Timestamp(changed_at.time + 60, 0)))
    record_changes(client, lake, scope)
    assert "first" in ledger_of(workdir, database).dirty, "the change is recorded"
    with dg.DagsterInstance.get() as instance:
        apply(defs, instance, tick(defs, instance, sensor))
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))


def test_a_collection_joins_its_database_stream_through_its_own_stream_not_from_a_time(
    client, database, workdir, synced
):
    """The database stream's first read after the first loads has no token, and used to start at its
    collections' oldest position. A start time is not exact on every server: SecantusDB places one
    past writes it is still committing, and skips them (a 9,000-document prefix of an update_many in
    the kill -9 test on CI, never marked). The stream now opens at the present, and each collection
    joins through its own stream, resumed after the token its first load saved: here the position
    is past the change, and the change is recorded all the same."""
    coll, defs, folder, sensor = synced
    lake = LocalLake(workdir / "lake")
    source = SourceCollection(database, "events")
    scope = StreamScope(database, "database", (source,))
    assert load_scope_token(lake, scope) == (None, set()), "no read of the database stream yet"
    first = coll.find_one(sort=[("_id", 1)])
    coll.update_one({"_id": first["_id"]}, {"$set": {"n": -1}})
    store = LedgerStore(lake, database, "events")
    changed_at = majority_time(client, source)
    store.update(lambda led: led.advance(Timestamp(changed_at.time + 60, 0)))
    record_changes(client, lake, scope)
    assert "first" in ledger_of(workdir, database).dirty, "the change is recorded"
    assert load_scope_token(lake, scope)[1] == {source.label}, "the collection has joined the stream"
    coll.update_one({"_id": first["_id"]}, {"$set": {"n": -2}})
    with dg.DagsterInstance.get() as instance:
        apply(defs, instance, tick(defs, instance, sensor))
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))


def test_a_joining_collections_change_is_counted_once(client, database, workdir, synced):
    """A collection joining its scope has its changes marked by the scope's read and read again by
    its own stream: the tick's counts (the sensor's `change_events`) had each such change twice."""
    coll, defs, folder, sensor = synced
    lake = LocalLake(workdir / "lake")
    source = SourceCollection(database, "events")
    scope = StreamScope(database, "database", (source,))
    record_changes(client, lake, scope)
    token, members = load_scope_token(lake, scope)
    assert members == {source.label}
    save_scope_token(lake, scope, token, set())  # as if it were new to the scope: it joins again
    first = coll.find_one(sort=[("_id", 1)])
    coll.update_one({"_id": first["_id"]}, {"$set": {"n": -1}})
    recorded, _ = record_changes(client, lake, scope)
    assert recorded[source.label].events == 1
    assert recorded[source.label].marked == 1
    assert load_scope_token(lake, scope)[1] == {source.label}, "joined"
    assert "first" in ledger_of(workdir, database).dirty


def test_a_collection_with_no_token_of_its_own_joins_from_its_position_even_with_a_re_read_waiting(
    client, database, workdir, synced
):
    """A lake of an older Aries, or a lost history, leaves a collection no token of its own. Its re-read
    may have read a bucket before a change that came before the scope's token: the join reads its
    changes from its position all the same, rather than leave them to the re-read."""
    coll, defs, folder, sensor = synced
    lake = LocalLake(workdir / "lake")
    source = SourceCollection(database, "events")
    (workdir / "lake" / scope_file(collection_scope(source))).unlink()
    store = LedgerStore(lake, database, "events")
    store.update(lambda led: setattr(led, "reread", {"reason": "test", "time": led.position}))
    first = coll.find_one(sort=[("_id", 1)])
    coll.update_one({"_id": first["_id"]}, {"$set": {"n": -1}})
    record_changes(client, lake, StreamScope(database, "database", (source,)))
    assert "first" in ledger_of(workdir, database).dirty, "the change before the scope's token is recorded"


def test_a_lake_of_an_older_aries_is_re_read_and_then_follows_the_stream(client, database, workdir, synced):
    """A lake written before the ledger has a bucket map and no stream position. Its upgrade re-reads
    the collection once; the run marks its stream first, so its changes are recorded from then on
    (with no position, no stream ever recorded them)."""
    coll, defs, folder, sensor = synced
    lake = LocalLake(workdir / "lake")
    source = SourceCollection(database, "events")
    old = ledger_of(workdir, database)
    lake.write_text(bucket_map_file(database, "events"), old.bucket_map().to_json())
    (workdir / "lake" / ledger_file(database, "events")).unlink()
    (workdir / "lake" / scope_file(collection_scope(source))).unlink()
    assert run_cli("sync", "--workers", "1")[0] == 0
    assert ledger_of(workdir, database).position is not None, "the upgrade's re-read marked the stream"
    first = coll.find_one(sort=[("_id", 1)])
    coll.update_one({"_id": first["_id"]}, {"$set": {"n": -1}})
    with dg.DagsterInstance.get() as instance:
        apply(defs, instance, tick(defs, instance, sensor))
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))


def test_a_read_that_stops_inside_a_transaction_leaves_none_of_it_behind(client, database, workdir, synced):
    """Every change of a transaction carries the same cluster time. A read that stopped at its limit
    inside one recorded that time, and the next read, resumed after the last change read, skipped
    the rest of the transaction as recorded already. A read now ends only between cluster times."""
    coll, defs, folder, sensor = synced
    lake = LocalLake(workdir / "lake")
    scope = StreamScope(database, "database", (SourceCollection(database, "events"),))
    record_changes(client, lake, scope, idle_persist_seconds=0)  # joined: the stream has its token
    ids = [d["_id"] for d in coll.find({}, {"_id": 1}).sort("_id", 1)]
    with client.start_session() as session, session.start_transaction():
        for _id in (ids[0], ids[25], ids[45]):  # one change in each of three buckets
            coll.update_one({"_id": _id}, {"$set": {"n": -1}}, session=session)
    reads = 0
    while True:
        reads += 1
        _, changes = record_changes(client, lake, scope, max_events=1)
        if changes.caught_up:
            break
        assert reads < 10
    ledger = ledger_of(workdir, database)
    assert sorted(ledger.dirty) == sorted(ledger.bucket_map().keys[:3]), "the whole transaction is marked"
    with dg.DagsterInstance.get() as instance:
        apply(defs, instance, tick(defs, instance, sensor))
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))


def test_lost_history_is_recovered_by_rewriting_only_changed_buckets(workdir):
    # A server with a tiny oplog, so a position falls off it after a few writes.
    with (
        embedded_mongo(":memory:", extra_args=("--oplog-max-entries", "30")) as uri,
        MongoClient(uri) as client,
    ):
        coll = client.app.events
        coll.insert_many([{"_id": i, "v": 0} for i in range(60)])
        write_config(
            workdir / "aries.yaml",
            uri,
            "./lake",
            [{"database": "app", "collection": "events", "bucket_size": 20}],
        )
        assert run_cli("sync", "--workers", "1")[0] == 0
        defs = build_definitions(load_config())
        folder = workdir / "lake" / "app" / "events"
        mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}
        with dg.DagsterInstance.get() as instance:
            coll.update_one({"_id": 5}, {"$set": {"v": 1}})  # bucket "first" changes
            # Churn elsewhere in the database pushes the position out of the oplog.
            client.app.noise.insert_many([{"i": i} for i in range(1500)])
            result = tick(defs, instance, "changes__app")
            (request,) = result.run_requests
            assert request.tags["aries/reason"].startswith("re-read:")
            apply(defs, instance, result)
            assert_same_documents(mongo_documents(client, "app", "events"), lake_documents(folder))
            changed = {p.name for p in folder.glob("*.parquet") if p.stat().st_mtime_ns != mtimes[p.name]}
            assert changed == {"first.parquet"}, "only the changed bucket is rewritten"
            assert tick(defs, instance, "changes__app", result.cursor).run_requests == []


def test_a_collection_with_a_run_waiting_is_not_requested_again(client, database, synced):
    coll, defs, folder, sensor = synced
    with dg.DagsterInstance.get() as instance:
        coll.update_one({"_id": coll.find_one()["_id"]}, {"$set": {"n": -1}})
        first = tick(defs, instance, sensor)
        (request,) = first.run_requests
        # The daemon queued that run; it has not started when the next change arrives.
        instance.create_run_for_job(
            defs.resolve_job_def(request.job_name), tags=request.tags, status=dg.DagsterRunStatus.NOT_STARTED
        )
        coll.update_one({"_id": coll.find_one()["_id"]}, {"$set": {"n": -2}})
        assert tick(defs, instance, sensor, first.cursor).run_requests == []


def test_a_failed_run_is_requested_again_with_no_new_change(workdir):
    """MongoDB stops in the middle of a run: the buckets stay dirty, and after a backoff the
    sensor asks again by itself; the lake ends exact."""
    port, storage = free_port(), workdir / "mongo"
    with embedded_mongo(storage, port=port) as uri:
        with MongoClient(uri) as client:
            client.app.events.insert_many([{"_id": i, "v": 0} for i in range(40)])
        write_config(
            workdir / "aries.yaml",
            uri,
            "./lake",
            [{"database": "app", "collection": "events", "bucket_size": 10}],
        )
        assert run_cli("sync", "--workers", "1")[0] == 0
        defs = build_definitions(load_config())
        with MongoClient(uri) as client:
            client.app.events.update_many({"_id": {"$in": [3, 13, 33]}}, {"$set": {"v": 1}})
        with dg.DagsterInstance.get() as instance:
            result = tick(defs, instance, "changes__app")
            assert len(result.run_requests) == 1
    # MongoDB is down while the run starts: it fails, and the ledger keeps the buckets.
    with dg.DagsterInstance.get() as instance:
        apply(defs, instance, result, expect_success=False)
    assert len(ledger_of(workdir, "app").dirty) == 3
    with embedded_mongo(storage, port=port) as uri, dg.DagsterInstance.get() as instance:
        again = tick(defs, instance, "changes__app")
        assert again.run_requests == [], "a backoff after a failure"
        time.sleep(5.5)
        retry = tick(defs, instance, "changes__app", again.cursor)
        assert len(retry.run_requests) == 1, "no new change needed"
        apply(defs, instance, retry)
        with MongoClient(uri) as client:
            expected = mongo_documents(client, "app", "events")
        assert_same_documents(expected, lake_documents(workdir / "lake" / "app" / "events"))
        assert not ledger_of(workdir, "app").dirty


def test_collections_changing_at_once_share_one_run_and_end_exact(client, mongo_uri, database, workdir):
    """Many collections with changes in one tick: one run serves them all (one run start, not
    one each); while it is queued or running, no collection of the stream is requested again."""
    names = [f"c{i}" for i in range(12)]
    for name in names:
        client[database][name].insert_many([{"_id": i, "v": 0} for i in range(30)])
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": n, "bucket_size": 10} for n in names],
    )
    assert run_cli("sync", "--workers", "1")[0] == 0
    defs = build_definitions(load_config())
    with dg.DagsterInstance.get() as instance:
        for i, name in enumerate(names):
            client[database][name].update_one({"_id": i}, {"$set": {"v": 1}})
            client[database][name].insert_one({"_id": 100 + i, "v": 2})
        result = tick(defs, instance, f"changes__{database}")
        (request,) = result.run_requests
        assert request.job_name == f"serve__{database}"
        assert request.tags["aries/scope"] == database
        # Queued, not started yet: further changes ask for nothing new.
        instance.create_run_for_job(
            defs.resolve_job_def(request.job_name), tags=request.tags, status=dg.DagsterRunStatus.NOT_STARTED
        )
        client[database]["c3"].update_one({"_id": 1}, {"$set": {"v": 3}})
        assert tick(defs, instance, f"changes__{database}", result.cursor).run_requests == []
        apply(defs, instance, result)
        for name in names:
            assert_same_documents(
                mongo_documents(client, database, name), lake_documents(workdir / "lake" / database / name)
            )
            assert not ledger_of(workdir, database, name).dirty
        for name in ("c0", "c11"):
            materialized = instance.get_materialized_partitions(dg.AssetKey(["lake", database, name]))
            assert set(ledger_of(workdir, database, name).bucket_map().keys) <= materialized


def test_a_serving_run_follows_the_stream_between_ticks(client, database, workdir, synced):
    """A change made while the serving run lingers reaches the lake with no sensor tick at all."""
    coll, defs, folder, sensor = synced
    with dg.DagsterInstance.get() as instance:
        coll.update_one({"_id": coll.find_one()["_id"]}, {"$set": {"n": -1}})
        (request,) = tick(defs, instance, sensor).run_requests  # saves the stream's token too
        job = defs.resolve_job_def(request.job_name)
        op = job.nodes[0].name
        late = ObjectId()

        def change_later() -> None:
            time.sleep(2)
            coll.insert_one({"_id": late, "n": "late"})

        writer = threading.Thread(target=change_later)
        writer.start()
        outcome = job.execute_in_process(
            instance=instance,
            tags=request.tags,
            run_config={"ops": {op: {"config": {"linger_seconds": 4.0}}}},
        )
        writer.join()
        assert outcome.success
        assert any(str(late) in key for key in lake_documents(folder)), "written by the lingering run itself"
        assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))


def test_a_run_that_released_its_lease_is_not_taken_for_dead(tmp_path):
    """Between releasing its lease and reporting its success a run still shows as started;
    a sensor tick in that moment must not mark it failed (it once did: a red run that succeeded)."""
    from aries_assets.core.ledger import Lease
    from aries_assets.sensors import run_looks_dead

    lease = Lease(LocalLake(tmp_path / "lake"), "app", "events", "run abc", run_id="abc", ttl=30)
    lease.acquire(wait=1)
    held = lease.current()
    lease.release()
    released = lease.current()
    assert released.released_at is not None and released.run_id == "abc"

    now = released.released_at
    assert not run_looks_dead("abc", released, 30, now + 1), "just finished: its success report follows"
    assert run_looks_dead("abc", released, 30, now + 31), "released long ago and never reported: dead"
    assert not run_looks_dead("abc", held, 30, now), "a live lease: alive"
    assert not run_looks_dead("abc", held, 30, held.expires_at + 5), "expired moments ago: wait"
    assert run_looks_dead("abc", held, 30, held.expires_at + 31), "expired long ago: dead"
    assert run_looks_dead("abc", None, 30, now), "never took the lease"
    assert run_looks_dead("other", released, 30, now), "another run holds or held it"
