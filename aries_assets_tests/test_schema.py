"""Schema inference rules, from hand-made counts: widening, outliers, overrides, shapes, names."""

from __future__ import annotations

import uuid
from collections import Counter

import bson
import pyarrow as pa
from bson import Binary, Decimal128, Int64, ObjectId, json_util

from aries_assets.core import schema as s
from aries_assets.core.arrow import BucketConverter, id_string

OPTIONS = s.SchemaOptions()


def written(
    converter: BucketConverter, batches: list, schema: s.InferredSchema, outliers: Counter
) -> pa.Table:
    """The converted chunks as one table in `schema`, as a bucket write makes them."""
    return pa.concat_tables([converter.table(batch, schema, outliers) for batch in batches])


def counts(**kinds) -> s.FieldStats:
    stats = s.FieldStats(kinds=Counter(kinds))
    return stats


def resolve(stats: s.FieldStats, share: float = 0.01) -> str:
    return s.resolve_type(stats, share)[0]


def test_all_ones_stays_int_unless_overridden_or_mixed_with_booleans():
    ones = counts(int32=1000)
    ones.int_min = ones.int_max = 1
    assert resolve(ones) == "int32"  # BSON says int; the count alone cannot make it a flag
    flags = counts(int32=400, bool=600)
    flags.int_min, flags.int_max = 0, 1
    assert resolve(flags) == "bool"  # booleans written by one app version, 0/1 by another
    wide = counts(int32=400, bool=600)
    wide.int_min, wide.int_max = 0, 7
    assert resolve(wide) == "string"
    # The override settles it: 0/1 become false/true, anything else is an outlier.
    stats = s.TypeStats(documents=3, fields={("flag",): ones})
    schema = s.resolve_schema(stats, None, s.SchemaOptions(overrides={"flag": "bool"}))
    assert schema.columns[0].type == "bool"


def test_integer_ladder():
    assert resolve(counts(int32=5)) == "int32"
    assert resolve(counts(int32=5, int64=1)) == "int64"
    small = counts(int32=5, double=5)
    small.int_max = 2**40
    assert resolve(small) == "double"
    huge = counts(int64=5, double=5)
    huge.int_max, huge.int_digits, huge.scale = 2**60, 1, 3
    assert resolve(huge) == "decimal(38,3)"  # a double would round 2**60 + 1


def test_decimal128_is_never_a_double():
    money = counts(decimal=100)
    money.int_digits, money.scale = 7, 2
    assert resolve(money) == "decimal(38,2)"
    mixed = counts(decimal=50, double=50)
    mixed.int_digits, mixed.scale = 3, 4
    assert resolve(mixed) == "decimal(38,4)"
    too_precise = counts(decimal=1)
    too_precise.int_digits, too_precise.scale = 20, 30
    assert resolve(too_precise) == "string"


def test_int_to_string_drift_and_rare_outliers():
    assert resolve(counts(int64=995, string=5)) == "int64"  # 0.5% strings: outliers, kept in `_doc`
    assert resolve(counts(int64=900, string=100)) == "string"  # 10%: the column becomes text
    assert resolve(counts(int64=995, string=5), share=0.0) == "string"


def test_dates_ids_and_containers():
    assert resolve(counts(date=10)) == "timestamp"
    assert resolve(counts(date=10, timestamp=1)) == "timestamp"
    assert resolve(counts(objectId=10, string=3)) == "string"
    assert resolve(counts(document=3)) == "json"
    ints = counts(array=4)
    ints.element_kinds = Counter(int32=10)
    assert resolve(ints) == "list<int32>"
    docs = counts(array=4)
    docs.element_kinds = Counter(document=10)
    assert resolve(docs) == "json"


def test_maps_are_one_json_column():
    documents = [
        {"_id": 1, "tier_and_details": {"0df078f33aa74a2e9696e0520c1a828a": {"tier": "Bronze"}}, "name": "a"},
        {"_id": 2, "tier_and_details": {"699456451cc24f028d2aa99d7534c219": {"tier": "Gold"}}, "name": "b"},
        {"_id": 3, "address": {"city": "Oslo", "zip": "0150"}},
    ]
    converter = BucketConverter()
    batches = list(converter.chunks([bson.encode(d) for d in documents]))
    schema = s.resolve_schema(converter.stats, None, OPTIONS)
    names = {c.name: c.type for c in schema.columns}
    assert names == {
        "tier_and_details": "json",
        "name": "string",
        "address__city": "string",
        "address__zip": "string",
    }
    table = written(converter, batches, schema, Counter())
    assert (
        table.column("tier_and_details").to_pylist()[1]
        == '{ "699456451cc24f028d2aa99d7534c219" : { "tier" : "Gold" } }'
    )


