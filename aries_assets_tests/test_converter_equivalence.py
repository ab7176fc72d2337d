"""The columnar converter against the exact one: same `_doc` bytes, columns, statistics and outliers."""

from __future__ import annotations

import datetime
import json
import random
import re
import struct
import tracemalloc
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import bson
import bsonjs
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bson import (
    Binary,
    Code,
    DBRef,
    Decimal128,
    Int64,
    ObjectId,
    Regex,
    Timestamp,
    json_util,
)
from bson.datetime_ms import DatetimeMS
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.son import SON

from aries_assets.core import doc_text
from aries_assets.core import schema as s
from aries_assets.core.arrow import (
    CODEC_OPTIONS,
    BucketConverter,
    ColumnarBatch,
    SplitBatch,
    id_key,
)
from aries_assets.core.bson_columns import _refused_by_sample, looks_like_maps, wrapper_rows
from aries_assets.core.doc_text import MapKeys, canonical_json, render
from aries_assets.core.snapshot import convert_to_parquet
from aries_assets_tests.test_messy import messy_documents

UTC = datetime.UTC
DEFAULTS = s.SchemaOptions()
SAMPLES = Path(__file__).parent.parent / "aries_assets" / "demo" / "data"


def convert(documents: list[dict], options: s.SchemaOptions, batch: int, fast: bool, schema=None):
    """Every chunk converted (a chunk never spans two slices of `batch` documents), then written in
    the schema of the whole: what a bucket write does when the schema does not change on the way."""
    converter = BucketConverter(options, fast=fast)
    raws = [d if isinstance(d, bytes) else bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents]
    batches = [
        b for start in range(0, len(raws), batch) for b in converter.chunks(raws[start : start + batch])
    ]
    columnar = columnar_rows(batches)
    schema = schema or s.resolve_schema(converter.stats, None, options)
    outliers: Counter = Counter()
    tables = [converter.table(b, schema, outliers) for b in batches]
    return converter.stats, pa.concat_tables(tables) if tables else None, outliers, columnar


def columnar_rows(batches) -> int:
    """Documents the columnar path took, whole chunks and the plain part of split ones."""
    return sum(b.rows for b in batches if isinstance(b, ColumnarBatch)) + sum(
        b.columnar.rows for b in batches if isinstance(b, SplitBatch)
    )


# The two ways the columnar path reads a chunk: the values the `_doc` walk found while rendering,
# and Arrow's JSON reader over the text (a chunk whose documents the walk left to bsonjs).
ROUTES = ("found", "text")


@contextmanager
def reading(route: str):
    saved = doc_text.FOUND_UNWALKED_SHARE
    doc_text.FOUND_UNWALKED_SHARE = saved if route == "found" else -1.0
    try:
        yield
    finally:
        doc_text.FOUND_UNWALKED_SHARE = saved


def assert_equivalent(
    documents, options=DEFAULTS, batch=1000, schema=None, expect_columnar=None, route="found"
):
    """The columnar path's file is the exact path's, by either route; returns the table, and how
    many documents `route` took columnar."""
    exact_stats, exact, exact_outliers, _ = convert(documents, options, batch, fast=False, schema=schema)
    schema = schema or s.resolve_schema(exact_stats, None, options)
    taken = {}
    for way in ROUTES:
        with reading(way):
            stats, table, outliers, columnar = convert(documents, options, batch, fast=True, schema=schema)
        assert stats.to_json() == exact_stats.to_json(), way
        assert [(p, dict(f.kinds), dict(f.element_kinds)) for p, f in sorted(stats.fields.items())] == [
            (p, dict(f.kinds), dict(f.element_kinds)) for p, f in sorted(exact_stats.fields.items())
        ], way
        assert outliers == exact_outliers, way
        assert table.schema == exact.schema, way
        for name in exact.column_names:
            assert comparable(table.column(name)) == comparable(exact.column(name)), (way, name)
        if expect_columnar is not None:
            assert (columnar > 0) == expect_columnar, f"{way}: {columnar} documents columnar"
        taken[way] = (table, columnar)
    return taken[route]


def comparable(column: pa.ChunkedArray) -> list[str]:
    """Values as repr: -0.0 is not 0.0, NaN equals NaN; timestamps as epoch ms (some are beyond datetime)."""
    kind = column.type
    if pa.types.is_timestamp(kind):
        column = column.cast(pa.int64())
    elif pa.types.is_list(kind) and pa.types.is_timestamp(kind.value_type):
        column = column.cast(pa.list_(pa.int64()))
    return list(map(repr, column.to_pylist()))


