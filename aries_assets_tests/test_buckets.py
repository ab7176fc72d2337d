"""Bucket planning: boundaries never move, the newest bucket fills, old buckets split when they swell."""

from __future__ import annotations

import random
import threading
import time

import bson
from bson import ObjectId
from bson.max_key import MaxKey
from bson.min_key import MinKey

from aries_assets.core.buckets import BucketCutter, BucketMap, bucket_key
from aries_assets.core.extract import SourceCollection, raw_id


def _cut_ids(values, bucket_map: BucketMap, size: int) -> list:
    """Documents with these `_id`s, in order, through a cutter over the whole map: the buckets it hands back."""
    cutter = BucketCutter(bucket_map, 0, len(bucket_map.lowers) - 1, size, 10**9)
    done = []
    for value in values:
        done += cutter.add(value, bson.encode({"_id": value}))
    return done + cutter.finish()


def _counts(done) -> dict[str, int]:
    return {d.bucket.key: len(d.documents) for d in done}


def test_a_first_load_cuts_every_bucket_size():
    bucket_map = BucketMap(4, [MinKey()])
    done = _cut_ids(range(10), bucket_map, 4)
    assert bucket_map.lowers[1:] == [4, 8]
    assert _counts(done) == {"first": 4, "int-4": 4, "int-8": 2}
    assert [d.bucket.key for d in done if d.new] == ["int-4", "int-8"]


def test_existing_boundaries_stay_and_the_newest_bucket_fills():
    bucket_map = BucketMap(4, [MinKey(), 4, 8])
    # Documents 0-3 deleted, 10-13 inserted: bucket "first" empties, the last one fills and a new one opens.
    done = _cut_ids(range(4, 14), bucket_map, 4)
    assert bucket_map.lowers[1:] == [4, 8, 12]
    assert _counts(done) == {"first": 0, "int-4": 4, "int-8": 4, "int-12": 2}
    assert [d.bucket.key for d in done if d.new] == ["int-12"]


def test_a_swollen_middle_bucket_is_cut_into_pieces_below_twice_the_bucket_size():
    bucket_map = BucketMap(4, [MinKey(), "m", "zz"])
    names = ["a", "b"] + [f"m{i:02d}" for i in range(13)] + ["zz1"]
    done = _cut_ids(sorted(names), bucket_map, 4)
    # "m" holds m00..m12: a piece of 4 is cut off each time it reaches 2 x 4, the rest stays whole.
    assert bucket_map.lowers == [MinKey(), "m", "m04", "m08", "zz"]
    counts = _counts(done)
    assert counts["first"] == 2
    assert [counts[bucket_key(k)] for k in ("m", "m04", "m08", "zz")] == [4, 4, 5, 1]
    assert [d.bucket.key for d in done if d.new] == [bucket_key("m04"), bucket_key("m08")]


def _cut(bucket_map: BucketMap, raws: list[bytes], batch_sizes: list[int] | None, max_bytes: int):
    """The buckets a cutter hands back for `raws`, one by one or in batches of these sizes."""
    cutter = BucketCutter(bucket_map, 0, len(bucket_map.lowers) - 1, 5, max_bytes)
    done = []
    if batch_sizes is None:
        for raw in raws:
            done += cutter.add(raw_id(raw), raw)
    else:
        start = 0
        for size in batch_sizes:
            done += cutter.add_many(raws[start : start + size], raw_id)
            start += size
        assert start >= len(raws)
    done += cutter.finish()
    return [(d.bucket, d.documents, d.nbytes, d.digest, d.new) for d in done], list(bucket_map.lowers)


def test_buckets_cut_from_batches_are_those_cut_one_document_at_a_time():
    """A read hands the cutter whole server batches. Wherever the batches break, and whether a bucket
    closes by count or by size, the buckets, their documents and digests, and the map are the same as
    placing the documents one at a time."""
    rng = random.Random(7)
    mixed = [bson.encode({"_id": i, "pad": "x" * rng.choice([0, 10, 200, 900])}) for i in range(230)]
    even = [bson.encode({"_id": i, "pad": "x" * 100}) for i in range(230)]
    size = len(even[0])
    # Buckets closed by count; by size; with one document over the size alone. Then a size one byte
    # short of 3 documents, and exactly 3.
    cases = [(mixed, max_bytes) for max_bytes in (10**9, 1_500, 300)]
    cases += [(even, 3 * size - 1), (even, 3 * size)]
    # A first load (the newest bucket fills); changes to middle buckets, which swell and split.
    for lowers in ([MinKey()], [MinKey(), 40, 100], [MinKey(), 120]):
        for raws, max_bytes in cases:
            expected = _cut(BucketMap(5, list(lowers)), raws, None, max_bytes)
            assert len(expected[0]) > 10
            for sizes in ([230], [1] * 230, [rng.randint(1, 17) for _ in range(60)], [0, 7, 0, 223]):
                got = _cut(BucketMap(5, list(lowers)), raws, sizes, max_bytes)
                assert got == expected, (lowers, max_bytes, sizes)
            by_doc = [bson.decode(raw)["_id"] for _, docs, *_ in expected[0] for raw in docs]
            assert by_doc == list(range(230)), "every document once, in order"


