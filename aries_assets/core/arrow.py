"""BSON documents to Arrow: a lossless `_doc`, an injective `_id_key`, and typed columns.

One pass over a bucket renders each batch's `_doc`, counts the type statistics
and keeps each field's values, as Arrow arrays for the documents that allow it
(`bson_columns`), as decoded Python values for the others. Once the schema is
settled (which needs the statistics of the whole bucket), the kept values
become the typed columns. A value its column cannot hold is a counted
outlier: null in the column, intact in `_doc`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import bson
import bsonjs
import numpy as np
import pyarrow as pa
from bson import Binary, Decimal128, Int64, ObjectId, Timestamp, json_util
from bson.codec_options import DatetimeConversion
from bson.datetime_ms import DatetimeMS

from aries_assets.core import doc_text, heap
from aries_assets.core import schema as s
from aries_assets.core.bson_columns import (
    ColumnarBatch,
    columnar_part,
    fast_column,
    python_values,
)
from aries_assets.core.extract import CODEC_OPTIONS
from aries_assets.core.ordering import epoch_millis

# Arrow's default allocator (mimalloc) keeps what a chunk freed mapped for the next, several times
# the chunk: a bucket's memory follows its bytes only if freed memory goes back. jemalloc (in
# pyarrow's Linux and macOS wheels) gives it back, and keeps Arrow's buffers out of glibc's heap,
# where the chunk's NumPy arrays and Python objects would otherwise be freed between them, into
# holes glibc cannot return: a messy bucket of 2 MiB chunks peaked at 2.7x its BSON, against 3.3x
# with the system allocator, as fast or faster. Where a wheel lacks it, the system allocator.
# ARROW_DEFAULT_MEMORY_POOL, where set, still decides. (Set here, it covers what Python asks Arrow
# for; writer processes start with it set, which covers Arrow's C++ internals too: see
# `engine.WRITER_MEMORY_ENV`.)
MEMORY_POOL = "jemalloc" if "jemalloc" in pa.supported_memory_backends() else "system"
if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
    pa.set_memory_pool(pa.jemalloc_memory_pool() if MEMORY_POOL == "jemalloc" else pa.system_memory_pool())

_log = logging.getLogger(__name__)
ID_COLUMN, DOC_COLUMN = s.RESERVED_COLUMNS
KEY_COLUMN = "_id_key"  # injective `_id`; inferred names never start with "_", so it cannot clash

KEY_JSON_OPTIONS = json_util.JSONOptions(
    json_mode=json_util.JSONMode.CANONICAL, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)

_KIND_BY_TYPE: dict[type, str] = {
    bool: s.BOOL,
    int: s.INT32,  # BSON int32 decodes as int, int64 as Int64
    Int64: s.INT64,
    float: s.DOUBLE,
    Decimal128: s.DECIMAL,
    str: s.STRING,
    ObjectId: s.OBJECTID,
    bytes: s.BINARY,
    datetime.datetime: s.DATE,
    DatetimeMS: s.DATE,
    Timestamp: s.TIMESTAMP,
    list: s.ARRAY,
    dict: s.DOCUMENT,
}
_OUTLIER = object()
# Converted and written at a time (a row group): the transient copies (JSON text, decoded documents)
# are a few times this, and the exact path's Python objects about ten times.
CHUNK_BYTES = 2 * 1024 * 1024
# A bucket converts in chunks of an eighth of it (`chunk_bytes_for`), since a chunk's transient copies
# (its `_doc` text, the values the walk read, Arrow arrays, Parquet pages) come to about ten times its
# BSON, and the bucket's raw BSON is held beside them: so a write's peak stays under three times the
# bucket. But not below this: each chunk has a fixed cost (a row group, a walk's steps, per-column
# statistics) of a few milliseconds, and 384 KiB chunks made a 2.3 MB bucket's conversion a third
# slower than 1 MiB chunks (128 KB chunks, half as fast).
MIN_CHUNK_BYTES = 384 * 1024
CHUNKS_PER_BUCKET = 8
# A chunk whose documents took both paths held Arrow's parse of some beside the Python objects of
# the others, twice what either alone takes: after one where the others came to `SPLIT_SHARE` of
# its bytes, chunks are cut at most this large. A few (a map beside arrays, one odd document in
# thousands) weigh nothing: cutting every chunk after them made a messy bucket's conversion a fifth
# slower.
SPLIT_CHUNK_BYTES = 1024 * 1024
SPLIT_SHARE = 1 / 8
# BSON the exact path decodes at a time: Python objects take several times the bytes.
EXACT_CHUNK_BYTES = 512 * 1024
# A bucket whose chunks the columnar path refused this often in a row is messy throughout: stop trying.
_GIVE_UP_AFTER = 2
_NOT_DECIMAL = s.MAX_DECIMAL_PRECISION + 1  # NaN and infinities have no decimal form


def _fall_back(error: Exception, path: str) -> None:
    """A fault in a fast path must not fail a bucket: the exact path, and libbson's own `_doc`,
    give the same file, only slower. Tests set `ARIES_STRICT_CONVERSION=1` to fail instead."""
    if os.environ.get("ARIES_STRICT_CONVERSION") == "1":
        raise error
    _log.warning("%s failed on a chunk (%r); it takes the exact path instead", path, error)


def chunk_bytes_for(bucket_bytes: int) -> int:
    """The chunk size for a bucket of this much raw BSON: an eighth of it, at least MIN_CHUNK_BYTES
    and at most CHUNK_BYTES, evened out so the bucket splits into equal chunks (a 500 KB bucket is
    one chunk, not 384 KiB and a sliver)."""
    target = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, bucket_bytes // CHUNKS_PER_BUCKET))
    count = max(1, round(bucket_bytes / target))
    return -(-bucket_bytes // count) if bucket_bytes else target


def kind_of(value: Any) -> str | None:
    kind = _KIND_BY_TYPE.get(type(value))
    if kind is not None:
        return kind
    if value is None:
        return None
    if isinstance(value, Binary):
        return s.UUID if value.subtype == 4 and len(value) == 16 else s.BINARY
    return s.OTHER


def id_string(value: Any) -> str:
    """`_id` as text: ObjectId hex, strings as they are, integers in decimal, the rest as JSON."""
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, Int64)) and not isinstance(value, bool):
        return str(int(value))
    return json_util.dumps(value, json_options=json_util.CANONICAL_JSON_OPTIONS)


def id_key(value: Any) -> str:
    """`_id` as canonical Extended JSON: unlike `id_string`, distinct ids never share a key (5, "5", Int64(5))."""
    kind = type(value)
    if kind is ObjectId:
        return f'{{"$oid": "{value}"}}'
    if kind is str:
        return json.dumps(value)  # as json_util writes a string
    if kind is int and -(2**31) <= value < 2**31:
        return f'{{"$numberInt": "{value}"}}'
    if kind is Int64 or kind is int:
        return f'{{"$numberLong": "{int(value)}"}}'
    return json_util.dumps(value, json_options=KEY_JSON_OPTIONS)


def options_fingerprint(options: s.SchemaOptions) -> str:
    """A digest of every option that shapes a bucket file's content: store it, and rewrite on a mismatch.

    Adding a path to `exclude` must scrub files written before; equal options in
    another order give the same digest.
    """
    body = {
        "exclude": sorted(set(options.exclude)),
        "overrides": sorted(options.overrides.items()),
        "max_depth": options.max_depth,
        "max_columns": options.max_columns,
        "outlier_share": options.outlier_share,
        "evolution": options.evolution,
        "infer": options.infer,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def relaxed_json_value(value: Any) -> str:
    """A value as relaxed Extended JSON; bsonjs (libbson) is much faster than json_util."""
    return doc_text.value_text(bsonjs.dumps(bson.encode({"v": value}), mode=bsonjs.RELAXED))


def _field_stats(values: list[Any]) -> s.FieldStats:
    """Statistics of one field path's values, counted by type at C speed where possible."""
    stats = s.FieldStats()
    by_type = Counter(map(type, values))
    typed: dict[str, list[Any]] = {}
    for value_type, count in by_type.items():
        if value_type is type(None):
            stats.nulls += count
            continue
        kind = _KIND_BY_TYPE.get(value_type)
        if kind is not None:
            stats.kinds[kind] += count
            if count == len(values):
                typed[kind] = values  # one type throughout: no copy
            else:
                typed.setdefault(kind, []).extend(v for v in values if type(v) is value_type)
            continue
        for value in values:  # Binary subtypes, regexes, code, min/max keys: rare
            if type(value) is value_type:
                stats.kinds[kind_of(value)] += 1
    _measure(stats, typed)
    if s.ARRAY in typed:
        elements = [e for array in typed[s.ARRAY] for e in array]
        element_stats = _field_stats(elements)
        stats.element_kinds = Counter(element_stats.kinds)
        if element_stats.nulls:
            stats.element_kinds["null"] = element_stats.nulls
        stats.merge(s.FieldStats(int_min=element_stats.int_min, int_max=element_stats.int_max,
                                 int_digits=element_stats.int_digits, scale=element_stats.scale,
                                 max_bytes=element_stats.max_bytes))  # fmt: skip
    return stats


