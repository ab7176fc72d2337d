"""Distinct `_id`s whose text is the same (5 and "5", an ObjectId and its hex) stay distinct rows."""

from __future__ import annotations

import duckdb
import psycopg2
import pytest
from bson import Int64, ObjectId, json_util

from aries_assets.core.arrow import CODEC_OPTIONS, id_key, id_string
from aries_assets_tests.support import (
    assert_same_documents,
    lake_documents,
    lake_tables,
    mongo_documents,
    run_cli,
    write_config,
)

OID = ObjectId("5f1d7f0e2b3c4d5e6f708192")
LOOKALIKES = [
    5, "5", Int64(7), "7", OID, str(OID), {"a": 1}, '{"a": 1}', '{"a": {"$numberInt": "1"}}',
    2.5, '{"$numberDouble": "2.5"}',
]  # fmt: skip


def test_id_keys_are_distinct_where_id_text_is_not():
    assert len({id_string(v) for v in LOOKALIKES}) < len(LOOKALIKES)
    assert len({id_key(v) for v in LOOKALIKES}) == len(LOOKALIKES)
    assert id_key(OID) == '{"$oid": "5f1d7f0e2b3c4d5e6f708192"}' and id_key("5") == '"5"'


@pytest.fixture(params=["duckdb", "postgresql"])
def warehouse_url(request, workdir, database):
    if request.param == "duckdb":
        yield f"duckdb:///{workdir / 'warehouse.duckdb'}"
        return
    yield request.getfixturevalue("postgres_url")


def table_rows(url: str, schema: str, table: str) -> list[tuple[str, str, str]]:
    sql = f'SELECT "_id", "_id_key", CAST("_doc" AS VARCHAR) FROM "{schema}"."{table}"'
    if url.startswith("duckdb"):
        with duckdb.connect(url[len("duckdb://") :], read_only=True) as connection:
            return connection.execute(sql).fetchall()
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(sql.replace("VARCHAR", "TEXT"))
        return cursor.fetchall()


def assert_table_holds_every_document(url, database, coll):
    expected = {id_key(d["_id"]): d for d in coll.with_options(codec_options=CODEC_OPTIONS).find()}
    rows = table_rows(url, database, coll.name)
    keys = [key for _, key, _ in rows]
    assert sorted(keys) == sorted(expected), "rows missing from or extra in the table"
    for _id, key, doc in rows:
        document = expected[key]
        assert _id == id_string(document["_id"])
        assert json_util.dumps(json_util.loads(doc), sort_keys=True) == json_util.dumps(
            document, sort_keys=True
        )


def test_lookalike_ids_in_different_buckets_all_reach_lake_and_table(
    client, mongo_uri, database, workdir, warehouse_url
):
    coll = client[database].ids
    coll.insert_many([{"_id": v, "n": i} for i, v in enumerate(LOOKALIKES)])
    entry = {"database": database, "collection": "ids", "bucket_size": 2}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry], warehouse={"url": warehouse_url})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, err + out

    lake = workdir / "lake" / database / "ids"
    assert len(lake_tables(lake)) >= 4
    assert_same_documents(mongo_documents(client, database, "ids"), lake_documents(lake))
    for table in lake_tables(lake).values():
        assert table.column("_id_key").to_pylist() == [
            id_key(json_util.loads(d, json_options=json_util.CANONICAL_JSON_OPTIONS)["_id"])
            for d in table.column("_doc").to_pylist()
        ]
    assert_table_holds_every_document(warehouse_url, database, coll)

    # Rewriting one bucket must not remove its lookalikes' rows from the others.
    coll.update_one({"_id": "5"}, {"$set": {"n": "five"}})
    coll.update_one({"_id": str(OID)}, {"$set": {"n": "hex"}})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, err + out
    assert_same_documents(mongo_documents(client, database, "ids"), lake_documents(lake))
    assert_table_holds_every_document(warehouse_url, database, coll)