def events(count: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    apps = [ObjectId() for _ in range(5)]
    return [
        {
            "_id": ObjectId(),
            "app_id": rng.choice(apps),
            "type": rng.choice(["page_view", "track", "identify", "error"]),
            "at": datetime.datetime(2026, 1, 1, tzinfo=UTC) + datetime.timedelta(seconds=i, milliseconds=i),
            "bytes": rng.randint(100, 5_000_000),
            "amount": Decimal128(f"{rng.randint(0, 99999)}.{rng.randint(0, 99):02d}"),
            "context": {"ip": f"10.0.{rng.randint(0, 255)}.1", "library": {"name": "a.js", "version": "4"}},
            "tags": rng.sample(["a", "b", "c", "d", "e"], 2),
        }
        for i in range(count)
    ]


def test_events_take_the_columnar_path():
    assert_equivalent(events(500), batch=100, expect_columnar=True)


def test_a_chunk_of_maps_is_refused_from_a_sample_and_a_rare_map_by_the_walk():
    """Maps keyed by data make Arrow's reader build a field per key of every row: a sample of a
    chunk turns them away first. What that costs grows with the square of the rows, not with the
    bytes: 2,000 documents of maps, half a megabyte of text, took 20 MB and 0.3 s to parse. Only a
    chunk of a few hundred rows is parsed whatever it holds (a sample cost a small bucket's chunks
    a fifth of their time)."""
    rng = random.Random(3)
    plain = events(4_000)
    maps = [dict(d, scores={f"{rng.getrandbits(64):016x}": 1.5 for _ in range(3)}) for d in plain]

    def chunk(documents):
        return canonical_json([bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents])

    assert chunk(maps).nbytes > 1 << 20
    assert _refused_by_sample(chunk(maps), DEFAULTS, set())
    assert chunk(maps[:1000]).nbytes < 1 << 20
    assert _refused_by_sample(chunk(maps[:1000]), DEFAULTS, set()), "under a megabyte, a thousand rows"
    assert not _refused_by_sample(chunk(maps[:200]), DEFAULTS, set()), "a few hundred rows: not sampled"
    assert not _refused_by_sample(chunk(plain), DEFAULTS, set())
    nested = [dict(d, items=[{"sku": "a"}]) for d in plain]  # arrays of documents: refused too
    assert _refused_by_sample(chunk(nested), DEFAULTS, set())
    # One map, in a document the sample skips: that document alone takes the exact path.
    rare = list(plain)
    rare[7] = maps[7]
    assert not _refused_by_sample(chunk(rare), DEFAULTS, set())
    _, columnar = assert_equivalent(rare, batch=len(rare), route="text")
    assert columnar == len(rare) - 1
    # A chunk of maps, though, is walked whole by the `_doc` walk, which holds each map's text
    # aside: the reader parses `"scores" : null` instead, and the chunk is columnar.
    with reading("text"):
        rendered = render([bson.encode(d, codec_options=CODEC_OPTIONS) for d in maps])
    assert '"scores" : null' in rendered.columnar[0].as_py()
    assert not _refused_by_sample(rendered.columnar, DEFAULTS, set())
    for route in ROUTES:
        _, columnar = assert_equivalent(maps, route=route)
        assert columnar == len(maps), route


def test_a_chunk_takes_its_plain_documents_columnar_and_the_rest_exactly():
    """What the walk refuses in one document (a map, an array of documents or of arrays, an old binary,
    a regex, a timestamp, an empty document, a string like a key separator, a key named like a
    wrapper) sends that document down the exact path, not its whole chunk: the documents take
    their turns in the file as they came, and every column, count and outlier is the exact path's."""
    documents = events(600)
    odd = [
        {"scores": {"5f1d7a9e3c2b4a6d8e0f1a2b": 1.5, "5f1d7a9e3c2b4a6d8e0f1a2c": 2}},
        {"items": [{"sku": "a", "qty": 2}, {"sku": "b"}]},
        {"grid": [[1, 2], [3]]},
        {"blob": Binary(b"\x00\xff", 2)},
        {"pattern": Regex("^a", "i"), "at": Timestamp(1, 2)},
        {"context": {}},
        {"type": 'says "a" : b'},
        {"tags": [1, {"x": 1}]},
        {"context": {"$oid": "not an id"}},
        {"bytes": "a string where the others have numbers"},
    ]
    for i, extra in enumerate(odd * 3):
        documents[20 * i + 3].update(extra)
    _, columnar = assert_equivalent(documents, batch=len(documents), route="text")
    assert columnar == len(documents) - 3 * len(odd)
    # The walk reads the string like a key separator as it is: only the text needs it set aside.
    _, columnar = assert_equivalent(documents, batch=len(documents))
    assert columnar == len(documents) - 3 * (len(odd) - 1)
    # In batches of a few documents, some all plain, some all odd, some mixed: the same.
    assert_equivalent(documents, batch=7)


def test_uuids_and_binaries_take_the_columnar_path():
    """UUIDs (subtype 4, 16 bytes) as text, binaries of every other subtype and length as bytes, in
    arrays too; a few UUIDs among strings, a few strings and ints among UUIDs (outliers): every value
    what the exact path gives."""
    rng = random.Random(11)
    documents = events(600)
    for i, d in enumerate(documents):
        d["user"] = uuid.UUID(int=rng.getrandbits(128)) if i % 97 else f"user-{i}"
        d["label"] = f"label-{i}" if i % 89 else uuid.UUID(int=i)
        d["hash"] = Binary(rng.randbytes(rng.randint(0, 33)), rng.choice([0, 1, 3, 4, 5, 6, 7, 8, 0x80]))
        d["sessions"] = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(i % 3)]
        d["legacy"] = Binary(rng.randbytes(16), 3)
        if i % 50 == 0:
            d["user"] = 12  # an outlier in a UUID column
    documents = [
        {k: Binary.from_uuid(v) if isinstance(v, uuid.UUID) else v for k, v in d.items()} for d in documents
    ]
    for d in documents:
        d["sessions"] = [Binary.from_uuid(u) for u in d["sessions"]]
    table, columnar = assert_equivalent(documents, batch=len(documents), route="text")
    # A string where the others hold a UUID (or the other way) is a JSON string beside an object:
    # those few take the exact path; an int beside UUIDs (both objects) stays columnar.
    assert columnar == len(documents) - len([i for i in range(600) if i % 89 == 0 or i % 97 == 0])
    # The walk reads strings, ints and UUIDs alike as text; what parts it from its group (a
    # string, an int, binaries of other lengths in too few documents to walk) takes the exact path.
    table, columnar = assert_equivalent(documents, batch=len(documents))
    assert columnar >= 0.95 * len(documents)
    assert table.column("user_")[1].as_py() == str(Binary.as_uuid(documents[1]["user"]))  # `user`: SQL
    assert table.column("hash").type == pa.binary()
    assert_equivalent(documents, batch=7)


def test_arrays_of_documents_and_maps_take_the_columnar_path():
    """The `_doc` walk holds arrays of documents (nulls among them, at any path of documents) and
    maps keyed by data whole; the columnar path takes them as JSON text, with the exact path's
    counts: the documents stay columnar. What the exact path would not hold whole stays its own:
    an array of documents beside other values, a record whose keys differ from document to
    document but are no map, a map past `max_depth`."""
    rng = random.Random(12)
    documents = events(900)
    for i, d in enumerate(documents):
        d["items"] = [{"sku": f"s{rng.randint(0, 9)}", "qty": rng.randint(1, 5)} for _ in range(i % 4)]
        if i % 7 == 0:
            d["items"].append(None)
        d["order"] = {"lines": [{"n": i, "at": d["at"]}, {f"k{rng.randint(0, 99)}": Int64(i)}], "id": i}
        d["scores"] = {f"{rng.getrandbits(64):016x}": rng.random() for _ in range(rng.randint(1, 3))}
        d["tiers"] = {f"{rng.getrandbits(128):032x}": {"tier": "gold", "since": d["at"]} for _ in range(2)}
    odd = {
        100: {"items": [{"sku": "a"}, 5]},  # an array of documents beside a number
        200: {"order": {"lines": [[1], {"n": 1}], "id": 1}},
        300: {"scores": {"alpha": 1.5, "beta": 2.5}},  # keys like field names: a record, not a map
    }
    for i, extra in odd.items():
        documents[i].update(extra)
    table, columnar = assert_equivalent(documents, batch=len(documents))
    # Besides those, the `[null]` arrays (Arrow's reader drops a leading null) and the few
    # documents whose shapes leave them in groups too small to walk are the exact path's.
    assert columnar > 0.85 * len(documents)
    assert json.loads(table.column("items")[5].as_py()) == [
        {"sku": e["sku"], "qty": e["qty"]} for e in documents[5]["items"]
    ]
    assert_equivalent(documents, batch=37)
    shallow = s.SchemaOptions(max_depth=1)  # `tiers` and `scores` are then values of their own
    _, columnar = assert_equivalent(documents, shallow, batch=len(documents))
    assert columnar < len(documents) // 10


def test_keys_are_told_data_as_the_exact_path_tells_them():
    """Keys are matched as data by Arrow, a chunk at a time, and by Python where the two could
    differ (Python's `\\d` takes any Unicode digit, its `$` matches before a final newline): maps
    keyed by such keys are maps on both paths, records keyed by the same keys with fields beside
    them are records on both."""
    odd_keys = ["\u0662\u0660\u0662\u0664-\u0660\u0661-\u0660\u0661", "123\n", "2024-01-01\n", "\u0661\u0662"]
    plain_keys = ["0123456789abcdef", "42", "name", "caf\u00e9", "a\nb"]
    cases = [[], *[[k] for k in odd_keys + plain_keys], odd_keys, [odd_keys[0], "name", "other"]]
    assert looks_like_maps(MapKeys.of(cases)).tolist() == [s.looks_like_map(k) for k in cases]
    documents = events(300)
    arabic = str.maketrans("0123456789", "".join(map(chr, range(0x660, 0x66A))))
    for i, d in enumerate(documents):  # keys that only Python's `re` tells as data: maps all the same
        d["m"] = {f"{i}\n": i, f"2024-01-{i % 28 + 1:02d}".translate(arabic): i, "name": i}
    _, columnar = assert_equivalent(documents, batch=len(documents))
    assert columnar == len(documents)