def test_names_are_safe_deterministic_and_never_collide():
    paths = [
        ("Name",),
        ("name",),
        ("customer", "address", "city"),
        ("select",),
        ("2fa",),
        ("名前",),
        ("a" * 200,),
    ]
    stats = s.TypeStats(documents=1, fields={p: counts(string=1) for p in paths})
    first = s.resolve_schema(stats, None, OPTIONS)
    again = s.resolve_schema(stats, None, OPTIONS)
    assert [c.name for c in first.columns] == [c.name for c in again.columns]
    names = {c.path: c.name for c in first.columns}
    assert names[("customer", "address", "city")] == "customer__address__city"
    assert names[("select",)] == "select_"
    assert names[("2fa",)] == "c_2fa"
    assert names[("Name",)] == "name" and names[("name",)].startswith("name_")
    assert all(len(n.encode()) <= 63 and n.isascii() and n == n.lower() for n in names.values())
    assert len(set(names.values())) == len(names)
    # A new field that would take an existing name gets another; existing names never move.
    stats.fields[("NAME",)] = counts(string=1)
    later = s.resolve_schema(stats, first, OPTIONS)
    assert {c.path: c.name for c in later.columns if c.path in names} == names


def test_evolution_rebuild_widens_and_append_adds_a_column():
    v1 = s.resolve_schema(s.TypeStats(1, {("n",): counts(int64=10)}), None, OPTIONS)
    drifted = s.TypeStats(2, {("n",): counts(int64=10, string=10)})
    rebuilt = s.resolve_schema(drifted, v1, OPTIONS)
    assert [(c.name, c.type) for c in rebuilt.columns] == [("n", "string")]
    assert rebuilt.version == v1.version + 1 and rebuilt.actions == ["changed n: int64 -> string"]
    assert s.changed_types(v1, rebuilt) == {("n",)}
    appended = s.resolve_schema(drifted, v1, s.SchemaOptions(evolution="append"))
    assert [(c.name, c.type) for c in appended.columns] == [("n", "int64"), ("n__string", "string")]
    assert appended.actions == ["added n__string (string)"]


def test_append_gives_decimals_the_old_column_cannot_hold_a_new_column():
    """decimal(38,1) never changes under `append`; values with more scale (or more integer digits) go
    to a new column, not null with only `_doc` holding them."""
    documents = [{"_id": i, "p": Decimal128(f"{i}.5")} for i in range(50)]
    converter = BucketConverter()
    batches = list(converter.chunks([bson.encode(d) for d in documents]))
    append = s.SchemaOptions(evolution="append")
    v1 = s.resolve_schema(converter.stats, None, append)
    assert [(c.name, c.type) for c in v1.columns] == [("p", "decimal(38,1)")]

    documents += [{"_id": 50, "p": Decimal128("7.12345")}, {"_id": 51, "p": Decimal128("8.5")}]
    converter = BucketConverter(append)
    batches = list(converter.chunks([bson.encode(d) for d in documents]))
    v2 = s.resolve_schema(converter.stats, v1, append)
    assert [(c.name, c.type) for c in v2.columns] == [
        ("p", "decimal(38,1)"),
        ("p__decimal_38_5", "decimal(38,5)"),
    ]
    outliers = Counter()
    table = written(converter, batches, v2, outliers)
    assert not outliers, outliers
    assert [str(v) for v in table.column("p").to_pylist()[-2:]] == ["None", "8.5"]
    assert [str(v) for v in table.column("p__decimal_38_5").to_pylist()[-2:]] == ["7.12345", "None"]
    # The same widening under `rebuild` changes the column itself.
    rebuilt = s.resolve_schema(converter.stats, v1, OPTIONS)
    assert [(c.name, c.type) for c in rebuilt.columns] == [("p", "decimal(38,5)")]


def test_exclude_and_column_cap():
    stats = s.TypeStats(
        3, {("password",): counts(string=3), ("a",): counts(int32=3), ("b",): counts(int32=1)}
    )
    schema = s.resolve_schema(stats, None, s.SchemaOptions(exclude=("password",), max_columns=1))
    assert [c.name for c in schema.columns] == ["a"]


def test_outliers_are_null_in_the_column_and_intact_in_doc():
    documents = [{"_id": i, "n": i} for i in range(200)] + [{"_id": 200, "n": "two hundred"}]
    raws = [bson.encode(d) for d in documents]
    converter = BucketConverter()
    batches = list(converter.chunks(raws))
    schema = s.resolve_schema(converter.stats, None, OPTIONS)
    assert schema.columns[0].type == "int32"
    outliers = Counter()
    table = written(converter, batches, schema, outliers)
    assert outliers == {"n": 1}
    assert table.column("n").to_pylist()[-1] is None
    assert json_util.loads(table.column("_doc").to_pylist()[-1])["n"] == "two hundred"


