"""Load bucket files into warehouse tables, one bucket per transaction.

Each table holds `_id`, `_doc`, `_bucket` and the collection schema's columns.
Replacing a bucket is one transaction: stage the bucket's rows, delete the
rows of that bucket and any row with a staged key (so a document that moved
between buckets is never there twice), insert the staged rows, and record
which lake file was loaded in `_aries_loads`. A crash anywhere rolls back to
the previous rows; a retry does the same work again.

A column that must change type takes a rebuild: `replace_bucket` raises
`RebuildNeeded`, and the caller passes every bucket to `rebuild`, which builds
the table under a shadow name and swaps it in at once. Readers never see a
partial table, and DuckDB readers never wait for a load (see `DuckDBLoader`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from aries_assets.core import schema as s
from aries_assets.core.arrow import arrow_type

LOADS_TABLE = "_aries_loads"
MAX_IDENTIFIER_BYTES = 63
# The column a document is found by across buckets (a document that moved is deleted by it).
# Rows are matched by this column, not `_id`: `_id` text is the same for 5 and "5", the key is not.
KEY_COLUMN = "_id_key"
REBUILD_SUFFIX = "__aries_rebuild"


class WarehouseError(RuntimeError):
    """A warehouse operation failed; names the table and bucket, never credentials."""


class BucketRefused(WarehouseError):
    """The warehouse cannot hold one bucket's data as it is (a NUL character, a document over its size
    limit): that bucket waits for its data or the config to change; the others still load."""

    def __init__(self, message: str, bucket: str) -> None:
        super().__init__(message)
        self.bucket = bucket


class RebuildNeeded(WarehouseError):
    """Columns of a table must change type, which takes a rebuild from every bucket (`Loader.rebuild`).

    Raised by `Loader.replace_bucket` before it changes anything, with `evolution: rebuild`.
    """

    def __init__(self, table: TableRef, columns: list[str]) -> None:
        self.table = table
        self.columns = columns
        super().__init__(
            f"{table.label}: columns {', '.join(columns)} must change type; rebuild the table from "
            "every bucket (Loader.rebuild) before loading this one"
        )


@dataclass(frozen=True)
class TableRef:
    schema: str
    table: str

    def __post_init__(self) -> None:
        for part in (self.schema, self.table):
            if not part or len(part.encode()) > MAX_IDENTIFIER_BYTES or "\0" in part:
                raise WarehouseError(
                    f"warehouse name {part!r} must be 1-{MAX_IDENTIFIER_BYTES} bytes; "
                    "set warehouse_schema / warehouse_table for this collection"
                )

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class BucketLoad:
    """One bucket to load: its key, the content hash of its lake file, its rows and the file's URI
    (Redshift COPYs from the URI; DuckDB and PostgreSQL take the rows)."""

    key: str
    digest: str
    data: pa.Table
    file_uri: str = ""


@dataclass(frozen=True)
class LoadedBucket:
    table: str
    bucket: str
    rows: int
    actions: list[str]
    seconds: float


def bounded_name(name: str, suffix: str) -> str:
    """`name + suffix` within MAX_IDENTIFIER_BYTES; a shortened name gets a hash so two never meet."""
    if len((name + suffix).encode()) <= MAX_IDENTIFIER_BYTES:
        return name + suffix
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    room = MAX_IDENTIFIER_BYTES - len(suffix.encode()) - len(digest) - 1
    return name.encode()[:room].decode(errors="ignore") + "_" + digest + suffix


def shadow_of(table: TableRef) -> TableRef:
    """Where `rebuild` builds the new table before swapping it in."""
    return TableRef(table.schema, bounded_name(table.table, REBUILD_SUFFIX))


def index_name(table: str, column: str) -> str:
    return bounded_name(table, f"__{column.strip('_')}_idx")


def quote(identifier: str) -> str:
    """A quoted SQL identifier: any name from the data is safe inside it."""
    return '"' + identifier.replace('"', '""') + '"'


def literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class Dialect:
    name = "sql"
    json_type = "text"
    id_type = "text"
    max_document_bytes: int | None = None  # the largest `_doc` the table can hold
    holds_nul = True  # whether text can hold the NUL character (PostgreSQL's cannot)

    def column_type(self, column: s.ColumnSpec, stats: s.FieldStats | None) -> str:
        raise NotImplementedError

    def table_suffix(self) -> str:
        return ""

    def column_options(self, name: str, type_sql: str) -> str:
        """What follows a column's type in CREATE TABLE and ADD COLUMN (Redshift: its encoding)."""
        return ""

    indexed_columns: tuple[str, ...] = ()