def test_an_empty_array_beside_text_once_the_arrays_held_whole_are_set_aside(monkeypatch):
    """An empty array joins arrays of documents held whole at its path; where those documents are
    the exact path's (here: a key named like a wrapper), the empty array is left beside strings,
    which one `Values` cannot hold: the rarer shape goes to the exact path too. (Found by the
    walked fuzz once chunks with a rare decimal were walked.)"""
    monkeypatch.setattr(doc_text, "MIN_GROUP", 1)
    monkeypatch.setattr(doc_text, "BUDGET_SHARE", 1e6)
    monkeypatch.setattr(doc_text, "FOUND_UNWALKED_SHARE", 1.0)
    documents = [{"_id": i, "f": f"[ null {i}"} for i in range(30)]
    documents[5]["f"] = []
    documents[9]["f"] = [{"a": 1}, None]
    documents[9]["g"] = {"$oid": "not an id"}
    table, _ = assert_equivalent(documents, batch=len(documents))
    assert json.loads(table.column("f")[0].as_py()) == "[ null 0"


def test_keys_named_like_wrappers_are_found_in_the_bson_at_any_depth():
    """`wrapper_rows` reads each `$` of a chunk's bytes: the documents it finds are those a
    regular expression finds searching each one's BSON, keys and strings alike (a string holding
    `$oid` and a zero byte cannot be told from a key there; such a document is the exact path's)."""
    wrapper = re.compile(rb"\$(?:oid|date|binary|numberInt|numberLong|numberDouble|numberDecimal|ref)\x00")
    rng = random.Random(7)
    names = [
        "$oid",
        "$date",
        "$numberLong",
        "$numberDecimal",
        "$binary",
        "$ref",
        "$id",
        "$dollar",
        "$oidx",
        "oid",
        "a$oid",
        "$",
    ]
    raws = []
    for i in range(3000):
        d = {"_id": i}
        for _ in range(rng.randint(0, 3)):
            name = rng.choice(names)
            d[name if rng.random() < 0.5 else "n"] = {rng.choice(names): rng.choice([1, "$oid", "x$date"])}
        raws.append(bson.encode(d))
    found = wrapper_rows(raws).tolist()
    assert found == [bool(wrapper.search(r)) for r in raws]
    assert 0 < sum(found) < len(raws)
    assert wrapper_rows([]).tolist() == []


def test_values_held_whole_of_literal_text_only():
    """Arrays of empty documents (the same text in every document), held whole, then a split."""
    documents = [
        {"_id": i, "v": [{}], "w": i if i % 3 else f"s{i}", "x": {"y": [{}, None]}} for i in range(300)
    ]
    assert_equivalent(documents, batch=300)
    assert_equivalent(documents, batch=37)


def test_a_fault_in_a_fast_path_falls_back_to_the_exact_path(monkeypatch, caplog):
    """Outside the tests (which set ARIES_STRICT_CONVERSION), a crash in the `_doc` walk or in the
    columnar path costs speed, not the bucket: libbson renders `_doc` and the exact path converts."""
    from aries_assets.core import arrow

    documents = events(300)
    exact_stats, exact, exact_outliers, _ = convert(documents, DEFAULTS, 1000, fast=False)
    monkeypatch.delenv("ARIES_STRICT_CONVERSION")

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    for name in ("render", "columnar_part"):
        with monkeypatch.context() as patched:
            patched.setattr(arrow.doc_text if name == "render" else arrow, name, broken)
            stats, table, outliers, columnar = convert(documents, DEFAULTS, 1000, fast=True)
        assert columnar == 0
        assert stats.to_json() == exact_stats.to_json() and outliers == exact_outliers
        assert table.equals(exact)
        assert "it takes the exact path instead" in caplog.text


def test_values_that_decode_to_others_stay_exact():
    """A value is held whole only where pymongo decodes it back byte for byte, as the exact path
    sees it: DBRefs (in either key order), a key twice, and the deprecated symbol, undefined and
    dbPointer, inside maps or arrays of documents, take the exact path. (Found by a review's
    fuzz; each document is padded so that the walk, not libbson, renders the chunk.)"""

    def base(i):
        return {"_id": ObjectId(), "n": i, "pad": "p" * 3000}

    def with_map_value(i: int, element: bytes) -> bytes:
        """A document whose map `m` holds one raw element under a key like an id."""
        key = f"{i:016x}".encode()
        inner = raw_document(element.replace(b"KEY", key))
        head = bson.encode(base(i), codec_options=CODEC_OPTIONS)[4:-1]
        return raw_document(head + b"\x03m\x00" + inner)

    oddities = {
        "symbol": b"\x0eKEY\x00" + struct.pack("<i", 4) + b"abc\x00",
        "undefined": b"\x06KEY\x00",
        "dbPointer": b"\x0cKEY\x00" + struct.pack("<i", 4) + b"col\x00" + b"\x01" * 12,
        "a key twice": b"\x10KEY\x00" + struct.pack("<i", 1) + b"\x10KEY\x00" + struct.pack("<i", 2),
    }
    for name, element in oddities.items():
        raws = [with_map_value(i, element) for i in range(200)]
        _, columnar = assert_equivalent(raws, batch=200)
        assert columnar == 0, name
    twice = raw_document(b"\x10a\x00" + struct.pack("<i", 1) + b"\x10a\x00" + struct.pack("<i", 2))
    raws = [
        raw_document(bson.encode(base(i))[4:-1] + b"\x04items\x00" + raw_document(b"\x030\x00" + twice))
        for i in range(200)
    ]
    assert_equivalent(raws, batch=200)
    for order in ([("$ref", "c"), ("$id", 1)], [("$id", 1), ("$ref", "c")]):
        assert_equivalent([dict(base(i), refs=[SON(order)], m={f"{i:016x}": SON(order)}) for i in range(200)])
    maps = [dict(base(i), m={f"{i:016x}": 1}) for i in range(200)]
    assert_equivalent(maps, s.SchemaOptions(infer=False), expect_columnar=True)


def test_a_held_value_libbson_cannot_read_back_stays_exact():
    """A Decimal128 whose coefficient is past 34 digits: libbson writes its 35 digits, as `_doc`
    keeps them, but cannot read that text back, which the columnar path does for a held value
    holding a date, or beside other kinds, or under an override. Those documents stay exact.
    (Found by a review's fuzz.)"""
    coefficient_past_34_digits = Decimal128.from_bid(
        ((1 << 64) - 1).to_bytes(8, "little") + ((0x3040 << 48) | ((1 << 49) - 1)).to_bytes(8, "little")
    )
    at = datetime.datetime(2020, 1, 1, tzinfo=UTC)
    cases = {
        "a date beside": lambda i: [{f"k{i}": coefficient_past_34_digits, "at": at}],
        "a map": lambda i: {f"{i:016x}": [coefficient_past_34_digits, at]},
        "a string beside": lambda i: [{f"k{i}": coefficient_past_34_digits}] if i % 2 else "x",
    }
    for name, make in cases.items():
        documents = [{"_id": ObjectId(), "pad": "p" * 3000, "items": make(i)} for i in range(100)]
        assert_equivalent(documents), name
    overridden = s.SchemaOptions(overrides={"items": "string"})
    documents = [
        {"_id": ObjectId(), "pad": "p" * 3000, "items": [{"k": coefficient_past_34_digits}]}
        for _ in range(100)
    ]
    assert_equivalent(documents, overridden)


