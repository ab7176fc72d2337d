"""Every column type the schema can produce, loaded by the real loader and read back value by value.

PostgreSQL and DuckDB run here; Redshift cannot, so its generated SQL is checked per type.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal

import duckdb
import psycopg2
import pyarrow as pa
import pytest

from aries_assets.core import schema as s
from aries_assets.core.arrow import arrow_type
from aries_assets.core.warehouse.loader import (
    RedshiftDialect,
    RedshiftLoader,
    TableRef,
    WarehouseError,
    open_loader,
)

TABLE = TableRef("app", "typed")
MS = 1
YEAR_1 = -62_135_596_800_000  # 0001-01-01T00:00:00Z in epoch milliseconds
INF = float("inf")

# column name -> (type, values). Row i of every column belongs to _id str(i).
COLUMNS: dict[str, tuple[str, list]] = {
    "ts": (
        s.T_TIMESTAMP,
        [
            0,
            -1,
            -3_155_759_999_877,
            1_700_000_000_123,
            YEAR_1 + 1,  # 0001-01-01T00:00:00.001Z: far from the epoch, with milliseconds
            YEAR_1 - 86_400_000 * 366 * 3,
            253_402_300_799_999,  # 9999-12-31T23:59:59.999Z, the usual "never expires"
            None,
        ],
    ),
    "dec": (
        "decimal(38,4)",
        [
            Decimal("1234567890123456789012345678901234.5678"),
            Decimal("-1234567890123456789012345678901234.5678"),
            Decimal("-0.0001"),
            Decimal("0.0000"),
            Decimal("42.1000"),
            None,
            Decimal("1.0000"),
            Decimal("-7.0500"),
        ],
    ),
    "dec0": ("decimal(38,0)", [Decimal(10**37), Decimal(-(10**37)), None, 0, 1, -1, 2, 3]),
    "l_int32": ("list<int32>", [[1, -(2**31), 2**31 - 1], [], None, [None, 0], [5], [6], [7], [8]]),
    "l_int64": ("list<int64>", [[2**63 - 1, -(2**63)], [0], [None], None, [], [1], [2], [3]]),
    "l_double": (
        "list<double>",
        [[1.5, math.nan, INF, -INF], [-0.0, 5e-324], None, [], [None], [2.5], [1e300], [3.0]],
    ),
    "l_decimal": (
        "list<decimal(38,2)>",
        [
            [Decimal("12345678901234567890123456789012345.67")],
            [Decimal("-0.01"), None],
            None,
            [],
            [Decimal("1.00")],
            [Decimal("2.50")],
            [Decimal("0.00")],
            [Decimal("-3.25")],
        ],
    ),  # fmt: skip
    "l_bool": ("list<bool>", [[True, False], [None], None, [], [True], [False], [True, True], [False]]),
    "l_string": (
        "list<string>",
        [["a", 'q"uote', "back\\slash", "new\nline", "é漢🙂"], [""], None, [], [None], ["x"], ["y"], ["z"]],
    ),  # fmt: skip
    "l_ts": (
        "list<timestamp>",
        [
            [0, -1, 1_700_000_000_123],
            [YEAR_1 - 86_400_000 * 366 * 3 + 7],
            [253_402_300_799_999, 253_402_300_800_000],
            None,
            [],
            [None],
            [5],
            [6],
        ],
    ),  # fmt: skip
    "js": (
        s.T_JSON,
        [
            '{"a": [1, {"b": null}], "c": "x"}',
            '[1, 2.5, "three", {"$numberDecimal": "1.10"}]',
            '"just a string"',
            "12345678901234567890",
            '{"nested": {"deep": {"deeper": [true, false]}}}',
            None,
            "{}",
            "[]",
        ],
    ),
    "bin": (s.T_BINARY, [b"\x00\x01\xfe\xff", b"", None, b"\\x00", b"plain", bytes(range(256)), b"\n", b'"']),
    "flag": (s.T_BOOL, [True, False, None, True, False, True, False, True]),
    "i32": (s.T_INT32, [2**31 - 1, -(2**31), 0, None, 1, -1, 7, 8]),
    "i64": (s.T_INT64, [2**63 - 1, -(2**63), 0, None, 2**53 + 1, -1, 7, 8]),
    "dbl": (s.T_DOUBLE, [1.5, math.nan, INF, -INF, -0.0, 5e-324, 1.7976931348623157e308, None]),
    "txt": (
        s.T_STRING,
        ["", None, 'comma, "quote"', "new\nline\r\n", "back\\slash", "é漢字🙂", "\\N", "NULL"],
    ),
}
ROWS = 8


def typed_schema() -> s.InferredSchema:
    columns = [s.ColumnSpec((n,), n, t, s.accepted_kinds(t)) for n, (t, _) in COLUMNS.items()]
    return s.InferredSchema(version=1, columns=columns)


def typed_data() -> pa.Table:
    arrays = {
        "_id": pa.array([str(i) for i in range(ROWS)]),
        "_id_key": pa.array([f'{{"$numberInt": "{i}"}}' for i in range(ROWS)]),
        "_doc": pa.array([f'{{"n": {i}}}' for i in range(ROWS)]),
    }
    for name, (type_name, values) in COLUMNS.items():
        arrays[name] = pa.array(values, arrow_type(type_name))
    return pa.table(arrays)


@pytest.fixture(params=["postgresql", "postgresql in a DST time zone", "duckdb"])
def url(request, tmp_path, monkeypatch):
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    if "DST" in request.param:  # the session's time zone must not move a single value
        monkeypatch.setenv("PGTZ", "America/New_York")
    return request.getfixturevalue("postgres_url")


def read_rows(url: str, select: str) -> list[tuple]:
    sql = f'SELECT "_id", {select} FROM "app"."typed" ORDER BY CAST("_id" AS INTEGER)'
    if url.startswith("duckdb"):
        with duckdb.connect(url.removeprefix("duckdb:///"), read_only=True) as connection:
            return connection.execute(sql).fetchall()
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def column_values(url: str, name: str) -> list:
    """One column as Python values, read in a form that keeps every value exact."""
    type_name = COLUMNS[name][0]
    duck = url.startswith("duckdb")
    if type_name == s.T_TIMESTAMP:
        # PostgreSQL's epoch is numeric, to the microsecond: a value a microsecond off reads as such.
        expression = f'epoch_ms("{name}")' if duck else f'EXTRACT(EPOCH FROM "{name}") * 1000'
    elif type_name.startswith("list<") and not duck:
        expression = f'CAST("{name}" AS TEXT)'  # jsonb as text: numbers keep every digit
    elif type_name == "list<timestamp>" and duck:
        expression = f'list_transform("{name}", lambda x: epoch_ms(x))'
    elif type_name == s.T_JSON:
        expression = f'CAST("{name}" AS {"VARCHAR" if duck else "TEXT"})'
    else:
        expression = f'"{name}"'
    rows = read_rows(url, expression)
    assert [r[0] for r in rows] == [str(i) for i in range(ROWS)]
    values = [r[1] for r in rows]
    if type_name.startswith("list<") and not duck:
        values = [None if v is None else json.loads(v, parse_float=Decimal) for v in values]
    if type_name == s.T_BINARY:
        values = [None if v is None else bytes(v) for v in values]
    return values


def same(expected, actual) -> bool:
    if isinstance(expected, float) and math.isnan(expected):
        return isinstance(actual, float) and math.isnan(actual)
    if isinstance(expected, float) and isinstance(actual, float):
        return expected == actual and math.copysign(1, expected) == math.copysign(1, actual)
    return expected == actual


def test_every_column_type_loads_exactly(url):
    loader = open_loader(url)
    loaded = loader.replace_bucket(TABLE, typed_schema(), "rebuild", "b1", "digest-1", typed_data(), "")
    assert loaded.rows == ROWS

    for name, (type_name, expected) in COLUMNS.items():
        actual = column_values(url, name)
        if type_name == s.T_JSON:
            parse = [None if v is None else json.loads(v) for v in expected]
            assert [None if v is None else json.loads(v) for v in actual] == parse, name
            continue
        if type_name.startswith("list<") and not url.startswith("duckdb"):
            expected = [None if v is None else [_json_element(type_name, e) for e in v] for v in expected]
        elif type_name.startswith("list<"):
            expected = [None if v is None else [_duck_element(type_name, e) for e in v] for v in expected]
        elif type_name.startswith("decimal"):
            expected = [None if v is None else Decimal(v) for v in expected]
        for row, (want, got) in enumerate(zip(expected, actual, strict=True)):
            if isinstance(want, list) and isinstance(got, list):
                assert len(want) == len(got) and all(map(same, want, got)), (name, row, want, got)
            else:
                assert same(want, got), (name, row, want, got)
    assert loader.loaded(TABLE) == {"b1": "digest-1"}


def _json_element(type_name: str, value):
    """How a list element reads back from PostgreSQL's jsonb (see `_json_list` in the loader)."""
    if value is None:
        return None
    if type_name == "list<double>":
        # JSON has no NaN or infinities: they are the strings PostgreSQL itself prints for them.
        if math.isnan(value) or math.isinf(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return Decimal(repr(value))  # jsonb numbers are numeric: exact, but without a negative zero
    if type_name == "list<timestamp>":
        import pyarrow.compute as pc

        stamp = pa.array([value], pa.timestamp("ms", tz="UTC"))
        return pc.strftime(stamp, format="%Y-%m-%dT%H:%M:%SZ")[0].as_py()
    return value


def _duck_element(type_name: str, value):
    if type_name == "list<decimal(38,2)>" and value is not None:
        return Decimal(value)
    return value


def test_postgres_names_the_nul_character_it_cannot_store(postgres_url):
    loader = open_loader(postgres_url)
    schema = s.InferredSchema(
        version=1, columns=[s.ColumnSpec(("txt",), "txt", s.T_STRING, s.accepted_kinds(s.T_STRING))]
    )
    data = pa.table(
        {
            "_id": ["ok", "bad"],
            "_id_key": ['"ok"', '"bad"'],
            "_doc": ['{"txt": "a"}', '{"txt": "a\\u0000b"}'],
            "txt": ["a", "a\x00b"],
        }
    )
    with pytest.raises(WarehouseError) as error:
        loader.replace_bucket(TABLE, schema, "rebuild", "b1", "d", data, "")
    message = str(error.value)
    assert "app.typed" in message and "bucket b1" in message and "column txt" in message
    assert "_id bad" in message and "NUL" in message and "schema.exclude" in message
    assert loader.loaded(TABLE) == {}, "nothing was loaded"

    # Only in `_doc` (the field is no column): still named, with the field unknown but the _id given.
    only_doc = data.drop_columns(["txt"])
    no_columns = s.InferredSchema(version=1)
    with pytest.raises(WarehouseError, match=r"column _doc of _id bad"):
        loader.replace_bucket(TABLE, no_columns, "rebuild", "b1", "d", only_doc, "")

    # An escaped backslash before "u0000" is text, not a NUL: it loads.
    fine = pa.table(
        {"_id": ["x"], "_id_key": ['"x"'], "_doc": ['{"txt": "a\\\\u0000"}'], "txt": ["a\\u0000"]}
    )
    assert loader.replace_bucket(TABLE, schema, "rebuild", "b1", "d", fine, "").rows == 1


def redshift_loader() -> RedshiftLoader:
    return RedshiftLoader(RedshiftDialect(), lambda: None, "arn:aws:iam::123456789012:role/aries")


def test_redshift_sql_for_every_column_type():
    schema = typed_schema()
    loader = redshift_loader()
    columns = dict(loader.columns_sql(schema))
    expected = {
        "ts": "TIMESTAMPTZ",
        "dec": "DECIMAL(38,4)",
        "dec0": "DECIMAL(38,0)",
        "js": "SUPER",
        "bin": "VARBYTE(65535)",
        "flag": "BOOLEAN",
        "i32": "INTEGER",
        "i64": "BIGINT",
        "dbl": "DOUBLE PRECISION",
        "txt": "VARCHAR(256)",
    }
    expected.update({n: "SUPER" for n, (t, _) in COLUMNS.items() if t.startswith("list<")})
    assert {n: columns[n] for n in COLUMNS} == expected

    # Staging: Parquet columns COPY straight into their types, except JSON text, which JSON_PARSE turns
    # into SUPER on insert (COPY would keep it a SUPER string); lists arrive as SUPER arrays.
    stage, copy = loader.stage_sql('"stg"', TABLE, schema, "s3://lake/app/typed/b1.parquet")
    assert '"js" VARCHAR(65535)' in stage and '"_doc" VARCHAR(65535)' in stage
    assert '"l_ts" SUPER' in stage and '"ts" TIMESTAMPTZ' in stage and '"bin" VARBYTE(65535)' in stage
    assert "FORMAT AS PARQUET SERIALIZETOJSON" in copy
    insert = next(
        q for q in loader.replace_sql(TABLE, schema, '"stg"', "b1", "d") if q.startswith('INSERT INTO "app"')
    )
    assert 'JSON_PARSE("_doc")' in insert and 'JSON_PARSE("js")' in insert
    assert '"l_ts"' in insert and 'JSON_PARSE("l_ts")' not in insert and '"ts"' in insert
