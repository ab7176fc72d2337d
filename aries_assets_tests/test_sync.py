"""`aries sync` end to end against a real MongoDB: the lake holds exactly the documents."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bson import ObjectId
from dagster import AssetKey, DagsterInstance

from aries_assets.demo.data import SAMPLE_NAMESPACES, load_samples
from aries_assets_tests.support import (
    assert_same_documents,
    events_config,
    lake_documents,
    lake_tables,
    mongo_documents,
    run_cli,
    table_documents,
    write_config,
)

BUCKET_SIZE = 300


@pytest.fixture
def samples(client, mongo_uri, database, workdir):
    """The sample datasets loaded under a fresh database prefix, and a config for all of them."""
    load_samples(client, database_prefix=f"{database}_")
    collections = []
    for namespace in SAMPLE_NAMESPACES:
        db, coll = namespace.split(".", 1)
        collections.append({"database": f"{database}_{db}", "collection": coll, "bucket_size": BUCKET_SIZE})
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", collections)
    yield collections
    for entry in collections:
        client.drop_database(entry["database"])


def lake_dir(workdir, entry):
    return workdir / "lake" / entry["database"] / entry["collection"]


def test_sync_writes_every_sample_document_exactly(client, samples, workdir):
    code, out, err = run_cli("sync", "--workers", "2")
    assert code == 0, err

    for entry in samples:
        tables = lake_tables(lake_dir(workdir, entry))
        expected = mongo_documents(client, entry["database"], entry["collection"])
        assert len(tables) == -(-len(expected) // BUCKET_SIZE), "one file per bucket of at most bucket_size"
        actual = {}
        for table in tables.values():
            assert table.num_rows <= BUCKET_SIZE
            ids = table.column("_id").to_pylist()
            assert len(set(ids)) == len(ids)
            actual.update(table_documents(table))
        assert_same_documents(expected, actual)
        assert f"{entry['database']}.{entry['collection']}" in out

    # Flattened columns carry typed values, nested paths included.
    theaters = next(e for e in samples if e["collection"] == "theaters")
    table = pq.read_table(lake_dir(workdir, theaters) / "first.parquet")
    assert table.schema.field("location__address__city").type == "string"
    assert table.schema.field("theaterid").type == "int32"
    coordinates = table.schema.field("location__geo__coordinates").type
    assert pa.types.is_list(coordinates) and coordinates.value_type == pa.float64()


def test_sync_records_partitions_and_materializations(client, samples, workdir):
    code, _, err = run_cli("sync", "--workers", "1")
    assert code == 0, err
    entry = samples[0]
    name = f"{entry['database']}__{entry['collection']}"
    with DagsterInstance.get() as instance:
        keys = instance.get_dynamic_partitions(name)
        assert keys[0] == "first" and len(keys) == len(lake_tables(lake_dir(workdir, entry)))
        lake_key = AssetKey(["lake", entry["database"], entry["collection"]])
        materialized = instance.get_materialized_partitions(lake_key)
        assert materialized == set(keys)
        event = instance.get_latest_materialization_event(lake_key)
        metadata = event.asset_materialization.metadata
        assert metadata["dagster/row_count"].value <= BUCKET_SIZE
        column_names = [c.name for c in metadata["dagster/column_schema"].schema.columns]
        assert column_names[:3] == ["_id", "_id_key", "_doc"]


def test_second_sync_rewrites_nothing_and_changes_rewrite_only_their_bucket(
    client, mongo_uri, database, workdir
):
    coll = client[database].events
    coll.insert_many([{"_id": ObjectId(), "n": i} for i in range(350)])
    config = [{"database": database, "collection": "events", "bucket_size": 100}]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", config)
    folder = workdir / "lake" / database / "events"
    assert run_cli("sync", "--workers", "1")[0] == 0
    files = sorted(folder.glob("*.parquet"), key=lambda f: f.stat().st_mtime_ns)
    assert len(files) == 4
    before = {f.name: f.stat().st_mtime_ns for f in files}

    code, out, _ = run_cli("sync", "--workers", "1")
    assert code == 0
    assert " 0 written" in out
    assert {f.name: f.stat().st_mtime_ns for f in folder.glob("*.parquet")} == before

    # A delete in bucket 1, an update in bucket 2, nothing in bucket 3, inserts past the end.
    ids = [d["_id"] for d in coll.find({}, {"_id": 1}).sort("_id", 1)]
    coll.delete_one({"_id": ids[5]})
    coll.update_one({"_id": ids[150]}, {"$set": {"n": -1, "note": "changed"}})
    coll.insert_many([{"_id": ObjectId(), "n": 1000 + i} for i in range(120)])
    by_bucket = [pq.read_metadata(f).metadata[b"aries.bucket"].decode() for f in files]
    code, out, _ = run_cli("sync", "--workers", "1")
    assert code == 0
    after = {f.name: f.stat().st_mtime_ns for f in folder.glob("*.parquet")}
    untouched = {name for name in before if after[name] == before[name]}
    third = next(
        f.name for f in files if pq.read_metadata(f).metadata[b"aries.bucket"].decode() == by_bucket[2]
    )
    assert untouched == {third}
    assert len(after) == 5, "120 new documents fill the last bucket and open one more"
    actual = lake_documents(folder)
    assert_same_documents(mongo_documents(client, database, "events"), actual)


def test_query_filter_limits_the_documents(client, mongo_uri, database, workdir):
    client[database].events.insert_many(
        [{"_id": i, "n": i, "kind": "a" if i % 2 else "b"} for i in range(40)]
    )
    config = [{"database": database, "collection": "events", "bucket_size": 7, "query": {"kind": "a"}}]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", config)
    code, _, err = run_cli("sync", "--workers", "1")
    assert code == 0, err
    actual = lake_documents(workdir / "lake" / database / "events")
    assert_same_documents(mongo_documents(client, database, "events", {"kind": "a"}), actual)


def test_a_failing_collection_is_reported_and_the_others_still_sync(client, mongo_uri, database, workdir):
    client[database].good.insert_many([{"n": i} for i in range(5)])
    (workdir / "lake").mkdir()
    (workdir / "lake" / database).write_text("a file where the database directory should be")
    other = f"{database}_other"
    client[other].good.insert_many([{"n": i} for i in range(5)])
    try:
        config = [{"database": database, "collection": "good"}, {"database": other, "collection": "good"}]
        write_config(workdir / "aries.yaml", mongo_uri, "./lake", config)
        code, out, err = run_cli("sync", "--workers", "1")
        assert code == 1
        assert f"{database}.good" in out and "FAILED" in out
        # One line, saying where the rest is: Dagster's own dump of the failure stays in the run's log.
        assert "the full log: run" in err and "STEP_FAILURE" not in err and "Traceback" not in err, err
        assert "FAILED: NotADirectoryError: [Errno 20]" in err, "the error's class is named once"
        assert len(list((workdir / "lake" / other / "good").glob("*.parquet"))) == 1
    finally:
        client.drop_database(other)


def test_a_terminal_gets_a_live_progress_display_and_a_pipe_plain_lines(client, mongo_uri, database, workdir):
    import os
    import shlex
    import subprocess
    import sys

    client[database].events.insert_many([{"n": i} for i in range(5_000)])
    write_config(
        workdir / "aries.yaml", mongo_uri, "./lake", [{"database": database, "collection": "events"}]
    )
    command = shlex.join(
        [sys.executable, "-m", "aries_assets.cli", "sync", "--config", str(workdir / "aries.yaml")]
    )
    env = {**os.environ, "COLUMNS": "160"}
    # `script` gives the command a pseudo-terminal, as a person's shell would.
    on_terminal = subprocess.run(
        ["script", "-qec", command, "/dev/null"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert on_terminal.returncode == 0, on_terminal.stdout
    assert "docs/s" in on_terminal.stdout and f"{database}.events" in on_terminal.stdout
    client[database].events.insert_many([{"n": i} for i in range(10)])
    piped = subprocess.run(
        shlex.split(command), cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert piped.returncode == 0
    assert "docs/s" not in piped.stderr and f"[{database}.events]" in piped.stderr
    assert "Warning" not in piped.stderr + on_terminal.stdout, "no library warnings for the user to read"


def test_a_terminal_gets_a_live_display_with_totals_and_plain_lines_otherwise(
    client, mongo_uri, database, workdir
):
    """On a terminal: a live display per collection with done/total, MB, rate and time left
    (the total costs a count, asked for only there). Piped: plain lines, no count."""
    import os
    import pty
    import re
    import subprocess
    import sys

    client[database].events.insert_many([{"_id": i, "v": "x" * 100} for i in range(3_000)])
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": "events", "bucket_size": 500}],
    )
    command = [sys.executable, "-m", "aries_assets.cli", "sync", "--workers", "1"]
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        command, stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "200"}
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=120) == 0
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert re.search(r"3000/3000 docs\s+[0-9.]+ MB\s+[0-9,]+ docs/s", shown), shown[-2000:]

    client[database].events.insert_many([{"_id": 10_000 + i} for i in range(10)])
    piped = subprocess.run(command + ["--full"], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert "\x1b[" not in piped.stdout + piped.stderr, "no terminal codes when piped"
    assert "3,010 docs" in piped.stdout


def test_a_change_undone_before_the_read_rewrites_nothing_and_says_so(client, mongo_uri, database, workdir):
    """A bucket marked by a recorded change that reads the same as its file is left as it is, and the
    run says which buckets: a read that missed a change would not pass unseen."""
    coll = client[database].events
    coll.insert_many([{"_id": i, "v": 0} for i in range(300)])
    events_config(workdir, mongo_uri, database)
    assert run_cli("sync", "--workers", "1")[0] == 0
    folder = workdir / "lake" / database / "events"
    before = {f.name: f.stat().st_mtime_ns for f in folder.glob("*.parquet")}
    coll.update_one({"_id": 150}, {"$set": {"v": 1}})
    coll.update_one({"_id": 150}, {"$set": {"v": 0}})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, err
    assert "1 changed buckets read the same as their files: int-100" in out + err
    assert {f.name: f.stat().st_mtime_ns for f in folder.glob("*.parquet")} == before


def test_a_changed_bucket_that_reads_unchanged_is_read_again_before_its_mark_is_cleared(
    client, mongo_uri, database, workdir, monkeypatch
):
    """A read that does not see a change the stream showed (a lagging server, a visibility bug) would
    clear the bucket's mark on its word alone, and the lake would stay stale with nothing left to
    repair it. Such a bucket is read once more a moment later: the change is written, and the run
    warns. The fault: the run's first read returns one document as it was before its change."""
    import bson

    from aries_assets.core import engine

    coll = client[database].events
    coll.insert_many([{"_id": i, "v": 0} for i in range(300)])
    events_config(workdir, mongo_uri, database)
    assert run_cli("sync", "--workers", "1")[0] == 0
    before = bson.encode(coll.find_one({"_id": 150}))
    coll.update_one({"_id": 150}, {"$set": {"v": 1}})
    reads = []
    real_read = engine.range_batches

    def first_read_lags(*args, **kwargs):
        reads.append(args[2:4])
        for batch in real_read(*args, **kwargs):
            lagging = len(reads) == 1
            yield [before if lagging and bson.decode(raw)["_id"] == 150 else raw for raw in batch]

    monkeypatch.setattr(engine, "range_batches", first_read_lags)
    monkeypatch.setattr(engine, "SECOND_READ_PAUSE_SECONDS", 0)
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, err
    assert len(reads) == 2, "the bucket was read a second time"
    assert "WARNING: 1 changed buckets read the same as their files, then differently" in out + err
    assert "int-100" in out + err
    assert_same_documents(
        mongo_documents(client, database, "events"), lake_documents(workdir / "lake" / database / "events")
    )


