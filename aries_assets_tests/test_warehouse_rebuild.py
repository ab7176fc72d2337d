"""Rebuilding a table under a shadow name: readers see the whole old table or the whole new one.

Also the PostgreSQL indexes that keep a bucket's replacement from scanning the whole table.
"""

from __future__ import annotations

import threading
import time

import duckdb
import psycopg2
import pyarrow as pa
import pytest

from aries_assets.core import schema as s
from aries_assets.core.warehouse.loader import (
    KEY_COLUMN,
    LOADS_TABLE,
    BucketLoad,
    RebuildNeeded,
    TableRef,
    open_loader,
)

TABLE = TableRef("app", "events")


def schema_with(v_type: str) -> s.InferredSchema:
    columns = [
        s.ColumnSpec(("gen",), "gen", s.T_INT32, s.accepted_kinds(s.T_INT32)),
        s.ColumnSpec(("v",), "v", v_type, s.accepted_kinds(v_type)),
    ]
    return s.InferredSchema(version=1 if v_type == s.T_INT64 else 2, columns=columns)


def bucket_rows(bucket: int, rows: int, gen: int) -> pa.Table:
    ids = [f"{bucket:04d}-{i:04d}" for i in range(rows)]
    values = [bucket * 1000 + i for i in range(rows)]
    return pa.table(
        {
            "_id": ids,
            "_id_key": [f'"{_id}"' for _id in ids],
            "_doc": [f'{{"_id": "{_id}", "v": {v}}}' for _id, v in zip(ids, values, strict=True)],
            "gen": pa.array([gen] * rows, pa.int32()),
            "v": pa.array(
                values if gen == 1 else [f"v{v}" for v in values], pa.int64() if gen == 1 else pa.string()
            ),
        }
    )


@pytest.fixture(params=["postgresql", "duckdb"])
def url(request, tmp_path):
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    return request.getfixturevalue("postgres_url")


def query(url: str, sql: str) -> list[tuple]:
    """What a reader sees: its own connection, read-only for DuckDB, a fresh snapshot each time."""
    if url.startswith("duckdb"):
        with duckdb.connect(url.removeprefix("duckdb:///"), read_only=True) as connection:
            return connection.execute(sql).fetchall()
    connection = psycopg2.connect(url)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        connection.close()


class ReaderLoop:
    """Runs `sql` every `interval` seconds in another thread, keeping every answer and every error."""

    def __init__(self, url: str, sql: str, interval: float = 0.05) -> None:
        self.url, self.sql, self.interval = url, sql, interval
        self.answers: list[tuple] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(tuple(query(self.url, self.sql)[0]))
            except Exception as error:  # every failure is a finding
                self.errors.append(f"{type(error).__name__}: {error}")
            time.sleep(self.interval)

    def __enter__(self) -> ReaderLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_a_retype_asks_for_a_rebuild_and_leaves_the_table_alone(url):
    loader = open_loader(url)
    loader.replace_bucket(TABLE, schema_with(s.T_INT64), "rebuild", "b0", "d0", bucket_rows(0, 5, 1), "")
    with pytest.raises(RebuildNeeded) as error:
        loader.replace_bucket(TABLE, schema_with(s.T_STRING), "rebuild", "b0", "d1", bucket_rows(0, 5, 2), "")
    assert error.value.table == TABLE and error.value.columns == ["v"]
    assert "app.events" in str(error.value) and "v" in str(error.value)
    assert query(url, 'SELECT COUNT(*), MIN(gen) FROM "app"."events"') == [(5, 1)]
    assert loader.loaded(TABLE) == {"b0": "d0"}


def test_readers_see_the_whole_old_table_or_the_whole_new_one_during_a_rebuild(url):
    loader = open_loader(url)
    old = schema_with(s.T_INT64)
    for b in range(30):
        loader.replace_bucket(TABLE, old, "rebuild", f"b{b:02d}", f"old{b}", bucket_rows(b, 100, 1), "")
    sql = 'SELECT COUNT(*), MIN(gen), MAX(gen), COUNT(DISTINCT "_bucket") FROM "app"."events"'
    assert query(url, sql) == [(3000, 1, 1, 30)]

    def new_buckets():
        for b in range(31):  # one bucket more than before
            time.sleep(0.03)
            yield BucketLoad(f"b{b:02d}", f"new{b}", bucket_rows(b, 100, 2))

    with ReaderLoop(url, sql) as reader:
        time.sleep(0.2)
        loaded = open_loader(url).rebuild(TABLE, schema_with(s.T_STRING), new_buckets())
        time.sleep(0.3)
    assert reader.errors == []
    assert set(reader.answers) == {(3000, 1, 1, 30), (3100, 2, 2, 31)}, set(reader.answers)
    assert reader.answers[0] == (3000, 1, 1, 30) and reader.answers[-1] == (3100, 2, 2, 31)
    assert len(loaded) == 31 and sum(b.rows for b in loaded) == 3100

    assert loader.loaded(TABLE) == {f"b{b:02d}": f"new{b}" for b in range(31)}
    rows = query(url, 'SELECT "_id", "v", "_bucket" FROM "app"."events" ORDER BY "_id"')
    assert rows == [
        (f"{b:04d}-{i:04d}", f"v{b * 1000 + i}", f"b{b:02d}") for b in range(31) for i in range(100)
    ]
    tables = query(
        url, "SELECT COUNT(*) FROM information_schema.tables WHERE table_name LIKE '%aries_rebuild%'"
    )
    assert tables == [(0,)], "the shadow table is gone"
    assert query(url, f"SELECT COUNT(*) FROM {LOADS_TABLE} WHERE table_name LIKE '%aries_rebuild%'") == [(0,)]

    # The rebuilt table is an ordinary one: the next bucket replaces as before.
    loader.replace_bucket(TABLE, schema_with(s.T_STRING), "rebuild", "b05", "newer", bucket_rows(5, 3, 2), "")
    assert query(url, sql) == [(3003, 2, 2, 31)]