class DuckDBDialect(Dialect):
    name = "duckdb"
    json_type = "JSON"
    id_type = "VARCHAR"
    _types = {
        s.T_BOOL: "BOOLEAN", s.T_INT32: "INTEGER", s.T_INT64: "BIGINT", s.T_DOUBLE: "DOUBLE",
        s.T_STRING: "VARCHAR", s.T_JSON: "JSON", s.T_TIMESTAMP: "TIMESTAMP WITH TIME ZONE", s.T_BINARY: "BLOB",
    }  # fmt: skip

    def column_type(self, column: s.ColumnSpec, stats: s.FieldStats | None) -> str:
        return self._type(column.type)

    def _type(self, type_name: str) -> str:
        if type_name.startswith("list<"):
            return f"{self._type(type_name[5:-1])}[]"
        decimal = s.parse_decimal(type_name)
        return f"DECIMAL({decimal[0]},{decimal[1]})" if decimal else self._types[type_name]


class PostgresDialect(Dialect):
    name = "postgresql"
    json_type = "jsonb"
    id_type = "text"
    holds_nul = False
    # Replacing a bucket deletes by `_bucket` and by the key: without these, each scans the table.
    indexed_columns = ("_bucket", KEY_COLUMN)
    _types = {
        s.T_BOOL: "boolean", s.T_INT32: "integer", s.T_INT64: "bigint", s.T_DOUBLE: "double precision",
        s.T_STRING: "text", s.T_JSON: "jsonb", s.T_TIMESTAMP: "timestamp with time zone", s.T_BINARY: "bytea",
    }  # fmt: skip

    def column_type(self, column: s.ColumnSpec, stats: s.FieldStats | None) -> str:
        if column.type.startswith("list<"):
            return "jsonb"
        decimal = s.parse_decimal(column.type)
        return f"numeric({decimal[0]},{decimal[1]})" if decimal else self._types[column.type]


class RedshiftDialect(Dialect):
    """Redshift: VARCHAR widths from the statistics, SUPER for JSON, DISTKEY/SORTKEY on `_id`."""

    name = "redshift"
    json_type = "SUPER"
    id_type = "VARCHAR(2048)"
    MAX_VARCHAR = 65535
    # `_doc` is staged as VARCHAR before JSON_PARSE makes it SUPER (itself capped at 16 MB).
    max_document_bytes = MAX_VARCHAR
    _types = {
        s.T_BOOL: "BOOLEAN", s.T_INT32: "INTEGER", s.T_INT64: "BIGINT", s.T_DOUBLE: "DOUBLE PRECISION",
        s.T_JSON: "SUPER", s.T_TIMESTAMP: "TIMESTAMPTZ", s.T_BINARY: "VARBYTE(65535)",
    }  # fmt: skip

    def column_type(self, column: s.ColumnSpec, stats: s.FieldStats | None) -> str:
        if column.type.startswith("list<"):
            return "SUPER"
        decimal = s.parse_decimal(column.type)
        if decimal:
            return f"DECIMAL({decimal[0]},{decimal[1]})"
        if column.type == s.T_STRING:
            longest = stats.max_bytes if stats else 0
            # Room to grow: twice the longest value seen, at least 256, at most Redshift's limit.
            return f"VARCHAR({min(self.MAX_VARCHAR, max(256, 2 * longest))})"
        return self._types[column.type]

    def table_suffix(self) -> str:
        # A bucket's rows are replaced together: with `_bucket` leading the sort key they sit in
        # few blocks, and zone maps let the per-bucket DELETE skip all others (the key second keeps
        # the moved-document DELETE and key lookups selective within a bucket). Distributing on the
        # key spreads rows evenly across slices (a bucket on one slice would skew), and the stage,
        # distributed the same way, joins the table without redistributing it.
        return f" DISTKEY({quote(KEY_COLUMN)}) SORTKEY({quote('_bucket')}, {quote(KEY_COLUMN)})"

    def column_options(self, name: str, type_sql: str) -> str:
        if not type_sql.startswith("VARCHAR"):
            return ""
        # Explicit encodings: Redshift can resize a VARCHAR column only if it is not BYTEDICT, RUNLENGTH,
        # TEXT255 or TEXT32K, which automatic encoding might pick. The leading sort key stays RAW.
        return " ENCODE RAW" if name == "_bucket" else " ENCODE ZSTD"

    @staticmethod
    def varchar_width(type_sql: str) -> int | None:
        match = re.match(r"^VARCHAR\((\d+)\)", type_sql)
        return int(match.group(1)) if match else None


DIALECTS = {
    "duckdb": DuckDBDialect,
    "postgresql": PostgresDialect,
    "postgres": PostgresDialect,
    "redshift": RedshiftDialect,
}