def test_digests_change_with_content_only():
    def digests(documents, lowers):
        bucket_map = BucketMap(3, list(lowers))
        cutter = BucketCutter(bucket_map, 0, len(lowers) - 1, 3, 10**9)
        done = [d for i, raw in documents for d in cutter.add(i, raw)] + cutter.finish()
        return {d.bucket.key: d.digest for d in done}, bucket_map.lowers

    docs = [(i, bson.encode({"_id": i, "v": f"doc{i}"})) for i in range(6)]
    a, lowers = digests(docs, [MinKey()])
    b, _ = digests(docs, lowers)
    assert a == b
    changed = [*docs[:4], (4, bson.encode({"_id": 4, "v": "changed"})), docs[5]]
    c, _ = digests(changed, lowers)
    assert c["first"] == a["first"] and c["int-3"] != a["int-3"]


def test_bucket_map_round_trips_and_finds_buckets():
    oid = ObjectId()
    bucket_map = BucketMap(10, [MinKey(), 5, "k", oid])
    restored = BucketMap.from_json(bucket_map.to_json())
    assert restored.lowers == bucket_map.lowers and restored.bucket_size == 10
    assert restored.find(-100).key == "first"
    assert restored.find(7).key == "int-5"
    assert restored.find("zzz").key == restored.find("k").key
    assert restored.find(True).key == f"oid-{oid}"  # booleans sort after ObjectIds
    assert isinstance(restored.buckets[-1].upper, MaxKey)


def test_keys_are_safe_and_distinct():
    keys = {bucket_key(v) for v in ["a/b", "a\\b", "a b", "../etc", "ÄÖ", -3, 3, 2.5, ObjectId("0" * 24)]}
    assert len(keys) == 9
    assert all(k.replace("-", "").replace("_", "").replace(".", "").isalnum() for k in keys)
    assert bucket_key(-3) == "int-neg3"


def test_bucket_reads_cross_type_ranges(client, database):
    """Index bounds, not $gte/$lt, so a bucket spanning numbers and strings returns both."""
    from aries_assets.core.extract import RangeRead

    coll = client[database].mixed
    coll.insert_many([{"_id": v} for v in [1, 2.5, "a", "b", ObjectId()]])
    source = SourceCollection(database, "mixed")

    def read(lower, upper):
        return [
            bson.decode(raw)["_id"]
            for batch in RangeRead(client, source, lower, upper, None).batches()
            for raw in batch
        ]

    assert read(MinKey(), "a") == [1, 2.5]
    assert read(2, "b") == [2.5, "a"]
    assert read("b", MaxKey())[0] == "b" and len(read("b", MaxKey())) == 2


def test_a_read_fetches_ahead_by_bytes_and_loses_nothing(client, database, monkeypatch):
    """A read fetches ahead of its reader while it works, up to `ahead_bytes` of raw BSON (the
    read begun before Dagster loads takes a bucket's worth, and a run's share once adopted), then
    waits; read on, every document comes once, in order."""
    from aries_assets.core import extract

    monkeypatch.setattr(extract, "READ_BATCH", 100)  # server batches of ~100 KB
    coll = client[database].ahead
    coll.insert_many([{"_id": i, "pad": "x" * 1000} for i in range(2000)])
    source = SourceCollection(database, "ahead")
    read = extract.RangeRead(client, source, MinKey(), MaxKey(), None, ahead_bytes=350_000)
    try:
        deadline = time.monotonic() + 10
        while read.prefetch.waiting_bytes < 300_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # room for one more batch, were the bound not kept
        waiting = read.prefetch.waiting_bytes
        assert 300_000 <= waiting <= 350_000, "fetched ahead, up to the bound"
        # Adopted by a run, the read fetches ahead as a run's read does.
        read.fetch_ahead(150_000)
        batches = iter(read.prefetch)
        seen = [next(batches)]
        time.sleep(0.3)
        assert read.prefetch.waiting_bytes <= waiting - sum(map(len, seen[0])), (
            "no fetch while over the new bound"
        )
        while read.prefetch.waiting_bytes > 150_000:
            seen.append(next(batches))
        time.sleep(0.3)
        assert 100_000 <= read.prefetch.waiting_bytes <= 150_000
        seen += list(batches)
        ids = [bson.decode(raw)["_id"] for batch in seen for raw in batch]
        assert ids == list(range(2000))
    finally:
        read.close()


def test_a_closed_read_ends_its_documents_instead_of_waiting(client, database):
    client[database].closed.insert_many([{"_id": i} for i in range(10)])
    from aries_assets.core import extract

    read = extract.RangeRead(client, SourceCollection(database, "closed"), MinKey(), MaxKey(), None)
    read.close()
    done = []
    reader = threading.Thread(target=lambda: done.append(list(read.prefetch)), daemon=True)
    reader.start()
    reader.join(5)
    assert done, "iterating a closed read waits forever"


