"""`_doc` rendered a chunk at a time against libbson's text, document by document, byte for byte.

The walk renders what it knows and hands the rest to bsonjs; either way, each document's text
must be exactly what `bsonjs.dumps(raw, CANONICAL)` gives it.
"""

from __future__ import annotations

import datetime
import random
import struct
import uuid

import bson
import bson.json_util
import bsonjs
import numpy as np
import pytest
from bson import Binary, Code, Decimal128, Int64, ObjectId, Regex, Timestamp
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions
from bson.datetime_ms import DatetimeMS
from bson.max_key import MaxKey
from bson.min_key import MinKey

from aries_assets.core import doc_text
from aries_assets.core.doc_text import canonical_json
from aries_assets_tests.test_converter_equivalence import SAMPLES
from aries_assets_tests.test_messy import messy_documents

UTC = datetime.UTC
OPTIONS = CodecOptions(uuid_representation=UuidRepresentation.STANDARD)


def libbson(raws: list[bytes]) -> list[str]:
    return [bsonjs.dumps(raw, bsonjs.CANONICAL) for raw in raws]


def assert_libbsons(raws: list[bytes]) -> None:
    got, expected = canonical_json(raws).to_pylist(), libbson(raws)
    wrong = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b]
    assert not wrong, f"{len(wrong)} of {len(raws)} differ, first:\n{got[wrong[0]]}\n{expected[wrong[0]]}"


def rendered_by_libbson(raws: list[bytes], monkeypatch) -> list[bytes]:
    """The documents the chunk's rendering handed to bsonjs; every text checked against libbson's."""
    expected = libbson(raws)
    rendered: list[bytes] = []
    dumps = bsonjs.dumps
    monkeypatch.setattr(doc_text.bsonjs, "dumps", lambda raw, mode: rendered.append(raw) or dumps(raw, mode))
    assert canonical_json(raws).to_pylist() == expected
    return rendered


def encoded(documents: list[dict]) -> list[bytes]:
    return [bson.encode(d, codec_options=OPTIONS) for d in documents]


def a_double(rng: random.Random) -> float:
    roll = rng.random()
    if roll < 0.3:
        return rng.uniform(-1e6, 1e6)
    if roll < 0.5:
        return float(rng.randint(-(10**6), 10**6))
    if roll < 0.6:
        return rng.choice(
            [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 5e-324, 1e21, 1e20, 1e-7, 0.1]
        )
    return struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]  # any bits at all


def a_decimal(rng: random.Random) -> Decimal128:
    roll = rng.random()
    if roll < 0.5:
        sign = rng.choice(["", "-"])
        return Decimal128(
            f"{sign}{rng.randint(0, 10 ** rng.randint(1, 19))}.{rng.randint(0, 10**6):0{rng.randint(0, 8)}d}"
        )
    if roll < 0.7:
        return Decimal128(f"{rng.randint(0, 999)}E{rng.randint(-20, 20)}")
    if roll < 0.8:
        return Decimal128(
            rng.choice(["NaN", "-NaN", "Infinity", "-Infinity", "0", "-0", "0E-10", "1E+6144", "-0.000000",
                        "0.0000001", "9999999999999999999999999999999999", "12345678901234567890.5"])
        )  # fmt: skip
    return Decimal128.from_bid(rng.getrandbits(128).to_bytes(16, "little"))  # non-canonical ones too


