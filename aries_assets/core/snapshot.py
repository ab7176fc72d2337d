"""Snapshot a collection into bucket files: plan the buckets, find the stale ones, write one.

Plain functions over a pymongo collection and a Lake; the Dagster layer and
`aries sync` call these and nothing else, so both behave the same.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

import pyarrow.parquet as pq
from bson import json_util
from pymongo.collection import Collection

from aries_assets.core.arrow import Column, DocumentConverter
from aries_assets.core.buckets import Bucket, BucketPlan, plan_buckets
from aries_assets.core.extract import (
    DEFAULT_BATCH_BYTES,
    SourceCollection,
    read_bucket,
    scan_documents,
    scan_ids,
)
from aries_assets.core.lake import Lake, bucket_file, load_bucket_map, save_bucket_map

# Bumped when the file layout changes, so existing bucket files are rewritten.
FORMAT_VERSION = "1"
_ROW_GROUP_BYTES = 64 * 1024 * 1024

META_FORMAT = "aries.format_version"
META_DIGEST = "aries.content_sha256"
META_COUNT = "aries.document_count"
META_COLLECTION = "aries.collection"
META_BUCKET = "aries.bucket"
META_RANGE = "aries.id_range"


class BucketWriteError(RuntimeError):
    """A bucket could not be written; names the collection and bucket."""


@dataclass(frozen=True)
class WrittenBucket:
    """What writing one bucket file produced."""

    key: str
    uri: str
    documents: int
    bytes_in: int  # raw BSON read from MongoDB
    bytes_out: int  # Parquet written
    digest: str
    columns: list[Column]
    seconds: float


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


def stale_buckets(source: SourceCollection, lake: Lake, result: BucketPlan) -> list[str]:
    """Buckets whose file is missing, from another format version, or differs from MongoDB."""
    stale = []
    for key in result.bucket_map.keys:
        metadata = lake.parquet_metadata(bucket_file(source.database, source.collection, key))
        if (
            metadata is None
            or metadata.get(META_FORMAT) != FORMAT_VERSION
            or metadata.get(META_DIGEST) != result.digests.get(key)
        ):
            stale.append(key)
    return stale


def write_bucket(
    source: SourceCollection,
    collection: Collection,
    lake: Lake,
    bucket: Bucket,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> WrittenBucket:
    """Read one bucket from MongoDB and replace its Parquet file whole.

    Memory is bounded by the bucket: its raw BSON is held while the column
    types are settled, then converted and written batch by batch.
    """
    started = time.monotonic()
    path = bucket_file(source.database, source.collection, bucket.key)
    batches = list(read_bucket(source, collection, bucket, batch_bytes))
    converter = DocumentConverter()
    digest = hashlib.sha256()
    documents = bytes_in = 0
    for batch in batches:
        converter.observe(batch)
        for raw in batch:
            digest.update(raw)
            bytes_in += len(raw)
        documents += len(batch)
    columns = converter.columns()
    schema = converter.schema(columns).with_metadata(
        {
            META_FORMAT: FORMAT_VERSION,
            META_DIGEST: digest.hexdigest(),
            META_COUNT: str(documents),
            META_COLLECTION: source.label,
            META_BUCKET: bucket.key,
            META_RANGE: _range_json(bucket),
        }
    )
    try:
        with lake.atomic_local_file(path) as local_path:
            with pq.ParquetWriter(local_path, schema, compression="zstd") as writer:
                while batches:
                    batch = batches.pop(0)  # release raw BSON as it is written
                    table = converter.to_table(batch, columns).replace_schema_metadata(schema.metadata)
                    rows = max(1, int(len(batch) * _ROW_GROUP_BYTES / max(1, sum(map(len, batch)))))
                    writer.write_table(table, row_group_size=rows)
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
        columns=columns,
        seconds=time.monotonic() - started,
    )


def _range_json(bucket: Bucket) -> str:
    return json_util.dumps([bucket.lower, bucket.upper], json_options=json_util.CANONICAL_JSON_OPTIONS)
