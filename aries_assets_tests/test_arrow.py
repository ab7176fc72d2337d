"""BSON to Arrow: the first, simple type choice and the lossless `_doc`."""

from __future__ import annotations

import datetime

import bson
import pyarrow as pa
from bson import Decimal128, Int64, ObjectId, json_util

from aries_assets.core.arrow import DocumentConverter, PathStats, id_string, resolve_column

UTC = datetime.UTC


def stats(*values):
    s = PathStats()
    for v in values:
        s.add(v)
    return s


def test_single_kinds_keep_their_type():
    assert resolve_column(("a",), stats(1, 2, None)).arrow_type == pa.int64()
    assert resolve_column(("a",), stats(True, False)).arrow_type == pa.bool_()
    assert resolve_column(("a",), stats(datetime.datetime.now(UTC))).arrow_type == pa.timestamp(
        "ms", tz="UTC"
    )
    assert resolve_column(("a",), stats(ObjectId())).arrow_type == pa.string()


def test_ints_widen_to_double_only_when_exact():
    assert resolve_column(("a",), stats(1, 2.5)).arrow_type == pa.float64()
    column = resolve_column(("a",), stats(Int64(2**60), 2.5))
    assert column.arrow_type == pa.string() and column.as_json


def test_arrays():
    assert resolve_column(("a",), stats([1, 2], [3])).arrow_type == pa.list_(pa.int64())
    assert resolve_column(("a",), stats([1, "x"])).arrow_type == pa.string()
    assert resolve_column(("a",), stats([{"x": 1}])).as_json


def test_converter_flattens_and_keeps_everything_in_doc():
    docs = [
        {"_id": ObjectId(), "a": {"b": {"c": 1}}, "d": Decimal128("1.50"), "m": 1},
        {"_id": "s", "a": {"b": {"c": 2}}, "m": "one", "_doc": "collides with our column"},
    ]
    raws = [bson.encode(d) for d in docs]
    converter = DocumentConverter()
    converter.observe(raws)
    columns = converter.columns()
    assert [c.name for c in columns] == ["a.b.c", "d", "m"]
    table = converter.to_table(raws, columns)
    assert table.column("a.b.c").to_pylist() == [1, 2]
    assert table.column("d").to_pylist() == ["1.50", None]
    assert table.column("m").to_pylist() == ["1", "one"]
    back = [
        json_util.loads(t, json_options=json_util.CANONICAL_JSON_OPTIONS)
        for t in table.column("_doc").to_pylist()
    ]
    assert [bson.encode(d) for d in back] == raws


def test_id_strings():
    oid = ObjectId()
    assert id_string(oid) == str(oid)
    assert id_string("abc") == "abc"
    assert id_string(Int64(5)) == "5"
    assert id_string(2.5) == '{"$numberDouble": "2.5"}'
    assert id_string({"a": 1}) == '{"a": {"$numberInt": "1"}}'