def a_string(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.7:
        return "".join(rng.choice("abcXYZ 019-_:/.") for _ in range(rng.randint(0, 20)))
    if roll < 0.85:
        return rng.choice(
            ["é", "名前", "🎉", "\u2028", "\x7f", 'a"b', "a\\b", "\n", "\t", "\x00x", "", '" : ']
        )
    return "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 5)))


def any_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    scalars = [
        a_double, a_decimal, a_string,
        lambda r: r.randint(-(2**31), 2**31 - 1),
        lambda r: Int64(r.randint(-(2**63), 2**63 - 1)),
        lambda r: DatetimeMS(r.randint(-(2**62), 2**62)),
        lambda r: r.choice([True, False, None]),
        lambda r: ObjectId(),
        lambda r: r.choice([Binary(b"xy", 0), Regex("a.*", "i"), Timestamp(5, 1), MinKey(), MaxKey(),
                            Code("x"), uuid.UUID(int=r.getrandbits(128))]),
    ]  # fmt: skip
    if depth < 3 and roll < 0.15:
        return {f"k{i}": any_value(rng, depth + 1) for i in range(rng.randint(0, 3))}
    if depth < 3 and roll < 0.3:
        return [any_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice(scalars)(rng)


KINDS = {
    "double": a_double,
    "decimal": a_decimal,
    "string": a_string,
    "int32": lambda r: r.randint(-(2**31), 2**31 - 1),
    "int64": lambda r: Int64(r.choice([-(2**63), 2**63 - 1, r.randint(-(2**63), 2**63 - 1)])),
    "date": lambda r: DatetimeMS(r.randint(-(2**62), 2**62)),  # before 1970 and past year 9999
    "bool": lambda r: r.choice([True, False]),
    "null": lambda r: None,
    "objectid": lambda r: ObjectId(),
    "uuid": lambda r: uuid.UUID(int=r.getrandbits(128)),  # one length: encoded for every row at once
    # Every subtype (2, the old one, nests its length: libbson's) and lengths 0 to 40: one at a time.
    "binary": lambda r: Binary(
        r.randbytes(r.randint(0, 40)), r.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x80, 0xFF])
    ),
    "array": lambda r: [r.randint(0, 5) for _ in range(r.randint(0, 12))],  # lengths past one digit
    "document": lambda r: {"a": a_string(r), "b": a_decimal(r)} if r.random() < 0.8 else {"b": 1},
    "empty": lambda r: r.choice([{}, [], [{}], {"x": []}]),
    "mixed": lambda r: any_value(r),
}


@pytest.mark.parametrize("kind", KINDS)
def test_documents_of_one_shape_with_every_value_of_a_kind(kind):
    rng = random.Random(kind)
    make = KINDS[kind]
    assert_libbsons(encoded([{"_id": i, "v": make(rng), "w": "x"} for i in range(3000)]))


def test_documents_of_many_shapes():
    rng = random.Random(7)
    documents = [
        {"_id": ObjectId(), **{f"f{rng.randint(0, 6)}": any_value(rng) for _ in range(rng.randint(1, 6))}}
        for _ in range(5000)
    ]
    assert_libbsons(encoded(documents))


def test_the_sample_datasets_and_messy_documents():
    for path in sorted(SAMPLES.glob("*.jsonl")):
        documents = [bson.json_util.loads(line) for line in path.read_text().splitlines() if line.strip()]
        assert_libbsons(encoded(documents * 3))
    assert_libbsons(encoded(messy_documents() * 20))


def events(count: int) -> list[dict]:
    rng = random.Random(1)
    return [
        {
            "_id": ObjectId(),
            "type": rng.choice(["page_view", "track"]),
            "at": datetime.datetime(2026, 1, 1, tzinfo=UTC) + datetime.timedelta(seconds=i),
            "bytes": rng.randint(100, 5_000_000),
            "amount": Decimal128(f"{rng.randint(0, 99999)}.{rng.randint(0, 99):02d}"),
            "context": {"ip": f"10.0.{rng.randint(0, 255)}.{rng.randint(0, 255)}"},
            "tags": rng.sample(["a", "b", "c"], 2),
        }
        for i in range(count)
    ]


def test_a_chunk_of_one_shape_is_rendered_without_libbson(monkeypatch):
    raws = encoded(events(2000))
    assert rendered_by_libbson(raws, monkeypatch) == []


def test_uuids_and_binaries_are_rendered_without_libbson_but_the_old_subtype(monkeypatch):
    rng = random.Random(4)
    documents = [
        dict(d, user=uuid.UUID(int=rng.getrandbits(128)), hash=Binary(rng.randbytes(rng.randint(0, 9)), 0))
        for d in events(1000)
    ]
    documents[7]["hash"] = Binary(b"abc", 2)
    raws = encoded(documents)
    assert rendered_by_libbson(raws, monkeypatch) == [raws[7]]


def test_what_the_walk_leaves_goes_to_libbson_alone(monkeypatch):
    """A regular expression sends its document to bsonjs; a string with a control character that
    has no short escape (`\\u0001`) goes alone; quotes, backslashes and newlines the walk escapes."""
    documents = events(1000)
    documents[10]["pattern"] = Regex("^a", "i")
    documents[20]["type"] = 'say "hi"\x01'
    documents[30]["type"] = 'say "hi"\\\n\t\r\b\f'
    raws = encoded(documents)
    assert sorted(rendered_by_libbson(raws, monkeypatch)) == sorted([raws[10], alone('say "hi"\x01')])


