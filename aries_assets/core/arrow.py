"""BSON documents to Arrow: a lossless `_doc` plus typed columns that follow the collection schema.

One pass over a bucket decodes each document once: it renders `_doc`, counts
the type statistics and keeps each field's values. Once the schema is settled
(which needs the statistics of the whole bucket), the kept values become
Arrow arrays. A value its column cannot hold is a counted outlier: null in
the column, intact in `_doc`.
"""

from __future__ import annotations

import datetime
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import bson
import bsonjs
import pyarrow as pa
from bson import Binary, Decimal128, Int64, ObjectId, Timestamp, json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS

from aries_assets.core import schema as s
from aries_assets.core.ordering import _millis

# Decode dates beyond Python's datetime range as DatetimeMS instead of failing.
CODEC_OPTIONS = CodecOptions(tz_aware=True, datetime_conversion=DatetimeConversion.DATETIME_AUTO)
ID_COLUMN, DOC_COLUMN = s.RESERVED_COLUMNS

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
_NOT_DECIMAL = s.MAX_DECIMAL_PRECISION + 1  # NaN and infinities have no decimal form


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


def relaxed_json_value(value: Any) -> str:
    """A value as relaxed Extended JSON; bsonjs (libbson) is much faster than json_util."""
    text = bsonjs.dumps(bson.encode({"v": value}), mode=bsonjs.RELAXED)
    return text[text.index(":") + 1 : text.rindex("}")].strip()


def _update_stats(stats: s.FieldStats, kind: str, value: Any) -> None:
    if kind is s.INT32 or kind is s.INT64:
        v = int(value)
        if stats.int_min is None or v < stats.int_min:
            stats.int_min = v
        if stats.int_max is None or v > stats.int_max:
            stats.int_max = v
    elif kind is s.STRING:
        if len(value) * 4 > stats.max_bytes:
            stats.max_bytes = max(stats.max_bytes, len(value.encode("utf-8")))
    elif kind is s.DOUBLE or kind is s.DECIMAL:
        _update_digits(stats, value)


def _update_digits(stats: s.FieldStats, value: Any) -> None:
    number = value.to_decimal() if isinstance(value, Decimal128) else Decimal(repr(value))
    if not number.is_finite():
        stats.scale = _NOT_DECIMAL
        return
    int_digits, scale = s.decimal_digits(number)
    stats.int_digits = max(stats.int_digits, int_digits)
    stats.scale = max(stats.scale, scale)


@dataclass
class _Batch:
    ids: list[str]
    docs: list[str]
    values: dict[s.Path, tuple[list[int], list[Any]]]  # sparse: rows and values per field path


