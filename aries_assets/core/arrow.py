"""BSON documents to Arrow: a lossless `_doc` plus flattened, typed columns.

Every row carries `_id` (string form) and `_doc` (canonical Extended JSON, so
`bson.json_util.loads` gives back the exact document, types included). Nested
scalar fields become dotted columns (`customer.address.city`) so warehouses can
query them without JSON functions. A value that does not fit its column is
rendered as JSON in a string column rather than dropped; `_doc` always has it.
"""

from __future__ import annotations

import datetime
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import bson
import bsonjs
import pyarrow as pa
from bson import Binary, Decimal128, Int64, ObjectId, json_util
from bson.codec_options import CodecOptions, DatetimeConversion

from aries_assets.core.ordering import _millis

# Decode dates beyond Python's datetime range as DatetimeMS instead of failing.
CODEC_OPTIONS = CodecOptions(tz_aware=True, datetime_conversion=DatetimeConversion.DATETIME_AUTO)

ID_COLUMN, DOC_COLUMN = "_id", "_doc"
RESERVED = {ID_COLUMN, DOC_COLUMN}
MAX_DEPTH = 6
_MAX_EXACT_INT_IN_DOUBLE = 2**53

# Kinds of leaf values, the unit of the type statistics.
BOOL, INT, DOUBLE, DECIMAL, STRING, DATE, OBJECTID, UUID_, BINARY = (
    "bool", "int", "double", "decimal", "string", "date", "objectId", "uuid", "binary",
)  # fmt: skip
ARRAY, DOCUMENT, OTHER = "array", "document", "other"

_SCALAR_TYPES = {
    BOOL: pa.bool_(),
    INT: pa.int64(),
    DOUBLE: pa.float64(),
    DECIMAL: pa.string(),  # exact digits; Arrow decimals cannot hold every Decimal128
    STRING: pa.string(),
    DATE: pa.timestamp("ms", tz="UTC"),
    OBJECTID: pa.string(),
    UUID_: pa.string(),
    BINARY: pa.binary(),
}