def test_a_rare_decimal_goes_to_libbson_alone_not_its_chunk(monkeypatch):
    """A decimal the walk does not write itself (NaN, an exponent, a huge coefficient) is written
    by libbson value by value; its chunk is still walked. (The one-value document handed to
    libbson was a byte too long: libbson refused it and the whole chunk went to bsonjs.)"""
    documents = events(200)
    rare = [Decimal128("NaN"), Decimal128("1E+6144"), Decimal128("-0E-6176")]
    for i, value in enumerate(rare):
        documents[10 * i]["amount"] = value
    rendered = rendered_by_libbson(encoded(documents), monkeypatch)
    assert sorted(rendered) == sorted(alone(value) for value in rare)


def test_a_few_large_documents_are_walked_not_escaped_by_libbson(monkeypatch):
    """Fewer documents than `MIN_GROUP` are walked where they hold `MIN_GROUP_BYTES` or more: a
    2 MB string is written at once, where libbson escapes it a character at a time. A few small
    ones still go to bsonjs."""
    large = [
        {"_id": ObjectId(), "blob": "x" * (2 * 1024 * 1024), "bytes": Binary(b"\xff" * 1024)},
        {"_id": ObjectId(), "blob": "y\u00e9" * 40_000, "n": 1.5},
    ]
    raws = encoded(large)
    assert rendered_by_libbson(raws, monkeypatch) == []
    small = encoded(events(3))
    assert sorted(rendered_by_libbson(small, monkeypatch)) == sorted(small)
    # A few large documents of many small values: a step each, so the walk soon leaves them to
    # bsonjs (after a few hundred of their 400,000 elements).
    many = encoded([{"_id": i, "a": list(range(200_000))} for i in range(2)])
    value, steps = doc_text._Walk._value, []
    monkeypatch.setattr(doc_text._Walk, "_value", lambda *a, **k: steps.append(1) or value(*a, **k))
    assert sorted(rendered_by_libbson(many, monkeypatch)) == sorted(many)
    assert len(steps) < 1000


def alone(value) -> bytes:
    """`{"": value}`: how the walk hands bsonjs one value."""
    return bson.encode({"": value}, codec_options=OPTIONS)


def test_maps_escaped_keys_and_strings_go_to_libbson_value_by_value(monkeypatch):
    """Keys that differ from document to document (maps keyed by ids, at any depth, maps of
    documents, arrays of documents of many shapes) and keys libbson escapes: only those values are
    bsonjs's, the documents are walked (a newline in every address, too)."""
    rng = random.Random(9)
    documents = []
    for i, d in enumerate(events(600)):
        d["scores"] = {f"{rng.getrandbits(64):016x}": rng.random() for _ in range(rng.randint(0, 3))}
        d["context"]["tiers"] = {f"{rng.getrandbits(32):08x}": {"tier": "gold", "n": i} for _ in range(2)}
        d["items"] = [{f"k{rng.randint(0, 99)}": i} for _ in range(2)]
        d["address"] = f"{i} Main St\nSpringfield"
        d['say "what"'] = i
        d["context"]["tab\there"] = "x"
        documents.append(d)
    raws = encoded(documents)
    rendered = rendered_by_libbson(raws, monkeypatch)
    assert not set(rendered) & set(raws), "no whole document"
    alone = [bson.decode(r)[""] for r in rendered if bson.decode(r).keys() == {""}]
    keys = [bson.decode(r) for r in rendered if bson.decode(r).keys() != {""}]
    assert all(isinstance(v, dict) for v in alone), "maps and array elements: documents alone"
    assert {next(iter(k)) for k in keys} == {'say "what"', "tab\there"}  # each escaped key, once a group


