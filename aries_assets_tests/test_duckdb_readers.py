"""Readers of the warehouse are never blocked by Aries loading it.

A reader in another process runs the README's kind of join about 20 times a second while many
buckets load: it must never fail, and every answer must be a committed state (whole buckets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import psycopg2
import pyarrow as pa
import pytest

from aries_assets.core import schema as s
from aries_assets.core.warehouse.loader import DuckDBLoader, TableRef, open_loader

APPS, EVENTS = TableRef("app", "apps"), TableRef("app", "events")
ROWS_PER_BUCKET = 50
JOIN = (
    'SELECT a."name", COUNT(*) FROM "app"."events" e JOIN "app"."apps" a ON a."_id" = e."app_id" '
    'GROUP BY a."name" ORDER BY a."name"'
)

READER = textwrap.dedent(
    """
    import json, os, sys, time
    url, stop, sql = sys.argv[1], sys.argv[2], sys.argv[3]
    answers, errors = [], []
    while not os.path.exists(stop):
        try:
            if url.startswith("duckdb:///"):
                import duckdb
                with duckdb.connect(url.removeprefix("duckdb:///"), read_only=True) as connection:
                    rows = connection.execute(sql).fetchall()
            else:
                import psycopg2
                connection = psycopg2.connect(url)
                try:
                    with connection.cursor() as cursor:
                        cursor.execute(sql)
                        rows = cursor.fetchall()
                finally:
                    connection.close()
            answers.append([list(r) for r in rows])
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
        time.sleep(0.05)
    print(json.dumps({"answers": answers, "errors": errors}))
    """
)


def string_schema(*names: str) -> s.InferredSchema:
    columns = [s.ColumnSpec((n,), n, s.T_STRING, s.accepted_kinds(s.T_STRING)) for n in names]
    return s.InferredSchema(version=1, columns=columns)


def apps() -> pa.Table:
    return pa.table(
        {
            "_id": ["a1", "a2"],
            "_id_key": ['"a1"', '"a2"'],
            "_doc": ['{"_id": "a1"}', '{"_id": "a2"}'],
            "name": ["alpha", "beta"],
        }
    )


def events(bucket: int) -> pa.Table:
    ids = [f"{bucket:03d}-{i:03d}" for i in range(ROWS_PER_BUCKET)]
    return pa.table(
        {
            "_id": ids,
            "_id_key": [f'"{i}"' for i in ids],
            "_doc": [f'{{"_id": "{i}"}}' for i in ids],
            "app_id": ["a1" if i % 5 else "a2" for i in range(ROWS_PER_BUCKET)],
        }
    )


@pytest.fixture(params=["duckdb", "postgresql"])
def url(request, tmp_path):
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    return request.getfixturevalue("postgres_url")


def test_readers_are_never_blocked_by_loads(url, tmp_path):
    loader = open_loader(url)
    loader.replace_bucket(APPS, string_schema("name"), "rebuild", "all", "d", apps(), "")
    loader.replace_bucket(EVENTS, string_schema("app_id"), "rebuild", "b000", "d0", events(0), "")

    stop = tmp_path / "stop"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, url, str(stop), JOIN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # the reader is running
        for b in range(1, 60):
            loader.replace_bucket(
                EVENTS, string_schema("app_id"), "rebuild", f"b{b:03d}", f"d{b}", events(b), ""
            )
        time.sleep(0.5)
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
    report = json.loads(out)
    assert report["errors"] == [], report["errors"][:3]
    assert len(report["answers"]) >= 20, "the reader ran throughout"
    for answer in report["answers"]:  # every answer is whole buckets, 4 of 5 events for alpha
        total = sum(n for _, n in answer)
        assert total % ROWS_PER_BUCKET == 0 and dict(answer)["alpha"] * 5 == total * 4, answer
    totals = [sum(n for _, n in a) for a in report["answers"]]
    assert totals == sorted(totals) and totals[-1] == 60 * ROWS_PER_BUCKET

    # The published table is exact.
    sql = 'SELECT "_id", "app_id", "_bucket" FROM "app"."events" ORDER BY "_id"'
    if url.startswith("duckdb"):
        with duckdb.connect(url.removeprefix("duckdb:///"), read_only=True) as connection:
            rows = connection.execute(sql).fetchall()
    else:
        with psycopg2.connect(url) as connection, connection.cursor() as cursor:
            cursor.execute(sql)
            rows = cursor.fetchall()
    assert rows == [
        (f"{b:03d}-{i:03d}", "a1" if i % 5 else "a2", f"b{b:03d}")
        for b in range(60)
        for i in range(ROWS_PER_BUCKET)
    ]


def test_duckdb_publishes_only_what_changed(tmp_path):
    path = tmp_path / "warehouse.duckdb"
    loader = open_loader(f"duckdb:///{path}")
    assert isinstance(loader, DuckDBLoader)
    loader.replace_bucket(APPS, string_schema("name"), "rebuild", "all", "d", apps(), "")
    published = path.stat()
    assert loader.loaded(APPS) == {"all": "d"}  # reads commit nothing new: nothing is copied
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (published.st_ino, published.st_mtime_ns)

    # A reader holding the published file keeps its snapshot while the next load publishes anew.
    with duckdb.connect(str(path), read_only=True) as old_reader:
        loader.replace_bucket(APPS, string_schema("name"), "rebuild", "all", "d2", apps().slice(0, 1), "")
        assert old_reader.execute('SELECT COUNT(*) FROM "app"."apps"').fetchall() == [(2,)]
    with duckdb.connect(str(path), read_only=True) as new_reader:
        assert new_reader.execute('SELECT COUNT(*) FROM "app"."apps"').fetchall() == [(1,)]
    assert path.stat().st_ino != published.st_ino
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["warehouse.duckdb"]


def test_duckdb_takes_over_a_file_written_in_place(tmp_path):
    """A warehouse file from before publishing (written in place, maybe with a WAL) keeps its tables."""
    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as old:
        old.execute("CREATE TABLE kept AS SELECT 42 AS answer")
    loader = open_loader(f"duckdb:///{path}")
    loader.replace_bucket(APPS, string_schema("name"), "rebuild", "all", "d", apps(), "")
    with duckdb.connect(str(path), read_only=True) as reader:
        assert reader.execute("SELECT answer FROM kept").fetchall() == [(42,)]
        assert reader.execute('SELECT COUNT(*) FROM "app"."apps"').fetchall() == [(2,)]


def test_duckdb_writers_wait_for_each_other(tmp_path):
    """Several Aries processes load one DuckDB warehouse: each waits its turn, none is lost."""
    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    open_loader(url).replace_bucket(APPS, string_schema("name"), "rebuild", "all", "d", apps(), "")
    writer = textwrap.dedent(
        """
        import sys
        import pyarrow as pa
        from aries_assets_tests.test_duckdb_readers import EVENTS, events, string_schema
        from aries_assets.core.warehouse.loader import open_loader
        url, first = sys.argv[1], int(sys.argv[2])
        loader = open_loader(url)
        for b in range(first, first + 10):
            loader.replace_bucket(EVENTS, string_schema("app_id"), "rebuild", f"b{b:03d}", "d", events(b), "")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", writer, url, str(first)], env=env, stderr=subprocess.PIPE, text=True
        )
        for first in (0, 10, 20)
    ]
    for process in writers:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as reader:
        assert reader.execute('SELECT COUNT(*) FROM "app"."events"').fetchall() == [(30 * ROWS_PER_BUCKET,)]
    assert len(open_loader(url).loaded(EVENTS)) == 30