def _measure(stats: s.FieldStats, typed: dict[str, list[Any]]) -> None:
    ints = typed.get(s.INT32, []) + typed.get(s.INT64, [])
    if ints:
        stats.int_min, stats.int_max = int(min(ints)), int(max(ints))
    if s.STRING in typed:
        stats.max_bytes = max(map(len, map(str.encode, typed[s.STRING])))
    for kind in (s.DOUBLE, s.DECIMAL):
        for value in typed.get(kind, ()):
            digits = _decimal128_digits(value) if kind is s.DECIMAL else None
            if digits is None:
                number = value.to_decimal() if kind is s.DECIMAL else Decimal(repr(value))
                if not number.is_finite():
                    stats.scale = max(stats.scale, _NOT_DECIMAL)  # the largest counts, in any order
                    continue
                digits = s.decimal_digits(number)
            stats.int_digits = max(stats.int_digits, digits[0])
            stats.scale = max(stats.scale, digits[1])


_BID = struct.Struct("<QQ")


_MAX_COEFFICIENT = 10**s.DECIMAL128_DIGITS - 1


def _bid(value: Decimal128) -> tuple[bool, int, int] | None:
    """(negative, coefficient, exponent) from a Decimal128's IEEE 754-2008 BID bits; None for NaN,
    infinities and the large-coefficient form. A non-canonical coefficient (past 34 digits) is
    zero, as IEEE 754 and `to_decimal()` read it."""
    low, high = _BID.unpack(value.bid)
    if (high >> 61) & 3 == 3:
        return None
    coefficient = ((high & 0x1FFFFFFFFFFFF) << 64) | low
    if coefficient > _MAX_COEFFICIENT:
        coefficient = 0
    return bool(high >> 63), coefficient, ((high >> 49) & 0x3FFF) - 6176


