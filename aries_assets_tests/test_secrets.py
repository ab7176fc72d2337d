"""Passwords never land anywhere Aries or Dagster store things: run storage, event logs, compute
logs, Parquet files and footers, `_aries/` state, warehouse rows, or the commands' output.

Each server gets a recognisable password: SecantusDB a SCRAM user, the embedded PostgreSQL a login
role (it trusts local connections, so the password is sent but not checked), moto the AWS secret key.
Successful syncs, a sensor tick and its run, `aries status`, and failing syncs (wrong port, wrong
password, missing bucket, missing socket) all run before everything is searched.
"""

from __future__ import annotations

import urllib.parse

import boto3
import dagster as dg
import psycopg2
import pytest

from aries_assets.config import load_config
from aries_assets.definitions import build_definitions
from aries_assets.demo.mongo_server import free_port
from aries_assets_tests.faults import dump_tables, moto_server, s3_objects
from aries_assets_tests.support import run_cli, write_config
from aries_assets_tests.test_sensor import apply, tick

MONGO_PASSWORD = "Canary-Mongo-9f3"
PG_PASSWORD = "Canary-Pg-7d1"
S3_SECRET = "Canary-S3-4b2"
CANARIES = (MONGO_PASSWORD, PG_PASSWORD, S3_SECRET)


@pytest.fixture(scope="module")
def moto_endpoint():
    with moto_server() as endpoint:
        yield endpoint


def _found(text: str | bytes, where: str) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    variants = {c: (c, urllib.parse.quote(c), c.encode().hex()) for c in CANARIES}
    return [f"{canary} in {where}" for canary, forms in variants.items() if any(f in text for f in forms)]


