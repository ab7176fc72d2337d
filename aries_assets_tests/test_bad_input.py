"""Bad input, catalogued: every mistake gets one line naming what and where and what to do, a non-zero
exit, and nothing written. Complements test_config.py (which covers the first config mistakes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aries_assets.cli import main
from aries_assets.demo.mongo_server import free_port
from aries_assets_tests.faults import assert_table_exact, table_names
from aries_assets_tests.support import (
    assert_same_documents,
    lake_documents,
    mongo_documents,
    run_cli,
    write_config,
)

BODY = """\
mongo: {uri: "mongodb://localhost:27017"}
lake: {url: ./lake}
collections:
  - database: app
    collection: apps
"""
COLL = "    collection: apps\n"


def _only_config_left(workdir: Path) -> None:
    assert sorted(p.name for p in workdir.iterdir()) == ["aries.yaml"], "nothing may be written"


def _bad(text: str, message: str, *marks):
    return pytest.param(text, message, marks=marks, id=message[:40])


CONFIG_MISTAKES = [
    _bad("", "the top level must be a mapping"),
    _bad("- 1\n", "the top level must be a mapping"),
    _bad(BODY.replace('"mongodb://localhost:27017"', "5"), "mongo.uri must be a non-empty string"),
    _bad(BODY.replace('"mongodb://localhost:27017"', '""'), "mongo.uri must be a non-empty string"),
    _bad(BODY.replace("mongo: {uri:", "mongo: {url:"), "mongo: unknown key 'url'"),
    _bad(BODY.replace("lake: {url: ./lake}", "lake: ./lake"), "lake must be a mapping"),
    _bad(BODY.replace("lake: {url: ./lake}", "lake: {url: ./lake, bucket: x}"), "lake: unknown key 'bucket'"),
    _bad(BODY.replace("./lake", "'${ARIES_FAULTS_UNSET_LAKE}'"), "ARIES_FAULTS_UNSET_LAKE is not set"),
    _bad(BODY + "warehouse: {url: ''}\n", "warehouse.url must be a non-empty string"),
    _bad(BODY + "warehouse: {url: 'duckdb:///w', user: x}\n", "warehouse: unknown key 'user'"),
    _bad(BODY + "warehouse: {url: '${ARIES_FAULTS_UNSET_PG}'}\n", "ARIES_FAULTS_UNSET_PG is not set"),
    _bad(BODY + "warehouse: {url: 'redshift://u:p@h:5439/d'}\n", "lake.url must be s3://bucket/prefix"),
    _bad(BODY + "sync: [1]\n", "sync must be a mapping"),
    _bad(BODY + "sync: {workerz: 2}\n", "sync: unknown key 'workerz'"),
    _bad(BODY + "sync: {workers: 0}\n", "sync.workers must be a whole number from 1 to 64, got 0"),
    _bad(BODY + "sync: {workers: 65}\n", "sync.workers must be a whole number from 1 to 64, got 65"),
    _bad(BODY + "sync: {workers: '2'}\n", "sync.workers must be a whole number from 1 to 64, got '2'"),
    _bad(BODY + "sync: {workers: true}\n", "sync.workers must be a whole number from 1 to 64, got True"),
    _bad(
        BODY + "sync: {linger_seconds: -1}\n", "sync.linger_seconds must be a number of seconds, at least 0"
    ),
    _bad(BODY + "sync: {lease_seconds: 4}\n", "sync.lease_seconds must be a number of seconds, at least 5"),
    _bad(
        BODY + "sync: {lease_seconds: .nan}\n",
        "sync.lease_seconds must be a number of seconds",
    ),
    _bad(BODY + "sync: {change_streams: cluster}\n", "sync.change_streams must be one of"),
    _bad(BODY + "collections: {}\n", "collections must be a non-empty list"),
    _bad(BODY + "  - 5\n", "collections[1] must be a mapping"),
    _bad(BODY.replace("database: app", "database: 'a.b'"), "database name may not contain"),
    _bad(BODY.replace("database: app", "database: 'a b'"), "database name may not contain"),
    _bad(BODY.replace("collection: apps", "collection: system.users"), "may not contain NUL or start with"),
    _bad(BODY.replace("collection: apps", 'collection: "a\\0b"'), "may not contain NUL or start with"),
    _bad(BODY.replace("collection: apps", "collection: 5"), "collection must be a non-empty string"),
    _bad(BODY + "    bucket_size: '10'\n", "bucket_size must be a positive whole number, got '10'"),
    _bad(BODY + "    bucket_size: 1.5\n", "bucket_size must be a positive whole number, got 1.5"),
    _bad(BODY + "    bucket_bytes: 1023\n", "bucket_bytes must be a whole number of bytes, at least 1024"),
    _bad(BODY + "    owners: team\n", "owners must be a list"),
    _bad(BODY + "    schema: {price: money}\n", "schema.price: unknown type 'money'"),
    _bad(BODY + "    schema: {price: 'decimal(40,2)'}\n", "decimal precision must be 1-38"),
    _bad(BODY + "    schema: {exclude: password}\n", "schema.exclude must be a list of field paths"),
    _bad(BODY + "    schema: {exclude: ['']}\n", "schema.exclude[1] must be a field path such as password"),
    _bad(BODY + "    schema: {exclude: [a, 5]}\n", "schema.exclude[2] must be a field path such as password"),
    _bad(BODY + "    schema: {exclude: [_id]}\n", "schema.exclude[1]: _id cannot be excluded"),
    _bad(BODY + "    schema: {exclude: [a, _id.region]}\n", "schema.exclude[2]: _id cannot be excluded"),
    _bad(BODY + "    schema: {_id: int64}\n", "schema._id: _id is always a string column"),
    _bad(BODY + "    evolution: merge\n", "evolution must be rebuild or append, got 'merge'"),
    _bad(BODY + "    max_depth: 0\n", "max_depth must be a positive whole number, got 0"),
    _bad(BODY + "    max_columns: -5\n", "max_columns must be a positive whole number, got -5"),
    _bad(BODY + "    infer_schema: 'yes'\n", "infer_schema must be true or false"),
    _bad(BODY + f"    warehouse_table: {'t' * 64}\n", "warehouse_table must be a name of 1 to 63 bytes"),
    _bad(BODY.replace("collection: apps", f"collection: {'c' * 64}"), "too long for a table name"),
    _bad(BODY + "    query: {$where: [1}\n", "not valid YAML at line"),
    _bad(
        BODY.replace("lake: {url: ./lake}", "lake: {url: ./lake, endpoint_url: 5}"),
        "lake.endpoint_url must be",
    ),
    _bad(
        BODY.replace("lake: {url: ./lake}", "lake: {url: ./lake, region: [eu]}"),
        "lake.region must be",
    ),
    _bad(
        BODY + "warehouse: {url: 'duckdb:///w', iam_role: 5}\n",
        "iam_role must be",
    ),
]


@pytest.mark.parametrize(("text", "message"), CONFIG_MISTAKES)
def test_a_config_mistake_is_one_line_and_writes_nothing(workdir, monkeypatch, text, message):
    # A reachable-looking MongoDB that fails fast if the config gets that far.
    monkeypatch.setattr("aries_assets.resources.SERVER_SELECTION_TIMEOUT_MS", 500)
    (workdir / "aries.yaml").write_text(text)
    try:
        code, out, err = run_cli("sync", "--workers", "1")
    except Exception as error:  # noqa: BLE001 - a traceback is the failure being catalogued
        pytest.fail(f"`aries sync` raised {type(error).__name__}: {str(error)[:300]}")
    assert code == 2, out + err
    assert err.startswith("aries: aries.yaml: ") and err.strip().count("\n") == 0, err
    assert message in err
    _only_config_left(workdir)


# --- unreachable and misconfigured servers ---------------------------------------------------------


def _clear_failure(code: int, out: str, err: str, *needles: str) -> None:
    """A non-zero exit, no traceback, and one line carrying every needle."""
    assert code != 0
    text = out + err
    assert "Traceback" not in text, f"a traceback instead of one line:\n{text[-2000:]}"
    lines = [line for line in text.splitlines() if all(n in line for n in needles)]
    assert lines, f"no line names {needles}:\n{text[-2000:]}"


UNREACHABLE_WAREHOUSE = (
    "An unreachable or misconfigured warehouse is found only after the lake is written, and the output is a "
    "Dagster traceback on stderr plus '{summary}' with no host or hint: aries_assets/cli.py cmd_sync checks "
    "MongoDB up front (check_mongo) but not the warehouse, and sync.py _first_error keeps only the last line "
    "of psycopg2's message. Reproduce: warehouse.url {url}, `aries sync`."
)


def test_an_unreachable_postgresql_is_one_line_and_writes_nothing(client, mongo_uri, database, workdir):
    client[database].apps.insert_one({"_id": 1})
    port = free_port()
    url = f"postgresql://aries:pw@127.0.0.1:{port}/db"
    write_config(
        workdir / "aries.yaml", mongo_uri, "./lake", [{"database": database, "collection": "apps"}],
        warehouse={"url": url},
    )  # fmt: skip
    code, out, err = run_cli("sync", "--workers", "1")
    _clear_failure(code, out, err, f"127.0.0.1:{port}", "warehouse.url")
    assert not (workdir / "lake").exists()


def test_a_postgresql_database_that_does_not_exist_is_one_line_and_writes_nothing(
    client, mongo_uri, database, workdir, postgres_server
):
    client[database].apps.insert_one({"_id": 1})
    url = postgres_server.get_uri("aries_faults_no_such_db")
    write_config(
        workdir / "aries.yaml", mongo_uri, "./lake", [{"database": database, "collection": "apps"}],
        warehouse={"url": url},
    )  # fmt: skip
    code, out, err = run_cli("sync", "--workers", "1")
    _clear_failure(code, out, err, "aries_faults_no_such_db", "does not exist", "warehouse.url")
    assert not (workdir / "lake").exists()


def test_a_duckdb_path_that_cannot_be_created_is_one_line_and_writes_nothing(
    client, mongo_uri, database, workdir
):
    client[database].apps.insert_one({"_id": 1})
    write_config(
        workdir / "aries.yaml", mongo_uri, "./lake", [{"database": database, "collection": "apps"}],
        warehouse={"url": "duckdb:////proc/no/such/dir/w.duckdb"},
    )  # fmt: skip
    code, out, err = run_cli("sync", "--workers", "1")
    _clear_failure(code, out, err, "/proc/no/such/dir", "warehouse.url")
    assert not (workdir / "lake").exists()


def test_an_unreachable_s3_endpoint_is_one_line_and_writes_nothing(
    client, mongo_uri, database, workdir, monkeypatch
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client[database].apps.insert_one({"_id": 1})
    port = free_port()
    (workdir / "aries.yaml").write_text(
        f"mongo: {{uri: '{mongo_uri}'}}\n"
        f"lake: {{url: 's3://lake-bucket/p', endpoint_url: 'http://127.0.0.1:{port}', region: us-east-1}}\n"
        f"collections: [{{database: {database}, collection: apps}}]\n"
    )
    try:
        code, out, err = run_cli("sync", "--workers", "1")
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"`aries sync` raised {type(error).__name__}: {str(error)[:300]}")
    _clear_failure(code, out, err, f"127.0.0.1:{port}", "lake")
    _only_config_left(workdir)


@pytest.mark.parametrize("lake", ["/proc/aries-lake", "/sys/kernel/aries-lake"])
def test_a_lake_that_cannot_be_written_is_one_line_before_any_run(client, mongo_uri, database, workdir, lake):
    """Found before anything runs, like an unreachable MongoDB: not one failed run per collection."""
    client[database].apps.insert_one({"_id": 1})
    client[database].users.insert_one({"_id": 1})
    entries = [{"database": database, "collection": "apps"}, {"database": database, "collection": "users"}]
    write_config(workdir / "aries.yaml", mongo_uri, lake, entries)
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 2, out + err
    assert err.startswith("aries: cannot write to the lake at") and err.strip().count("\n") == 0, err
    assert lake in err and "lake.url" in err
    assert "FAILED" not in out + err, "no run was started"


def test_wrong_mongodb_credentials_say_authentication_failed(client, mongo_uri, database, workdir):
    user = f"u_{database}"
    client.admin.command("createUser", user, pwd="right-password", roles=["root"])
    try:
        host = mongo_uri.split("://", 1)[1].split("/", 1)[0]
        uri = f"mongodb://{user}:wrong-password@{host}/?directConnection=true&authSource=admin"
        write_config(workdir / "aries.yaml", uri, "./lake", [{"database": database, "collection": "apps"}])
        code, out, err = run_cli("sync", "--workers", "1")
        assert code == 2 and err.strip().count("\n") == 0, err
        assert "wrong-password" not in out + err
        _only_config_left(workdir)
        assert "authentication failed" in err.lower(), err
    finally:
        client.admin.command("dropUser", user)


# --- collections that are not there -----------------------------------------------------------------


def test_a_collection_that_does_not_exist_is_refused(client, mongo_uri, database, workdir):
    client[database].apps.insert_one({"_id": 1})
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [{"database": database, "collection": "nope"}])
    code, out, err = run_cli("sync", "--workers", "1")
    _clear_failure(code, out, err, f"{database}.nope", "check the database and collection names")
    assert not list((workdir / "lake").rglob("*.parquet")) if (workdir / "lake").exists() else True


def test_a_collection_dropped_between_syncs_fails_clearly_and_keeps_the_lake(
    client, mongo_uri, database, workdir
):
    coll = client[database].gone
    coll.insert_many([{"_id": i, "v": i} for i in range(12)])
    url = f"duckdb:///{workdir / 'w.duckdb'}"
    entry = {"database": database, "collection": "gone", "bucket_size": 5}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry], warehouse={"url": url})
    assert run_cli("sync", "--workers", "1")[0] == 0
    folder = workdir / "lake" / database / "gone"
    before = lake_documents(folder)
    assert len(before) == 12
    coll.drop()
    code, out, err = run_cli("sync", "--workers", "1")
    assert lake_documents(folder) == before, "the dropped collection's lake files were rewritten"
    _clear_failure(code, out, err, f"{database}.gone", "dropped")


# --- large documents and hostile names ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["duckdb", "postgresql"])
def test_a_15_mb_document_loads_into_each_warehouse(client, mongo_uri, database, workdir, kind, request):
    """MongoDB's 16 MB document cap is below both limits (DuckDB VARCHAR 4 GB, PostgreSQL jsonb ~255 MB)."""
    url = f"duckdb:///{workdir / 'w.duckdb'}" if kind == "duckdb" else request.getfixturevalue("postgres_url")
    coll = client[database].big
    coll.insert_many([{"_id": 1, "s": "y" * (15 * 1024 * 1024), "n": [1] * 1000}, {"_id": 2, "s": "small"}])
    entry = {"database": database, "collection": "big"}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry], warehouse={"url": url})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert_same_documents(
        mongo_documents(client, database, "big"), lake_documents(workdir / "lake" / database / "big")
    )
    assert_table_exact(url, database, coll)


