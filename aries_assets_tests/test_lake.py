"""Atomic bucket writes: a crash mid-write leaves the previous file, and the next sync repairs it."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from aries_assets.core import snapshot
from aries_assets.core.arrow import BucketConverter
from aries_assets.core.buckets import BucketMap
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import LocalLake, bucket_file, safe_segment


def test_crash_mid_write_keeps_the_previous_file(client, database, tmp_path, monkeypatch):
    coll = client[database].docs
    coll.insert_many([{"_id": i, "v": "old"} for i in range(100)])
    source = SourceCollection(database, "docs")
    lake = LocalLake(tmp_path)
    bucket = BucketMap(1000).buckets[0]
    snapshot.write_bucket(source, source.open(client), lake, bucket)
    path = tmp_path / bucket_file(database, "docs", bucket.key)
    before = path.read_bytes()

    coll.update_many({}, {"$set": {"v": "new"}})
    original = BucketConverter.tables

    def crash_after_first_batch(self, schema, outliers):
        tables = original(self, schema, outliers)
        yield next(tables)
        raise MemoryError("simulated crash")

    monkeypatch.setattr(BucketConverter, "tables", crash_after_first_batch)
    with pytest.raises(snapshot.BucketWriteError, match=rf"{database}\.docs: could not write bucket first"):
        snapshot.write_bucket(source, source.open(client), lake, bucket, batch_bytes=500)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left behind"

    monkeypatch.setattr(BucketConverter, "tables", original)
    plan = snapshot.plan(source, source.open(client), lake, 1000)
    files = snapshot.inspect_files(source, lake, plan.bucket_map.keys)
    assert snapshot.content_stale(plan, files) == ["first"]
    snapshot.write_bucket(source, source.open(client), lake, bucket)
    assert set(pq.read_table(path).column("v").to_pylist()) == {"new"}


def test_path_segments_are_sanitised():
    assert safe_segment("events") == "events"
    for hostile in ["../etc", "a/b", "a\\b", "na me", "日本", ".hidden", ""]:
        segment = safe_segment(hostile)
        assert "/" not in segment and "\\" not in segment and not segment.startswith(".")
        assert segment.isascii() and segment
    assert safe_segment("a/b") != safe_segment("a_b")


def test_orphan_bucket_files_are_removed(tmp_path):
    lake = LocalLake(tmp_path)
    source = SourceCollection("db", "coll")
    for key in ("first", "int-5", "int-9"):
        lake.write_text(bucket_file("db", "coll", key), "x")
    lake.write_text("db/coll/_aries/buckets.json", "{}")
    removed = snapshot.remove_orphans(source, lake, ["first", "int-5"])
    assert removed == ["db/coll/int-9.parquet"]
    assert lake.list("db/coll") == [
        "db/coll/_aries/buckets.json",
        "db/coll/first.parquet",
        "db/coll/int-5.parquet",
    ]