class Loader:
    """Keeps one warehouse's tables equal to the lake, bucket by bucket."""

    def __init__(self, dialect: Dialect, connect) -> None:
        self.dialect = dialect
        self._connect = connect  # () -> DB-API connection

    # --- SQL --------------------------------------------------------------------------------

    def table_sql(self, table: TableRef) -> str:
        return f"{quote(table.schema)}.{quote(table.table)}"

    def columns_sql(self, schema: s.InferredSchema) -> list[tuple[str, str]]:
        d = self.dialect
        columns = [
            ("_id", f"{d.id_type} NOT NULL"),
            ("_doc", d.json_type),
            (KEY_COLUMN, d.id_type),  # nullable: added to tables that predate it, filled as buckets reload
            ("_bucket", f"{d.id_type} NOT NULL"),
        ]
        for column in schema.columns:
            columns.append((column.name, d.column_type(column, schema.stats.fields.get(column.path))))
        return columns

    def create_table_sql(self, table: TableRef, schema: s.InferredSchema) -> list[str]:
        options = self.dialect.column_options
        body = ", ".join(f"{quote(n)} {t}{options(n, t)}" for n, t in self.columns_sql(schema))
        return [
            f"CREATE SCHEMA IF NOT EXISTS {quote(table.schema)}",
            f"CREATE TABLE {self.table_sql(table)} ({body}){self.dialect.table_suffix()}",
            *[self.create_index_sql(table, c) for c in self.dialect.indexed_columns],
        ]

    def create_index_sql(self, table: TableRef, column: str) -> str:
        return f"CREATE INDEX {quote(index_name(table.table, column))} ON {self.table_sql(table)} ({quote(column)})"

    def loads_table_sql(self) -> str:
        return (
            f"CREATE TABLE IF NOT EXISTS {quote(LOADS_TABLE)} (table_name VARCHAR(300) NOT NULL, "
            "bucket VARCHAR(300) NOT NULL, content_sha256 VARCHAR(64) NOT NULL, rows_loaded BIGINT NOT NULL, "
            "schema_version INTEGER NOT NULL, loaded_at VARCHAR(40) NOT NULL)"
        )

    def replace_sql(
        self, table: TableRef, schema: s.InferredSchema, stage: str, bucket: str, digest: str
    ) -> list[str]:
        """The statements after staging: delete the bucket's rows and any re-staged `_id`, insert, record."""
        target = self.table_sql(table)
        typed = staged_types(schema)
        names = list(typed)
        select = ", ".join(self.stage_expression(n, t) for n, t in typed.items())
        insert_columns = ", ".join(quote(n) for n in [*names, "_bucket"])
        # Two DELETEs, not one with OR: each can use its index (an OR with a subquery scans the table).
        return [
            f"DELETE FROM {target} WHERE {quote('_bucket')} = {literal(bucket)}",
            f"DELETE FROM {target} WHERE {quote(KEY_COLUMN)} IN (SELECT {quote(KEY_COLUMN)} FROM {stage})",
            f"INSERT INTO {target} ({insert_columns}) SELECT {select}, {literal(bucket)} FROM {stage}",
            f"DELETE FROM {quote(LOADS_TABLE)} WHERE table_name = {literal(table.label)} AND bucket = {literal(bucket)}",
            f"INSERT INTO {quote(LOADS_TABLE)} VALUES ({literal(table.label)}, {literal(bucket)}, {literal(digest)}, "
            f"(SELECT COUNT(*) FROM {stage}), {schema.version}, {literal(time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))})",
        ]

    def stage_expression(self, name: str, type_name: str) -> str:
        """How a staged column becomes the table's: as it is, unless the dialect stages it in another form."""
        return quote(name)

    # --- operations -------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, publish: bool = True) -> Iterator[Any]:
        """One transaction on a fresh connection; `publish=False` when readers need not see it yet."""
        connection = self._connect()
        try:
            cursor = self.begin(connection)
            yield cursor
            connection.commit()
            if publish:
                self.committed(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                connection.rollback()
            raise
        finally:
            connection.close()

    def begin(self, connection):
        return connection.cursor()  # DB-API drivers open a transaction with the first statement

    def committed(self, connection) -> None:
        """Called after a commit readers should see; a server database shows it to them already."""

    def existing_columns(self, cursor, table: TableRef) -> dict[str, str]:
        cursor.execute(
            "SELECT column_name, data_type, numeric_precision, numeric_scale FROM information_schema.columns "
            f"WHERE table_schema = {literal(table.schema)} AND table_name = {literal(table.table)}"
        )
        columns = {}
        for name, kind, precision, scale in cursor.fetchall():
            kind = kind.lower()
            if kind in ("numeric", "decimal") and precision is not None:
                kind = f"decimal({precision},{scale})"
            columns[name] = canonical_type(kind)
        return columns

    def evolve(self, cursor, table: TableRef, schema: s.InferredSchema, evolution: str) -> list[str]:
        """Create the table or add new columns; a column that must change type raises RebuildNeeded."""
        cursor.execute(self.loads_table_sql())
        existing = self.existing_columns(cursor, table)
        if not existing:
            for statement in self.create_table_sql(table, schema):
                cursor.execute(statement)
            return [f"created {table.label}"]
        wanted = dict(self.columns_sql(schema))
        retyped = [n for n, t in wanted.items() if n in existing and existing[n] != canonical_type(t)]
        if retyped and evolution == "rebuild":
            # Redshift cannot alter a column's type, and an in-place rebuild would leave readers a
            # near-empty table: the caller rebuilds it under a shadow name from every bucket.
            raise RebuildNeeded(table, retyped)
        actions = []
        options = self.dialect.column_options
        for name, type_sql in wanted.items():
            if name not in existing:
                cursor.execute(
                    f"ALTER TABLE {self.table_sql(table)} ADD COLUMN {quote(name)} {type_sql}{options(name, type_sql)}"
                )
                actions.append(f"added column {name}")
        for column in self.missing_indexes(cursor, table):
            cursor.execute(self.create_index_sql(table, column))
            actions.append(f"indexed {column}")
        return actions

    def missing_indexes(self, cursor, table: TableRef) -> list[str]:
        """Columns the dialect indexes that lead no index of the table yet (tables from older versions)."""
        if not self.dialect.indexed_columns:
            return []
        cursor.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            f"AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass({literal(self.table_sql(table))})"
        )
        indexed = {row[0] for row in cursor.fetchall()}
        return [c for c in self.dialect.indexed_columns if c not in indexed]

    def loaded(self, table: TableRef) -> dict[str, str]:
        """Content hash of the lake file last loaded, by bucket."""
        with self.transaction() as cursor:
            cursor.execute(self.loads_table_sql())
            cursor.execute(
                f"SELECT bucket, content_sha256 FROM {quote(LOADS_TABLE)} WHERE table_name = {literal(table.label)}"
            )
            return dict(cursor.fetchall())

    def row_count(self, table: TableRef) -> int | None:
        """Rows in the table, or None when it does not exist yet."""
        with self.transaction() as cursor:
            if not self.existing_columns(cursor, table):
                return None
            cursor.execute(f"SELECT COUNT(*) FROM {self.table_sql(table)}")
            return int(cursor.fetchone()[0])

    def bucket_ids(self, table: TableRef, bucket: str) -> list[str]:
        """The `_id_key`s of a bucket's rows (compare with the file's `_id_key` column)."""
        with self.transaction() as cursor:
            cursor.execute(
                f"SELECT {quote(KEY_COLUMN)} FROM {self.table_sql(table)} WHERE {quote('_bucket')} = {literal(bucket)}"
            )
            return [row[0] for row in cursor.fetchall()]

    def drop_buckets(self, table: TableRef, buckets: list[str]) -> int:
        """Delete the rows and load records of `buckets`, in one transaction; the rows deleted."""
        target, deleted = self.table_sql(table), 0
        with self.transaction() as cursor:
            exists = bool(self.existing_columns(cursor, table))
            for start in range(0, len(buckets), 500):
                names = ", ".join(literal(b) for b in buckets[start : start + 500])
                if exists:
                    cursor.execute(f"SELECT COUNT(*) FROM {target} WHERE {quote('_bucket')} IN ({names})")
                    deleted += int(cursor.fetchone()[0])
                    cursor.execute(f"DELETE FROM {target} WHERE {quote('_bucket')} IN ({names})")
                cursor.execute(
                    f"DELETE FROM {quote(LOADS_TABLE)} WHERE table_name = {literal(table.label)} "
                    f"AND bucket IN ({names})"
                )
        return deleted

    def replace_bucket(
        self,
        table: TableRef,
        schema: s.InferredSchema,
        evolution: str,
        bucket: str,
        digest: str,
        data: pa.Table,
        file_uri: str,
    ) -> LoadedBucket:
        """Replace one bucket's rows in one transaction, creating the table or adding columns first.

        Raises RebuildNeeded, changing nothing, when a column must change type with `evolution:
        rebuild`; the caller then calls `rebuild` with every bucket of the table.
        """
        return self._replace(table, schema, evolution, BucketLoad(bucket, digest, data, file_uri), True)

    def rebuild(
        self, table: TableRef, schema: s.InferredSchema, buckets: Iterable[BucketLoad]
    ) -> list[LoadedBucket]:
        """Build `table` anew from every bucket, out of readers' sight, and swap it in at once.

        The new table is built under the shadow name `<table>__aries_rebuild` (a leftover from an
        interrupted rebuild is dropped first), one transaction per bucket. Then one transaction drops
        the old table, renames the shadow, and moves the shadow's `_aries_loads` rows to the table's,
        so readers see the whole old table until that commit and the whole new one after it. The
        buckets are iterated once, lazily: the caller can read each lake file as it is needed.
        """
        shadow = shadow_of(table)
        with self.transaction(publish=False) as cursor:
            cursor.execute(self.loads_table_sql())
            cursor.execute(f"DROP TABLE IF EXISTS {self.table_sql(shadow)}")
            cursor.execute(f"DELETE FROM {quote(LOADS_TABLE)} WHERE table_name = {literal(shadow.label)}")
            for statement in self.create_table_sql(shadow, schema):
                cursor.execute(statement)
        loaded = [self._replace(shadow, schema, "rebuild", bucket, False) for bucket in buckets]
        with self.transaction() as cursor:
            for statement in self.swap_sql(shadow, table):
                cursor.execute(statement)
        return [
            LoadedBucket(table.label, b.bucket, b.rows, [f"rebuilt {table.label}"], b.seconds) for b in loaded
        ]

    def swap_sql(self, shadow: TableRef, table: TableRef) -> list[str]:
        """Replace `table` by `shadow` and its load records; run in one transaction."""
        loads = quote(LOADS_TABLE)
        return [
            f"DROP TABLE IF EXISTS {self.table_sql(table)}",
            f"ALTER TABLE {self.table_sql(shadow)} RENAME TO {quote(table.table)}",
            *[
                f"ALTER INDEX {quote(table.schema)}.{quote(index_name(shadow.table, c))} "
                f"RENAME TO {quote(index_name(table.table, c))}"
                for c in self.dialect.indexed_columns
            ],
            f"DELETE FROM {loads} WHERE table_name = {literal(table.label)}",
            f"UPDATE {loads} SET table_name = {literal(table.label)} WHERE table_name = {literal(shadow.label)}",
        ]

    def _replace(
        self, table: TableRef, schema: s.InferredSchema, evolution: str, bucket: BucketLoad, publish: bool
    ) -> LoadedBucket:
        started = time.monotonic()
        stage = quote(f"_aries_stage_{os.getpid()}_{abs(hash(bucket.key)) % 10**8}")
        data = _conform(bucket.data, schema)
        self.check_values(table, bucket.key, schema, data)
        try:
            actions = self.prepare(table, schema)
            with self.transaction(publish) as cursor:
                actions += self.evolve(cursor, table, schema, evolution)
                self.stage(cursor, stage, table, schema, data, bucket.file_uri)
                for statement in self.replace_sql(table, schema, stage, bucket.key, bucket.digest):
                    cursor.execute(statement)
                cursor.execute(f"DROP TABLE {stage}")
        except WarehouseError:
            raise
        except Exception as error:  # the driver's own error, named by table and bucket
            if type(error).__name__ == "InterruptException":  # DuckDB's, on the run's SIGINT: rolled back
                raise KeyboardInterrupt(f"{table.label} bucket {bucket.key}: load interrupted") from error
            lines = str(error).strip().splitlines()
            raise WarehouseError(
                f"{table.label} bucket {bucket.key}: {lines[0] if lines else type(error).__name__}"
            ) from error
        return LoadedBucket(table.label, bucket.key, data.num_rows, actions, time.monotonic() - started)

    def prepare(self, table: TableRef, schema: s.InferredSchema) -> list[str]:
        """Changes that cannot run inside the bucket's transaction (Redshift: wider VARCHARs)."""
        return []

    def column_widths(self, cursor, table: TableRef) -> dict[str, int]:
        """Declared widths of the table's width-limited text columns."""
        cursor.execute(
            "SELECT column_name, character_maximum_length FROM information_schema.columns "
            f"WHERE table_schema = {literal(table.schema)} AND table_name = {literal(table.table)} "
            "AND character_maximum_length IS NOT NULL"
        )
        return {name: int(width) for name, width in cursor.fetchall()}

    def widen_sql(self, table: TableRef, schema: s.InferredSchema, widths: dict[str, int]) -> list[str]:
        """ALTER statements for VARCHAR columns narrower than the schema now needs; never narrows."""
        statements = []
        for name, type_sql in self.columns_sql(schema):
            wanted = RedshiftDialect.varchar_width(type_sql)
            if wanted and name in widths and widths[name] < wanted:
                statements.append(
                    f"ALTER TABLE {self.table_sql(table)} ALTER COLUMN {quote(name)} TYPE VARCHAR({wanted})"
                )
        return statements

    def stage(
        self, cursor, stage: str, table: TableRef, schema: s.InferredSchema, data: pa.Table, file_uri: str
    ) -> None:
        raise NotImplementedError

    def check_values(self, table: TableRef, bucket: str, schema: s.InferredSchema, data: pa.Table) -> None:
        """Refuse, by name, values the warehouse cannot store, before anything is staged."""
        if self.dialect.holds_nul:
            return
        found = nul_value(data, staged_types(schema))
        if found:
            column, _id = found
            raise BucketRefused(
                f"{table.label} bucket {bucket}: {self.dialect.name} text and JSON cannot hold the NUL "
                f"character (\\u0000), found in column {column} of _id {_id}; exclude that field "
                "(schema.exclude) or strip NUL from it in MongoDB",
                bucket,
            )


