"""Warehouse tables against real DuckDB and real PostgreSQL: exact, document by document."""

from __future__ import annotations

import duckdb
import psycopg2
import pytest
from bson import Decimal128, ObjectId, json_util

from aries_assets.core.warehouse.loader import Loader
from aries_assets_tests.support import run_cli, write_config

CANONICAL = json_util.CANONICAL_JSON_OPTIONS


@pytest.fixture(params=["duckdb", "postgresql"])
def warehouse_url(request, workdir, database):
    if request.param == "duckdb":
        yield f"duckdb:///{workdir / 'warehouse.duckdb'}"
        return
    yield request.getfixturevalue("postgres_url")


def table_documents(url: str, schema: str, table: str) -> dict[str, dict]:
    """`_doc` of every row, decoded with its BSON types, keyed by `_id` (order-insensitive: jsonb sorts keys)."""
    sql = f'SELECT "_id", CAST("_doc" AS VARCHAR) FROM "{schema}"."{table}"'
    if url.startswith("duckdb"):
        with duckdb.connect(url[len("duckdb://") :], read_only=True) as connection:
            rows = connection.execute(sql).fetchall()
    else:
        with psycopg2.connect(url) as connection, connection.cursor() as cursor:
            cursor.execute(sql.replace("VARCHAR", "TEXT"))
            rows = cursor.fetchall()
    documents = {}
    for _id, doc in rows:
        assert _id not in documents, f"{_id} is in the table twice"
        documents[_id] = json_util.loads(doc, json_options=CANONICAL)
    return documents


def mongo_by_id(coll) -> dict[str, dict]:
    from aries_assets.core.arrow import CODEC_OPTIONS, id_string

    return {id_string(d["_id"]): d for d in coll.with_options(codec_options=CODEC_OPTIONS).find()}


def assert_table_equals_mongo(url, database, coll):
    expected = mongo_by_id(coll)
    actual = table_documents(url, database, coll.name)
    assert set(actual) == set(expected)
    for key, document in expected.items():
        assert json_util.dumps(actual[key], json_options=CANONICAL, sort_keys=True) == json_util.dumps(
            document, json_options=CANONICAL, sort_keys=True
        ), key


def sync(workdir, mongo_uri, database, url, **collection):
    entry = {"database": database, "collection": "events", "bucket_size": 10, **collection}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry], warehouse={"url": url})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, err + out
    return out


def test_tables_follow_mongodb_through_changes(client, mongo_uri, database, workdir, warehouse_url):
    coll = client[database].events
    coll.insert_many(
        [{"_id": ObjectId(), "n": i, "price": Decimal128(f"{i}.25"), "tags": ["a", "b"]} for i in range(25)]
    )
    sync(workdir, mongo_uri, database, warehouse_url)
    assert_table_equals_mongo(warehouse_url, database, coll)

    ids = [d["_id"] for d in coll.find({}, {"_id": 1}).sort("_id", 1)]
    coll.delete_one({"_id": ids[2]})
    coll.update_one({"_id": ids[12]}, {"$set": {"n": -12, "new_field": "hello"}})
    coll.insert_many([{"_id": ObjectId(), "n": 100 + i} for i in range(12)])  # opens a bucket
    sync(workdir, mongo_uri, database, warehouse_url)
    assert_table_equals_mongo(warehouse_url, database, coll)

    # Nothing changed: nothing is loaded again.
    out = sync(workdir, mongo_uri, database, warehouse_url)
    assert " 0 written" in out


def test_a_widened_column_rebuilds_the_table_through_sync(
    client, mongo_uri, database, workdir, warehouse_url
):
    coll = client[database].events
    coll.insert_many([{"_id": i, "n": i} for i in range(25)])
    sync(workdir, mongo_uri, database, warehouse_url)
    coll.update_one({"_id": 20}, {"$set": {"n": "twenty"}})  # n widens to string: rebuild
    sync(workdir, mongo_uri, database, warehouse_url)
    assert_table_equals_mongo(warehouse_url, database, coll)


def test_hostile_names_and_values_load_as_data(client, mongo_uri, database, workdir, warehouse_url):
    coll = client[database].events
    coll.insert_many(
        [
            {
                "_id": "x'; DROP TABLE events; --",
                'weird"name': "a",
                "DROP TABLE events; --": "b",
                "select": 1,
            },
            {"_id": "normal", "semi;colon": "'); DELETE FROM events; --", "select": 2},
        ]
    )
    sync(workdir, mongo_uri, database, warehouse_url)
    assert_table_equals_mongo(warehouse_url, database, coll)


def test_a_crash_between_delete_and_insert_keeps_the_previous_rows(
    client, mongo_uri, database, workdir, warehouse_url, monkeypatch
):
    coll = client[database].events
    coll.insert_many([{"_id": i, "v": "old"} for i in range(5)])
    sync(workdir, mongo_uri, database, warehouse_url)
    coll.update_many({}, {"$set": {"v": "new"}})

    original = Loader.replace_sql

    def crash_after_delete(self, *args):
        statements = original(self, *args)
        return [statements[0], "SELECT no_such_column FROM no_such_table", *statements[1:]]

    monkeypatch.setattr(Loader, "replace_sql", crash_after_delete)
    code, out, _ = run_cli("sync", "--workers", "1")
    assert code == 1
    assert {d["v"] for d in table_documents(warehouse_url, database, "events").values()} == {"old"}

    monkeypatch.setattr(Loader, "replace_sql", original)
    assert run_cli("sync", "--workers", "1")[0] == 0
    assert_table_equals_mongo(warehouse_url, database, coll)


