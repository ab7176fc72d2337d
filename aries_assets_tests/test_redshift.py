"""Redshift: the generated SQL, and every statement PostgreSQL can also run, run against PostgreSQL."""

from __future__ import annotations

from collections import Counter

import psycopg2
import pyarrow as pa
import pytest

from aries_assets.core import schema as s
from aries_assets.core.warehouse.loader import (
    PostgresDialect,
    PostgresLoader,
    RedshiftDialect,
    RedshiftLoader,
    TableRef,
    WarehouseError,
    canonical_type,
)
from aries_assets.resources import redshift_conn_args, redshift_resource

TABLE = TableRef("app", 'we"ird; DROP TABLE x')


def inferred() -> s.InferredSchema:
    name = s.FieldStats(kinds=Counter(string=3), max_bytes=40)
    stats = s.TypeStats(3, {("name",): name, ("n",): s.FieldStats(kinds=Counter(int64=3))})
    return s.resolve_schema(stats, None, s.SchemaOptions())


def loader() -> RedshiftLoader:
    return RedshiftLoader(RedshiftDialect(), lambda: None, "arn:aws:iam::123456789012:role/aries")


def test_create_table_uses_redshift_types_and_keys():
    create = loader().create_table_sql(TABLE, inferred())[1]
    assert create.startswith('CREATE TABLE "app"."we""ird; DROP TABLE x" (')
    assert '"_id" VARCHAR(2048) NOT NULL' in create and '"_doc" SUPER' in create
    assert '"name" VARCHAR(256) ENCODE ZSTD' in create and '"n" BIGINT,' in create
    assert '"_bucket" VARCHAR(2048) NOT NULL ENCODE RAW' in create
    assert create.endswith('DISTKEY("_id_key") SORTKEY("_bucket", "_id_key")')


def test_copy_reads_parquet_from_s3_with_a_role_and_no_keys():
    stage, copy = loader().stage_sql('"stg"', TABLE, inferred(), "s3://lake/app/events/first.parquet")
    assert stage.startswith('CREATE TEMP TABLE "stg" (') and '"_doc" VARCHAR(65535)' in stage
    assert copy == (
        "COPY \"stg\" FROM 's3://lake/app/events/first.parquet' "
        "IAM_ROLE 'arn:aws:iam::123456789012:role/aries' FORMAT AS PARQUET SERIALIZETOJSON"
    )
    with pytest.raises(WarehouseError, match="Redshift loads from S3"):
        loader().stage_sql('"stg"', TABLE, inferred(), "/local/first.parquet")


def test_replace_inserts_json_parse_of_doc():
    statements = loader().replace_sql(TABLE, inferred(), '"stg"', "first", "abc")
    insert = next(q for q in statements if q.startswith('INSERT INTO "app"'))
    assert 'JSON_PARSE("_doc")' in insert


def test_per_bucket_deletes_follow_the_sort_key():
    statements = loader().replace_sql(TABLE, inferred(), '"stg"', "first", "abc")
    assert statements[:2] == [
        'DELETE FROM "app"."we""ird; DROP TABLE x" WHERE "_bucket" = \'first\'',
        'DELETE FROM "app"."we""ird; DROP TABLE x" WHERE "_id_key" IN (SELECT "_id_key" FROM "stg")',
    ]
    stage = loader().stage_sql('"stg"', TABLE, inferred(), "s3://lake/a.parquet")[0]
    assert stage.endswith('DISTKEY("_id_key")')


def longer_names(longest: int) -> s.InferredSchema:
    name = s.FieldStats(kinds=Counter(string=3), max_bytes=longest)
    stats = s.TypeStats(3, {("name",): name, ("n",): s.FieldStats(kinds=Counter(int64=3))})
    return s.resolve_schema(stats, None, s.SchemaOptions())


def test_varchar_columns_widen_and_never_narrow():
    widen = loader().widen_sql
    assert widen(TABLE, longer_names(1000), {"name": 256, "_id": 2048, "_bucket": 2048}) == [
        'ALTER TABLE "app"."we""ird; DROP TABLE x" ALTER COLUMN "name" TYPE VARCHAR(2000)'
    ]
    assert widen(TABLE, longer_names(40), {"name": 2000}) == []
    assert widen(TABLE, longer_names(50_000), {"name": 2000})[0].endswith("TYPE VARCHAR(65535)")