def test_oversize_for_redshift_is_named_in_the_generated_load():
    """Redshift stages `_doc` as VARCHAR(65535): a larger document is named, not cut (generated SQL only)."""
    import pyarrow as pa

    from aries_assets.core.warehouse.loader import RedshiftDialect, TableRef, oversize_documents

    limit = RedshiftDialect.max_document_bytes
    docs = [
        "x" * limit,
        "y" * (limit + 1),
        "\u00e9" * (limit // 2 + 1),
    ]  # the last is over in bytes, not chars
    data = pa.table({"_id": ["at", "over", "multibyte"], "_doc": docs})
    assert oversize_documents(data, limit) == ["over", "multibyte"]
    with pytest.raises(Exception, match="1-63 bytes"):
        TableRef("s", "t" * 64)


HOSTILE_COLLECTIONS = [
    "with space",
    "\u00fcn\u00efcode \U0001f600",
    'quo"te',
    "dots.in.name",
    "DROP TABLE x; --",
    "slash/in/name",
    "-leading-dash",  # ".." cannot be in a collection name: MongoDB and pymongo refuse it
    "back\\slash",
    "x" * 63,
]


def test_hostile_collection_names_stay_inside_the_lake_and_load_as_tables(
    client, mongo_uri, database, workdir
):
    for name in HOSTILE_COLLECTIONS:
        client[database].get_collection(name).insert_many([{"_id": 1, "n": name}, {"_id": 2}])
    url = f"duckdb:///{workdir / 'w.duckdb'}"
    entries = [{"database": database, "collection": n} for n in HOSTILE_COLLECTIONS]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", entries, warehouse={"url": url})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    lake = (workdir / "lake").resolve()
    files = [p.resolve() for p in workdir.rglob("*.parquet")]
    assert len(files) == len(HOSTILE_COLLECTIONS)
    assert all(lake in p.parents for p in files), files
    assert set(table_names(url)) >= {f"{database}.{n}" for n in HOSTILE_COLLECTIONS}
    for name in HOSTILE_COLLECTIONS:
        assert_table_exact(url, database, client[database].get_collection(name))


@pytest.mark.parametrize("workers", ["0", "-3", "65", "two"])
def test_workers_outside_1_to_64_are_refused_on_the_command_line(workdir, capsys, workers):
    with pytest.raises(SystemExit) as exited:
        main(["sync", "--workers", workers])
    assert exited.value.code == 2
    assert f"--workers: must be a whole number from 1 to 64, got '{workers}'" in capsys.readouterr().err


def test_values_an_override_cannot_hold_are_said_by_aries_sync_not_only_in_the_ui(
    client, mongo_uri, database, workdir
):
    """`name: int32` over text: the column is null, `_doc` keeps every value, and the terminal says so
    (the failed type_conformance check alone is in the UI, which a cron user never opens)."""
    client[database].people.insert_many([{"_id": i, "name": f"person {i}"} for i in range(40)])
    entry = {"database": database, "collection": "people", "bucket_size": 10, "schema": {"name": "int32"}}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry])
    code, out, err = run_cli("sync", "--workers", "1", "--plain")
    assert code == 0, out + err
    lines = [line for line in (out + err).splitlines() if "type_conformance" in line]
    assert len(lines) == 2, out + err  # the first bucket, then how many in all
    assert f"{database}.people" in lines[0] and "name: 10" in lines[0] and "_doc" in lines[0], lines[0]
    assert "4 buckets" in lines[1], lines[1]
    assert_same_documents(
        mongo_documents(client, database, "people"), lake_documents(workdir / "lake" / database / "people")
    )