def test_exclude_removes_the_field_from_doc_too():
    converter = BucketConverter(s.SchemaOptions(exclude=("password", "profile.ssn")))
    batches = list(
        converter.chunks(
            [bson.encode({"_id": 1, "password": "x", "profile": {"ssn": "123", "city": "Rome"}})]
        )
    )
    schema = s.resolve_schema(converter.stats, None, converter.options)
    table = written(converter, batches, schema, Counter())
    assert "password" not in table.column_names and "x" not in table.column("_doc").to_pylist()[0]
    assert json_util.loads(table.column("_doc").to_pylist()[0]) == {"_id": 1, "profile": {"city": "Rome"}}


def test_typed_values():
    documents = [{"_id": ObjectId(), "d": Decimal128("12.50"), "big": Int64(2**62), "m": [1, 2]}]
    converter = BucketConverter()
    batches = list(converter.chunks([bson.encode(d) for d in documents]))
    schema = s.resolve_schema(converter.stats, None, OPTIONS)
    table = written(converter, batches, schema, Counter())
    assert table.schema.field("d").type == pa.decimal128(38, 2)
    assert str(table.column("d")[0]) == "12.50"
    assert table.column("big").to_pylist() == [2**62]
    assert table.column("m").to_pylist() == [[1, 2]]


def test_uuids_are_text_in_their_usual_form():
    ids = [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.UUID("12345678-9abc-4def-8012-3456789abcde")]
    documents = [{"_id": i, "u": Binary(u.bytes, 4)} for i, u in enumerate(ids)]
    documents.append({"_id": 9, "u": "not-a-uuid"})  # a string: the column is text, the UUIDs as above
    converter = BucketConverter(fast=False)
    batches = list(converter.chunks([bson.encode(d) for d in documents]))
    schema = s.resolve_schema(converter.stats, None, OPTIONS)
    table = written(converter, batches, schema, Counter())
    assert table.column("u").to_pylist() == [*map(str, ids), "not-a-uuid"]


def test_id_strings():
    oid = ObjectId()
    assert id_string(oid) == str(oid)
    assert id_string("abc") == "abc"
    assert id_string(Int64(5)) == "5"
    assert id_string(2.5) == '{"$numberDouble": "2.5"}'


def test_a_list_override_counts_arrays_its_elements_do_not_fit_as_outliers():
    documents = [{"_id": 0, "tags": [1, 2]}, {"_id": 1, "tags": ["a", "b"]}, {"_id": 2, "tags": [3, None]}]
    documents += [{"_id": 3, "tags": [2**40]}, {"_id": 4, "tags": [1.5]}, {"_id": 5, "tags": []}]
    options = s.SchemaOptions(overrides={"tags": "list<int32>"})
    for fast in (True, False):
        converter = BucketConverter(options, fast=fast)
        batches = list(converter.chunks([bson.encode(d) for d in documents]))
        schema = s.resolve_schema(converter.stats, None, options)
        outliers = Counter()
        table = written(converter, batches, schema, outliers)
        assert outliers == {"tags": 3}, fast
        assert table.column("tags").to_pylist() == [[1, 2], None, [3, None], None, None, []]
        assert json_util.loads(table.column("_doc").to_pylist()[1])["tags"] == ["a", "b"]


def test_statistics_counted_in_another_order_settle_the_same_schema():
    """Two converters may count a bucket's kinds in different orders (the columnar path takes
    some documents, the exact path the rest): equal counts must rank, settle and store alike."""

    def field(order: list[tuple[str, int]]) -> s.FieldStats:
        stats = s.FieldStats(kinds=Counter(dict(order)))
        stats.int_min, stats.int_max, stats.int_digits, stats.scale = 0, 9, 1, 2
        return stats

    one = field([("int32", 98), ("string", 1), ("double", 1)])
    other = field([("int32", 98), ("double", 1), ("string", 1)])
    # A tie between the rare kinds decides which is kept with int32 (share 1%: one of them may go).
    assert s.resolve_type(one, 0.01) == s.resolve_type(other, 0.01)
    assert one.to_json() == other.to_json()
    settled = [
        s.resolve_schema(s.TypeStats(documents=100, fields={("n",): stats}), None, OPTIONS).columns
        for stats in (one, other)
    ]
    assert settled[0] == settled[1]
    assert [kind for kind, _ in settled[0][0].shares] == ["int32", "double", "string"]
