"""Snapshot a collection into bucket files: plan buckets, settle the schema, write a bucket.

Plain functions over a pymongo collection and a Lake; the Dagster layer and
`aries sync` call these and nothing else, so both behave the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import pyarrow.parquet as pq
from bson import json_util
from pymongo.collection import Collection

from aries_assets.core import schema as s
from aries_assets.core.arrow import BucketConverter, arrow_schema_of, id_string
from aries_assets.core.buckets import Bucket, BucketPlan, plan_buckets
from aries_assets.core.extract import (
    DEFAULT_BATCH_BYTES,
    SourceCollection,
    read_bucket,
    scan_bucket_ids,
    scan_documents,
    scan_ids,
)
from aries_assets.core.lake import (
    Lake,
    bucket_file,
    collection_prefix,
    load_bucket_map,
    save_bucket_map,
    schema_file,
)

# Bumped when the file layout changes, so existing bucket files are rewritten.
FORMAT_VERSION = "2"
_ROW_GROUP_BYTES = 64 * 1024 * 1024

META_FORMAT = "aries.format_version"
META_DIGEST = "aries.content_sha256"
META_COUNT = "aries.document_count"
META_COLLECTION = "aries.collection"
META_BUCKET = "aries.bucket"
META_RANGE = "aries.id_range"
META_SCHEMA_VERSION = "aries.schema_version"
META_STATS = "aries.type_stats"
META_COLUMNS = "aries.columns"
META_OUTLIERS = "aries.outliers"


class BucketWriteError(RuntimeError):
    """A bucket could not be written; names the collection and bucket."""


@dataclass(frozen=True)
class BucketFile:
    """What a bucket file's footer says about it."""

    key: str
    format_version: str
    digest: str
    schema_version: int
    columns: dict[str, str]  # name -> column type
    stats: s.TypeStats

    @classmethod
    def from_metadata(cls, key: str, metadata: dict[str, str]) -> BucketFile | None:
        try:
            return cls(
                key=key,
                format_version=metadata[META_FORMAT],
                digest=metadata[META_DIGEST],
                schema_version=int(metadata[META_SCHEMA_VERSION]),
                columns=dict(json.loads(metadata[META_COLUMNS])),
                stats=s.TypeStats.from_json(metadata[META_STATS]),
            )
        except (KeyError, ValueError):
            return None  # written by another format: rewritten


@dataclass(frozen=True)
class WrittenBucket:
    """What writing one bucket file produced."""

    key: str
    uri: str
    documents: int
    bytes_in: int  # raw BSON read from MongoDB
    bytes_out: int  # Parquet written
    digest: str
    schema: s.InferredSchema  # the schema the file follows
    stats: s.TypeStats  # this bucket's statistics
    outliers: dict[str, int]  # values kept only in `_doc`, by column
    previous: BucketFile | None  # the file this one replaced
    seconds: float
    rewritten: bool = True  # False when the file already held exactly these documents


@dataclass
class SchemaState:
    """The collection schema after reconciling it with every bucket file's statistics."""

    schema: s.InferredSchema
    changed: bool
    mismatched: list[str] = field(default_factory=list)  # buckets whose file does not follow it


def plan(source: SourceCollection, collection: Collection, lake: Lake, bucket_size: int) -> BucketPlan:
    """Plan the collection's buckets in one ordered pass, and save the bucket map.

    The first time, only `_id`s are read (a covered index scan). Later, whole
    documents are read to hash each bucket, which finds updates without a
    change stream; boundaries already in the map never move.
    """
    previous = load_bucket_map(lake, source.database, source.collection)
    if previous is None:
        result = plan_buckets(scan_ids(source, collection), None, bucket_size)
    else:
        result = plan_buckets(scan_documents(source, collection), previous, bucket_size, with_digests=True)
    if previous is None or previous.lowers != result.bucket_map.lowers:
        save_bucket_map(lake, source.database, source.collection, result.bucket_map)
    return result