def test_maps_are_walked_element_by_element_their_documents_and_arrays_by_libbson(monkeypatch):
    """A map (keys that differ from document to document) is rendered element by element for all
    its documents at once: its scalars of any type by the walk, a document or an array in it by
    libbson alone. Empty maps, maps of one to eight elements and a key twice are walked too; a map
    with a key libbson escapes, or longer than `MAP_ELEMENTS`, is libbson's whole, as before."""
    rng = random.Random(11)
    scalars = [
        lambda: rng.random(),
        lambda: rng.randint(-5, 5),
        lambda: Int64(rng.randint(0, 2**40)),
        lambda: f"s{rng.randint(0, 9)}",
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: Decimal128(f"{rng.randint(0, 999)}.{rng.randint(0, 99)}"),
        lambda: datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        lambda: ObjectId(),
        lambda: Binary(bytes(rng.getrandbits(8) for _ in range(16)), 4),
    ]
    documents = []
    for i in range(150):  # each type first in fewer than `MIN_GROUP` maps: the group stays whole
        scores = {f"{rng.getrandbits(64):016x}": rng.choice(scalars)() for _ in range(rng.randint(0, 8))}
        tiers = {f"{rng.getrandbits(32):08x}": {"tier": "gold", "n": i} for _ in range(rng.randint(1, 2))}
        tiers["list"] = [i, "x"]
        documents.append({"_id": i, "scores": scores, "tiers": tiers})
    raws = encoded(documents)
    rendered = rendered_by_libbson(raws, monkeypatch)
    values = [bson.decode(r)[""] for r in rendered]  # values alone: no whole document
    assert {type(v) for v in values} == {dict, list}
    assert all(set(v) == {"tier", "n"} for v in values if isinstance(v, dict)), "no map, only its documents"
    assert len(values) == sum(len(d["tiers"]) for d in documents)
    twice = [  # a key twice in each map: `{ "k" : 1, "k" : 2 }`, as libbson writes it
        raw_document(
            bson.encode({"_id": i})[4:-1]
            + b"\x03m\x00"
            + raw_document(b"".join(b"\x10%08x\x00" % i + struct.pack("<i", n) for n in (1, 2)))
        )
        for i in range(100)
    ]
    assert_libbsons(twice)
    long = encoded(
        [{"_id": i, "m": {f"k{i}-{j}": j for j in range(doc_text.MAP_ELEMENTS + 1)}} for i in range(100)]
    )
    whole = [bson.decode(r) for r in rendered_by_libbson(long, monkeypatch)]
    assert sum(len(d.get("", ())) == doc_text.MAP_ELEMENTS + 1 for d in whole) == 100, "libbson's whole"


def test_a_short_last_key_at_the_end_of_a_chunk_keeps_the_chunk_walked():
    """The key each document holds at a step is compared with the first document's in windows of
    that key's length. The chunk's last document, ending in a shorter key, ran such a window past
    the chunk's end, and the whole chunk went to libbson and the exact path. It takes only its own
    way now."""
    documents = [{"_id": i, "n": i, "a_rather_long_key_name": 1} for i in range(200)]
    documents.append({"_id": 200, "n": 1, "b": 1})
    raws = encoded(documents)
    rendered = doc_text.render(raws)
    assert rendered.found is not None and len(rendered.unwalked) <= 1
    assert_libbsons(raws)


def test_values_of_literal_text_only_then_a_split():
    """An array of empty documents held whole, and empty binaries, are the same text in every
    document; the group splitting after them (a string here, an int there) still renders each."""
    documents = [
        {"_id": i, "v": [{}], "b": Binary(b"", 0), "w": i if i % 3 else f"s{i}", "x": {"y": [{}, None]}}
        for i in range(300)
    ]
    assert_libbsons(encoded(documents))


def raw_document(elements: bytes) -> bytes:
    return struct.pack("<i", len(elements) + 5) + elements + b"\x00"


def test_bytes_bson_allows_but_python_cannot_write_render_as_libbson_renders_them():
    """Arrays keyed other than 0, 1, ... and strings that are not UTF-8, in documents among plain ones."""
    plain = encoded([{"_id": i, "a": [1, 2]} for i in range(100)])
    odd_array = raw_document(b"\x10_id\x00" + struct.pack("<i", 7) + b"\x04a\x00" + raw_document(
        b"\x105\x00" + struct.pack("<i", 1) + b"\x10x\x00" + struct.pack("<i", 2)))  # fmt: skip
    raws = plain[:50] + [odd_array] + plain[50:]
    assert_libbsons(raws)
    not_utf8 = raw_document(
        b"\x10_id\x00" + struct.pack("<i", 8) + b"\x02s\x00" + struct.pack("<i", 3) + b"\xff\xfe\x00"
    )
    try:
        expected = libbson([not_utf8])
    except Exception as error:  # libbson refuses it: so must the chunk, the same way
        with pytest.raises(type(error)):
            canonical_json(plain + [not_utf8])
    else:
        assert canonical_json(plain + [not_utf8]).to_pylist()[-1] == expected[0]


