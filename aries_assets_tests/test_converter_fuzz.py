"""The two converters against each other on random documents: the columnar path (with the exact
one for the documents it sets aside) must give what the exact path alone gives, every time.

Seeded, so a failure reproduces; each case is small, so a failure is easy to read.
`ARIES_FUZZ_SEEDS=500 pytest aries_assets_tests/test_converter_fuzz.py` searches longer. Fuzzing
like this found the differences `test_converter_equivalence` now pins one by one.
"""

from __future__ import annotations

import datetime
import os
import random

import bson
import bsonjs
import pytest
from bson import Binary, Code, Decimal128, Int64, ObjectId, Regex, Timestamp
from bson.datetime_ms import DatetimeMS
from bson.max_key import MaxKey
from bson.min_key import MinKey

from aries_assets.core import doc_text
from aries_assets.core import schema as s
from aries_assets.core.arrow import CODEC_OPTIONS
from aries_assets_tests.test_converter_equivalence import assert_equivalent

UTC = datetime.UTC
SEEDS = int(os.environ.get("ARIES_FUZZ_SEEDS", "8"))  # 40 collections each; set it higher to search longer
KEYS = ["a", "b", "name", "type", "tags", "at", "with space", "dotted.name", 'double"quote', "", "名前",
        "Name", "1", "2024-01-01", "5f1d7a9e3c2b4a6d8e0f1a2b", " : k", "a/b\\c"]  # fmt: skip
TEXTS = ["", "x", '" : ', " : a", "{  }", "[ null", ', { "x', '\\" : ', "\\", '"', "null", "\x00", "🎉"]


def scalar(rng: random.Random):
    return rng.choice(
        [
            lambda: rng.randint(-(2**31), 2**31 - 1),
            lambda: Int64(rng.randint(-(2**63), 2**63 - 1)),
            lambda: rng.choice([0.0, -0.0, 1.5, 5e-324, 1e300, float("nan"), float("inf")]),
            lambda: Decimal128(
                rng.choice(["0", "-0", "1.50", "1E+3", "1E-6176", "NaN", "Infinity", "-7.25"])
            ),
            lambda: rng.choice(TEXTS),
            lambda: rng.choice([True, False]),
            lambda: ObjectId(),
            lambda: (
                datetime.datetime(2020, 1, 1, tzinfo=UTC)
                + datetime.timedelta(milliseconds=rng.randint(-9, 9**9))
            ),
            lambda: DatetimeMS(253402300800000 + rng.randint(0, 9)),
            lambda: None,
            lambda: rng.choice(
                [
                    Binary(b"\0\xff", 0),
                    Binary(bytes(16), 4),
                    Regex("^a", "i"),
                    Code("f()"),
                    Timestamp(1, 2),
                    MinKey(),
                    MaxKey(),
                ]
            ),
        ]  # fmt: skip
    )()


def value(rng: random.Random, depth: int):
    roll = rng.random()
    if depth > 3 or roll < 0.6:
        return scalar(rng)
    if roll < 0.75:
        return [
            value(rng, depth + 1) if rng.random() < 0.3 else scalar(rng) for _ in range(rng.randint(0, 3))
        ]
    if roll < 0.8:
        return {f"{rng.getrandbits(64):016x}": scalar(rng) for _ in range(rng.randint(1, 3))}  # a map
    return record(rng, depth + 1)


def record(rng: random.Random, depth: int) -> dict:
    return {rng.choice(KEYS): value(rng, depth) for _ in range(rng.randint(0, 4))}


