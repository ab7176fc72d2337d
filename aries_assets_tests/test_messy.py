"""Documents that break naive exporters: mixed `_id` types, exotic BSON, huge and oddly named fields."""

from __future__ import annotations

import datetime
import uuid

import bson
import pyarrow as pa
import pytest
from bson import Binary, Code, Decimal128, Int64, ObjectId, Regex, Timestamp
from bson.datetime_ms import DatetimeMS
from bson.max_key import MaxKey
from bson.min_key import MinKey
from pymongo.errors import OperationFailure

from aries_assets.core.ordering import sort_key
from aries_assets_tests.support import (
    assert_same_documents,
    lake_tables,
    mongo_documents,
    run_cli,
    table_documents,
    write_config,
)

UTC = datetime.UTC

MIXED_IDS = [
    -7, 0, 42, Int64(2**40), 2.5, -1e300, Decimal128("3.14159265358979323846264338327950"),
    "", "abc", "Zürich", "日本", "a b.c\"d'", {"tenant": 1, "user": "x"},
    Binary(uuid.UUID("12345678-1234-5678-1234-567812345678").bytes, 4), Binary(b"\x00\x01", 0),
    ObjectId("000000000000000000000001"), ObjectId(), True, False,
    datetime.datetime(2001, 2, 3, 4, 5, 6, 789000, tzinfo=UTC), Timestamp(1700000000, 3),
]  # fmt: skip

HOSTILE_NAMES = [
    "with space", "dotted.name", 'double"quote', "single'quote", "semi;colon", "Ünïcödé", "名前",
    "DROP TABLE x; --", "Name", "name", "$dollar", "", "tab\tname", "a/b\\c",
]  # fmt: skip


def messy_documents() -> list[dict]:
    docs = []
    for i, _id in enumerate(MIXED_IDS):
        doc = {
            "_id": _id,
            "price": Decimal128(f"{i}.10"),
            "uuid": Binary(uuid.uuid4().bytes, 4),
            "at": datetime.datetime(2020, 1, 1, tzinfo=UTC) + datetime.timedelta(days=i, milliseconds=7),
            "items": [
                {"sku": f"s{i}", "qty": i, "tags": ["a", "b"]},
                {"sku": None, "extra": {"deep": [1, [2, 3]]}},
            ],
            "customer": {"address": {"city": "Berlin" if i % 2 else "Paris", "zip": i}},
            "maybe": i if i % 3 else str(i),  # an int column with strings mixed in
            "big": Int64(2**62 + i),
            "nan": float("nan") if i == 1 else -0.0,
            "code": Code("function() { return 1; }"),
            "regex": Regex("^a.*b$", "i"),
            "bounds": [MinKey(), MaxKey()],
            "empty": {},
            "nothing": None,
        }
        for j, name in enumerate(HOSTILE_NAMES):
            doc[name] = f"{name}-{j}"
        docs.append(doc)
    docs.append({"_id": "huge", "blob": "x" * (2 * 1024 * 1024), "bytes": Binary(b"\xff" * 1024 * 1024)})
    return docs


def test_bson_order_matches_the_server(client, database):
    coll = client[database].ids
    coll.insert_many([{"_id": v} for v in MIXED_IDS])
    server_order = [bson.encode({"v": d["_id"]}) for d in coll.find({}, {"_id": 1}).sort("_id", 1)]
    python_order = [bson.encode({"v": v}) for v in sorted(MIXED_IDS, key=sort_key)]
    assert python_order == server_order


@pytest.mark.parametrize("bucket_size", [1, 4, 1000])
def test_messy_collection_round_trips_exactly(client, mongo_uri, database, workdir, bucket_size):
    documents = messy_documents()
    try:  # dates after year 9999: mongod stores them; SecantusDB (Python datetimes) cannot
        client[database].probe.insert_one({"far_future": DatetimeMS(253402300800000)})
        documents[0]["far_future"] = DatetimeMS(253402300800000 + 7)
    except OperationFailure:
        pass
    client[database].messy.insert_many(documents)
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": "messy", "bucket_size": bucket_size}],
    )
    code, _, err = run_cli("sync", "--workers", "1")
    assert code == 0, err

    tables = lake_tables(workdir / "lake" / database / "messy")
    assert len(tables) == -(-(len(MIXED_IDS) + 1) // bucket_size)
    actual = {}
    for table in tables.values():
        assert table.num_rows <= bucket_size
        actual.update(table_documents(table))
    assert_same_documents(mongo_documents(client, database, "messy"), actual)

    if bucket_size == 1000:
        (table,) = tables.values()
        schema = table.schema
        assert schema.field("price").type == pa.decimal128(38, 2)  # Decimal128 digits kept exactly
        assert schema.field("at_").type == pa.timestamp("ms", tz="UTC")  # AT is reserved in DuckDB
        assert schema.field("big").type == pa.int64()
        assert schema.field("customer__address__city").type == pa.string()
        assert schema.field("maybe").type == pa.string()  # a third are strings: every value kept, as text
        assert schema.field("items").type == pa.string()  # array of documents: JSON text
        assert schema.field("items").metadata[b"aries.type"] == b"json"
        rows = {r["_id"]: r for r in table.select(["_id", "price", "maybe", "big", "with_space"]).to_pylist()}
        assert str(rows["42"]["price"]) == "2.10"
        assert rows["42"]["maybe"] == "2" and rows["abc"]["maybe"] == "8"
        assert rows["42"]["big"] == 2**62 + 2
        assert rows["42"]["with_space"] == "with space-0"
        # Hostile names become safe, distinct, lowercase ASCII columns; the mapping is in the metadata.
        names = [n for n in schema.names if n not in ("_id", "_doc")]
        assert len(set(names)) == len(names)
        assert all(n.isascii() and n == n.lower() and '"' not in n and " " not in n for n in names)
        assert sum(1 for n in names if n == "name" or n.startswith("name_")) == 2
        assert "drop_table_x" in names and "semi_colon" in names
        ids = table.column("_id").to_pylist()
        assert "huge" in ids and str(MIXED_IDS[15]) in ids and len(set(ids)) == len(ids)