def test_a_bucket_materialized_by_name_is_rewritten_after_one_read(
    client, mongo_uri, database, workdir, monkeypatch
):
    """A partition materialized from the UI is rewritten, even if its file is current (the run failed
    with "bucket was not written"), and read once: no change was recorded, so a bucket that reads
    the same as its file is no sign of a missed one."""
    from aries_assets.config import load_config
    from aries_assets.core import engine
    from aries_assets.definitions import build_definitions
    from aries_assets.factory import load_job_name

    coll = client[database].events
    coll.insert_many([{"_id": i, "v": 0} for i in range(300)])
    events_config(workdir, mongo_uri, database)
    assert run_cli("sync", "--workers", "1")[0] == 0
    reads = []
    real_read = engine.range_batches

    def counted(*args, **kwargs):
        reads.append(args[2:4])
        yield from real_read(*args, **kwargs)

    monkeypatch.setattr(engine, "range_batches", counted)
    defs = build_definitions(load_config())
    (entry,) = load_config().collections
    with DagsterInstance.get() as instance:
        result = defs.resolve_job_def(load_job_name(entry)).execute_in_process(
            instance=instance, partition_key="int-100", raise_on_error=False
        )
    assert result.success
    assert reads == [(100, 200)]
    materialization = result.asset_materializations_for_node(f"lake__{entry.name}")
    assert [m.partition for m in materialization] == ["int-100"]