def test_widths_are_read_and_widened_on_postgres(postgres_url):
    """information_schema and ALTER COLUMN ... TYPE VARCHAR(n) are the same on PostgreSQL."""
    redshift = loader()
    connection = psycopg2.connect(postgres_url)
    try:
        connection.autocommit = True  # as on Redshift, which resizes only outside a transaction block
        cursor = connection.cursor()
        cursor.execute('CREATE SCHEMA "app"')
        cursor.execute(
            'CREATE TABLE "app"."we""ird; DROP TABLE x" ("_id" VARCHAR(2048), "name" VARCHAR(256), "n" BIGINT)'
        )
        cursor.execute("""INSERT INTO "app"."we""ird; DROP TABLE x" VALUES ('1', 'short', 1)""")
        widths = redshift.column_widths(cursor, TABLE)
        assert widths == {"_id": 2048, "name": 256}
        for statement in redshift.widen_sql(TABLE, longer_names(1000), widths):
            cursor.execute(statement)
        assert redshift.column_widths(cursor, TABLE) == {"_id": 2048, "name": 2000}
        cursor.execute("""INSERT INTO "app"."we""ird; DROP TABLE x" VALUES ('2', %s, 2)""", ("x" * 1500,))
        cursor.execute('SELECT "name" FROM "app"."we""ird; DROP TABLE x" ORDER BY "_id"')
        assert cursor.fetchall() == [("short",), ("x" * 1500,)]
    finally:
        connection.close()


def test_redshift_url_goes_through_dagster_aws_resource():
    resource = redshift_resource("redshift://aries:p%40ss@cluster.example:5439/analytics")
    args = redshift_conn_args(resource)
    assert (args["host"], args["port"], args["user"], args["password"], args["database"]) == (
        "cluster.example",
        5439,
        "aries",
        "p@ss",
        "analytics",
    )


def test_the_postgres_runnable_statements_run_on_postgres(postgres_url):
    """Replace and evolution SQL is standard; run Redshift's replace and loads bookkeeping on PostgreSQL."""
    schema = inferred()
    redshift = loader()
    postgres = PostgresLoader(PostgresDialect(), lambda: psycopg2.connect(postgres_url))
    data = pa.table(
        {
            "_id": ["1", "2"],
            "_doc": ['{"a": 1}', '{"a": 2}'],
            "_id_key": ['"1"', '"2"'],
            "n": [1, 2],
            "name": ["x", "y"],
        }
    )
    postgres.replace_bucket(TABLE, schema, "rebuild", "first", "h1", data, "")
    with postgres.transaction() as cursor:
        cursor.execute(
            'CREATE TEMP TABLE "stg" AS SELECT "_id", "_doc", "_id_key", "n", "name" '
            'FROM "app"."we""ird; DROP TABLE x" LIMIT 0'
        )
        cursor.execute(
            """INSERT INTO "stg" VALUES ('2', '{"a": 3}', '"2"', 20, 'z'), ('3', '{"a": 4}', '"3"', 30, 'w')"""
        )
        for statement in redshift.replace_sql(TABLE, schema, '"stg"', "first", "h2"):
            cursor.execute(
                statement.replace('JSON_PARSE("_doc")', '"_doc"')
            )  # the one Redshift-only function
        cursor.execute('SELECT "_id", "n", "_bucket" FROM "app"."we""ird; DROP TABLE x" ORDER BY 1')
        assert cursor.fetchall() == [("2", 20, "first"), ("3", 30, "first")]
        cursor.execute(redshift.loads_table_sql())
    assert postgres.loaded(TABLE) == {"first": "h2"}


def test_type_spellings_compare_equal():
    assert canonical_type("character varying") == canonical_type("VARCHAR(256)") == "text"
    assert canonical_type("numeric(38,2)") == canonical_type("DECIMAL(38, 2)")
    assert canonical_type("timestamp with time zone") == canonical_type("TIMESTAMPTZ")
    assert canonical_type("INTEGER[]") == "list"


def test_oversize_documents_are_named_not_dropped():
    from aries_assets.core.warehouse.loader import oversize_documents

    data = pa.table({"_id": ["small", "big"], "_doc": ["{}", '{"x": "' + "y" * 70_000 + '"}']})
    assert oversize_documents(data, RedshiftDialect.max_document_bytes) == ["big"]
    assert oversize_documents(data, PostgresDialect.max_document_bytes) == []
