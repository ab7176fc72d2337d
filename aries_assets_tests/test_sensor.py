"""The change-stream sensor against a real server and a real Dagster instance."""

from __future__ import annotations

import json

import dagster as dg
import pytest
from bson import ObjectId
from pymongo import MongoClient

from aries_assets.config import load_config
from aries_assets.definitions import build_definitions
from aries_assets.demo.mongo_server import embedded_mongo
from aries_assets_tests.support import (
    assert_same_documents,
    lake_documents,
    mongo_documents,
    run_cli,
    write_config,
)


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, name: str, cursor: str | None):
    sensor = defs.resolve_sensor_def(name)
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, definitions=defs, resources=defs.resources
    ) as context:
        return sensor(context)


def apply(defs: dg.Definitions, instance: dg.DagsterInstance, result: dg.SensorResult, job: str) -> None:
    """What the daemon does with a SensorResult: add partitions, then run each request."""
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for run_request in result.run_requests:
        job_def = defs.resolve_job_def(run_request.job_name or job)
        outcome = job_def.execute_in_process(partition_key=run_request.partition_key, instance=instance)
        assert outcome.success


@pytest.fixture
def synced(client, mongo_uri, database, workdir):
    coll = client[database].events
    coll.insert_many([{"_id": ObjectId(), "n": i, "tags": ["a"]} for i in range(50)])
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": "events", "bucket_size": 20}],
    )
    assert run_cli("sync", "--workers", "1")[0] == 0
    defs = build_definitions(load_config())
    return (
        coll,
        defs,
        workdir / "lake" / database / "events",
        f"changes__{database}__events",
        f"sync__{database}__events",
    )


def test_one_tick_then_its_runs_make_the_lake_equal_mongodb(client, database, synced):
    coll, defs, folder, sensor, job = synced
    with dg.DagsterInstance.get() as instance:
        assert tick(defs, instance, sensor, None).run_requests == []  # starts from `aries sync`'s token

        ids = [d["_id"] for d in coll.find({}, {"_id": 1}).sort("_id", 1)]
        coll.update_one({"_id": ids[3]}, {"$set": {"n": -3}})  # bucket 1
        coll.update_one({"_id": ids[25]}, {"$unset": {"tags": ""}})  # bucket 2
        coll.replace_one({"_id": ids[26]}, {"replaced": True})  # bucket 2
        coll.delete_one({"_id": ids[45]})  # bucket 3, the newest
        coll.insert_many([{"_id": ObjectId(), "n": 100 + i} for i in range(35)])  # fills bucket 3, opens more
        result = tick(defs, instance, sensor, None)
        requested = [r.partition_key for r in result.run_requests]
        first, second, third = (b["key"] for b in _buckets(folder)[:3])
        assert requested[:3] == [first, second, third]
        assert len(requested) >= 4, "the inserts opened at least one new bucket"
        assert result.dynamic_partitions_requests and set(
            result.dynamic_partitions_requests[0].partition_keys
        ) <= set(requested)
        assert len(set(requested)) == len(requested), "one request per bucket per tick"
        apply(defs, instance, result, job)
        assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))

        quiet = tick(defs, instance, sensor, result.cursor)
        assert quiet.run_requests == []
        observation = quiet.asset_events[0]
        assert observation.metadata["replication_lag_seconds"].value == 0.0


def _buckets(folder):
    from aries_assets.core.buckets import BucketMap

    bucket_map = BucketMap.from_json((folder / "_aries" / "buckets.json").read_text())
    return [{"key": b.key} for b in bucket_map.buckets]


def test_an_idle_collection_still_advances_its_token(client, database, synced):
    coll, defs, folder, sensor, _ = synced
    with dg.DagsterInstance.get() as instance:
        first = tick(defs, instance, sensor, None)
        client[database].other.insert_many([{"x": i} for i in range(5)])  # the oplog moves on elsewhere
        second = tick(defs, instance, sensor, first.cursor)
        assert second.run_requests == []
        assert json.loads(second.cursor)["token"] != json.loads(first.cursor)["token"]


def test_lost_history_is_recovered_without_a_gap(workdir):
    # A server with a tiny oplog, so a token falls off it after a few writes.
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
        with dg.DagsterInstance.get() as instance:
            cursor = tick(defs, instance, "changes__app__events", None).cursor
            coll.update_one({"_id": 5}, {"$set": {"v": 1}})  # bucket "first" changes
            # Churn elsewhere pushes the token out of the oplog (SecantusDB prunes every 1000 entries).
            client.app.noise.insert_many([{"i": i} for i in range(1500)])
            result = tick(defs, instance, "changes__app__events", cursor)
            assert result.run_requests[0].tags["aries/mode"].startswith("re-read:")
            assert [r.partition_key for r in result.run_requests] == ["first"], "only the changed bucket"
            apply(defs, instance, result, "sync__app__events")
            assert_same_documents(mongo_documents(client, "app", "events"), lake_documents(folder))
            after = tick(defs, instance, "changes__app__events", result.cursor)
            assert after.run_requests == []


def test_a_bucket_with_a_run_still_waiting_is_not_requested_again(client, database, synced):
    coll, defs, folder, sensor, job = synced
    with dg.DagsterInstance.get() as instance:
        cursor = tick(defs, instance, sensor, None).cursor
        newest = coll.find_one(sort=[("_id", -1)])["_id"]
        coll.update_one({"_id": newest}, {"$set": {"n": -1}})
        first = tick(defs, instance, sensor, cursor)
        (request,) = first.run_requests
        # The daemon queued that run; it has not started when the next change arrives.
        instance.create_run_for_job(
            defs.resolve_job_def(job),
            tags={"dagster/partition": request.partition_key},
            status=dg.DagsterRunStatus.NOT_STARTED,
        )
        coll.update_one({"_id": newest}, {"$set": {"n": -2}})
        second = tick(defs, instance, sensor, first.cursor)
        assert second.run_requests == []
        assert second.asset_events[0].metadata["buckets_already_queued"].value == 1