def raw_document(elements: bytes) -> bytes:
    return struct.pack("<i", len(elements) + 5) + elements + b"\x00"


def test_sample_datasets():
    for path in sorted(SAMPLES.glob("*.jsonl")):
        documents = [json_util.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for batch in (7, 1000):
            assert_equivalent(documents, batch=batch)


def test_messy_documents():
    assert_equivalent(messy_documents(), batch=5)
    assert_equivalent(messy_documents(), batch=1000)


def test_a_walked_chunk_is_read_from_the_walk_with_no_text_parsed(monkeypatch):
    """Where the `_doc` walk walks a chunk, the columnar path takes the values it read on the
    way (`Rendered.found`): no JSON is parsed. Fields of several types, hostile and `$` names,
    empty documents beside records and maps, arrays of documents and of scalars: every document
    columnar, and the file the exact path's."""
    from aries_assets.core import bson_columns

    rng = random.Random(5)
    documents = events(1200)
    for i, d in enumerate(documents):
        d["maybe"] = i if i % 3 else f"s{i}"  # ints and strings in one field, each in many documents
        d["flag"] = None if i % 4 == 0 else bool(i % 2)
        d["$dollar"], d["dotted.name"], d['double"quote'], d["名前"] = "d", 1.5, "q", i
        d["details"] = [{}, {"kind": "x"}, {f"{rng.getrandbits(64):016x}": 1}][i % 3]  # empty, record, map
        d["items"] = [{"sku": f"s{j}", "qty": j} for j in range(i % 3)]
        d["nested"] = {"empty": {}, "deep": {"n": Decimal128("1.25"), "u": Binary(bytes(16), 4)}}
    parsed = []
    read_json = bson_columns.pajson.read_json
    monkeypatch.setattr(
        bson_columns.pajson, "read_json", lambda *a, **k: parsed.append(1) or read_json(*a, **k)
    )
    raws = [bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents]
    batches = list(BucketConverter(DEFAULTS, chunk_bytes=None).chunks(raws))
    assert columnar_rows(batches) == len(documents)
    assert parsed == []
    monkeypatch.undo()
    for route in ROUTES:
        assert_equivalent(documents, batch=len(documents), route=route)
    assert_equivalent(documents, batch=100)


def scalar_cases() -> dict[str, list]:
    """Values per field, each list one field's values down the batch (None: missing)."""
    return {
        "ints": [0, -(2**31), 2**31 - 1, 7, None, 3],
        "longs": [Int64(-(2**63)), Int64(2**63 - 1), Int64(0), 5, Int64(1), None],
        "doubles": [0.1, -0.0, float("nan"), float("inf"), float("-inf"), 1e300],
        "tiny": [5e-324, 2.5, -1.5, 1e-7, 123456789.125, None],
        "decimals": [Decimal128("1.50"), Decimal128("-0"), Decimal128("1E+3"), Decimal128("0.001"),
                     Decimal128("12345678901234567890.12"), Decimal128("-7.0")],
        "dec_special": [Decimal128("NaN"), Decimal128("Infinity"), Decimal128("-Infinity"),
                        Decimal128("1.2E-10"), Decimal128("9999999999999999999999999999999999"), None],
        "dates": [datetime.datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
                  datetime.datetime(1, 1, 1, tzinfo=UTC), datetime.datetime(9999, 12, 31, tzinfo=UTC),
                  DatetimeMS(253402300800007), DatetimeMS(-62135596800001), None],
        "strings": ["", "\x00nul", "עברית RTL \u202e", "emoji 🎉", 'quote " back \\ slash', "x" * 3000],
        "bools": [True, False, None, True, False, True],
        "oids": [ObjectId("000000000000000000000000"), ObjectId("ffffffffffffffffffffffff"),
                 ObjectId(), None, ObjectId(), ObjectId()],
        "nulls": [None, None, None, None, None, None],
        "int_arrays": [[1, 2, 3], [], [None, 4], [2**31 - 1], None, [0]],
        "string_arrays": [["a"], [], ["", "🎉"], None, ["x", None], ["y"]],
        "double_arrays": [[1.5, -0.0], [float("nan")], [], None, [2.25], [1e-300]],
        "date_arrays": [[datetime.datetime(2020, 1, 1, tzinfo=UTC)], [], None, [], [], []],
        "record": [{"a": 1, "b": "x"}, {"a": 2}, None, {"b": "y", "c": {"d": True}}, {"a": 3}, {"b": "z"}],
    }  # fmt: skip


def scalar_documents(with_nulls: bool) -> list[dict]:
    cases = scalar_cases()
    documents = []
    for row in range(6):
        doc = {"_id": row}
        for name, values in cases.items():
            value = values[row]
            if value is not None:
                doc[name] = value
            elif with_nulls:
                doc[name] = None
        documents.append(doc)
    return documents


@pytest.mark.parametrize("with_nulls", [False, True])
def test_every_scalar_kind_on_the_columnar_path(with_nulls):
    # With nulls, a document whose text cannot tell its null fields from its missing ones takes
    # the exact path alone; the rest of its batch stays columnar.
    table, columnar = assert_equivalent(scalar_documents(with_nulls), batch=6, expect_columnar=True)
    assert table.column("_id_key").to_pylist()[:2] == ['{"$numberInt": "0"}', '{"$numberInt": "1"}']


def test_nulls_and_missing_fields_in_one_document():
    documents = [
        {"_id": 1, "a": None, "b": "x", "r": {"c": None, "d": 1}},
        {"_id": 2, "b": None, "r": {"d": None}},
        {"_id": 3, "a": "y", "r": None},
        {"_id": 4, "r": {"c": "z"}},
    ]
    table, columnar = assert_equivalent(documents, batch=10, expect_columnar=True)
    stats = convert(documents, s.SchemaOptions(), 10, fast=True)[0]
    assert (stats.fields[("a",)].nulls, stats.fields[("b",)].nulls, stats.fields[("r",)].nulls) == (1, 1, 1)
    assert (stats.fields[("r", "c")].nulls, stats.fields[("r", "d")].nulls) == (1, 1)


def test_each_field_alone_and_in_pairs():
    """Every case as its own batch, so one refused field does not hide another's result."""
    for name, values in scalar_cases().items():
        for with_nulls in (False, True):
            documents = []
            for row, value in enumerate(values):
                if value is not None or with_nulls:
                    documents.append({"_id": f"r{row}", name: value})
                else:
                    documents.append({"_id": f"r{row}"})
            assert_equivalent(documents, batch=6)


def test_overrides_and_outliers_convert_like_the_exact_path():
    documents = scalar_documents(with_nulls=True)
    documents[0]["ints"] = "not a number"
    documents.append({"_id": 100, "decimals": Decimal128("0.12345"), "ints": Int64(2**40), "dates": "soon"})
    overrides = {
        "ints": "string", "longs": "double", "decimals": "decimal(10,2)", "doubles": "decimal",
        "dates": "string", "oids": "json", "bools": "int32", "int_arrays": "json", "tiny": "decimal(38,3)",
        "strings": "binary", "dec_special": "string", "record.a": "bool",
    }  # fmt: skip
    for options in (
        s.SchemaOptions(overrides=overrides),
        s.SchemaOptions(outlier_share=0.3),
        s.SchemaOptions(max_depth=1),
        s.SchemaOptions(infer=False),
    ):
        assert_equivalent(documents, options, batch=3)


def test_append_evolution_variants():
    before = [{"_id": i, "n": i, "tags": ["a"]} for i in range(20)]
    after = before + [{"_id": 100 + i, "n": f"s{i}", "tags": [i]} for i in range(20)]
    options = s.SchemaOptions(evolution="append")
    first = s.resolve_schema(convert(before, options, 1000, fast=False)[0], None, options)
    stats = convert(after, options, 1000, fast=False)[0]
    schema = s.resolve_schema(stats, first, options)
    assert len(schema.columns) > 2
    assert_equivalent(after, options, batch=10, schema=schema)


def every_bson_type() -> list[dict]:
    return [
        {"_id": 1, "regex": Regex("^a.*$", "imx"), "code": Code("f()"), "scope": Code("g(x)", {"x": 1}),
         "ref": DBRef("coll", ObjectId(), "db"), "min": MinKey(), "max": MaxKey(), "ts": Timestamp(1, 2)},
        {"_id": 2, **{f"bin{t}": Binary(b"\x00\x01\xff", t) for t in (0, 1, 2, 3, 5, 6, 7, 8, 128)},
         "uuid": Binary(uuid.uuid4().bytes, 4), "uuid3": Binary(uuid.uuid4().bytes, 3), "raw": b"bytes"},
        {"_id": 3, "": "empty key", "dotted.key": 1, "$dollar": 2, "🎉": 3, "deep": _deep(60),
         "empty_doc": {}, "empty_list": [], "nested_lists": [[1, [2]], []], "mixed": [1, "a", None, {"x": 1}]},
        {"_id": 4, "ts": datetime.datetime(2020, 1, 1, tzinfo=UTC), "regex": "text", "min": 5},
        {"_id": "5", "code": None, "map": {"2024-01-01": 1, "2024-01-02": 2}},
        {"_id": Int64(7), "map": {"2024-01-03": 3}, "a": {"b": {"c": {"d": {"e": {"f": 1}}}}}},
        {"_id": "7", "a": {"b": {"c": {"d": {"e": {"f": "deeper"}}}}}},
        {"_id": {"a": 1}, "x": 1},
        {"_id": '{"a": 1}', "x": 2},
    ]  # fmt: skip


def _deep(levels: int):
    value: object = "bottom"
    for level in range(levels):
        value = {f"l{level}": value}
    return value


def test_every_bson_type():
    assert_equivalent(every_bson_type(), batch=1)
    assert_equivalent(every_bson_type(), batch=100)


def test_hostile_names_in_clean_batches():
    names = ["with space", "dotted.name", 'double"quote', "single'quote", "Ünïcödé", "名前", "Name", "name",
             "DROP TABLE x; --", "tab\tname", "a/b\\c", "emoji🎉", "2fa", "select"]  # fmt: skip
    documents = [{"_id": ObjectId(), **{n: f"{n}-{i}" for n in names}, "n": i} for i in range(30)]
    table, _ = assert_equivalent(documents, batch=7, expect_columnar=True)
    assert "with_space" in table.column_names


def test_a_large_document():
    documents = events(5) + [{"_id": ObjectId(), "blob": "x" * (2 * 1024 * 1024), "type": "big"}]
    assert_equivalent(documents, batch=10, expect_columnar=True)


def test_exclusion_gives_the_same_result_on_both_paths():
    documents = [
        {"_id": i, "addresses": [{"ssn": "123-45-6789", "city": "Rome"}, [{"ssn": "x"}]], "ssn": "top"}
        for i in range(10)
    ]
    options = s.SchemaOptions(exclude=("addresses.ssn", "ssn"))
    table, _ = assert_equivalent(documents, options, batch=3)
    assert not any("ssn" in d or "123-45" in d for d in table.column("_doc").to_pylist())


def test_id_key_is_json_util_canonical():
    for value in [ObjectId(), "Zürich \"q\"", "", 0, -(2**31), 2**31 - 1, 2**31, -(2**31) - 1, Int64(5),
                  2.5, {"a": 1}, [1], Decimal128("1.5"), datetime.datetime(2020, 1, 1, tzinfo=UTC), True]:  # fmt: skip
        assert id_key(value) == json_util.dumps(value, json_options=json_util.CANONICAL_JSON_OPTIONS)


def streamed(documents: list[dict], tmp_path, name: str, options: s.SchemaOptions = DEFAULTS):
    """A bucket file written chunk by chunk, the way `write_bucket` writes one, read back whole."""
    raws = [bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents]
    path = str(tmp_path / f"{name}.parquet")
    converted = convert_to_parquet(path, raws, lambda stats: s.resolve_schema(stats, None, options), options)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f"{name}.parquet.")], "a run file left"
    return converted, pq.read_table(path), pq.read_metadata(path).metadata