def _decimal128_digits(value: Decimal128) -> tuple[int, int] | None:
    """(integer digits, scale) straight from the BID bits; None for the rare other forms."""
    parts = _bid(value)
    if parts is None:
        return None
    _, coefficient, exponent = parts
    digits = len(str(coefficient)) if coefficient else 1
    return max(0, digits + exponent), max(0, -exponent)


@dataclass
class _Batch:
    """A batch for the exact path: its decoded values by field path, until `table` takes them."""

    raw_size: int  # the batch's BSON
    values: dict[s.Path, tuple[list[int], list[Any]]] | None
    ids: pa.Array
    keys: pa.Array
    docs: Any
    stats: s.TypeStats


@dataclass
class SplitBatch:
    """A chunk converted in parts: the documents the walk takes columnar, the rest exactly."""

    columnar: ColumnarBatch
    exact: list[_Batch]
    rows: np.ndarray  # the chunk's row of each row of the parts, columnar part first
    docs: Any  # the chunk's `_doc`, in its order (the parts hold none: one copy of the text)
    stats: s.TypeStats = field(default_factory=s.TypeStats)

    def __post_init__(self) -> None:
        for part in self.parts:
            self.stats.merge(part.stats)  # counts add up alike in any order (`schema.ranked`)

    @property
    def parts(self) -> list[_Batch | ColumnarBatch]:
        return [self.columnar, *self.exact]