def remove_orphans(source: SourceCollection, lake: Lake, keys: list[str]) -> list[str]:
    """Delete bucket files the bucket map no longer names, so no document is read twice."""
    prefix = collection_prefix(source.database, source.collection)
    wanted = {bucket_file(source.database, source.collection, k) for k in keys}
    orphans = [p for p in lake.list(prefix) if p.endswith(".parquet") and "/" not in p[len(prefix) + 1 :]]
    orphans = [p for p in orphans if p not in wanted]
    for path in orphans:
        lake.delete(path)
    return orphans


def inspect_files(source: SourceCollection, lake: Lake, keys: list[str]) -> dict[str, BucketFile | None]:
    """Footers of the bucket files (None where a file is missing or from another format)."""
    files = {}
    for key in keys:
        metadata = lake.parquet_metadata(bucket_file(source.database, source.collection, key))
        found = BucketFile.from_metadata(key, metadata) if metadata else None
        files[key] = found if found and found.format_version == FORMAT_VERSION else None
    return files


def content_stale(result: BucketPlan, files: dict[str, BucketFile | None]) -> list[str]:
    """Buckets whose file is missing or whose documents changed since it was written."""
    return [
        k for k in result.bucket_map.keys if files.get(k) is None or files[k].digest != result.digests.get(k)
    ]


def file_schema(collection_schema: s.InferredSchema, found: BucketFile) -> s.InferredSchema:
    """The schema a bucket file was written with: the collection's, or a newer one the file widened."""
    if found.schema_version <= collection_schema.version:
        return collection_schema
    by_name = {c.name: c for c in collection_schema.columns}
    columns = []
    for name, type_name in found.columns.items():
        base = by_name.get(name) or s.ColumnSpec((name,), name, type_name, s.accepted_kinds(type_name))
        columns.append(replace(base, type=type_name, accepts=s.accepted_kinds(type_name)))
    merged = s.TypeStats()
    merged.merge(collection_schema.stats)
    merged.merge(found.stats)
    return s.InferredSchema(found.schema_version, columns, merged, collection_schema.names)


def load_schema(lake: Lake, source: SourceCollection) -> s.InferredSchema | None:
    text = lake.read_text(schema_file(source.database, source.collection))
    return s.InferredSchema.from_json(text) if text else None


def reconcile_schema(
    source: SourceCollection, lake: Lake, files: dict[str, BucketFile | None], options: s.SchemaOptions
) -> SchemaState:
    """Merge every file's statistics into the collection schema; list the files that do not follow it."""
    previous = load_schema(lake, source)
    merged = s.TypeStats()
    for found in files.values():
        if found is not None:
            merged.merge(found.stats)
    schema = s.resolve_schema(merged, previous, options)
    changed = previous is None or schema.version != previous.version
    if changed or previous.stats.to_json() != schema.stats.to_json():
        lake.write_text(schema_file(source.database, source.collection), schema.to_json())
    expected = {c.name: c for c in schema.columns}
    mismatched = []
    for key, found in files.items():
        if found is None:
            continue
        wrong_type = any(
            name not in expected or expected[name].type != t for name, t in found.columns.items()
        )
        fields = found.stats.fields
        missing = any(
            c.name not in found.columns and c.path in fields and c.accepts & set(fields[c.path].kinds)
            for c in schema.columns
        )
        if wrong_type or missing:
            mismatched.append(key)
    return SchemaState(schema, changed, mismatched)