@pytest.mark.parametrize(
    "case",
    [
        "steady",
        "a field only at the end",
        "a type that widens at the end",
        "a type conflict at the end",
        "messy",
    ],
)
def test_a_bucket_streamed_in_chunks_is_the_exact_paths_file(case, tmp_path, monkeypatch):
    """Written a small chunk at a time, while the schema still changes: the same file as the exact path's."""
    from aries_assets.core import arrow

    documents = events(300)
    if case == "messy":  # schemas change from chunk to chunk
        documents = messy_documents() + documents
    elif case == "a field only at the end":  # carried over: the rows before hold no value for it
        documents.append({"_id": ObjectId(), "blob": "x" * 5000, "bytes": Binary(b"\xff" * 10)})
    elif case == "a type that widens at the end":  # converted again: an int32 column becomes int64
        documents.append({"_id": ObjectId(), "bytes": Int64(2**40)})
    elif case == "a type conflict at the end":
        documents += [{"_id": ObjectId(), "type": i} for i in range(300)]
    monkeypatch.setattr(arrow, "CHUNK_BYTES", 4096)
    converted, table, metadata = streamed(documents, tmp_path, "bucket")
    stats, exact, outliers, _ = convert(documents, DEFAULTS, 1000, fast=False)
    assert converted.stats.to_json() == stats.to_json()
    assert converted.outliers == dict(outliers)
    assert table.schema.remove_metadata() == exact.schema.remove_metadata()
    assert table.column("_doc").to_pylist() == exact.column("_doc").to_pylist()
    for name in exact.column_names:
        assert comparable(table.column(name)) == comparable(exact.column(name)), name
    assert metadata[b"aries.type_stats"].decode() == stats.to_json()
    assert json.loads(metadata[b"aries.outliers"]) == dict(outliers)
    assert pq.ParquetFile(tmp_path / "bucket.parquet").num_row_groups > 1, "one row group per chunk"


