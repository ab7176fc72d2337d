"""Snapshot a collection into bucket files: plan buckets, settle the schema, write a bucket.

Plain functions over a pymongo collection and a Lake; the Dagster layer and
`aries sync` call these and nothing else, so both behave the same.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq
from bson import json_util

from aries_assets.core import parquet_join
from aries_assets.core import schema as s
from aries_assets.core.arrow import (
    DOC_COLUMN,
    KEY_COLUMN,
    BucketConverter,
    arrow_schema_of,
    options_fingerprint,
)
from aries_assets.core.buckets import BucketDocuments
from aries_assets.core.extract import SourceCollection
from aries_assets.core.heap import HeapWatch
from aries_assets.core.lake import Lake, bucket_file, collection_prefix, schema_file

_log = logging.getLogger(__name__)

# Bumped when the file layout changes, so existing bucket files are rewritten.
FORMAT_VERSION = "4"  # 4: `_id_key`, excluded paths removed through arrays

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


def load_digest(found: BucketFile) -> str:
    """What a warehouse records of a bucket it loaded: the file's documents and the options they were
    written with. The documents' digest alone stays the same when an exclude is added, and the
    table would keep the excluded field."""
    return hashlib.sha256(f"{found.digest}\n{found.options}".encode()).hexdigest()


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


@dataclass
class ConvertedFile:
    """What converting a bucket into a Parquet file settled."""

    schema: s.InferredSchema  # the schema the file follows
    stats: s.TypeStats  # the bucket's statistics
    outliers: dict[str, int]  # values kept only in `_doc`, by column


def convert_to_parquet(
    local_path: str,
    documents: Sequence[bytes],
    settle: Callable[[s.TypeStats], s.InferredSchema],
    options: s.SchemaOptions,
    known_maps: set[s.Path] | None = None,
    metadata: dict[str, str] | None = None,
) -> ConvertedFile:
    """Write a bucket's documents to a Parquet file a chunk at a time, one row group per chunk.

    The schema follows from the statistics of the whole bucket; each chunk is
    written in the schema `settle` gives for the statistics so far and then
    dropped, so memory is the documents plus one chunk. When the schema changes
    on the way, the rows written before are carried over if it only added
    columns those rows had no value for (null there); otherwise the bucket is
    converted again in the settled schema.
    """
    heap = HeapWatch(sum(map(len, documents)))
    runs = _SchemaRuns(local_path, metadata or {}, heap.before_join)
    try:
        # Chunks sized from the bucket's own bytes (`chunk_bytes_for`), so memory follows them.
        converter = BucketConverter(options, set(known_maps or ()), chunk_bytes=None)
        for batch in converter.chunks(documents):
            schema = settle(converter.stats)
            runs.write(converter.table(batch, schema, runs.outliers), schema, converter.stats)
            del batch
            heap.after_chunk()
        stats = converter.stats
        schema = settle(stats)
        if not runs.finish(schema, stats):
            runs.reset()  # a column changed under rows already written: convert again, in the settled schema
            converter = BucketConverter(options, set(known_maps or ()), chunk_bytes=None)
            for batch in converter.chunks(documents):
                runs.write(converter.table(batch, schema, runs.outliers), schema, stats)
                del batch
                heap.after_chunk()
            runs.finish(schema, stats)
    finally:
        runs.discard()
    return ConvertedFile(schema, stats, dict(runs.outliers))


def _same_columns(a: s.InferredSchema, b: s.InferredSchema) -> bool:
    """The same Parquet columns: names, types and paths (what `arrow_schema_of` makes of them)."""
    return a is b or [(c.name, c.type, c.path) for c in a.columns] == [
        (c.name, c.type, c.path) for c in b.columns
    ]


def _carries_over(written: s.InferredSchema, seen: set[s.Path], settled: s.InferredSchema) -> bool:
    """Rows written in `written` are rows of `settled`: every column kept as it was, and each added
    column's field absent from every row written so far."""
    kept = {f.name: f for f in arrow_schema_of(written)}
    final = {f.name: f for f in arrow_schema_of(settled)}
    if any(name not in final or not final[name].equals(f, check_metadata=True) for name, f in kept.items()):
        return False
    return all(c.path not in seen for c in settled.columns if c.name not in kept)