@dataclass
class BucketConverter:
    """Converts one bucket chunk by chunk into Arrow tables in a schema settled from its statistics.

    A chunk's documents take the columnar path (`bson_columns`: no Python object per
    value) where they can, and the exact path (decode, walk, convert in Python)
    otherwise, the two parts interleaved back in order (`SplitBatch`); both give the
    same `_doc`, columns, statistics and outliers. `fast=False` forces the exact path,
    the reference the columnar one is tested against.
    `chunks` + `table` stream a bucket: nothing is kept between chunks.
    """

    options: s.SchemaOptions = field(default_factory=s.SchemaOptions)
    known_maps: set[s.Path] = field(default_factory=set)
    fast: bool = True
    chunk_bytes: int | None = CHUNK_BYTES  # None: `chunk_bytes_for` the documents `chunks` is given
    _maps: set[s.Path] = field(default_factory=set)
    _records: set[tuple] = field(default_factory=set)
    _stats: s.TypeStats = field(default_factory=s.TypeStats)
    _refused: int = 0  # chunks in a row the columnar path refused
    _refusals: bool = False  # whether the last chunk had documents the columnar path refused
    _split: bool = False  # whether they came to `SPLIT_SHARE` of it: the next chunk is cut smaller
    _layout: tuple | None = None  # (schema, arrow schema, columns by path) of the last `table` call
    _conflicts: list = field(default_factory=list)  # fields met in two JSON shapes (`columnar_part`)

    def __post_init__(self) -> None:
        self._exclude = [tuple(p.split(".")) for p in self.options.exclude]
        # A document holds an excluded field only if its BSON holds the field's last key name.
        self._needles = [p[-1].encode() + b"\x00" for p in self._exclude]

    def chunks(self, raw_documents: Sequence[bytes]) -> Iterator[_Batch | ColumnarBatch | SplitBatch]:
        """Convert `chunk_bytes` of documents at a time; `stats` counts each chunk before it is yielded."""
        # Where each chunk ends, from the sizes at once: a chunk is the documents up to and including
        # the one that brings it to `chunk_bytes`.
        ends = np.cumsum(np.fromiter(map(len, raw_documents), np.int64, len(raw_documents)))
        chunk_bytes = self.chunk_bytes or chunk_bytes_for(int(ends[-1]) if len(ends) else 0)
        start, largest = 0, 0
        while start < len(raw_documents):
            # A chunk split between the paths holds both at once: after one whose refused documents
            # weighed much, the next one is cut smaller, and so is the first (which may be one); not
            # into a chunk and a sliver: only chunks well over that.
            split = (self._split or not start) and chunk_bytes >= 1.5 * SPLIT_CHUNK_BYTES
            size = SPLIT_CHUNK_BYTES if split else chunk_bytes
            reached = (ends[start - 1] if start else 0) + size
            end = min(int(np.searchsorted(ends, reached)) + 1, len(raw_documents))
            first = int(ends[start] - (ends[start - 1] if start else 0))  # the chunk's first document
            if end - start > 1 and ends[end - 1] - ends[end - 2] > size:
                end -= 1  # a document larger than a chunk is a chunk of its own: its copies, not others'
            elif end - start == 1 and first > max(size, largest):
                # and its copies, each some times its size, go where the chunks before it freed
                # theirs: jemalloc would keep those for a second, for extents of their own sizes.
                # (Once: a document no larger than one before it fits in what that one freed.)
                largest = first
                heap.give_back_arrow_pages()
            yield from self._convert(list(map(bytes, raw_documents[start:end])))
            start = end

    def _convert(self, raw_documents: list[bytes]) -> Iterator[_Batch | ColumnarBatch | SplitBatch]:
        if self._exclude:
            raw_documents = [self._without_excluded(raw) for raw in raw_documents]
        columnar_too = self.fast and self._refused < _GIVE_UP_AFTER
        try:
            rendered = doc_text.render(raw_documents, hold=columnar_too)
        except Exception as error:  # noqa: BLE001 (see `_fall_back`)
            _fall_back(error, "the _doc walk")
            docs = doc_text.one_by_one(raw_documents)  # libbson's own text: the reference
            rendered, columnar_too = doc_text.Rendered(docs, docs), False
        docs = rendered.docs
        columnar = None
        if columnar_too:
            columnar = self._columnar(raw_documents, rendered)
            self._refused = 0 if columnar is not None else self._refused + 1
        del rendered  # its columnar text and held values: not alive while the batch is written
        for batch in [columnar] if columnar is not None else self._exact_parts(raw_documents, docs):
            self._stats.merge(batch.stats)
            self._stats.maps |= self._maps
            yield batch

    def _columnar(
        self, raw_documents: list[bytes], rendered: doc_text.Rendered
    ) -> ColumnarBatch | SplitBatch | None:
        """The chunk by the columnar path, but for the documents it cannot take, which take the exact
        path beside it (a map, an array of documents or a binary in one document no longer sends the
        whole chunk down the exact path); None when the columnar path cannot take the chunk."""
        try:
            part = columnar_part(
                raw_documents, rendered, self.options, self.known_maps, self._refusals, self._conflicts
            )
        except Exception as error:  # noqa: BLE001 (see `_fall_back`): taken as a refusal
            _fall_back(error, "the columnar path")
            part = None
        self._refusals = self._split = part is None or len(part[1]) < len(raw_documents)
        if part is None:
            return None
        columnar, rows = part
        if not self._refusals:
            return columnar
        columnar.docs = _no_text(len(rows))  # read; the chunk's own `_doc` is written
        others = np.setdiff1d(np.arange(len(raw_documents)), rows, assume_unique=True)
        refused_bytes = sum(len(raw_documents[i]) for i in others.tolist())
        self._split = refused_bytes >= SPLIT_SHARE * sum(map(len, raw_documents))
        exact = self._exact_parts([raw_documents[i] for i in others.tolist()], _no_text(len(others)))
        return SplitBatch(columnar, list(exact), np.concatenate([rows, others]), rendered.docs)

    def _exact_parts(self, raw_documents: list[bytes], docs: pa.Array) -> Iterator[_Batch]:
        """Decoded, a document takes several times its BSON: the exact path takes a chunk in parts."""
        start = 0
        while start < len(raw_documents):
            end, size = start, 0
            while end < len(raw_documents) and (end == start or size < EXACT_CHUNK_BYTES):
                size += len(raw_documents[end])
                end += 1
            yield self._exact_batch(raw_documents[start:end], docs.slice(start, end - start))
            start = end

    def _without_excluded(self, raw: bytes) -> bytes:
        if not any(needle in raw for needle in self._needles):
            return raw
        document = bson.decode(raw, CODEC_OPTIONS)
        for path in self._exclude:
            _remove(document, path)
        return bson.encode(document, codec_options=CODEC_OPTIONS)

    def _exact_batch(self, raw_documents: list[bytes], docs: pa.Array) -> _Batch:
        raw = b"".join(raw_documents)
        documents = bson.decode_all(raw, CODEC_OPTIONS)
        values = self._values(documents)
        ids = [d["_id"] for d in documents]
        stats = s.TypeStats(
            documents=len(documents),
            fields={path: _field_stats(path_values) for path, (_, path_values) in values.items()},
        )
        id_texts = pa.array([id_string(i) for i in ids], pa.string())
        keys = pa.array([id_key(i) for i in ids], pa.string())
        return _Batch(len(raw), values, id_texts, keys, docs, stats)

    def _values(self, documents: list[dict[str, Any]]) -> dict[s.Path, tuple[list[int], list[Any]]]:
        values: dict[s.Path, tuple[list[int], list[Any]]] = {}
        if self.options.infer:
            for row, document in enumerate(documents):
                self._flatten(document, values, row)
        return values

    @property
    def stats(self) -> s.TypeStats:
        """This bucket's type statistics, counted over everything added so far."""
        return self._stats

    def _flatten(self, document: dict[str, Any], values: dict, row: int) -> None:
        """Keep every leaf value by field path; descend into documents that are records, not maps."""
        max_depth = self.options.max_depth
        stack: list[tuple[s.Path, dict[str, Any]]] = [((), document)]
        while stack:
            prefix, doc = stack.pop()
            for name, value in doc.items():
                if not prefix and name == ID_COLUMN:
                    continue  # `_id` has its own column
                path = (*prefix, name)
                if type(value) is dict and value and len(path) < max_depth:
                    shape = (path, tuple(value))
                    if shape in self._records:
                        stack.append((path, value))
                        continue
                    if path in self.known_maps or s.looks_like_map(list(value)):
                        self._maps.add(path)
                    else:
                        self._records.add(shape)  # the same keys again are a record too: skip the check
                        stack.append((path, value))
                        continue
                slot = values.get(path)
                if slot is None:
                    slot = values[path] = ([], [])
                slot[0].append(row)
                slot[1].append(value)

    def table(
        self, batch: _Batch | ColumnarBatch | SplitBatch, schema: s.InferredSchema, outliers: Counter
    ) -> pa.Table:
        """One converted batch as an Arrow table in the schema's columns; counts outliers by column."""
        if isinstance(batch, SplitBatch):
            parts = pa.concat_tables([self.table(part, schema, outliers) for part in batch.parts])
            order = np.empty(len(batch.rows), np.int64)
            order[batch.rows] = np.arange(len(batch.rows))
            table = parts.take(order)  # back in the chunk's order
            del parts
            return table.set_column(_DOC_INDEX, table.schema.field(_DOC_INDEX), batch.docs)
        if self._layout is None or self._layout[0] is not schema:
            by_path: dict[s.Path, list[s.ColumnSpec]] = {}
            for column in schema.columns:
                by_path.setdefault(column.path, []).append(column)
            self._layout = (schema, arrow_schema_of(schema), by_path)
        _, arrow_schema, by_path = self._layout
        docs = batch.docs
        if isinstance(batch, ColumnarBatch):
            return _columnar_table(batch, docs, by_path, arrow_schema, outliers)  # takes its values
        rows = len(batch.ids)
        # The walk gives what it gave when the statistics were counted: map decisions are per value.
        path_values, batch.values = batch.values, None  # taken: the batch is written once
        assert path_values is not None, "a batch's table is made once"
        columns: dict[str, list[Any]] = {}
        for path, candidates in by_path.items():
            row_numbers, values = path_values.pop(path, ((), ()))
            for column, column_values in _route(candidates, values, outliers).items():
                columns[column] = _scatter(row_numbers, column_values, rows)
        del path_values
        arrays = [batch.ids, docs, batch.keys]
        arrays += [pa.array(columns[f.name], f.type) for f in list(arrow_schema)[_FIXED_COLUMNS:]]
        return pa.Table.from_arrays(arrays, schema=arrow_schema)