def write_bucket(
    source: SourceCollection,
    collection: Collection,
    lake: Lake,
    bucket: Bucket,
    options: s.SchemaOptions | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> WrittenBucket:
    """Read one bucket from MongoDB and replace its Parquet file whole.

    Each document is decoded once; memory is bounded by the bucket, not the
    collection. The file follows the collection schema, widened by anything
    this bucket holds that the schema has not seen yet (the next reconcile
    makes that the collection's schema and rewrites any file that disagrees).
    """
    options = options or s.SchemaOptions()
    started = time.monotonic()
    path = bucket_file(source.database, source.collection, bucket.key)
    previous_metadata = lake.parquet_metadata(path)
    previous = BucketFile.from_metadata(bucket.key, previous_metadata) if previous_metadata else None
    collection_schema = load_schema(lake, source)
    converter = BucketConverter(options, set(collection_schema.stats.maps) if collection_schema else set())
    digest = hashlib.sha256()
    bytes_in = 0
    for batch in read_bucket(source, collection, bucket, batch_bytes):
        converter.add(batch)
        for raw in batch:
            digest.update(raw)
            bytes_in += len(raw)
    merged = s.TypeStats()
    if collection_schema is not None:
        merged.merge(collection_schema.stats)
    merged.merge(converter.stats)
    file_schema = s.resolve_schema(merged, collection_schema, options)
    documents = converter.stats.documents
    if (
        previous is not None
        and previous.digest == digest.hexdigest()
        and previous.format_version == FORMAT_VERSION
        and previous.columns == {c.name: c.type for c in file_schema.columns}
    ):
        # Same documents, same columns: the file already says it (a change outside the filter, a retry).
        return WrittenBucket(
            key=bucket.key,
            uri=lake.uri(path),
            documents=documents,
            bytes_in=bytes_in,
            bytes_out=0,
            digest=previous.digest,
            schema=file_schema,
            stats=converter.stats,
            outliers=json.loads(previous_metadata.get(META_OUTLIERS, "{}")),
            previous=previous,
            seconds=time.monotonic() - started,
            rewritten=False,
        )
    outliers: Counter = Counter()
    metadata = {
        META_FORMAT: FORMAT_VERSION,
        META_DIGEST: digest.hexdigest(),
        META_COUNT: str(documents),
        META_COLLECTION: source.label,
        META_BUCKET: bucket.key,
        META_RANGE: json_util.dumps(
            [bucket.lower, bucket.upper], json_options=json_util.CANONICAL_JSON_OPTIONS
        ),
        META_SCHEMA_VERSION: str(file_schema.version),
        META_STATS: converter.stats.to_json(),
        META_COLUMNS: json.dumps([[c.name, c.type] for c in file_schema.columns]),
    }
    arrow_schema = arrow_schema_of(file_schema)
    try:
        with lake.atomic_local_file(path) as local_path:
            writer = pq.ParquetWriter(local_path, arrow_schema.with_metadata(metadata), compression="zstd")
            try:
                for table in converter.tables(file_schema, outliers):
                    rows = max(1, int(table.num_rows * _ROW_GROUP_BYTES / max(1, table.nbytes)))
                    writer.write_table(table, row_group_size=rows)
                # The outlier counts are known only now; footer metadata is written on close.
                writer.add_key_value_metadata({META_OUTLIERS: json.dumps(dict(outliers))})
            finally:
                writer.close()
            bytes_out = os.path.getsize(local_path)
    except Exception as error:
        raise BucketWriteError(
            f"{source.label}: could not write bucket {bucket.key} {bucket.describe()} to {lake.uri(path)}: {error}"
        ) from error
    return WrittenBucket(
        key=bucket.key,
        uri=lake.uri(path),
        documents=documents,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        digest=digest.hexdigest(),
        schema=file_schema,
        stats=converter.stats,
        outliers=dict(outliers),
        previous=previous,
        seconds=time.monotonic() - started,
    )


@dataclass(frozen=True)
class IdCoverage:
    expected: int
    missing: list[str]  # in MongoDB, not in the file
    extra: list[str]  # in the file, not in MongoDB


def check_id_coverage(
    source: SourceCollection, collection: Collection, lake: Lake, bucket: Bucket
) -> IdCoverage:
    """Compare the `_id`s of the bucket's range in MongoDB with those in the file as stored."""
    in_mongo = {id_string(_id) for _id in scan_bucket_ids(source, collection, bucket)}
    table = lake.read_table(bucket_file(source.database, source.collection, bucket.key), columns=["_id"])
    in_file = set(table.column("_id").to_pylist())
    return IdCoverage(len(in_mongo), sorted(in_mongo - in_file), sorted(in_file - in_mongo))