def test_the_sensor_refreshes_lake_and_table_together(client, mongo_uri, database, workdir):
    import dagster as dg

    from aries_assets.config import load_config
    from aries_assets.definitions import build_definitions
    from aries_assets_tests.test_sensor import apply, tick

    url = f"duckdb:///{workdir / 'warehouse.duckdb'}"
    coll = client[database].events
    coll.insert_many([{"_id": i, "v": i} for i in range(30)])
    sync(workdir, mongo_uri, database, url)
    defs = build_definitions(load_config())
    coll.update_one({"_id": 3}, {"$set": {"v": "three"}})  # widens v: the table is rebuilt
    coll.delete_one({"_id": 25})
    coll.insert_many([{"_id": 100 + i, "v": i} for i in range(5)])
    with dg.DagsterInstance.get() as instance:
        result = tick(defs, instance, f"changes__{database}")
        assert len(result.run_requests) == 1, "one run for the collection"
        apply(defs, instance, result)  # writes, settles the schema, rebuilds and reloads the table
        assert_table_equals_mongo(url, database, coll)
        # Then the ticks go quiet. A tick that stopped at its time bound on a loaded machine leaves
        # the rest of the changes to the next, whose run finds lake and table already exact.
        for _ in range(3):
            result = tick(defs, instance, f"changes__{database}", result.cursor)
            if not result.run_requests:
                break
            apply(defs, instance, result)
        assert result.run_requests == []
        assert_table_equals_mongo(url, database, coll)


def test_a_lake_started_afresh_leaves_no_row_of_its_old_buckets_in_the_table(
    client, mongo_uri, database, workdir, warehouse_url
):
    """The lake is wiped (or moved) while the table stays: the new first load cuts other buckets,
    and the rows the old buckets held for documents deleted meanwhile must not linger."""
    import shutil

    coll = client[database].events
    coll.insert_many([{"_id": i, "n": i} for i in range(60)])
    sync(workdir, mongo_uri, database, warehouse_url)
    shutil.rmtree(workdir / "lake")
    # Deleting from the first buckets shifts every later bucket's lower bound.
    coll.delete_many({"_id": {"$in": [1, 2, 3, 15, 33, 47]}})
    code, out, err = run_cli("sync", "--workers", "1", "--plain")
    assert code == 0, err + out
    assert_table_equals_mongo(warehouse_url, database, coll)
    assert "deleted 3 rows of 5 buckets the lake no longer has" in out + err, out + err


def test_old_buckets_rows_stay_while_a_new_bucket_is_refused(
    client, mongo_uri, database, workdir, postgres_url
):
    """A new bucket that PostgreSQL refuses (a NUL character) never loads: its live documents are
    still only under the old buckets' keys, so those rows stay until it loads."""
    import shutil

    coll = client[database].events
    coll.insert_many([{"_id": i, "n": i} for i in range(60)])
    sync(workdir, mongo_uri, database, postgres_url)
    shutil.rmtree(workdir / "lake")
    coll.delete_many({"_id": {"$in": [1, 2, 3]}})
    coll.update_one({"_id": 15}, {"$set": {"note": "a\x00b"}})  # a new column, not a type change
    code, out, err = run_cli("sync", "--workers", "1", "--plain")
    assert code == 1 and "NUL" in out + err, out + err
    in_table = table_documents(postgres_url, database, "events")
    assert set(range(60)) - {1, 2, 3, 15} <= {int(k) for k in in_table}, sorted(in_table)

    coll.update_one({"_id": 15}, {"$set": {"note": "ab"}})
    code, out, err = run_cli("sync", "--workers", "1", "--plain")
    assert code == 0, out + err
    assert_table_equals_mongo(postgres_url, database, coll)


def test_a_deleted_duckdb_file_is_loaded_afresh_not_restored_from_the_working_copy(
    client, mongo_uri, database, workdir
):
    """Aries loads a private working copy and publishes it; a user who deletes the published file
    to start over gets a file built from the lake now, not the old copy back."""
    url = f"duckdb:///{workdir / 'warehouse.duckdb'}"
    for name in ("events", "orders"):
        client[database][name].insert_many([{"_id": i, "n": i} for i in range(30)])
    entries = [{"database": database, "collection": c, "bucket_size": 10} for c in ("events", "orders")]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", entries, warehouse={"url": url})
    assert run_cli("sync", "--workers", "1")[0] == 0
    (workdir / "warehouse.duckdb").unlink()
    sync(workdir, mongo_uri, database, url)  # orders no longer configured
    assert_table_equals_mongo(url, database, client[database].events)
    with duckdb.connect(str(workdir / "warehouse.duckdb"), read_only=True) as connection:
        tables = connection.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
        ).fetchall()
        loads = connection.execute('SELECT DISTINCT table_name FROM "_aries_loads"').fetchall()
    assert sorted(tables) == sorted([("main", "_aries_loads"), (database, "events")])
    assert loads == [(f"{database}.events",)]


def test_a_duckdb_file_deleted_during_a_load_is_not_put_back(workdir):
    from aries_assets.core.warehouse.loader import DuckDBDialect, DuckDBLoader, WarehouseError

    path = workdir / "warehouse.duckdb"
    loader = DuckDBLoader(DuckDBDialect(), str(path))
    with loader.transaction() as cursor:
        cursor.execute("CREATE TABLE kept AS SELECT 1 AS x")
    assert path.exists()
    deleted = pytest.raises(WarehouseError, match="deleted during the load; the next sync loads it afresh")
    with deleted, loader.transaction() as cursor:
        cursor.execute("CREATE TABLE later AS SELECT 2 AS x")
        path.unlink()
    assert not path.exists()
    with loader.transaction() as cursor:  # afresh: neither table of the deleted file
        cursor.execute("SELECT table_name FROM information_schema.tables")
        assert cursor.fetchall() == []
    assert path.exists()