_FIXED_COLUMNS = 3  # `_id`, `_doc`, `_id_key`
_DOC_INDEX = 1


def _no_text(rows: int) -> pa.Array:
    """A placeholder `_doc` for a part of a split chunk (nulls: no text buffer)."""
    return pa.nulls(rows, pa.string())


def _scatter(row_numbers, values: list[Any], rows: int) -> list[Any]:
    if len(row_numbers) == rows:
        return values  # every row has the field: already aligned
    full = [None] * rows
    for row, value in zip(row_numbers, values, strict=True):
        full[row] = value
    return full


def _columnar_table(
    batch: ColumnarBatch,
    docs: pa.Array,
    by_path: dict[s.Path, list[s.ColumnSpec]],
    arrow_schema: pa.Schema,
    outliers: Counter,
) -> pa.Table:
    """A columnar batch in the schema's columns: vectorised casts, the exact converters where they are needed."""
    columns: dict[str, pa.Array] = {}
    # Taken, a path at a time (the batch is written once): what the reader parsed is freed as its
    # columns are made, not held beside the table while Parquet writes it.
    paths, batch.paths = batch.paths, None
    assert paths is not None, "a batch's table is made once"
    for path, candidates in by_path.items():
        values = paths.pop(path, None)
        if values is None:
            continue
        if len(candidates) == 1:
            column = candidates[0]
            fast = fast_column(values, column.type, column.accepts)
            if fast is not None:
                columns[column.name], count = fast
                if count:
                    outliers[column.name] += count
                continue
        row_numbers, python = python_values(values, CODEC_OPTIONS)
        for name, column_values in _route(candidates, python, outliers).items():
            full = _scatter(row_numbers.tolist(), column_values, batch.rows)
            columns[name] = pa.array(full, arrow_schema.field(name).type)
    arrays = [batch.ids, docs, batch.keys]
    for f in list(arrow_schema)[_FIXED_COLUMNS:]:
        arrays.append(columns.get(f.name, pa.nulls(batch.rows, f.type)))
    return pa.Table.from_arrays(arrays, schema=arrow_schema)


