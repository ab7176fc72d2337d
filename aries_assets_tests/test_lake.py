"""Atomic bucket writes: a crash mid-write leaves the previous file, and the next sync repairs it."""

from __future__ import annotations

import pyarrow.parquet as pq

from aries_assets.core import snapshot
from aries_assets.core.arrow import BucketConverter
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import LocalLake, bucket_file, safe_segment
from aries_assets.core.ledger import LedgerStore
from aries_assets_tests.support import run_cli, write_config


def test_crash_mid_write_keeps_the_previous_file_and_the_next_sync_repairs(
    client, mongo_uri, database, workdir, monkeypatch
):
    coll = client[database].docs
    coll.insert_many([{"_id": i, "v": "old"} for i in range(100)])
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [{"database": database, "collection": "docs"}])
    assert run_cli("sync", "--workers", "1")[0] == 0
    path = workdir / "lake" / bucket_file(database, "docs", "first")
    before = path.read_bytes()

    coll.update_many({}, {"$set": {"v": "new"}})
    original = BucketConverter.table

    def crash_after_first_chunk(self, batch, schema, outliers):
        original(self, batch, schema, outliers)
        raise MemoryError("simulated crash")

    monkeypatch.setattr(BucketConverter, "table", crash_after_first_chunk)
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 1 and f"{database}.docs" in out + err and "could not write bucket first" in out + err
    assert path.read_bytes() == before
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"], "no temporary file left behind"
    ledger = LedgerStore(LocalLake(workdir / "lake"), database, "docs").load()
    assert "first" in ledger.dirty, "the bucket stays dirty until a file covering the change is written"

    monkeypatch.setattr(BucketConverter, "table", original)
    assert run_cli("sync", "--workers", "1")[0] == 0  # no new change: the ledger alone asks for the rewrite
    assert set(pq.read_table(path).column("v").to_pylist()) == {"new"}
    assert not LedgerStore(LocalLake(workdir / "lake"), database, "docs").load().dirty


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