def test_status_piped_into_a_reader_that_stops_early_is_not_a_traceback(mongo_uri, database, workdir):
    """`aries status --json | head`: the reader leaves after a line; more than a pipe's buffer is left."""
    import os
    import subprocess
    import sys

    entries = [{"database": database, "collection": f"c{i:03d}"} for i in range(300)]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", entries)
    status = subprocess.Popen(
        [sys.executable, "-m", "aries_assets.cli", "status", "--json"],
        cwd=workdir,
        env={**os.environ, "DAGSTER_HOME": str(workdir / ".dagster")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert status.stdout.readline().strip() == b"["
    status.stdout.close()  # as `head -1` does
    err = status.stderr.read().decode()
    status.wait(60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-2000:]


def test_a_query_mongodb_refuses_is_one_line_naming_the_query(client, mongo_uri, database, workdir):
    client[database].apps.insert_many([{"_id": i, "name": f"a{i}"} for i in range(5)])
    entry = {"database": database, "collection": "apps", "query": {"name": {"$foo": 1}}}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry])
    code, out, err = run_cli("sync", "--workers", "1", "--plain")
    _clear_failure(code, out, err, f"{database}.apps", "unknown operator: $foo", "query")
    assert "full error" not in out + err and "RawBSONDocument" not in out + err, out + err