_NONE = type(None)
# Python types pyarrow ingests unchanged for a column type (besides None).
_NATIVE: dict[str, set[type]] = {
    s.T_BOOL: {bool},
    s.T_INT32: {int},
    s.T_INT64: {int, Int64},
    s.T_DOUBLE: {float},  # pyarrow refuses integers beyond 2**53; `float` rounds them as a double does
    s.T_STRING: {str},
    s.T_TIMESTAMP: {datetime.datetime},
    s.T_BINARY: {bytes},
}


def _native(type_name: str, values: list[Any]) -> bool:
    types = set(map(type, values)) - {_NONE}
    if type_name.startswith("list<"):
        if types - {list}:
            return False
        element_types = {type(e) for v in values if v for e in v} - {_NONE}
        return element_types <= _NATIVE.get(type_name[5:-1], set())
    return types <= _NATIVE.get(type_name, set())


def _route(candidates: list[s.ColumnSpec], values: list[Any], outliers: Counter) -> dict[str, list[Any]]:
    """Values per column: converted where needed; outliers become None and are counted."""
    if len(candidates) == 1 and _native(candidates[0].type, values):
        return {candidates[0].name: values}
    converters = [(c, _converter(c.type)) for c in candidates]
    routed: dict[str, list[Any]] = {c.name: [None] * len(values) for c in candidates}
    for i, value in enumerate(values):
        if value is None:
            continue
        kind = kind_of(value)
        for column, convert in converters:
            if kind in column.accepts:
                converted = convert(value)
                if converted is not _OUTLIER:
                    routed[column.name][i] = converted
                    break
        else:
            outliers[candidates[0].name] += 1
    return routed