# One value per document: a dictionary would only be built to be thrown away.
_UNIQUE_COLUMNS = frozenset(s.RESERVED_COLUMNS) | {KEY_COLUMN}
# Parquet's data page: the writer holds a page as it encodes it, and its compressed copy, before
# it writes it out. At Arrow's default 1 MiB, a 1 MiB chunk's write took 3.6 MB more than the
# chunk's own table; at 256 KiB, 1.2 MB.
_PAGE_BYTES = 256 * 1024
# Parquet keeps no minimum or maximum longer than this (Arrow's `max_statistics_size`), yet copies
# every long value several times over while it works them out: a 2 MB string cost 12 MB.
_STATED_BYTES = 4096


def _parquet_writer(
    path: str, schema: pa.Schema, unstated: frozenset[str], long: frozenset[str]
) -> pq.ParquetWriter:
    dictionary, stated = _leaf_columns(schema, unstated, long)
    return pq.ParquetWriter(
        path,
        schema,
        compression="zstd",
        use_dictionary=dictionary,
        write_statistics=stated,
        data_page_size=_PAGE_BYTES,
    )


def _unstated(schema: s.InferredSchema, long: frozenset[str]) -> frozenset[str]:
    """Columns whose statistics Parquet would drop anyway, or no reader prunes by: JSON text (like
    `_doc`), binary, and text whose values run past `_STATED_BYTES` (in the statistics so far)."""
    names = {DOC_COLUMN, KEY_COLUMN}
    for column in schema.columns:
        base = column.type.removeprefix("list<").removesuffix(">")
        if base in (s.T_JSON, s.T_BINARY):
            names.add(column.name)
    return frozenset(names) | long


def _long(schema: s.InferredSchema, stats: s.TypeStats) -> frozenset[str]:
    """Columns whose values run past `_STATED_BYTES` (in the statistics so far). Nor are they
    dictionary-encoded: the dictionary would hold a copy of each long value, only to be dropped
    once it outgrew its page (a 2 MB string cost 2 MB more at its peak)."""
    names = set()
    for column in schema.columns:
        field = stats.fields.get(column.path)
        if field is not None and field.max_bytes > _STATED_BYTES:
            names.add(column.name)
    return frozenset(names)


@functools.lru_cache(maxsize=64)
def _leaf_columns(
    schema: pa.Schema, unstated: frozenset[str], long: frozenset[str]
) -> tuple[list[str], list[str]]:
    """Parquet leaf columns (`tags.list.element` for a list) to dictionary-encode (all but the
    one-per-document ones and `long`) and to keep statistics for (all but `unstated`)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), buffer)
    leaves = pq.ParquetFile(pa.BufferReader(buffer.getvalue())).schema
    paths = [leaves.column(i).path for i in range(len(leaves))]
    return (
        [p for p in paths if p.split(".", 1)[0] not in _UNIQUE_COLUMNS | long],
        [p for p in paths if p.split(".", 1)[0] not in unstated],
    )


class _SchemaRuns:
    """Runs of row groups, each written in one schema, joined into one file once the schema is settled."""

    def __init__(self, local_path: str, metadata: dict[str, str], before_join: Callable[[], None]) -> None:
        self.path = local_path
        self.metadata = metadata
        self.before_join = before_join
        self.outliers: Counter = Counter()
        self.runs: list[tuple[str, s.InferredSchema, set[s.Path]]] = []  # file, schema, paths seen by its end
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table, schema: s.InferredSchema, stats: s.TypeStats) -> None:
        if self.writer is None or not _same_columns(self.runs[-1][1], schema):
            self._close_writer()
            path = self.path if not self.runs else f"{self.path}.run{len(self.runs)}"
            self.writer = _parquet_writer(
                path,
                table.schema.with_metadata(self.metadata),
                _unstated(schema, long := _long(schema, stats)),
                long,
            )
            self.runs.append((path, schema, set()))
        self.writer.write_table(table)
        self.runs[-1][2].update(stats.fields)

    def finish(self, schema: s.InferredSchema, stats: s.TypeStats) -> bool:
        """Close the bucket's file in `schema`; False when rows written cannot be carried over into it."""
        late = {
            META_SCHEMA_VERSION: str(schema.version),
            META_STATS: stats.to_json(),
            META_COLUMNS: json.dumps([[c.name, c.type] for c in schema.columns]),
            META_OUTLIERS: json.dumps(dict(self.outliers)),
        }
        if len(self.runs) == 1 and _same_columns(self.runs[0][1], schema):
            self.writer.add_key_value_metadata(late)  # known only now; the footer is written on close
            self._close_writer()
            return True
        self._close_writer()
        if not all(_carries_over(written, seen, schema) for _, written, seen in self.runs):
            return False
        arrow_schema = arrow_schema_of(schema).with_metadata(self.metadata)
        long = _long(schema, stats)
        unstated = _unstated(schema, long)
        joined = f"{self.path}.joined"
        self.before_join()
        try:
            # The rows written keep their column chunks, copied byte for byte.
            parquet_join.join(
                [path for path, _, _ in self.runs],
                arrow_schema,
                joined,
                lambda sink, columns: _parquet_writer(sink, columns, unstated, long),
                late,
            )
        except parquet_join.CannotJoin as reason:
            _log.info("%s: rows written before new columns are rewritten (%s)", self.path, reason)
            self._rewrite(joined, arrow_schema, unstated, long, late)
        os.replace(joined, self.path)
        return True

    def _rewrite(
        self, joined: str, arrow_schema: pa.Schema, unstated: frozenset[str], long: frozenset[str], late: dict
    ) -> None:
        """The runs' rows read back and written again in `arrow_schema`, a row group at a time."""
        with _parquet_writer(joined, arrow_schema, unstated, long) as writer:
            for path, _, _ in self.runs:
                source = pq.ParquetFile(path)
                for group in range(source.num_row_groups):
                    table = source.read_row_group(group)
                    arrays = [
                        table.column(f.name)
                        if f.name in table.column_names
                        else pa.nulls(table.num_rows, f.type)
                        for f in arrow_schema
                    ]
                    writer.write_table(pa.Table.from_arrays(arrays, schema=arrow_schema))
                source.close()
            writer.add_key_value_metadata(late)

    def reset(self) -> None:
        self._close_writer()
        self.discard()
        self.runs = []
        self.outliers.clear()

    def _close_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def discard(self) -> None:
        """Remove the runs' files but the bucket's own (whose owner removes it on failure)."""
        self._close_writer()
        # `parquet_join` removes its own temporary files.
        for path in [p for p, _, _ in self.runs[1:]] + [f"{self.path}.joined"]:
            if os.path.exists(path):
                os.unlink(path)