def test_a_rebuild_left_half_done_is_started_again(url):
    loader = open_loader(url)
    new = schema_with(s.T_STRING)

    def failing():
        yield BucketLoad("b00", "new0", bucket_rows(0, 10, 2))
        raise RuntimeError("lake read failed")

    with pytest.raises(RuntimeError):
        loader.rebuild(TABLE, new, failing())
    loaded = loader.rebuild(TABLE, new, [BucketLoad("b00", "n0", bucket_rows(0, 10, 2))])
    assert [b.rows for b in loaded] == [10]
    assert query(url, 'SELECT COUNT(*) FROM "app"."events"') == [(10,)]
    assert loader.loaded(TABLE) == {"b00": "n0"}


def indexed_columns(url: str) -> set[str]:
    rows = query(
        url,
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
        "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        'WHERE i.indrelid = \'"app"."events"\'::regclass',
    )
    return {r[0] for r in rows}


def test_postgres_bucket_and_key_deletes_use_indexes(postgres_url):
    loader = open_loader(postgres_url)
    schema = schema_with(s.T_INT64)
    for b in range(50):
        loader.replace_bucket(TABLE, schema, "rebuild", f"b{b:02d}", f"d{b}", bucket_rows(b, 100, 1), "")
    assert indexed_columns(postgres_url) >= {"_bucket", KEY_COLUMN}

    statements = loader.replace_sql(TABLE, schema, '"stage"', "b07", "d")
    deletes = [q for q in statements if q.startswith('DELETE FROM "app"."events"')]
    assert len(deletes) == 2, "one delete by bucket, one by key: an OR of both cannot use an index"
    connection = psycopg2.connect(postgres_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute('ANALYZE "app"."events"')
            cursor.execute(
                'CREATE TEMP TABLE "stage" AS SELECT * FROM "app"."events" WHERE "_bucket" = \'b07\' LIMIT 20'
            )
            cursor.execute('ANALYZE "stage"')
            for delete in deletes:
                cursor.execute(f"EXPLAIN {delete}")
                plan = "\n".join(r[0] for r in cursor.fetchall())
                assert "Index" in plan and "Seq Scan on events" not in plan, plan
    finally:
        connection.rollback()
        connection.close()


def test_postgres_indexes_are_added_to_a_table_created_without_them(postgres_url):
    loader = open_loader(postgres_url)
    schema = schema_with(s.T_INT64)
    loader.replace_bucket(TABLE, schema, "rebuild", "b0", "d0", bucket_rows(0, 5, 1), "")
    connection = psycopg2.connect(postgres_url)
    with connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT format('DROP INDEX %I.%I', schemaname, indexname) FROM pg_indexes "
            "WHERE schemaname = 'app' AND tablename = 'events'"
        )
        for (drop,) in cursor.fetchall():
            cursor.execute(drop)
    connection.close()
    assert indexed_columns(postgres_url) == set()
    loader.replace_bucket(TABLE, schema, "rebuild", "b1", "d1", bucket_rows(1, 5, 1), "")
    assert indexed_columns(postgres_url) >= {"_bucket", KEY_COLUMN}


def test_a_table_with_the_longest_name_rebuilds(url):
    table = TableRef("app", "e" * 63)
    loader = open_loader(url)
    loader.replace_bucket(table, schema_with(s.T_INT64), "rebuild", "b0", "d0", bucket_rows(0, 5, 1), "")
    loader.rebuild(table, schema_with(s.T_STRING), [BucketLoad("b0", "d1", bucket_rows(0, 7, 2))])
    assert query(url, f'SELECT COUNT(*), MIN(gen) FROM "app"."{"e" * 63}"') == [(7, 2)]
    loader.replace_bucket(table, schema_with(s.T_STRING), "rebuild", "b1", "d2", bucket_rows(1, 2, 2), "")
    assert loader.loaded(table) == {"b0": "d1", "b1": "d2"}


def test_a_value_the_warehouse_refuses_names_table_and_bucket(postgres_url):
    from aries_assets.core.warehouse.loader import WarehouseError

    schema = s.InferredSchema(
        version=1, columns=[s.ColumnSpec(("t",), "t", s.T_TIMESTAMP, s.accepted_kinds(s.T_TIMESTAMP))]
    )
    beyond = pa.table(
        {
            "_id": ["1"],
            "_id_key": ['"1"'],
            "_doc": ["{}"],
            "t": pa.array([10**16], pa.timestamp("ms", tz="UTC")),
        }
    )
    with pytest.raises(WarehouseError, match=r"app\.events bucket b0: .*out of range"):
        open_loader(postgres_url).replace_bucket(TABLE, schema, "rebuild", "b0", "d", beyond, "")