def _remove(value: Any, path: tuple[str, ...]) -> None:
    """Remove `path` below `value` at any depth: through arrays (of arrays) and literal dotted keys."""
    if type(value) is list:
        for element in value:
            _remove(element, path)
        return
    if not isinstance(value, dict):
        return
    for length in range(1, len(path) + 1):
        name = ".".join(path[:length])
        if name in value:
            if length == len(path):
                del value[name]
            else:
                _remove(value[name], path[length:])


# --- column types -------------------------------------------------------------------------------


def arrow_type(type_name: str) -> pa.DataType:
    if type_name.startswith("list<"):
        return pa.list_(arrow_type(type_name[5:-1]))
    decimal = s.parse_decimal(type_name)
    if decimal:
        return pa.decimal128(*decimal)
    return {
        s.T_BOOL: pa.bool_(),
        s.T_INT32: pa.int32(),
        s.T_INT64: pa.int64(),
        s.T_DOUBLE: pa.float64(),
        s.T_STRING: pa.string(),
        s.T_JSON: pa.string(),
        s.T_TIMESTAMP: pa.timestamp("ms", tz="UTC"),
        s.T_BINARY: pa.binary(),
    }[type_name]


def arrow_schema_of(schema: s.InferredSchema) -> pa.Schema:
    fields = [
        pa.field(ID_COLUMN, pa.string(), nullable=False, metadata={"aries.type": "string"}),
        pa.field(DOC_COLUMN, pa.string(), nullable=False, metadata={"aries.type": "json"}),
        pa.field(KEY_COLUMN, pa.string(), nullable=False, metadata={"aries.type": "json"}),
    ]
    for column in schema.columns:
        metadata = {"aries.path": column.dotted, "aries.type": column.type}
        fields.append(pa.field(column.name, arrow_type(column.type), metadata=metadata))
    return pa.schema(fields)


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    return bool(value) if value in (0, 1) else _OUTLIER