def kind_of(value: Any) -> str | None:
    """The statistics kind of a decoded BSON value; None for null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, (int, Int64)):
        return INT
    if isinstance(value, float):
        return DOUBLE
    if isinstance(value, str):
        return STRING
    if isinstance(value, (datetime.datetime, bson.DatetimeMS)):
        return DATE
    if isinstance(value, ObjectId):
        return OBJECTID
    if isinstance(value, Decimal128):
        return DECIMAL
    if isinstance(value, Binary):
        return UUID_ if value.subtype == 4 and len(value) == 16 else BINARY
    if isinstance(value, (bytes, uuid.UUID)):
        return UUID_ if isinstance(value, uuid.UUID) else BINARY
    if isinstance(value, list):
        return ARRAY
    if isinstance(value, dict):
        return DOCUMENT
    return OTHER


def flatten(document: dict[str, Any], max_depth: int = MAX_DEPTH) -> Iterable[tuple[tuple[str, ...], Any]]:
    """(field path, value) for every leaf; documents below max_depth are leaves."""
    stack: list[tuple[tuple[str, ...], dict[str, Any]]] = [((), document)]
    while stack:
        prefix, doc = stack.pop()
        for name, value in doc.items():
            path = (*prefix, name)
            if not prefix and name in RESERVED:
                continue  # `_id` has its own column; a field named `_doc` stays in `_doc`
            if isinstance(value, dict) and value and len(path) < max_depth:
                stack.append((path, value))
            else:
                yield path, value


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


@dataclass
class PathStats:
    """Counts of value kinds seen at one field path, and what decides widening."""

    kinds: Counter = field(default_factory=Counter)
    element_kinds: Counter = field(default_factory=Counter)  # for arrays
    max_abs_int: int = 0
    max_abs_element_int: int = 0

    def add(self, value: Any) -> None:
        kind = kind_of(value)
        if kind is None:
            return
        self.kinds[kind] += 1
        if kind == INT:
            self.max_abs_int = max(self.max_abs_int, abs(int(value)))
        elif kind == ARRAY:
            for element in value:
                element_kind = kind_of(element) or "null"
                self.element_kinds[element_kind] += 1
                if element_kind == INT:
                    self.max_abs_element_int = max(self.max_abs_element_int, abs(int(element)))


@dataclass(frozen=True)
class Column:
    """A flattened column: the field path it comes from, its name, its Arrow type."""

    path: tuple[str, ...]
    name: str
    arrow_type: pa.DataType
    as_json: bool  # values rendered as relaxed Extended JSON text


def _numeric_type(kinds: set[str], max_abs_int: int) -> pa.DataType | None:
    if kinds == {INT}:
        return pa.int64()
    if kinds == {DOUBLE}:
        return pa.float64()
    if kinds == {INT, DOUBLE} and max_abs_int <= _MAX_EXACT_INT_IN_DOUBLE:
        return pa.float64()  # every integer seen is exact as a double
    return None


def resolve_column(path: tuple[str, ...], stats: PathStats) -> Column:
    """A first, simple type choice: one kind keeps its type; anything mixed becomes JSON text."""
    name = ".".join(path)
    kinds = set(stats.kinds)
    numeric = _numeric_type(kinds, stats.max_abs_int)
    if numeric is not None:
        return Column(path, name, numeric, False)
    if len(kinds) == 1:
        (kind,) = kinds
        if kind in _SCALAR_TYPES:
            return Column(path, name, _SCALAR_TYPES[kind], False)
        if kind == ARRAY:
            elements = set(stats.element_kinds) - {"null"}
            element_type = _numeric_type(elements, stats.max_abs_element_int)
            if element_type is None and len(elements) == 1:
                element_type = _SCALAR_TYPES.get(next(iter(elements)))
            if element_type is None and not elements:
                element_type = pa.string()
            if element_type is not None and element_type != pa.binary():
                return Column(path, name, pa.list_(element_type), False)
    return Column(path, name, pa.string(), kinds != {STRING})


def _value_converter(arrow_type: pa.DataType):
    """A per-value conversion to what pyarrow ingests natively, or None when it needs none."""
    if pa.types.is_timestamp(arrow_type):
        return _millis
    if pa.types.is_floating(arrow_type):
        return float  # integers that were widened
    if pa.types.is_binary(arrow_type):
        return bytes
    if arrow_type == pa.string():
        return _text
    return None  # bool, int64: pyarrow takes them as they are


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Binary):  # UUID, subtype 4
        return str(uuid.UUID(bytes=bytes(value)))
    return str(value)  # ObjectId hex, Decimal128 digits


class DocumentConverter:
    """Two passes over one bucket's raw documents: statistics, then typed columns."""

    def __init__(self, max_depth: int = MAX_DEPTH) -> None:
        self.max_depth = max_depth
        self.stats: dict[tuple[str, ...], PathStats] = defaultdict(PathStats)

    def observe(self, raw_documents: list[bytes]) -> None:
        for document in _decode(raw_documents):
            for path, value in flatten(document, self.max_depth):
                self.stats[path].add(value)

    def columns(self) -> list[Column]:
        """Resolved columns; a name another path already took keeps only the first, by path order."""
        taken = {name.lower() for name in RESERVED}
        result = []
        for path in sorted(self.stats):
            column = resolve_column(path, self.stats[path])
            if column.name.lower() in taken or not self.stats[path].kinds:
                continue
            taken.add(column.name.lower())
            result.append(column)
        return result

    def schema(self, columns: list[Column]) -> pa.Schema:
        fields = [
            pa.field(ID_COLUMN, pa.string(), nullable=False),
            pa.field(DOC_COLUMN, pa.string(), nullable=False),
        ]
        fields += [pa.field(c.name, c.arrow_type) for c in columns]
        return pa.schema(fields)

    def to_table(self, raw_documents: list[bytes], columns: list[Column]) -> pa.Table:
        documents = _decode(raw_documents)
        ids = [id_string(d["_id"]) for d in documents]
        docs = [bsonjs.dumps(raw, mode=bsonjs.CANONICAL) for raw in raw_documents]
        values: dict[tuple[str, ...], list[Any]] = {c.path: [None] * len(documents) for c in columns}
        for row, document in enumerate(documents):
            for path, value in flatten(document, self.max_depth):
                column_values = values.get(path)
                if column_values is not None:
                    column_values[row] = value
        arrays = [pa.array(ids, pa.string()), pa.array(docs, pa.string())]
        for column in columns:
            arrays.append(_column_array(values[column.path], column))
        return pa.Table.from_arrays(arrays, schema=self.schema(columns))


def _decode(raw_documents: list[bytes]) -> list[dict[str, Any]]:
    return bson.decode_all(b"".join(raw_documents), CODEC_OPTIONS)


def _column_array(values: list[Any], column: Column) -> pa.Array:
    arrow_type = column.arrow_type
    if column.as_json:
        return pa.array(
            [v if v is None or isinstance(v, str) else relaxed_json_value(v) for v in values], pa.string()
        )
    if pa.types.is_list(arrow_type):
        convert = _value_converter(arrow_type.value_type)
        if convert is not None:
            values = [None if v is None else [None if e is None else convert(e) for e in v] for v in values]
        return pa.array(values, arrow_type)
    convert = _value_converter(arrow_type)
    if convert is not None:
        values = [None if v is None else convert(v) for v in values]
    return pa.array(values, arrow_type)