def test_the_exact_path_decodes_a_chunk_in_parts(tmp_path, monkeypatch):
    """Decoded, documents take several times their BSON: a chunk the columnar path refused is
    decoded a part at a time, and the file is the one a single pass gives."""
    from aries_assets.core import arrow

    documents = messy_documents()
    raws = [bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents]
    stats, exact, outliers, _ = convert(documents, DEFAULTS, 10**6, fast=False)  # in one part
    monkeypatch.setattr(arrow, "EXACT_CHUNK_BYTES", 2048)
    batches = list(BucketConverter(DEFAULTS).chunks(raws))
    # The 3 MB document (the last) is a chunk of its own; the chunk of all the others is refused.
    assert len(raws[-1]) > 3 * 10**6 and isinstance(batches[-1], ColumnarBatch) and batches[-1].rows == 1
    refused = batches[:-1]
    assert all(not isinstance(b, ColumnarBatch) for b in refused)
    assert len(refused) > 1 and max(b.raw_size for b in refused) < 2048 + max(map(len, raws[:-1]))
    assert sum(len(b.ids) for b in refused) == len(raws) - 1
    converted, table, _ = streamed(documents, tmp_path, "bucket")
    assert converted.stats.to_json() == stats.to_json() and converted.outliers == dict(outliers)
    assert table.column("_doc").to_pylist() == exact.column("_doc").to_pylist()
    for name in exact.column_names:
        assert comparable(table.column(name)) == comparable(exact.column(name)), name


def test_an_empty_bucket_streams_to_a_file_with_no_rows(tmp_path):
    converted, table, _ = streamed([], tmp_path, "empty")
    assert table.num_rows == 0 and table.column_names == ["_id", "_doc", "_id_key"]
    assert converted.stats.documents == 0


def test_doc_is_libbsons_canonical_json_byte_for_byte():
    """`_doc` is rendered into one buffer as it goes: each document's text is still libbson's own,
    multi-byte characters and hostile names included."""
    import bsonjs

    raws = [bson.encode(d, codec_options=CODEC_OPTIONS) for d in messy_documents() + events(50)]
    docs = canonical_json(raws)
    assert docs.to_pylist() == [bsonjs.dumps(r, mode=bsonjs.CANONICAL) for r in raws]
    assert any(not text.isascii() for text in docs.to_pylist())