def collection(rng: random.Random) -> list[dict]:
    """Documents sharing a few fields (so fields meet in several shapes), each with its odd values."""
    shared = {rng.choice(KEYS): value(rng, 1) for _ in range(3)}
    documents = []
    for i in range(rng.randint(1, 40)):
        document = {"_id": i}
        for key, template in shared.items():
            if rng.random() < 0.8:
                document[key] = template if rng.random() < 0.6 else value(rng, 1)
        document.update(record(rng, 1) if rng.random() < 0.3 else {})
        documents.append(document)
    return documents


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_documents_convert_alike_on_both_paths(seed):
    rng = random.Random(seed)
    options = [s.SchemaOptions(), s.SchemaOptions(outlier_share=0.3), s.SchemaOptions(max_depth=2)]
    for _ in range(40):
        documents = collection(rng)
        assert_equivalent(documents, options=rng.choice(options), batch=rng.choice([1, 3, 7, 40]))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_documents_walked_one_by_one_convert_alike(seed, monkeypatch):
    """The same collections with every document walked, in groups of one and with no budget:
    random documents rarely share a shape, so this is what makes the columnar path read their
    values from the walk (`found_part`) rather than parse their text."""
    monkeypatch.setattr(doc_text, "MIN_GROUP", 1)
    monkeypatch.setattr(doc_text, "BUDGET_SHARE", 1e6)
    monkeypatch.setattr(doc_text, "FOUND_UNWALKED_SHARE", 1.0)
    test_random_documents_convert_alike_on_both_paths(seed)


def array_element(rng: random.Random, depth: int):
    """An element of an array: a scalar, a null, a line item (with fields some lack, maybe an
    array of its own), an array, or `{}`."""
    roll = rng.random()
    if roll < 0.5:
        return scalar(rng) if roll < 0.2 else rng.choice([rng.randint(0, 5), None, "s", 1.5])
    if depth < 2 and roll < 0.85:
        item = {"sku": rng.choice(["a", "b"]), "qty": rng.randint(0, 3)}
        if rng.random() < 0.3:
            item["gift"] = True
        if rng.random() < 0.3:
            item["codes"] = [array_element(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return item
    if depth < 2 and roll < 0.9:
        return [rng.randint(0, 3) for _ in range(rng.randint(0, 2))]
    return {}


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_arrays_of_several_lengths_convert_alike(seed, monkeypatch):
    """Groups large enough to walk, whose arrays end at different lengths and hold elements of
    several kinds (`doc_text._Walk._ragged`): scalars, line items that part ways inside, both
    mixed; the text libbson's and the file the exact path's. With no budget (small documents
    are libbson's by it), and half with `MIN_GROUP` at 3, so that small parts are walked too."""
    monkeypatch.setattr(doc_text, "BUDGET_SHARE", 1e6)
    if seed % 2:
        monkeypatch.setattr(doc_text, "MIN_GROUP", 3)
    rng = random.Random(seed)
    for _ in range(6):
        style = rng.choice(["scalars", "items", "mixed"])
        # Arrays of one length (of several types at an element), of several, or some empty.
        lengths = rng.choice([(3, 3), (1, 6), (0, 6)])
        odd = rng.choice([0.05, 0.3])  # how often an element is not the common one
        upto = rng.choice([1, 6])  # at the first element only, or at any
        documents = []
        for i in range(rng.choice([60, 300])):
            length = rng.randint(*lengths)
            if style == "scalars":
                values = [
                    rng.choice([1, None, "a"]) if rng.random() < odd and j < upto else 7
                    for j in range(length)
                ]
            elif style == "items":
                values = [
                    {"sku": "s", "qty": j, **({"gift": True} if rng.random() < odd and j < upto else {})}
                    for j in range(length)
                ]
            else:
                values = [array_element(rng, 0) for _ in range(length)]
            documents.append({"_id": ObjectId(), "values": values, "n": i, "last": [array_element(rng, 1)]})
        texts = doc_text.canonical_json([bson_of(d) for d in documents]).to_pylist()
        assert texts == [bsonjs.dumps(bson_of(d), bsonjs.CANONICAL) for d in documents]
        assert_equivalent(documents, batch=rng.choice([len(documents), 100]))


def bson_of(document: dict) -> bytes:
    return bson.encode(document, codec_options=CODEC_OPTIONS)