def _pymongo_read(coll, lower, upper) -> list[bytes]:
    """The same range through pymongo's raw-batch cursor, the reference."""
    cursor = coll.find_raw_batches({}, batch_size=7).sort("_id", 1).hint([("_id", 1)])
    if not isinstance(lower, MinKey):
        cursor = cursor.min([("_id", lower)])
    if not isinstance(upper, MaxKey):
        cursor = cursor.max([("_id", upper)])
    from aries_assets.core.extract import raw_documents

    return [raw for batch in cursor for raw in raw_documents(batch)]


def test_a_read_hands_over_the_servers_documents_byte_for_byte_and_never_one_by_one(
    client, database, monkeypatch
):
    """A range read gets the same bytes pymongo's cursor gets, in the same order, across server
    batches, without pymongo making an object of each document on the way (it did so twice)."""
    from bson.raw_bson import RawBSONDocument

    from aries_assets.core import extract
    from aries_assets.demo.data import sample_documents

    monkeypatch.setattr(extract, "READ_BATCH", 7)
    coll = client[database].mixed
    coll.insert_many(sample_documents("sample_mflix.users")[:40])
    coll.insert_many(
        [{"_id": i, "n": i} for i in range(30)] + [{"_id": f"s{i}", "s": "é" * i} for i in range(30)]
    )
    coll.insert_many([{"_id": {"a": i}, "big": "x" * 5000} for i in range(5)])
    source = SourceCollection(database, "mixed")
    every = _pymongo_read(coll, MinKey(), MaxKey())
    assert len(every) == 105
    inner = [raw_id(every[k]) for k in (0, 29, 30, 80, 104)]
    inits = []
    real_init = RawBSONDocument.__init__

    def counted(self, *args, **kwargs):
        inits.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(RawBSONDocument, "__init__", counted)
    for lower, upper in [
        (MinKey(), MaxKey()),
        (MinKey(), inner[1]),
        (inner[0], inner[3]),
        (inner[2], MaxKey()),
    ]:
        for after in (None, client.admin.command("ping")["operationTime"]):
            inits.clear()
            read = extract.RangeRead(client, source, lower, upper, after)
            got = [raw for batch in read.batches() for raw in batch]
            batches = -(-len(got) // 7) + 1
            assert len(inits) <= 5 * batches, "pymongo made an object of every document"
            monkeypatch.setattr(RawBSONDocument, "__init__", real_init)
            assert got == _pymongo_read(coll, lower, upper)
            monkeypatch.setattr(RawBSONDocument, "__init__", counted)
    assert len(got) == 75


def test_a_read_stopped_early_leaves_no_cursor_open_on_the_server(client, database, monkeypatch):
    from aries_assets.core import extract

    monkeypatch.setattr(extract, "READ_BATCH", 10)
    client[database].early.insert_many([{"_id": i} for i in range(100)])

    def open_cursors() -> int:
        return client.admin.command("serverStatus")["metrics"]["cursor"]["open"]["total"]

    before = open_cursors()
    read = extract.RangeRead(
        client, SourceCollection(database, "early"), MinKey(), MaxKey(), None, ahead_bytes=1
    )
    first = next(iter(read.prefetch))
    assert [bson.decode(raw)["_id"] for raw in first] == list(range(10))
    assert open_cursors() == before + 1
    read.close()
    deadline = time.monotonic() + 10
    while open_cursors() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_cursors() == before


def test_reads_from_secondaries_go_through_pymongos_cursor(mongo_uri, database, monkeypatch):
    """Where a getMore could reach another server than the find (secondaries, several mongos), only
    pymongo's cursor knows where its cursor lives: the read uses it, and gets the same documents."""
    from pymongo import MongoClient

    from aries_assets.core import extract

    monkeypatch.setattr(extract, "READ_BATCH", 10)
    with MongoClient(mongo_uri, directConnection=False, readPreference="secondaryPreferred") as secondary:
        secondary[database].get_collection("sec", write_concern=None).insert_many(
            [{"_id": i} for i in range(35)]
        )
        secondary.admin.command("ping")
        source = SourceCollection(database, "sec")
        assert secondary.topology_description.topology_type_name != "Single"
        read = extract.RangeRead(secondary, source, MinKey(), MaxKey(), None)
        assert isinstance(read.prefetch.cursor, extract._SplitBatches)
        assert [bson.decode(raw)["_id"] for batch in read.batches() for raw in batch] == list(range(35))


def test_a_reads_find_is_retried_once_after_a_network_error_as_pymongo_retries_it(
    client, database, monkeypatch
):
    from pymongo.database import Database
    from pymongo.errors import AutoReconnect

    from aries_assets.core import extract

    client[database].retried.insert_many([{"_id": i} for i in range(5)])
    real_command, failures = Database.command, []

    def fails_once(self, command, *args, **kwargs):
        if "find" in command and not failures:
            failures.append(command)
            raise AutoReconnect("connection reset")
        return real_command(self, command, *args, **kwargs)

    monkeypatch.setattr(Database, "command", fails_once)
    read = extract.RangeRead(client, SourceCollection(database, "retried"), MinKey(), MaxKey(), None)
    assert [bson.decode(raw)["_id"] for batch in read.batches() for raw in batch] == list(range(5))
    assert len(failures) == 1
