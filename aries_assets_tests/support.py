"""Test helpers: write configs, run `aries sync`, and read the lake back document by document."""

from __future__ import annotations

import io
import uuid
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import bson
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from bson import json_util
from bson.codec_options import DatetimeConversion
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient

from aries_assets.cli import main

# Decoding `_doc` exactly as a user would, but keeping dates outside Python's range.
DOC_JSON = json_util.JSONOptions(
    json_mode=json_util.JSONMode.CANONICAL, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def write_config(
    path: Path, mongo_uri: str, lake_url: str, collections: list[dict[str, Any]], **extra: Any
) -> Path:
    body = {"mongo": {"uri": mongo_uri}, "lake": {"url": lake_url}, "collections": collections, **extra}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def mongo_documents(
    client: MongoClient, database: str, collection: str, query: dict | None = None
) -> dict[Any, bytes]:
    """Raw BSON of every matching document, keyed by `_id` rendered as canonical JSON."""
    coll = client[database].get_collection(
        collection, codec_options=bson.CodecOptions(document_class=RawBSONDocument)
    )
    return {_id_key(doc.raw): doc.raw for doc in coll.find(query or {})}


def _id_key(raw: bytes) -> str:
    decoded = bson.decode(raw, bson.CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO))
    return json_util.dumps(decoded["_id"], json_options=json_util.CANONICAL_JSON_OPTIONS)


def table_documents(table: pa.Table) -> dict[str, bytes]:
    """`_doc` of every row turned back into BSON, keyed like mongo_documents."""
    result = {}
    for text in table.column("_doc").to_pylist():
        raw = bson.encode(json_util.loads(text, json_options=DOC_JSON))
        key = _id_key(raw)
        assert key not in result, f"duplicate document {key} in the lake"
        result[key] = raw
    return result


def lake_tables(lake_dir: Path) -> dict[str, pa.Table]:
    return {p.stem: pq.read_table(p) for p in sorted(lake_dir.glob("*.parquet"))}


def lake_documents(lake_dir: Path) -> dict[str, bytes]:
    """Every document of every bucket file in a collection's lake folder, as BSON."""
    documents: dict[str, bytes] = {}
    for table in lake_tables(lake_dir).values():
        found = table_documents(table)
        assert not set(found) & set(documents), "a document is in two buckets"
        documents.update(found)
    return documents


def assert_same_documents(expected: dict[str, bytes], actual: dict[str, bytes]) -> None:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing, f"{len(missing)} documents missing from the lake, e.g. {missing[:3]}"
    assert not extra, f"{len(extra)} documents in the lake but not in MongoDB, e.g. {extra[:3]}"
    for key, raw in expected.items():
        assert actual[key] == raw, f"document {key} differs: {bson.decode(raw)} != {bson.decode(actual[key])}"


def events_config(workdir, mongo_uri: str, database: str, bucket_size: int = 100) -> None:
    """`aries.yaml` in `workdir` for one collection, `<database>.events`, lake at ./lake."""
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": "events", "bucket_size": bucket_size}],
    )
