"""The lake on S3, through boto3, against moto running as a real HTTP server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from aries_assets.core.lake import S3Lake
from aries_assets.demo.data import load_samples
from aries_assets.demo.mongo_server import free_port
from aries_assets_tests.support import (
    assert_same_documents,
    mongo_documents,
    run_cli,
    table_documents,
    write_config,
)


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="lake-bucket")
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="lake-bucket"):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket="lake-bucket", Key=obj["Key"])
    client.delete_bucket(Bucket="lake-bucket")


def test_sync_to_s3_lake(client, mongo_uri, database, workdir, s3, s3_endpoint):
    load_samples(client, database_prefix=f"{database}_")
    db = f"{database}_sample_mflix"
    try:
        write_config(
            workdir / "aries.yaml",
            mongo_uri,
            "s3://lake-bucket/raw/mongo",
            [{"database": db, "collection": "users", "bucket_size": 50}],
        )
        config = (
            (workdir / "aries.yaml")
            .read_text()
            .replace("url: s3://", f"endpoint_url: {s3_endpoint}\n  url: s3://")
        )
        (workdir / "aries.yaml").write_text(config)
        code, out, err = run_cli("sync", "--workers", "1")
        assert code == 0, err

        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lake-bucket")["Contents"]]
        parquet = sorted(k for k in keys if k.endswith(".parquet"))
        assert all(k.startswith((f"raw/mongo/{db}/users/", "raw/mongo/_aries/streams/")) for k in keys)
        assert f"raw/mongo/{db}/users/_aries/ledger.json" in keys
        assert len(parquet) == 4  # 185 users in buckets of 50
        actual = {}
        for key in parquet:
            body = s3.get_object(Bucket="lake-bucket", Key=key)["Body"].read()
            actual.update(table_documents(pq.read_table(pa.BufferReader(body))))
        assert_same_documents(mongo_documents(client, db, "users"), actual)

        # The lake is registered for Athena: one Glue table with the collection's columns.
        glue = boto3.client("glue", endpoint_url=s3_endpoint, region_name="us-east-1")
        glue_db = db.lower()
        table = glue.get_table(DatabaseName=glue_db, Name="users")["Table"]
        columns = {c["Name"]: c["Type"] for c in table["StorageDescriptor"]["Columns"]}
        assert columns["_doc"] == "string" and columns["email"] == "string" and "password" in columns
        assert columns["_id_key"] == "string", "the key to delete, dedupe and check by, as in every file"
        assert table["StorageDescriptor"]["Location"] == f"s3://lake-bucket/raw/mongo/{db}/users/"
        assert table["Parameters"]["aries_schema_version"] == "1"

        # Footer metadata is read with ranged GETs, so an unchanged sync writes nothing, and Glue is
        # not called again for an unchanged schema.
        code, out, _ = run_cli("sync", "--workers", "1")
        assert code == 0 and " 0 written" in out
        assert len(glue.get_table_versions(DatabaseName=glue_db, TableName="users")["TableVersions"]) == 1

        client[db].users.update_one({}, {"$set": {"nickname": "new field"}})
        assert run_cli("sync", "--workers", "1")[0] == 0
        table = glue.get_table(DatabaseName=glue_db, Name="users")["Table"]
        assert "nickname" in {c["Name"] for c in table["StorageDescriptor"]["Columns"]}
        assert table["Parameters"]["aries_schema_version"] == "2"
    finally:
        for name in ("sample_mflix", "sample_analytics"):
            client.drop_database(f"{database}_{name}")


def test_s3_footer_read_handles_large_footers(s3):
    lake = S3Lake(s3, "lake-bucket", "p")
    wide = pa.table({f"column_{i}_{'x' * 40}": [i] for i in range(2000)}).replace_schema_metadata({"k": "v"})
    with lake.atomic_local_file("wide.parquet") as path:
        pq.write_table(wide, path)
    assert lake.parquet_metadata("wide.parquet")["k"] == "v"
    assert lake.parquet_metadata("missing.parquet") is None


def test_s3_footer_is_missing_only_when_the_key_is(s3):
    """Only NoSuchKey means "no file" (rewrite it); any other answer is an error, never a narrower schema."""
    lake = S3Lake(s3, "lake-bucket", "p")
    assert lake.parquet_metadata("missing.parquet") is None
    s3.put_object(Bucket="lake-bucket", Key="p/empty.parquet", Body=b"")
    assert lake.parquet_metadata("empty.parquet") is None  # unreadable, as a local file would be

    with pytest.raises(ClientError) as error:
        S3Lake(s3, "no-such-lake-bucket", "p").parquet_metadata("any.parquet")
    assert error.value.response["Error"]["Code"] == "NoSuchBucket"


@pytest.fixture
def s3_refusing_everyone():
    """moto as its own server process with authentication on: every request is refused (403)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and server.poll() is None, "moto did not start"
            time.sleep(0.1)
        yield boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="not-a-known-key",
            aws_secret_access_key="not-a-known-secret",
        )
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_s3_footer_read_refused_raises(s3_refusing_everyone):
    with pytest.raises(ClientError) as error:
        S3Lake(s3_refusing_everyone, "lake-bucket", "p").parquet_metadata("b.parquet")
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


@pytest.mark.parametrize("opened_by", ["resource", "writer"])
def test_the_lake_keeps_a_connection_for_every_request_in_flight(s3, s3_endpoint, opened_by, caplog):
    """Ledgers and leases go out LAKE_CONCURRENCY at a time (150 collections in one tick). A client
    with fewer pooled connections opens a new one for each extra request and throws it away,
    warning each time: on S3, a TLS handshake a request and a log full of warnings."""
    from aries_assets.core.lake import LAKE_CONCURRENCY, LakeSpec, each_at_once
    from aries_assets.resources import LakeResource

    url = "s3://lake-bucket/pool"
    if opened_by == "resource":
        lake = LakeResource(url=url, endpoint_url=s3_endpoint, region_name="us-east-1").open()
    else:
        lake = LakeSpec(url, s3_endpoint, "us-east-1").open()
    paths = [f"c{i:03d}/_aries/ledger.json" for i in range(4 * LAKE_CONCURRENCY)]
    with caplog.at_level("WARNING", logger="urllib3"):
        each_at_once(lambda path: lake.write_if(path, "{}", None), paths)
        versions = each_at_once(lambda path: lake.read_versioned(path)[1], paths)
    assert all(versions)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")] == []