def test_a_bucket_converts_in_even_chunks_of_an_eighth_of_it(tmp_path, monkeypatch):
    """Memory follows a bucket's own bytes: a chunk (a row group) is an eighth of the bucket, at
    least MIN_CHUNK_BYTES (each chunk has a fixed cost) and at most CHUNK_BYTES, in equal parts;
    and the file is the exact path's."""
    from aries_assets.core import arrow

    kb, mb = 1024, 1024 * 1024
    assert arrow.chunk_bytes_for(500 * kb) == 500 * kb, "one chunk, not 384 KiB and a sliver"
    assert arrow.chunk_bytes_for(int(2.3 * mb)) == -(-int(2.3 * mb) // 6)
    assert arrow.chunk_bytes_for(8 * mb) == mb
    assert arrow.chunk_bytes_for(24 * mb) == 2 * mb
    assert 1.9 * mb < arrow.chunk_bytes_for(63 * mb) <= 2 * mb
    monkeypatch.setattr(arrow, "MIN_CHUNK_BYTES", 64 * 1024)
    documents = events(6_000)
    raw = sum(len(bson.encode(d, codec_options=CODEC_OPTIONS)) for d in documents)
    assert raw // 8 >= arrow.MIN_CHUNK_BYTES
    converted, table, _ = streamed(documents, tmp_path, "bucket")
    groups = pq.ParquetFile(tmp_path / "bucket.parquet").metadata
    assert 7 <= groups.num_row_groups <= 8
    stats, exact, _, _ = convert(documents, DEFAULTS, 1000, fast=False)
    assert converted.stats.to_json() == stats.to_json()
    for name in exact.column_names:
        assert comparable(table.column(name)) == comparable(exact.column(name)), name


def test_a_few_refused_documents_do_not_cut_the_chunks_after_them(monkeypatch):
    """A chunk whose documents took both paths holds the columnar parse of some beside the Python
    objects of the others: after one where those weigh much, chunks are cut smaller. One refused
    document in a chunk (a map beside arrays, as in most messy collections) weighs nothing, and
    halving every chunk after it cost a fifth of the conversion speed."""
    from aries_assets.core import arrow

    monkeypatch.setattr(arrow, "SPLIT_CHUNK_BYTES", 32 * 1024)

    def chunked(every: int) -> tuple[int, int]:
        documents = [
            dict(d, mixed=[1, {"a": i}]) if i % every == 0 else d for i, d in enumerate(events(3_000))
        ]
        raws = [bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents]
        batches = list(BucketConverter(DEFAULTS, chunk_bytes=64 * 1024).chunks(raws))
        rows = [
            len(b.rows)
            if isinstance(b, SplitBatch)
            else b.rows
            if isinstance(b, ColumnarBatch)
            else len(b.ids)
            for b in batches
        ]
        assert sum(rows) == len(raws) and any(isinstance(b, SplitBatch) for b in batches)
        return len(batches), sum(map(len, raws))

    chunks, size = chunked(every=250)  # one refused document in a chunk of about 280
    assert chunks <= size // (64 * 1024) + 2, "only the first chunk is cut smaller"
    chunks, size = chunked(every=2)  # half of each chunk refused
    assert chunks >= size // (32 * 1024) - 1, "each chunk after the first mixed one is cut smaller"


def test_a_document_larger_than_a_chunk_is_a_chunk_of_its_own(tmp_path):
    """A 2 MB document takes its own chunk, so its copies (BSON, `_doc`, its column, Parquet pages)
    are not held beside a chunk of others' too; the documents around it keep their order."""
    documents = events(4_000)
    documents.insert(2_500, {"_id": ObjectId(), "blob": "x" * (2 * 1024 * 1024)})
    raws = [bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents]
    converter = BucketConverter(DEFAULTS, chunk_bytes=None)
    sizes = [
        len(b.rows) if isinstance(b, SplitBatch) else b.rows if isinstance(b, ColumnarBatch) else len(b.ids)
        for b in converter.chunks(raws)
    ]
    assert 1 in sizes and sum(sizes) == len(documents)
    assert sum(sizes[: sizes.index(1)]) == 2_500, "the large document alone, where it was"
    converted, table, _ = streamed(documents, tmp_path, "bucket")
    assert table.column("_id").to_pylist() == [str(d["_id"]) for d in documents]
    assert table.column("blob").to_pylist()[2_500] == documents[2_500]["blob"]


def test_a_long_string_is_tested_a_block_at_a_time_not_copied_whole(tmp_path):
    """The walk's byte tests on a string (escapes, wrapper keys, UTF-8) and its statistics work a
    block at a time: NumPy and Python hold no copy of a 4 MB string's bytes beside it (they held
    five, which left a small bucket with a large document at four times its BSON); and its column
    refers to the document's bytes, which the bucket holds anyway."""
    blob = "x" * (4 * 1024 * 1024) + 'costs $5, "quoted"\n and \u00e9'
    raw = bson.encode({"_id": 1, "blob": blob}, codec_options=CODEC_OPTIONS)
    converter = BucketConverter(DEFAULTS)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        batches = list(converter.chunks([raw]))
        held = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert held < len(blob) // 2, f"{held:,} bytes of temporaries for a {len(blob):,}-byte string"
    assert isinstance(batches[0], ColumnarBatch), "the columnar path took it"
    assert converter.stats.fields[("blob",)].max_bytes == len(blob.encode())
    # Nor does Arrow: the column's value is the document's own bytes, not a copy of them.
    settled = s.resolve_schema(converter.stats, None, DEFAULTS)
    column = converter.table(batches[0], settled, Counter()).column("blob")
    at, start = column.chunk(0).buffers()[2].address, pa.py_buffer(raw).address
    assert start <= at < start + len(raw), "the long string's column refers to its BSON"
    converted, table, _ = streamed([bson.decode(raw, CODEC_OPTIONS)], tmp_path, "bucket")
    assert table.column("blob").to_pylist() == [blob]
    assert table.column("_doc").to_pylist() == [bsonjs.dumps(raw, bsonjs.CANONICAL)]


def test_statistics_are_kept_where_a_reader_can_prune_by_them(tmp_path):
    """Parquet drops a minimum or maximum past 4 KB, yet copies each long value several times while
    working it out (12 MB for a 2 MB string): JSON text, binaries and long text go without;
    `_id` and the typed columns keep theirs."""
    documents = [
        {"_id": ObjectId(), "n": i, "name": f"n{i}", "blob": "x" * (5000 + i), "raw": Binary(b"\x01" * 8)}
        for i in range(50)
    ]
    documents[3]["scores"] = {f"{i:016x}": i for i in range(3)}  # a JSON column
    streamed(documents, tmp_path, "bucket")
    group = pq.ParquetFile(tmp_path / "bucket.parquet").metadata.row_group(0)
    stated = {group.column(i).path_in_schema: group.column(i).is_stats_set for i in range(group.num_columns)}
    assert stated == {
        "_id": True,
        "_doc": False,
        "_id_key": False,
        "n": True,
        "name": True,
        "blob": False,
        "raw": False,
        "scores": False,
    }


def test_a_field_of_two_shapes_is_set_aside_before_the_reader_meets_it_again(monkeypatch):
    """An int field with a rare string stops Arrow's reader (`changed from`): once per bucket.
    Its later chunks set the rarer shape aside before they are read, and the file is the exact
    path's."""
    from aries_assets.core import bson_columns

    documents = events(3000)
    for i, document in enumerate(documents):
        document["maybe"] = i if i % 50 else f"s{i}"
    met = []
    conflict = bson_columns._TypeConflict.__init__

    def counted(self, message):
        met.append(message)
        conflict(self, message)

    monkeypatch.setattr(bson_columns._TypeConflict, "__init__", counted)
    raws = [bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents]
    with reading("text"):
        batches = list(BucketConverter(DEFAULTS, chunk_bytes=32 * 1024).chunks(raws))
    assert len(batches) > 5 and all(isinstance(b, SplitBatch) for b in batches)
    assert len(met) == 1, met
    # The walk meets no reader: the rare string parts its documents from their group, too few
    # to walk, so they alone take the exact path.
    batches = list(BucketConverter(DEFAULTS, chunk_bytes=32 * 1024).chunks(raws))
    assert columnar_rows(batches) == len(documents) - len(documents) // 50
    assert_equivalent(documents, batch=len(documents), expect_columnar=True)


def test_long_text_is_not_dictionary_encoded(tmp_path):
    """A dictionary would copy each long value, only to be dropped once it outgrew its page (a
    2 MB string cost 2 MB more at its peak): text past 4 KB is written plain; short text and
    the other columns keep their dictionaries."""
    documents = [{"_id": i, "name": f"n{i % 3}", "blob": "x" * (5000 + i)} for i in range(50)]
    streamed(documents, tmp_path, "bucket")
    group = pq.ParquetFile(tmp_path / "bucket.parquet").metadata.row_group(0)
    dictionary = {
        group.column(i).path_in_schema: group.column(i).has_dictionary_page for i in range(group.num_columns)
    }
    assert dictionary == {"_id": False, "_doc": False, "_id_key": False, "name": True, "blob": False}


def test_doubles_digits_counted_at_once_as_one_by_one():
    """A double's integer digits and scale, from Arrow's shortest text of each, are those of
    `Decimal(repr(value))`, which the exact path counts: random bit patterns, round numbers and
    where `repr` turns to exponent form (1e-4 and 1e16), zero, subnormals, NaN and infinities."""
    from decimal import Decimal

    from aries_assets.core.bson_columns import _digits, double_digits

    rng = random.Random(11)
    values = [1e-5, 1e-4, 9.999e-5, 9.9999999e15, 1e16, 1e15, 0.0, -0.0, 5e-324, 1.7976931348623157e308]
    values += [100.0, 0.1, 12.5, -3.25e-10, 2.0**53 + 2, float("nan"), float("inf"), float("-inf")]
    for _ in range(20_000):
        roll = rng.random()
        if roll < 0.4:
            value = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
        elif roll < 0.7:
            value = round(rng.uniform(-1e6, 1e6), rng.randint(0, 6))
        else:
            value = float(f"{rng.choice([1, 1.5, 9.999, 1.2345678901234567])}e{rng.randint(-330, 308)}")
        values.append(value)

    def one_by_one(numbers: list[float]) -> tuple[int, int]:
        stats = s.FieldStats()
        _digits(stats, (Decimal(repr(v)) for v in numbers))
        return stats.int_digits, stats.scale

    def at_once(numbers: list[float]) -> tuple[int, int]:
        stats = s.FieldStats()
        double_digits(stats, pa.array(numbers, pa.float64()))
        return stats.int_digits, stats.scale

    for value in values:
        assert at_once([value]) == one_by_one([value]), repr(value)
    for start in range(0, len(values), 997):
        assert at_once(values[start : start + 997]) == one_by_one(values[start : start + 997])


def test_arrays_that_begin_with_nulls_keep_every_element():
    """Arrow's JSON reader drops the nulls an array begins with while its element type is unknown
    (`[null, "x"]` reads as `["x"]`, `[null, null]` as `[null]`): such documents take the exact path."""
    documents = [
        {"_id": 1, "a": [None, "x"], "n": [None, None], "r": {"l": [None, 2]}},
        {"_id": 2, "a": ["y", None], "n": [None, 3], "r": {"l": [1]}},
        {"_id": 3, "a": [None], "n": [], "r": {"l": [None]}},
    ]
    for batch in (1, 3):
        table, _ = assert_equivalent(documents, batch=batch)
        assert table.column("a").to_pylist() == [[None, "x"], ["y", None], [None]]
        assert table.column("n").to_pylist() == [[None, None], [None, 3], []]
        assert table.column("r__l").to_pylist() == [[None, 2], [1], [None]]


def test_a_decimal128_from_its_bits_converts_as_from_its_digits():
    """The exact path reads a Decimal128's coefficient and exponent from its BID bits; the result
    (a value, or an outlier: inexact at the scale, too many digits) is Python's `quantize` of
    `to_decimal()`, the way it was first written."""
    from decimal import Decimal, InvalidOperation

    from aries_assets.core.arrow import _OUTLIER, _decimal128_digits, _to_decimal

    def by_digits(precision: int, scale: int):
        quantum = Decimal(1).scaleb(-scale)

        def convert(value: Decimal128):
            try:
                number = value.to_decimal()
                if not number.is_finite():
                    return _OUTLIER
                exact = number.quantize(quantum)
            except InvalidOperation:
                return _OUTLIER
            return _OUTLIER if exact != number or len(exact.as_tuple().digits) > precision else exact

        return convert

    rng = random.Random(5)
    texts = ["0", "-0", "1.50", "1E+3", "0.001", "-7.0", "NaN", "-NaN", "Infinity", "-Infinity", "1E-6176",
             "9999999999999999999999999999999999", "9.999999999999999999999999999999999E+6144", "0E+6000",
             "-0E-6000", "123456789012345678901234567.8", "1234567890123456789012345678.9"]  # fmt: skip
    for _ in range(3000):
        coefficient = rng.randint(0, 10 ** rng.randint(1, 34) - 1)
        exponent = rng.choice([rng.randint(-40, 10), rng.randint(-6176, 6111)])
        texts.append(f"{'-' if rng.random() < 0.3 else ''}{coefficient}E{exponent}")
    values = [Decimal128(t) for t in texts]
    # Non-canonical: a coefficient past 34 digits, which IEEE 754 and pymongo read as zero.
    for coefficient, exponent, negative in [
        (10**34, 0, False),
        (2**113 - 1, -2, True),
        (10**34 + 7, 3, False),
    ]:
        high = (coefficient >> 64) | ((exponent + 6176) << 49) | (negative << 63)
        values.append(Decimal128.from_bid(struct.pack("<QQ", coefficient & (2**64 - 1), high)))
    for value in values:  # the statistics' digits, as from `to_decimal()`
        number = value.to_decimal()
        if number.is_finite():
            assert _decimal128_digits(value) == s.decimal_digits(number), value
    for precision, scale in [(38, 2), (10, 2), (38, 0), (38, 38), (5, 5), (20, 4), (1, 0), (28, 0), (38, 30)]:
        fast, slow = _to_decimal(precision, scale), by_digits(precision, scale)
        for value in values:
            got, expected = fast(value), slow(value)
            assert (got is _OUTLIER) == (expected is _OUTLIER), (precision, scale, value, got, expected)
            if got is not _OUTLIER:
                column = pa.decimal128(precision, scale)
                assert pa.array([got], column).equals(pa.array([expected], column)), (value, got, expected)


@pytest.mark.parametrize(
    "documents",
    [
        # A Decimal128 zero has one integer digit, as its coefficient has.
        [{"_id": 0, "at": Decimal128("-0")}, {"_id": 1, "at": Decimal128("0")}],
        # A wrapped value in one document and a record in another: the reader merges both shapes.
        [
            {"_id": 0, "": 1},
            {"_id": 1, "": None},
            {"_id": 2, "": {"tags": {"x": DatetimeMS(253402300800007)}}},
        ],
        [{"_id": 0, "with space": {"v1": 0}}, {"_id": 1, "with space": Int64(1)}],
        [
            {"_id": 4, "a/b\\c": {"at": ObjectId("ce976aaa45b378838af8859b")}},
            {"_id": 5, "a/b\\c": Binary(b"\0", 0)},
        ],
        # An empty document beside wrapped values: the reader makes it a wrapper of nulls.
        [{"_id": 0, "name": 1}, {"_id": 1, "name": {}}],
        [{"_id": 0, "name": {}}, {"_id": 1, "name": datetime.datetime(1, 1, 1, tzinfo=UTC)}],
        [{"_id": 0, "o": {}}, {"_id": 1, "o": ObjectId("ce976aaa45b378838af8859b")}],
        # A string that begins with " : " looks like a key's end to the key count.
        [
            {"_id": " : 331", "d": {"k": None, "": []}, "t": {"v": {"m": None}}},
            {"_id": " : 388", "d": {"k": []}, "y": True, "t": {"v": {"m": None}}},
        ],
        [{"_id": 0, "s": [" : x", None], "n": None}, {"_id": 1, "s": ["y"]}],
        [{"_id": 0, " : key": 1, "n": None}, {"_id": 1, "n": 2}],
        [{"_id": 0, "s": " : a", "n": None}, {"_id": 1, "s": "b", "m": 1}],
        [{"_id": 0, "w": 1}, {"_id": 1, "w": {"v": 0}}],
        [{"_id": 0, "t": [1, {}]}],
        [{"_id": 0, "b": Binary(b"a", 0)}, {"_id": 1, "b": {"x": 1}}],
        # A value with no decimal form (NaN, infinities) beside one with more digits than a decimal
        # holds: the largest scale counts, in whatever order they come.
        [{"_id": 0, "m": {}, "v": Decimal128("1E-6176")}, {"_id": 1, "v": Decimal128("Infinity")}],
        [{"_id": 0, "m": {}, "v": 5e-324}, {"_id": 1, "v": float("nan")}],
        # A non-canonical Decimal128 (a coefficient past 34 digits): libbson writes its digits,
        # pymongo reads it as zero.
        [{"_id": 0, "k": {"k": Decimal128.from_bid(bytes.fromhex("6e83cedc697c58a8e20de75dffffb70a"))}}],
        [{"_id": 0, "d": Decimal128.from_bid(bytes.fromhex("ffffffffffffffffffffffffffff0130"))}],
        [{"_id": 0, "b": Decimal128.from_bid(bytes.fromhex("34e5e076da66e6980b53a81affff019b"))}],  # negative
        [{"_id": 0, "c": Decimal128("-1.234567890123456789012345678901234E+40")}],  # canonical: 34 digits
    ],
)
def test_documents_the_fuzzer_found_convert_as_the_exact_path_converts_them(documents):
    for batch in (1, 2, len(documents)):
        assert_equivalent(documents, batch=batch)


def test_arrays_of_several_lengths_walked_as_one_group_are_the_exact_paths():
    """The elements the walk read for some of a group's documents only (arrays ending at
    different lengths), and each document's array length, give the exact path's columns and
    statistics, by either route and in chunks of any size; a later element of another type in a
    few documents still sets those aside."""
    from aries_assets_tests.test_doc_text import ragged

    documents = ragged(1500)
    _, columnar = assert_equivalent(documents, batch=len(documents))
    assert columnar == 1495  # all but the 5 whose tags run on (bsonjs's): read from the walk
    for i in range(0, 1500, 97):
        documents[i]["scores"] = documents[i]["scores"] + ["nine"]  # a string after ints, in a few
    _, columnar = assert_equivalent(documents, batch=len(documents))
    assert columnar >= 1480
    assert_equivalent(documents, batch=100)


def test_arrays_of_documents_walked_as_one_group_are_held_whole_as_the_exact_path_holds_them():
    """Arrays of documents of several lengths, walked as one group, are held whole: each
    document's count of documents and nulls in its array, and the JSON column, are the exact
    path's; nulls and empty documents after the documents, and a field some documents lack, too."""
    from aries_assets_tests.test_doc_text import line_items

    documents = line_items(1500)
    for d in documents[::7]:
        d["items"] = d["items"] + [None]
    for d in documents[::3]:
        d["items"][0]["gift"] = True
    for d in documents[::4]:
        d["items"] = [*d["items"], {}]
    _, columnar = assert_equivalent(documents, batch=len(documents))
    # All but the 54 with a null, then `{}`: where others hold a document at that element, their
    # group splits as before, into groups too small to walk.
    assert columnar == len(documents) - 54
    assert_equivalent(documents, batch=100)