def test_a_sync_of_a_databases_collections_is_one_run(client, mongo_uri, database, workdir):
    """A run start costs Dagster a few tenths of a second (its event log, its records): one run per
    collection made a sync of 150 collections take a minute with nothing to do. One run serves each
    change stream's collections, a few at a time, each recorded on its own asset."""
    names = [f"c{i}" for i in range(5)]
    for i, name in enumerate(names):
        client[database][name].insert_many([{"_id": j, "v": j * i} for j in range(12)])
    config = [{"database": database, "collection": name, "bucket_size": 5} for name in names]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", config)
    code, out, err = run_cli("sync", "--workers", "2")
    assert code == 0, err
    for name in names:
        assert f"{database}.{name}" in out and "(first load)" in out
        actual = lake_documents(workdir / "lake" / database / name)
        assert_same_documents(mongo_documents(client, database, name), actual)
    client[database].c3.update_one({"_id": 7}, {"$set": {"v": "changed"}})
    code, out, err = run_cli("sync", "--workers", "2")
    assert code == 0, err
    assert_same_documents(
        mongo_documents(client, database, "c3"), lake_documents(workdir / "lake" / database / "c3")
    )
    with DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert [r.job_name for r in runs] == [f"serve__{database}"] * 2, [r.job_name for r in runs]
        assert all(r.tags.get("aries/trigger") == "aries sync" for r in runs)
        for name in names:
            key = AssetKey(["lake", database, name])
            written = instance.get_materialized_partitions(key)
            assert "first" in written and len(written) == 3, (name, written)