def test_text_follows_the_documents_order_across_groups():
    rng = random.Random(3)
    documents = [{"_id": i, "v": rng.choice([1, "one", 1.5, None, [1], {"a": 1}])} for i in range(4000)]
    texts = canonical_json(encoded(documents)).to_pylist()
    assert [bson.json_util.loads(t)["_id"] for t in texts] == list(range(4000))
    assert_libbsons(encoded(documents))


def test_a_chunk_of_many_wide_shapes_spends_its_budget_then_goes_to_libbson(monkeypatch):
    """40 shapes of 300 fields, 50 documents each: walking every group would cost more than libbson
    one document at a time; the walk stops when its budget is spent and libbson renders the rest."""
    documents = [{"_id": i, f"shape{i % 40}": 1, **{f"field{j}": j for j in range(300)}} for i in range(2000)]
    raws = encoded(documents)
    assert 0 < len(rendered_by_libbson(raws, monkeypatch)) < len(raws)


def test_byte_ranges_are_gathered_in_order_or_not_and_flags_found_per_row():
    """`_gather` copies each range out (in the chunk's order by spans, else by an index per byte),
    and `_any_per_row` tells each row's span apart, empty spans included."""
    import numpy as np

    from aries_assets.core.doc_text import _any_per_row, _gather

    rng = np.random.default_rng(1)
    for trial in range(500):
        buf = rng.integers(0, 256, int(rng.integers(1, 400))).astype(np.uint8)
        count = int(rng.integers(0, 12))
        cuts = np.sort(rng.integers(0, len(buf) + 1, 2 * count))
        starts, ends = cuts[0::2].astype(np.int64), cuts[1::2].astype(np.int64)
        if trial % 5 == 0:
            starts, ends = starts[::-1].copy(), ends[::-1].copy()
        gathered = _gather(buf, starts, ends - starts).to_pylist()
        assert gathered == [buf[a:b].tobytes() for a, b in zip(starts, ends, strict=True)], trial
        flags = rng.random(len(buf)) < 0.05
        offsets = np.concatenate([[0], np.sort(rng.integers(0, len(buf) + 1, count))]).astype(np.int32)
        expected = [bool(flags[a:b].any()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        assert _any_per_row(flags, offsets).tolist() == expected, trial


def ragged(count: int, seed: int = 8) -> list[dict]:
    """Events with arrays of scalars that end at different lengths, as tags and scores do: strings,
    ints, doubles with NaN, nulls, dates, ObjectIds, decimals; an array whose first element's type
    varies; a field after them; a long tail."""
    rng = random.Random(seed)
    documents = events(count)
    for i, d in enumerate(documents):
        d["tags"] = [f"t{j}\n" if j == 2 else f"t{j}" for j in range(rng.randint(1, 6))]
        d["scores"] = [rng.choice([rng.randint(0, 9), None]) for _ in range(i % 5 + 1)]
        d["when"] = [datetime.datetime(2026, 1, 1, tzinfo=UTC)] * rng.randint(1, 3)
        d["ratios"] = [rng.choice([0.5, float("nan"), -0.0, 1e300]) for _ in range(rng.randint(1, 4))]
        d["ids"] = [ObjectId() for _ in range(rng.randint(1, 3))]
        d["prices"] = [Decimal128(f"{j}.25") for j in range(rng.randint(1, 3))]
        d["mixed"] = [rng.choice([1, "one", None]), "b", "c"]  # types part ways, then not
        d["after"] = i
    for d in documents[:5]:
        d["tags"] = d["tags"] + [f"long{j}" for j in range(50)]  # a few run on: bsonjs takes those
    return documents


def test_arrays_of_several_lengths_do_not_split_their_group(monkeypatch):
    """Where documents' arrays of scalars end at different lengths, the walk goes on with the
    documents that have the next element while the others wait at their array's end: one group,
    not one per length (each of which walked every field after the array again). Documents whose
    arrays run on after fewer than `MIN_GROUP` others go to bsonjs. Every text is libbson's."""
    documents = ragged(1500)
    raws = encoded(documents)
    assert sorted(rendered_by_libbson(raws, monkeypatch)) == sorted(raws[:5])
    rendered = doc_text.render(raws)
    assert [len(rows) for rows, _ in rendered.found] == [1495]


def line_items(count: int, seed: int = 9) -> list[dict]:
    """Orders of 1 to 5 line items (an array of documents), some items with a nested array of
    its own length, some with a field the others lack; a field after the items."""
    rng = random.Random(seed)
    return [
        {
            "_id": ObjectId(),
            "customer": f"c{rng.randint(0, 99)}",
            "items": [
                {
                    "sku": f"s{rng.randint(0, 9)}",
                    "qty": rng.randint(1, 5),
                    "codes": list(range(rng.randint(1, 3))),
                }
                for _ in range(rng.randint(1, 5))
            ],
            "total": Decimal128(f"{rng.randint(0, 999)}.50"),
            "note": "n" * 400,  # bytes enough that walking beats bsonjs by the budget's measure
        }
        for _ in range(count)
    ]


def test_arrays_of_documents_of_several_lengths_do_not_split_their_group(monkeypatch):
    """An array of documents that ends at different lengths (line items) is walked a document
    at a time for the documents that have one, as arrays of scalars are: one group. Where the
    documents part ways inside one (a field some lack), each part is walked in turn, and the
    group still goes on whole; a part too small to walk goes to bsonjs, its documents with it."""
    raws = encoded(line_items(1500))
    assert rendered_by_libbson(raws, monkeypatch) == []
    assert [len(rows) for rows, _ in doc_text.render(raws).found] == [1500]
    documents = line_items(1500)
    for d in documents[::3]:
        d["items"][-1]["gift"] = True
    for d in documents[1:100:10]:
        d["items"][0]["rare"] = 1  # 10 documents: too few to walk
    for d in documents[::4]:
        d["items"] = [*d["items"], {}]  # an empty document: walked too
    raws = encoded(documents)
    assert sorted(rendered_by_libbson(raws, monkeypatch)) == sorted(raws[1:100:10])
    assert [len(rows) for rows, _ in doc_text.render(raws).found] == [1490]


def test_byte_tests_a_block_at_a_time_flag_the_rows_a_whole_test_flags(monkeypatch):
    """`rows_with` and `positions_of` work a block at a time; with blocks of a few bytes, rows that
    span blocks, begin or end at a block's edge, or are empty are flagged as a test of all the
    bytes at once flags them."""
    rng = random.Random(7)
    for block in (1, 3, 7, 64):
        monkeypatch.setattr(doc_text, "BLOCK_BYTES", block)
        for _ in range(50):
            lengths = [rng.choice([0, 0, 1, 2, 5, 13, 40]) for _ in range(rng.randint(1, 30))]
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            data = np.frombuffer(bytes(rng.choice(b'ab"\n\x01') for _ in range(int(offsets[-1]))), np.uint8)
            expected = [
                bool((data[a:b] < 0x20).any()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)
            ]
            assert doc_text.rows_with(data, offsets, lambda d: d < 0x20).tolist() == expected
            assert doc_text.positions_of(data, ord('"')).tolist() == np.flatnonzero(data == ord('"')).tolist()


def test_the_walk_tells_which_documents_bson_holds_a_dollar(monkeypatch):
    """`wrapper_rows` searches only these: a `$` in a key, a string, or any value's bytes (0x24)."""
    monkeypatch.setattr(doc_text, "BLOCK_BYTES", 64)  # a `$` at a block's edge as well as inside
    rng = random.Random(5)
    documents = []
    for i in range(400):
        doc = {"_id": i, "n": rng.getrandbits(64) >> 1, "s": "abc" * rng.randint(0, 30)}
        if i % 7 == 0:
            doc["$oid"] = 1  # a key like a wrapper's
        if i % 11 == 0:
            doc["s"] = "cost: $" + doc["s"]
        if i % 13 == 0:
            doc["b"] = Binary(bytes([rng.choice([0x24, 0x41]) for _ in range(8)]))
        documents.append(doc)
    raws = [bson.encode(d) for d in documents]
    rendered = doc_text.render(raws)
    assert rendered.dollars.tolist() == [b"$" in raw for raw in raws]
    assert 0 < sum(rendered.dollars) < len(raws)
