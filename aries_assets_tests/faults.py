"""Fault-suite helpers: read warehouse tables back, dump everything Aries stored, an S3 fault proxy."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import psycopg2
from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion

from aries_assets_tests.support import DOC_JSON

RAW_CODEC = CodecOptions(tz_aware=True, datetime_conversion=DatetimeConversion.DATETIME_AUTO)
SORTED_CANONICAL = json_util.JSONOptions(
    json_mode=json_util.JSONMode.CANONICAL, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)


def canonical_sorted(document: dict) -> str:
    """A document as canonical Extended JSON with sorted keys: equal iff equal as BSON, up to key order."""
    return json_util.dumps(document, json_options=SORTED_CANONICAL, sort_keys=True)


def id_key(value: Any) -> str:
    """An `_id` as canonical Extended JSON: distinct for distinct BSON values (unlike Aries' `_id` text)."""
    return json_util.dumps({"_id": value}, json_options=SORTED_CANONICAL)


def mongo_sorted(coll) -> dict[str, str]:
    """Every document of a collection, keyed by `id_key`, as sorted canonical JSON."""
    return {id_key(d["_id"]): canonical_sorted(d) for d in coll.with_options(codec_options=RAW_CODEC).find()}


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def table_rows(url: str, schema: str, table: str) -> list[tuple[str, str]]:
    """(`_id`, `_doc` as text) of every row of a warehouse table."""
    sql = f'SELECT "_id", CAST("_doc" AS TEXT) FROM {_quote(schema)}.{_quote(table)}'
    if url.startswith("duckdb"):
        with duckdb.connect(url.removeprefix("duckdb:///"), read_only=True) as connection:
            return connection.execute(sql).fetchall()
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def table_sorted(url: str, schema: str, table: str) -> dict[str, str]:
    """Every row's `_doc` decoded with its BSON types, as sorted canonical JSON, keyed by `id_key`."""
    documents: dict[str, str] = {}
    for _id, doc in table_rows(url, schema, table):
        document = json_util.loads(doc, json_options=DOC_JSON)
        key = id_key(document["_id"])
        assert key not in documents, f"{key} is in {schema}.{table} twice"
        documents[key] = canonical_sorted(document)
    return documents


def assert_table_exact(url: str, database: str, coll) -> None:
    expected, actual = mongo_sorted(coll), table_sorted(url, database, coll.name)
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    assert not missing and not extra, (
        f"{coll.name}: {len(missing)} documents missing from the table, e.g. {missing[:3]}; "
        f"{len(extra)} extra, e.g. {extra[:3]}"
    )
    for key, text in expected.items():
        assert actual[key] == text, f"{coll.name} {key!r}: table {actual[key][:300]} != mongo {text[:300]}"


def table_names(url: str) -> list[str]:
    """Every user table of a warehouse, as schema.table."""
    sql = (
        "SELECT table_schema || '.' || table_name FROM information_schema.tables "
        "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
    )
    if url.startswith("duckdb"):
        path = Path(url.removeprefix("duckdb:///"))
        if not path.exists():
            return []
        with duckdb.connect(str(path), read_only=True) as connection:
            return [r[0] for r in connection.execute(sql).fetchall()]
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return [r[0] for r in cursor.fetchall()]


def dump_tables(url: str) -> str:
    """All rows of all user tables of a warehouse, as text (to look for secrets in)."""
    parts = []
    for name in table_names(url):
        schema, table = name.split(".", 1)
        sql = f"SELECT * FROM {_quote(schema)}.{_quote(table)}"
        if url.startswith("duckdb"):
            with duckdb.connect(url.removeprefix("duckdb:///"), read_only=True) as connection:
                rows = connection.execute(sql).fetchall()
        else:
            with psycopg2.connect(url) as connection, connection.cursor() as cursor:
                cursor.execute(sql)
                rows = cursor.fetchall()
        parts.append(f"{name}: {rows!r}")
    return "\n".join(parts)


# --- an HTTP fault proxy in front of moto -------------------------------------------------------

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault</RequestId></Error>"
)
INTERNAL = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


class FaultProxy:
    """Forwards HTTP to an upstream (moto); while `failing`, answers 503 SlowDown / 500 instead.

    `fail_next(n)` fails the next n requests; `failing = True` fails every request until reset.
    Counts what it forwarded and what it refused.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.failing = False
        self.fail_remaining = 0
        self.forwarded = 0
        self.refused = 0
        self.methods: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy._should_fail():
                    status, text = (503, SLOW_DOWN) if proxy.refused % 2 else (500, INTERNAL)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(text)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                # A client that hung up mid-answer (a retry giving up): kept, not printed. Printed, it
                # lands in the stderr a test captures from the CLI run in this process.
                proxy.errors.append(repr(sys.exc_info()[1]))

        self.errors: list[str] = []
        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _should_fail(self) -> bool:
        with self._lock:
            if self.failing or self.fail_remaining > 0:
                self.fail_remaining = max(0, self.fail_remaining - 1)
                self.refused += 1
                return True
            self.forwarded += 1
            return False

    def fail_next(self, count: int) -> None:
        with self._lock:
            self.fail_remaining = count

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def status_of(run_cli) -> tuple[int, list[dict]]:
    code, out, err = run_cli("status", "--json")
    try:
        return code, json.loads(out)
    except json.JSONDecodeError as error:
        raise AssertionError(f"aries status --json printed no JSON (exit {code}): {out}{err}") from error


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto as a real HTTP server (S3, Glue) on a free port; yields its endpoint."""
    from moto.server import ThreadedMotoServer

    from aries_assets.demo.mongo_server import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    """Every object of a bucket, read straight from moto."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            objects[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return objects