def write_bucket(
    source: SourceCollection,
    lake: Lake,
    docs: BucketDocuments,
    options: s.SchemaOptions | None = None,
    collection_schema: s.InferredSchema | None = None,
    previous: BucketFile | None = None,
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
    known_maps = set(collection_schema.stats.maps) if collection_schema else set()
    others = s.TypeStats()
    if collection_schema is not None:
        others.merge(collection_schema.stats)
        if previous is not None:
            others = without(others, previous.stats)

    def settle(stats: s.TypeStats) -> s.InferredSchema:
        merged = s.TypeStats()
        merged.merge(others)
        merged.merge(stats)
        return s.resolve_schema(merged, collection_schema, options)

    if is_current(previous, docs.digest, options):
        # Same documents: if the columns are the same too, the file already says it (a change outside
        # the filter, a retry). Counting the statistics costs a pass; writing nothing saves the rest.
        converter = BucketConverter(options, known_maps, chunk_bytes=None)  # sized as a write is
        for _ in converter.chunks(docs.documents):
            pass
        file_schema = settle(converter.stats)
        if previous.columns == {c.name: c.type for c in file_schema.columns}:
            return WrittenBucket(
                key=bucket.key,
                uri=lake.uri(path),
                documents=converter.stats.documents,
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
    metadata = {
        META_FORMAT: FORMAT_VERSION,
        META_DIGEST: docs.digest,
        META_COUNT: str(len(docs.documents)),
        META_COLLECTION: source.label,
        META_BUCKET: bucket.key,
        META_RANGE: json_util.dumps(
            [bucket.lower, bucket.upper], json_options=json_util.CANONICAL_JSON_OPTIONS
        ),
        META_OPTIONS: options_fingerprint(options),
    }
    try:
        with lake.atomic_local_file(path) as local_path:
            converted = convert_to_parquet(local_path, docs.documents, settle, options, known_maps, metadata)
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
        documents=converted.stats.documents,
        bytes_in=docs.nbytes,
        bytes_out=bytes_out,
        digest=docs.digest,
        schema=converted.schema,
        stats=converted.stats,
        outliers=converted.outliers,
        previous=previous,
        seconds=time.monotonic() - started,
    )