def _to_decimal(precision: int, scale: int):
    quantum = Decimal(1).scaleb(-scale)

    def convert(value: Any) -> Any:
        if type(value) is Decimal128:
            fast = _decimal128_at_scale(value, precision, scale)
            if fast is not None:
                return fast
        try:
            number = (
                value.to_decimal()
                if isinstance(value, Decimal128)
                else Decimal(repr(value) if isinstance(value, float) else int(value))
            )
            if not number.is_finite():
                return _OUTLIER
            exact = number.quantize(quantum)  # in the default context: 28 digits at most
        except InvalidOperation:
            return _OUTLIER
        if exact != number or len(exact.as_tuple().digits) > precision:
            return _OUTLIER
        return exact

    return convert


def _decimal128_at_scale(value: Decimal128, precision: int, scale: int) -> Any:
    """What `_to_decimal` gives for a Decimal128, straight from its BID bits (`to_decimal` builds a
    Decimal digit by digit, in Python); None for the rare forms the slow way settles (NaN,
    infinities, the large-coefficient form)."""
    parts = _bid(value)
    if parts is None:
        return None
    negative, coefficient, exponent = parts
    shift = exponent + scale
    if not coefficient:
        unscaled = 0
    elif shift >= 0:
        if shift > precision:
            return _OUTLIER  # more digits than the column holds
        unscaled = coefficient * 10**shift
    else:
        unscaled, rest = divmod(coefficient, 10**-shift)
        if rest:
            return _OUTLIER  # more fractional digits than the column keeps
    digits = len(str(unscaled))
    if digits > precision or digits > s.QUANTIZE_DIGITS:
        return _OUTLIER
    return Decimal(f"{'-' if negative else ''}{unscaled}E-{scale}")


def _text(value: Any) -> str:
    """Strings as they are; ObjectIds and UUIDs in their usual form; other values as JSON text."""
    kind = kind_of(value)
    if kind is s.STRING:
        return value
    if kind is s.OBJECTID or kind is s.DECIMAL:
        return str(value)
    if kind is s.UUID:  # as `str(uuid.UUID(bytes=...))` writes it, a few times faster
        h = bytes(value).hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    if kind is s.BOOL:
        return "true" if value else "false"
    if kind is s.INT32 or kind is s.INT64:
        return str(int(value))
    if kind is s.DATE and isinstance(value, datetime.datetime):
        return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return relaxed_json_value(value)


def _converter(type_name: str):
    """value -> what pyarrow ingests for this column type, or _OUTLIER."""
    if type_name.startswith("list<"):
        element = _converter(type_name[5:-1])
        accepts = s.accepted_kinds(type_name[5:-1])

        def convert_list(values: list[Any]) -> Any:
            # An element its type does not take makes the whole array an outlier, as a scalar would be.
            out = [None if e is None else element(e) if kind_of(e) in accepts else _OUTLIER for e in values]
            return _OUTLIER if any(e is _OUTLIER for e in out) else out

        return convert_list
    decimal = s.parse_decimal(type_name)
    if decimal:
        return _to_decimal(*decimal)
    return {
        s.T_BOOL: _to_bool,
        s.T_INT32: int,
        s.T_INT64: int,
        s.T_DOUBLE: float,
        s.T_STRING: _text,
        s.T_JSON: relaxed_json_value,
        s.T_TIMESTAMP: lambda v: v.time * 1000 if isinstance(v, Timestamp) else epoch_millis(v),
        s.T_BINARY: bytes,
    }[type_name]