_CANONICAL = {
    "int": "integer", "int4": "integer", "integer": "integer", "int8": "bigint", "bigint": "bigint",
    "bool": "boolean", "boolean": "boolean", "float8": "double", "double": "double", "double precision": "double",
    "text": "text", "varchar": "text", "character varying": "text", "jsonb": "jsonb", "json": "json",
    "super": "super", "timestamptz": "timestamptz", "timestamp with time zone": "timestamptz",
    "bytea": "binary", "blob": "binary", "varbyte": "binary", "binary varying": "binary", "array": "list",
}  # fmt: skip


def canonical_type(declared: str) -> str:
    """One spelling per type, so a column declared one way and reported another compares equal."""
    text = re.sub(r"\s+", " ", declared.lower().replace("not null", "")).strip()
    if text.endswith("[]"):
        return "list"
    decimal = re.match(r"^(?:numeric|decimal)\s*\((\d+),\s*(\d+)\)$", text)
    if decimal:
        return f"decimal({decimal.group(1)},{decimal.group(2)})"
    base = text.split("(")[0].strip()
    return _CANONICAL.get(base, base)


class DuckDBLoader(Loader):
    """An embedded DuckDB file that readers can always open, even while Aries loads it.

    DuckDB lets no reader open a file another process writes. So Aries writes a private working
    file next to the configured one (`.<name>.aries-write`, taken over from the configured file the
    first time) and, after each committed load, checkpoints it and publishes a copy at the
    configured path by an atomic rename: a reader that opened the old file keeps its snapshot, a new
    reader gets the new one, and none ever waits or sees a half-loaded bucket.

    The cost: each load copies the whole database file (a commit that changed nothing copies
    nothing), and the disk holds up to three copies at once. Aries processes loading the same file
    take turns through a lock file, waiting up to `LOCK_WAIT_SECONDS`.
    """

    LOCK_WAIT_SECONDS = 600

    def __init__(self, dialect: Dialect, path: str) -> None:
        super().__init__(dialect, self._connect_working_file)
        self.path = os.path.abspath(path)
        folder, name = os.path.split(self.path)
        self.work_path = os.path.join(folder, f".{name}.aries-write")
        self._lock_path = os.path.join(folder, f".{name}.aries-lock")
        self._published_path = os.path.join(folder, f".{name}.aries-published")

    @contextlib.contextmanager
    def transaction(self, publish: bool = True) -> Iterator[Any]:
        with self._writer_lock(), super().transaction(publish) as cursor:
            yield cursor

    def begin(self, connection):
        connection.execute("BEGIN TRANSACTION")  # DuckDB commits each statement unless told otherwise
        return connection

    def committed(self, connection) -> None:
        connection.execute("CHECKPOINT")  # the whole database in the main file, nothing left in the WAL
        self.publish()

    def publish(self) -> bool:
        """Copy the working file to the configured path, atomically; False if it was already there.

        Call with the writer lock held and the working file checkpointed (as `committed` does).
        """
        if self._deleted_since_published():  # while this load ran: not put back
            self._drop_working_copy()
            raise WarehouseError(
                f"{self.path} was deleted during the load; the next sync loads it afresh from the lake"
            )
        stat = os.stat(self.work_path)
        version = f"{stat.st_size} {stat.st_mtime_ns}"
        if os.path.exists(self.path) and _read(self._published_path) == version:
            return False
        temporary = f"{self.work_path}.{os.getpid()}.publish"
        try:
            shutil.copyfile(self.work_path, temporary)
            with open(temporary, "rb") as copy:
                os.fsync(copy.fileno())
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + ".wal")  # left by a file written in place: not this copy's
            os.replace(temporary, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        with open(self._published_path, "w", encoding="utf-8") as marker:
            marker.write(version)
        return True

    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self._lock_path, "a+b") as lock:
            deadline = time.monotonic() + self.LOCK_WAIT_SECONDS
            while True:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise WarehouseError(
                            f"{self.path}: another Aries process has been loading it for "
                            f"{self.LOCK_WAIT_SECONDS} s; try again when it is done"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _connect_working_file(self):
        if self._deleted_since_published():
            self._drop_working_copy()
        if not os.path.exists(self.work_path) and os.path.exists(self.path):
            # Take over a file written in place by an older Aries: copy it, with its WAL if any.
            for suffix in ("", ".wal"):
                if os.path.exists(self.path + suffix):
                    shutil.copyfile(self.path + suffix, f"{self.work_path}.tmp{suffix}")
            if os.path.exists(f"{self.work_path}.tmp.wal"):
                os.replace(f"{self.work_path}.tmp.wal", f"{self.work_path}.wal")
            os.replace(f"{self.work_path}.tmp", self.work_path)
        return _duckdb_connect(self.work_path)

    def _deleted_since_published(self) -> bool:
        """The configured file was published once and is gone: deleted to start over (Aries only
        ever replaces it). Its working copy is then dropped, not published again: it holds nothing
        the lake cannot load again, with its own record of loads. (Before its first publication the
        file is missing by design: a rebuild's shadow table is built unpublished.)"""
        return os.path.exists(self._published_path) and not os.path.exists(self.path)

    def _drop_working_copy(self) -> None:
        for leftover in (self.work_path, f"{self.work_path}.wal", self._published_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)

    def stage(self, cursor, stage, table, schema, data, file_uri):
        # DuckDB reads Arrow directly; the lake file's own types carry over.
        cursor.register("_aries_arrow", data)
        cursor.execute(f"CREATE TEMP TABLE {stage} AS SELECT * FROM _aries_arrow")
        cursor.unregister("_aries_arrow")


class PostgresLoader(Loader):
    """COPY FROM STDIN: the bucket streams as CSV into a temporary staging table.

    Timestamps are staged as epoch milliseconds and turned into `timestamptz` on insert, so every
    date PostgreSQL can hold (4713 BC to 294276 AD) arrives exactly, whatever text form Arrow
    would give it. Lists become jsonb arrays (see `_json_lists`).
    """

    def stage(self, cursor, stage, table, schema, data, file_uri):
        typed = staged_types(schema)
        columns = [(n, self.stage_type(typed[n], t)) for n, t in self.columns_sql(schema) if n in typed]
        body = ", ".join(f"{quote(n)} {t}" for n, t in columns)
        cursor.execute(f"CREATE TEMP TABLE {stage} ({body})")
        buffer = io.BytesIO()
        pacsv.write_csv(
            _csv_ready(data.select([n for n, _ in columns])), buffer, pacsv.WriteOptions(include_header=False)
        )
        buffer.seek(0)
        names = ", ".join(quote(n) for n, _ in columns)
        cursor.copy_expert(f"COPY {stage} ({names}) FROM STDIN WITH (FORMAT csv)", buffer)
        cursor.execute(f"ANALYZE {stage}")  # true row counts, so the deletes pick their indexes

    @staticmethod
    def stage_type(type_name: str, column_sql: str) -> str:
        return "bigint" if type_name == s.T_TIMESTAMP else column_sql.replace(" NOT NULL", "")

    def stage_expression(self, name: str, type_name: str) -> str:
        if type_name == s.T_TIMESTAMP:
            # An interval times a number is computed in double precision: 253402300799999 ms (the
            # last millisecond of 9999) came out 8 microseconds late. Whole days of 86,400 seconds
            # (not '1 day', which follows the session's time zone across DST), then the
            # milliseconds left: each product is exact in a double.
            column = quote(name)
            return (
                f"TIMESTAMPTZ 'epoch' + ({column} / 86400000) * INTERVAL '86400 seconds' "
                f"+ ({column} % 86400000) * INTERVAL '1 millisecond'"
            )
        return quote(name)


class RedshiftLoader(Loader):
    """COPY ... FORMAT AS PARQUET straight from the lake on S3 into a staging table."""

    def __init__(self, dialect, connect, iam_role: str | None = None) -> None:
        super().__init__(dialect, connect)
        self.iam_role = iam_role

    def stage_sql(self, stage: str, table: TableRef, schema: s.InferredSchema, file_uri: str) -> list[str]:
        if not file_uri.startswith("s3://"):
            raise WarehouseError(f"{table.label}: Redshift loads from S3; put the lake on s3:// (lake.url)")
        typed = staged_types(schema)
        # JSON text is staged as VARCHAR and parsed on insert: COPY would keep it a SUPER *string*.
        body = ", ".join(
            f"{quote(n)} {'VARCHAR(65535)' if typed[n] == s.T_JSON else t.replace(' NOT NULL', '')}"
            for n, t in self.columns_sql(schema)
            if n in typed
        )
        return [
            f"CREATE TEMP TABLE {stage} ({body}) DISTKEY({quote(KEY_COLUMN)})",  # joins the table in place
            f"COPY {stage} FROM {literal(file_uri)} {self.credentials_sql()} FORMAT AS PARQUET SERIALIZETOJSON",
        ]

    def credentials_sql(self) -> str:
        # The role name is not a secret; keys never appear in SQL: Redshift takes them from its role.
        return f"IAM_ROLE {literal(self.iam_role)}" if self.iam_role else "IAM_ROLE default"

    def stage(self, cursor, stage, table, schema, data, file_uri):
        for statement in self.stage_sql(stage, table, schema, file_uri):
            cursor.execute(statement)

    def prepare(self, table: TableRef, schema: s.InferredSchema) -> list[str]:
        """Widen VARCHAR columns a longer string would overflow (COPY would fail on every retry).

        Redshift resizes a column only outside a transaction block, so this runs on its own in
        autocommit; a wider column never harms a reader or a rollback.
        """
        connection = self._connect()
        try:
            connection.autocommit = True
            cursor = connection.cursor()
            statements = self.widen_sql(table, schema, self.column_widths(cursor, table))
            for statement in statements:
                cursor.execute(statement)
        finally:
            connection.close()
        return [f"widened: {statement.split(' ALTER COLUMN ', 1)[1]}" for statement in statements]

    def stage_expression(self, name: str, type_name: str) -> str:
        return f"JSON_PARSE({quote(name)})" if type_name == s.T_JSON else quote(name)


def oversize_documents(data: pa.Table, limit: int | None) -> list[str]:
    """`_id`s whose `_doc` is larger than the warehouse can hold; reported, never silently dropped."""
    if limit is None or data.num_rows == 0:
        return []
    sizes = pc.binary_length(pc.cast(data.column("_doc"), pa.binary()))
    mask = pc.greater(sizes, limit)
    return data.column("_id").filter(mask).to_pylist()


def _conform(data: pa.Table, schema: s.InferredSchema) -> pa.Table:
    """The file's columns in the collection schema's order; a column the file predates is null."""
    arrays = [data.column("_id"), data.column("_doc"), data.column(KEY_COLUMN)]
    names = ["_id", "_doc", KEY_COLUMN]
    for column in schema.columns:
        names.append(column.name)
        if column.name in data.column_names:
            arrays.append(data.column(column.name))
        else:
            arrays.append(pa.nulls(data.num_rows, arrow_type(column.type)))
    return pa.table(arrays, names=names)


def staged_types(schema: s.InferredSchema) -> dict[str, str]:
    """The staged columns and their Aries types: `_id`, `_doc` (JSON text), then the schema's."""
    return {
        "_id": s.T_STRING,
        "_doc": s.T_JSON,
        KEY_COLUMN: s.T_STRING,
        **{c.name: c.type for c in schema.columns},
    }


# A JSON "\u0000" escape, not preceded by an escaped backslash ("\\u0000" is text).
_JSON_NUL = r"(^|[^\\])(\\\\)*\\u0000"


def nul_value(data: pa.Table, types: dict[str, str]) -> tuple[str, str] | None:
    """(column, _id) of the first NUL character in text or JSON text, or None; `_doc` named last."""
    for name in sorted(data.column_names, key=lambda n: n == "_doc"):
        column = data.column(name)
        if types.get(name) == s.T_JSON:
            found = pc.match_substring_regex(column, _JSON_NUL)
        elif pa.types.is_string(column.type):
            found = pc.match_substring(column, "\0")
        elif pa.types.is_list(column.type) and pa.types.is_string(column.type.value_type):
            found = _list_has_nul(column)
        else:
            continue
        hits = data.column("_id").filter(pc.fill_null(found, False))
        if len(hits):
            return name, hits[0].as_py()
    return None


def _list_has_nul(column: pa.ChunkedArray) -> pa.Array:
    rows = []
    for value in column.to_pylist():
        rows.append(value is not None and any(e is not None and "\0" in e for e in value))
    return pa.array(rows, pa.bool_())


def _csv_ready(data: pa.Table) -> pa.Table:
    """Columns as PostgreSQL's CSV COPY reads them: lists to JSON, bytes to hex, timestamps to epoch ms."""
    arrays = []
    for name in data.column_names:
        column = data.column(name)
        if pa.types.is_list(column.type):
            column = _json_lists(column)
        elif pa.types.is_binary(column.type):
            column = pa.array(
                [None if v is None else "\\x" + v.hex() for v in column.to_pylist()], pa.string()
            )
        elif pa.types.is_timestamp(column.type):
            column = pc.cast(pc.cast(column, pa.timestamp("ms", tz="UTC")), pa.int64())
        arrays.append(column)
    return pa.table(arrays, names=data.column_names)


def _json_lists(column: pa.ChunkedArray) -> pa.Array:
    """Each list as JSON array text: numbers exact (decimals keep their digits), timestamps as
    ISO 8601 text in UTC with milliseconds, and NaN and the infinities (which JSON lacks) as the
    strings "NaN", "Infinity" and "-Infinity"."""
    lists = column.combine_chunks()
    values = lists.flatten()
    element = values.type
    if pa.types.is_timestamp(element):
        tokens = [
            None if v is None else json.dumps(v)
            for v in pc.strftime(values, format="%Y-%m-%dT%H:%M:%SZ").to_pylist()
        ]
    elif pa.types.is_floating(element):
        tokens = [None if v is None else _json_double(v) for v in values.to_pylist()]
    elif pa.types.is_decimal(element) or pa.types.is_integer(element) or pa.types.is_boolean(element):
        tokens = pc.cast(values, pa.string()).to_pylist()
    else:
        tokens = [None if v is None else json.dumps(v, ensure_ascii=False) for v in values.to_pylist()]
    rows, position = [], 0
    for length in pc.list_value_length(lists).to_pylist():
        if length is None:
            rows.append(None)
            continue
        items = tokens[position : position + length]
        position += length
        rows.append("[" + ",".join("null" if t is None else t for t in items) + "]")
    return pa.array(rows, pa.string())


def _json_double(value: float) -> str:
    if math.isnan(value):
        return '"NaN"'
    if math.isinf(value):
        return '"Infinity"' if value > 0 else '"-Infinity"'
    return repr(value)


def open_loader(url: str, iam_role: str | None = None, connect=None) -> Loader:
    """A loader for `duckdb:///path`, `postgresql://...` or `redshift://...`; `connect` overrides how to connect."""
    scheme = urlsplit(url).scheme
    if scheme == "duckdb":
        # As in SQLAlchemy: duckdb:///relative/path, duckdb:////absolute/path.
        return DuckDBLoader(DuckDBDialect(), url.removeprefix("duckdb:///"))
    if scheme in ("postgresql", "postgres"):
        import psycopg2

        return PostgresLoader(PostgresDialect(), connect or (lambda: psycopg2.connect(url)))
    if scheme == "redshift":
        import psycopg2

        dsn = urlsplit(url)._replace(scheme="postgresql").geturl()
        return RedshiftLoader(RedshiftDialect(), connect or (lambda: psycopg2.connect(dsn)), iam_role)
    raise WarehouseError(f"unsupported warehouse URL scheme {scheme!r}")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        return None


def _duckdb_connect(path: str):
    import duckdb

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    # DuckDB lets one process write a database file at a time: wait for the lock (another program
    # may hold it; Aries processes already take turns through the lock file).
    deadline = time.monotonic() + 60
    while True:
        try:
            return duckdb.connect(path)
        except duckdb.IOException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
