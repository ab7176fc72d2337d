"""Snapshot a collection into bucket files: plan buckets, settle the schema, write a bucket.

Plain functions over a pymongo collection and a Lake; the Dagster layer and
`aries sync` call these and nothing else, so both behave the same.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import pyarrow.parquet as pq
from bson import json_util

from aries_assets.core import schema as s
from aries_assets.core.arrow import BucketConverter, arrow_schema_of, options_fingerprint
from aries_assets.core.buckets import BucketDocuments
from aries_assets.core.extract import DEFAULT_BATCH_BYTES, SourceCollection
from aries_assets.core.lake import Lake, bucket_file, collection_prefix, schema_file

# Bumped when the file layout changes, so existing bucket files are rewritten.
FORMAT_VERSION = "4"  # 4: `_id_key`, excluded paths removed through arrays
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
META_OPTIONS = "aries.options_sha256"


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
    options: str = ""  # fingerprint of the collection options the file was written with
    documents: int = 0

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
                options=metadata.get(META_OPTIONS, ""),
                documents=int(metadata.get(META_COUNT, 0)),
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


def file_schema(collection_schema: s.InferredSchema, found: BucketFile) -> s.InferredSchema:
    """The schema a bucket file was written with: the collection's, widened by any column the file
    has that the collection schema does not (yet). Compared by columns, never by version alone:
    two writers can each produce a different version N+1."""
    expected = {c.name: c.type for c in collection_schema.columns}
    if all(expected.get(name) == type_name for name, type_name in found.columns.items()):
        return collection_schema
    columns = []
    for column in collection_schema.columns:
        type_name = found.columns.get(column.name, column.type)
        columns.append(replace(column, type=type_name, accepts=s.accepted_kinds(type_name)))
    for name, type_name in found.columns.items():
        if name not in expected:
            columns.append(s.ColumnSpec((name,), name, type_name, s.accepted_kinds(type_name)))
    merged = s.TypeStats()
    merged.merge(collection_schema.stats)
    merged.merge(found.stats)
    version = max(found.schema_version, collection_schema.version + 1)
    return s.InferredSchema(version, columns, merged, collection_schema.names)


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


def without(total: s.TypeStats, part: s.TypeStats) -> s.TypeStats:
    """`total` less one bucket's counts: a bucket being rewritten must not be counted twice.

    Counts subtract exactly; ranges (min/max, digits, widths) cannot, and stay as
    they were, which can only keep a type wider until the next reconcile.
    """
    result = s.TypeStats()
    result.merge(total)
    result.documents = max(0, result.documents - part.documents)
    for path, theirs in part.fields.items():
        mine = result.fields.get(path)
        if mine is None:
            continue
        mine.kinds.subtract(theirs.kinds)
        mine.kinds = +mine.kinds  # drop zero and negative counts
        mine.element_kinds.subtract(theirs.element_kinds)
        mine.element_kinds = +mine.element_kinds
        mine.nulls = max(0, mine.nulls - theirs.nulls)
        if not mine.kinds and not mine.nulls:
            del result.fields[path]
    return result


def is_current(found: BucketFile | None, digest: str, options: s.SchemaOptions) -> bool:
    """The file already holds exactly these documents, written the way the options say."""
    return (
        found is not None
        and found.format_version == FORMAT_VERSION
        and found.digest == digest
        and found.options == options_fingerprint(options)
    )


def write_bucket(
    source: SourceCollection,
    lake: Lake,
    docs: BucketDocuments,
    options: s.SchemaOptions | None = None,
    collection_schema: s.InferredSchema | None = None,
    previous: BucketFile | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> WrittenBucket:
    """Replace one bucket's Parquet file whole with these documents (read in `_id` order).

    The file follows the collection schema, widened by anything this bucket
    holds that the schema has not seen yet (the next reconcile makes that the
    collection's schema and rewrites any file that disagrees). The bucket's
    previous statistics are taken out of the collection's before its new ones
    go in, so a bucket is never counted twice.
    """
    options = options or s.SchemaOptions()
    started = time.monotonic()
    bucket = docs.bucket
    path = bucket_file(source.database, source.collection, bucket.key)
    converter = BucketConverter(options, set(collection_schema.stats.maps) if collection_schema else set())
    batch: list[bytes] = []
    size = 0
    for raw in docs.documents:
        batch.append(raw)
        size += len(raw)
        if size >= batch_bytes:
            converter.add(batch)
            batch, size = [], 0
    if batch:
        converter.add(batch)
    merged = s.TypeStats()
    if collection_schema is not None:
        merged.merge(collection_schema.stats)
        if previous is not None:
            merged = without(merged, previous.stats)
    merged.merge(converter.stats)
    file_schema = s.resolve_schema(merged, collection_schema, options)
    documents = converter.stats.documents
    if is_current(previous, docs.digest, options) and previous.columns == {
        c.name: c.type for c in file_schema.columns
    }:
        # Same documents, same columns: the file already says it (a change outside the filter, a retry).
        return WrittenBucket(
            key=bucket.key,
            uri=lake.uri(path),
            documents=documents,
            bytes_in=docs.nbytes,
            bytes_out=0,
            digest=previous.digest,
            schema=file_schema,
            stats=converter.stats,
            outliers={},
            previous=previous,
            seconds=time.monotonic() - started,
            rewritten=False,
        )
    outliers: Counter = Counter()
    metadata = {
        META_FORMAT: FORMAT_VERSION,
        META_DIGEST: docs.digest,
        META_COUNT: str(documents),
        META_COLLECTION: source.label,
        META_BUCKET: bucket.key,
        META_RANGE: json_util.dumps(
            [bucket.lower, bucket.upper], json_options=json_util.CANONICAL_JSON_OPTIONS
        ),
        META_SCHEMA_VERSION: str(file_schema.version),
        META_STATS: converter.stats.to_json(),
        META_COLUMNS: json.dumps([[c.name, c.type] for c in file_schema.columns]),
        META_OPTIONS: options_fingerprint(options),
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
            # `id_coverage` from the read itself: the file holds every document read, before it is published.
            rows_in_file = pq.read_metadata(local_path).num_rows
            if rows_in_file != len(docs.documents):
                raise RuntimeError(
                    f"the file holds {rows_in_file} rows for {len(docs.documents)} documents read"
                )
    except Exception as error:
        raise BucketWriteError(
            f"{source.label}: could not write bucket {bucket.key} {bucket.describe()} to {lake.uri(path)}: {error}"
        ) from error
    return WrittenBucket(
        key=bucket.key,
        uri=lake.uri(path),
        documents=documents,
        bytes_in=docs.nbytes,
        bytes_out=bytes_out,
        digest=docs.digest,
        schema=file_schema,
        stats=converter.stats,
        outliers=dict(outliers),
        previous=previous,
        seconds=time.monotonic() - started,
    )
