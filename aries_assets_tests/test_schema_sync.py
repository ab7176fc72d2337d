"""Schema inference end to end: stable across bucket sizes, recorded in Dagster, evolving with the data."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from bson import ObjectId
from dagster import AssetCheckKey, AssetKey, DagsterInstance

from aries_assets.demo.data import load_samples
from aries_assets.factory import _CheckSummary
from aries_assets_tests.support import (
    assert_same_documents,
    events_config,
    lake_documents,
    lake_tables,
    mongo_documents,
    run_cli,
    write_config,
)


def schema_columns(folder) -> list[tuple[str, str, str]]:
    body = json.loads((folder / "_aries" / "schema.json").read_text())
    return [(".".join(c["path"]), c["name"], c["type"]) for c in body["columns"]]


@pytest.fixture
def customers(client, database):
    load_samples(client, database_prefix=f"{database}_")
    yield f"{database}_sample_analytics", f"{database}_sample_mflix"
    for name in ("sample_analytics", "sample_mflix"):
        client.drop_database(f"{database}_{name}")


def test_schema_is_stable_across_bucket_sizes(client, mongo_uri, customers, workdir):
    analytics, _ = customers
    results = []
    for size in (7, 120, 5000):
        write_config(
            workdir / f"{size}.yaml",
            mongo_uri,
            f"./lake{size}",
            [{"database": analytics, "collection": "customers", "bucket_size": size}],
        )
        code, out, err = run_cli("sync", "--config", f"{size}.yaml", "--workers", "2")
        assert code == 0, err + out
        folder = workdir / f"lake{size}" / analytics / "customers"
        results.append(schema_columns(folder))
        # Every file follows the one schema: same names, same types.
        types = {(f.name, str(f.type)) for t in lake_tables(folder).values() for f in t.schema}
        assert len({name for name, _ in types}) == len(types)
        actual = lake_documents(folder)
        assert_same_documents(mongo_documents(client, analytics, "customers"), actual)
    assert results[0] == results[1] == results[2]
    columns = {name: type_ for _, name, type_ in results[0]}
    assert columns["tier_and_details"] == "json"  # a map keyed by ids: one column, not hundreds
    assert columns["birthdate"] == "timestamp"
    assert columns["accounts"] == "list<int32>"
    assert len(columns) < 15


def test_metadata_and_checks_are_recorded(client, mongo_uri, customers, workdir):
    _, mflix = customers
    config = [
        {"database": mflix, "collection": "users", "bucket_size": 100, "schema": {"exclude": ["password"]}}
    ]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", config)
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, err
    folder = workdir / "lake" / mflix / "users"
    for table in lake_tables(folder).values():
        assert "password" not in table.column_names
        assert not any("password" in doc for doc in table.column("_doc").to_pylist())
    key = AssetKey(["lake", mflix, "users"])
    with DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(key)
        metadata = event.asset_materialization.metadata
        schema = metadata["dagster/column_schema"].schema
        by_name = {c.name: c for c in schema.columns}
        assert by_name["email"].type == "string" and "string 100.0%" in by_name["email"].description
        assert metadata["schema_version"].value >= 1
        assert metadata["column_mapping"].value["email"] == "email"
        checks = {}
        for check in ("type_conformance", "schema_drift", "id_coverage"):
            record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                [AssetCheckKey(key, check)]
            )
            checks[check] = next(iter(record.values()))
        assert all(r.status.value == "SUCCEEDED" for r in checks.values()), {
            k: r.status for k, r in checks.items()
        }


def test_type_widening_rebuilds_the_affected_buckets(client, mongo_uri, database, workdir):
    coll = client[database].events
    coll.insert_many([{"_id": ObjectId(), "n": i, "k": "x"} for i in range(30)])
    config = [{"database": database, "collection": "events", "bucket_size": 10}]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", config)
    assert run_cli("sync", "--workers", "1")[0] == 0
    folder = workdir / "lake" / database / "events"
    assert ("n", "n", "int32") in schema_columns(folder)

    # A third of the newest bucket's values turn into strings: the column must widen everywhere.
    newest = [d["_id"] for d in coll.find().sort("_id", -1).limit(4)]
    coll.update_many({"_id": {"$in": newest}}, {"$set": {"n": "many"}})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, err
    assert "changed n: int32 -> string" in err
    assert ("n", "n", "string") in schema_columns(folder)
    for table in lake_tables(folder).values():
        assert str(table.schema.field("n").type) == "string"
    actual = lake_documents(folder)
    assert_same_documents(mongo_documents(client, database, "events"), actual)
    values = sorted(v for t in lake_tables(folder).values() for v in t.column("n").to_pylist())
    assert values.count("many") == 4 and "0" in values

    # Nothing changed since: nothing is rewritten, the schema stays.
    code, out, _ = run_cli("sync", "--workers", "1")
    assert code == 0 and " 0 written" in out


def test_append_evolution_adds_a_column_and_leaves_the_old_one(client, mongo_uri, database, workdir):
    coll = client[database].events
    coll.insert_many([{"_id": i, "n": i} for i in range(20)])
    config = [{"database": database, "collection": "events", "bucket_size": 10, "evolution": "append"}]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", config)
    assert run_cli("sync", "--workers", "1")[0] == 0
    folder = workdir / "lake" / database / "events"
    first = folder / "first.parquet"
    untouched = first.stat().st_mtime_ns
    coll.insert_many([{"_id": 100 + i, "n": f"s{i}"} for i in range(10)])
    code, _, err = run_cli("sync", "--workers", "1")
    assert code == 0, err
    assert schema_columns(folder) == [("n", "n", "int32"), ("n", "n__string", "string")]
    assert first.stat().st_mtime_ns == untouched, "append never rewrites a bucket for a new column"
    newest = pq.read_table(sorted(folder.glob("int-*.parquet"))[-1])
    assert newest.column("n__string").to_pylist()[-1] == "s9"


def test_a_run_of_many_buckets_records_checks_per_bucket_then_one_summary(
    client, mongo_uri, database, workdir
):
    """The first buckets of a run, and any failing one, get their own check evaluation; the rest
    are summed up in one evaluation per check, and every bucket still gets its materialization."""
    coll = client[database].events
    coll.insert_many([{"_id": i, "n": i} for i in range(200)])
    events_config(workdir, mongo_uri, database, bucket_size=10)
    assert run_cli("sync", "--workers", "1")[0] == 0
    key = AssetKey(["lake", database, "events"])
    with DagsterInstance.get() as instance:
        assert len(instance.get_materialized_partitions(key)) == 20
        history = instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(key, "id_coverage"), limit=100
        )
        evaluations = [r.event.dagster_event.event_specific_data for r in history]
        per_bucket = [e for e in evaluations if e.partition]
        summaries = [e for e in evaluations if not e.partition]
        assert len(per_bucket) == _CheckSummary.PER_BUCKET and all(e.passed for e in per_bucket)
        (summary,) = summaries
        assert summary.passed and summary.metadata["buckets_checked"].value == 20 - _CheckSummary.PER_BUCKET
        # The run's log lines, written beside its events by one thread: all there, in order.
        (run,) = instance.get_runs()
        lines = [
            e.user_message
            for e in instance.all_logs(run.run_id)
            if e.user_message.startswith(f"{database}.events: ")
        ]
        first_load = lines.index(f"{database}.events: first load")
        assert first_load < next(i for i, line in enumerate(lines) if " schema v1: " in line)