def test_no_password_is_stored_or_printed_anywhere(
    client, mongo_uri, database, workdir, postgres_url, moto_endpoint, monkeypatch
):
    monkeypatch.setattr("aries_assets.resources.SERVER_SELECTION_TIMEOUT_MS", 2000)
    user = f"u_{database}"
    client.admin.command("createUser", user, pwd=MONGO_PASSWORD, roles=["root"])
    parts = urllib.parse.urlsplit(postgres_url)
    admin = psycopg2.connect(postgres_url)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{PG_PASSWORD}'")
        cursor.execute(f'GRANT ALL ON DATABASE "{database}" TO "{user}"')
        cursor.execute(f'GRANT ALL ON SCHEMA public TO "{user}"')
    admin.close()
    monkeypatch.setenv("ARIES_MONGO_PASSWORD", MONGO_PASSWORD)
    monkeypatch.setenv("ARIES_PG_PASSWORD", PG_PASSWORD)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "canary-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="secret-lake")

    host = urllib.parse.urlsplit(mongo_uri).netloc
    good_mongo = f"mongodb://{user}:${{ARIES_MONGO_PASSWORD}}@{host}/?directConnection=true&authSource=admin"
    good_pg = f"postgresql://{user}:${{ARIES_PG_PASSWORD}}@/{database}?{parts.query}"
    lake = {"url": "s3://secret-lake/lake", "endpoint_url": moto_endpoint, "region": "us-east-1"}
    coll = client[database].accounts
    coll.insert_many([{"_id": i, "name": f"n{i}", "password": "not-a-canary"} for i in range(30)])
    entries = [{"database": database, "collection": "accounts", "bucket_size": 10}]

    def configure(mongo: str = good_mongo, pg: str = good_pg, lake_url: str = lake["url"]) -> None:
        write_config(workdir / "aries.yaml", mongo, lake_url, entries, warehouse={"url": pg})
        text = (workdir / "aries.yaml").read_text()
        text = text.replace(
            f"url: {lake_url}", f"url: {lake_url}\n  endpoint_url: {moto_endpoint}\n  region: us-east-1"
        )
        (workdir / "aries.yaml").write_text(text)

    outputs: list[tuple[str, str]] = []

    def run(*args: str, expect: int | None = 0) -> None:
        try:
            code, out, err = run_cli(*args)
        except Exception as error:  # noqa: BLE001 - a missing bucket still crashes `aries sync` (test_bad_input)
            code, out, err = None, "", f"{type(error).__name__}: {error}"
        outputs.append((" ".join(args), out + err))
        if expect is not None:
            assert code == expect, out + err

    configure()
    run("sync", "--workers", "2")
    coll.update_one({"_id": 3}, {"$set": {"name": "changed"}})
    coll.insert_one({"_id": 100, "name": "new"})
    run("sync", "--workers", "1")
    run("status", "--json")
    run("status")

    # The daemon's path: a sensor tick and the run it requests (its run config is stored).
    coll.update_one({"_id": 4}, {"$set": {"name": "sensor"}})
    defs = build_definitions(load_config())
    with dg.DagsterInstance.get() as instance:
        result = tick(defs, instance, f"changes__{database}")
        assert len(result.run_requests) == 1
        apply(defs, instance, result)

    # Failing syncs, each carrying a password.
    configure(mongo=good_mongo.replace(host, f"127.0.0.1:{free_port()}"))
    run("sync", "--workers", "1", expect=2)
    configure(mongo=f"mongodb://{user}:{MONGO_PASSWORD}-wrong@{host}/?directConnection=true&authSource=admin")
    run("sync", "--workers", "1", expect=2)
    configure(mongo=f"mongodb://{user}:{MONGO_PASSWORD}@127.0.0.1:{free_port()}/?directConnection=true")
    run("sync", "--workers", "1", expect=2)
    configure(pg=f"postgresql://{user}:{PG_PASSWORD}@/{database}?host=/nonexistent-socket-dir")
    coll.update_one({"_id": 5}, {"$set": {"name": "pg down"}})
    run("sync", "--workers", "1", expect=2)  # refused before anything is written
    configure(lake_url="s3://no-such-bucket/lake")
    run("sync", "--workers", "1", expect=None)
    run("status", "--json", expect=None)

    assert _found(f"x{PG_PASSWORD}y", "a probe"), "the search finds a password where there is one"
    found: list[str] = []
    for command, text in outputs:
        found += _found(text, f"the output of `aries {command}`")
    for path in sorted(workdir.rglob("*")):
        if path.is_file() and path.name != "aries.yaml":
            found += _found(path.read_bytes(), str(path.relative_to(workdir)))
    for key, body in s3_objects(moto_endpoint, "secret-lake").items():
        found += _found(body, f"s3://secret-lake/{key}")
    found += _found(dump_tables(good_pg.replace("${ARIES_PG_PASSWORD}", PG_PASSWORD)), "the warehouse tables")
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) >= 3  # the failing syncs are refused before any run starts
        for record in runs:
            found += _found(repr(record.run_config) + repr(record.tags), f"run {record.run_id} config")
            for entry in instance.all_logs(record.run_id):
                found += _found(repr(entry), f"run {record.run_id} event log")
    assert not found, "\n".join(found)


def test_passwords_written_into_the_config_itself_stay_there(
    client, mongo_uri, database, workdir, postgres_url, monkeypatch
):
    """Against advice (README: use ${VARS}), passwords typed into aries.yaml: still only in aries.yaml."""
    user = f"u_{database}"
    client.admin.command("createUser", user, pwd=MONGO_PASSWORD, roles=["root"])
    parts = urllib.parse.urlsplit(postgres_url)
    host = urllib.parse.urlsplit(mongo_uri).netloc
    mongo = f"mongodb://{user}:{MONGO_PASSWORD}@{host}/?directConnection=true&authSource=admin"
    pg = f"postgresql://postgres:{PG_PASSWORD}@/{database}?{parts.query}"
    client[database].accounts.insert_many([{"_id": i} for i in range(5)])
    entries = [{"database": database, "collection": "accounts"}]
    write_config(workdir / "aries.yaml", mongo, "./lake", entries, warehouse={"url": pg})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    found = _found(out + err, "the output")
    for path in sorted(workdir.rglob("*")):
        if path.is_file() and path.name != "aries.yaml":
            found += _found(path.read_bytes(), str(path.relative_to(workdir)))
    with dg.DagsterInstance.get() as instance:
        for record in instance.get_runs():
            for entry in instance.all_logs(record.run_id):
                found += _found(repr(entry), f"run {record.run_id} event log")
    assert not found, "\n".join(found)