@dataclass
class BucketConverter:
    """Collects one bucket's documents in a single decoding pass, then yields Arrow tables."""

    options: s.SchemaOptions = field(default_factory=s.SchemaOptions)
    known_maps: set[s.Path] = field(default_factory=set)
    stats: s.TypeStats = field(default_factory=s.TypeStats)
    _batches: list[_Batch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._exclude = [tuple(p.split(".")) for p in self.options.exclude]

    def add(self, raw_documents: list[bytes]) -> None:
        documents = bson.decode_all(b"".join(raw_documents), CODEC_OPTIONS)
        if self._exclude:
            for document in documents:
                for path in self._exclude:
                    _remove(document, path)
            raw_documents = [bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents]
        batch = _Batch(
            ids=[id_string(d["_id"]) for d in documents],
            docs=[bsonjs.dumps(raw, mode=bsonjs.CANONICAL) for raw in raw_documents],
            values={},
        )
        if self.options.infer:
            for row, document in enumerate(documents):
                self._flatten(document, batch.values, row)
        self.stats.documents += len(documents)
        self._batches.append(batch)

    def _flatten(self, document: dict[str, Any], values: dict, row: int) -> None:
        fields = self.stats.fields
        max_depth = self.options.max_depth
        stack: list[tuple[s.Path, dict[str, Any]]] = [((), document)]
        while stack:
            prefix, doc = stack.pop()
            for name, value in doc.items():
                if not prefix and name == ID_COLUMN:
                    continue  # `_id` has its own column
                path = (*prefix, name)
                kind = _KIND_BY_TYPE.get(type(value)) or kind_of(value)
                if kind is s.DOCUMENT and value and len(path) < max_depth:
                    if path in self.known_maps or s.looks_like_map(list(value)):
                        self.stats.maps.add(path)
                    else:
                        stack.append((path, value))
                        continue
                stats = fields.get(path)
                if stats is None:
                    stats = fields[path] = s.FieldStats()
                if kind is None:
                    stats.nulls += 1
                    continue
                stats.kinds[kind] += 1
                if kind is s.ARRAY:
                    for element in value:
                        element_kind = kind_of(element) or "null"
                        stats.element_kinds[element_kind] += 1
                        _update_stats(stats, element_kind, element)
                else:
                    _update_stats(stats, kind, value)
                slot = values.get(path)
                if slot is None:
                    slot = values[path] = ([], [])
                slot[0].append(row)
                slot[1].append(value)

    def tables(self, schema: s.InferredSchema, outliers: Counter) -> Iterator[pa.Table]:
        """One Arrow table per collected batch, in the schema's columns; counts outliers by column."""
        arrow_schema = arrow_schema_of(schema)
        by_path: dict[s.Path, list[s.ColumnSpec]] = {}
        for column in schema.columns:
            by_path.setdefault(column.path, []).append(column)
        converters = {c.name: _converter(c.type) for c in schema.columns}
        while self._batches:
            batch = self._batches.pop(0)  # release each batch's values as it is written
            rows = len(batch.ids)
            columns: dict[str, list[Any]] = {c.name: [None] * rows for c in schema.columns}
            for path, (row_numbers, values) in batch.values.items():
                candidates = by_path.get(path)
                if not candidates:
                    continue
                for row, value in zip(row_numbers, values, strict=True):
                    kind = kind_of(value)
                    for column in candidates:
                        if kind in column.accepts:
                            converted = converters[column.name](value)
                            if converted is not _OUTLIER:
                                columns[column.name][row] = converted
                                break
                    else:
                        outliers[candidates[0].name] += 1
            arrays = [pa.array(batch.ids, pa.string()), pa.array(batch.docs, pa.string())]
            arrays += [pa.array(columns[f.name], f.type) for f in list(arrow_schema)[2:]]
            yield pa.Table.from_arrays(arrays, schema=arrow_schema)


def _remove(document: dict[str, Any], path: tuple[str, ...]) -> None:
    for name in path[:-1]:
        document = document.get(name)
        if not isinstance(document, dict):
            return
    document.pop(path[-1], None)


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
        try:
            number = (
                value.to_decimal()
                if isinstance(value, Decimal128)
                else Decimal(repr(value) if isinstance(value, float) else int(value))
            )
            if not number.is_finite():
                return _OUTLIER
            exact = number.quantize(quantum)
        except InvalidOperation:
            return _OUTLIER
        if exact != number or len(exact.as_tuple().digits) > precision:
            return _OUTLIER
        return exact

    return convert


def _text(value: Any) -> str:
    """Strings as they are; ObjectIds and UUIDs in their usual form; other values as JSON text."""
    kind = kind_of(value)
    if kind is s.STRING:
        return value
    if kind is s.OBJECTID or kind is s.DECIMAL:
        return str(value)
    if kind is s.UUID:
        return str(uuid.UUID(bytes=bytes(value)))
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

        def convert_list(values: list[Any]) -> Any:
            out = [None if e is None else element(e) for e in values]
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
        s.T_TIMESTAMP: lambda v: v.time * 1000 if isinstance(v, Timestamp) else _millis(v),
        s.T_BINARY: bytes,
    }[type_name]
