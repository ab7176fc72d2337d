"""Probabilistic schema inference over schemaless documents.

As the first seed puts it: scan the documents, count how often each field has
each type, and pick the column type from those counts, with overrides for the
cases the counts cannot settle. Statistics are kept per bucket (in the bucket
file's footer) and merged into one collection schema, so the schema follows
the data without rescanning the collection. This module is pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

Path = tuple[str, ...]

# Value kinds: what the statistics count. They follow BSON types, with the
# containers split out and the rare types (regex, code, min/max key) as OTHER.
BOOL, INT32, INT64, DOUBLE, DECIMAL = "bool", "int32", "int64", "double", "decimal"
STRING, OBJECTID, UUID, BINARY = "string", "objectId", "uuid", "binary"
DATE, TIMESTAMP, ARRAY, DOCUMENT, OTHER = "date", "timestamp", "array", "document", "other"
SCALAR_KINDS = {BOOL, INT32, INT64, DOUBLE, DECIMAL, STRING, OBJECTID, UUID, BINARY, DATE, TIMESTAMP}
# Equal counts rank in this order, not in the order the kinds were met: a bucket's statistics may
# be counted by two converters (some documents columnar, the rest exact) and must settle alike.
_KIND_RANK = {kind: rank for rank, kind in enumerate(
    (BOOL, INT32, INT64, DOUBLE, DECIMAL, STRING, OBJECTID, UUID, BINARY, DATE, TIMESTAMP, ARRAY, DOCUMENT, OTHER)
)}  # fmt: skip


def ranked(kinds: Counter) -> list[tuple[str, int]]:
    """(kind, count), the most frequent first; equal counts in a fixed order of kinds."""
    return sorted(
        kinds.items(), key=lambda item: (-item[1], _KIND_RANK.get(item[0], len(_KIND_RANK)), item[0])
    )


# Column types (what the lake and warehouses see).
T_BOOL, T_INT32, T_INT64, T_DOUBLE = "bool", "int32", "int64", "double"
T_STRING, T_JSON, T_TIMESTAMP, T_BINARY = "string", "json", "timestamp", "binary"
OVERRIDE_TYPES = {T_BOOL, T_INT32, T_INT64, T_DOUBLE, T_STRING, T_JSON, T_TIMESTAMP, T_BINARY, "decimal"}
_DECIMAL_TYPE = re.compile(r"^decimal(?:\((\d+),\s*(\d+)\))?$")
MAX_DECIMAL_PRECISION = 38  # Arrow decimal128, Redshift and Athena all stop at 38 digits
# Digits of a canonical Decimal128's coefficient. A larger one is non-canonical: zero to pymongo,
# while libbson writes its digits into `_doc`.
DECIMAL128_DIGITS = 34
# decimal.DefaultContext.prec: `Decimal.quantize` in the default context gives at most this many
# digits, and the exact path quantizes there (more is an outlier).
QUANTIZE_DIGITS = 28
_MAX_EXACT_INT_IN_DOUBLE = 2**53

# Every kind a column type can hold without losing the value.
_ACCEPTS: dict[str, set[str]] = {
    T_BOOL: {BOOL},
    T_INT32: {INT32},
    T_INT64: {INT32, INT64},
    T_DOUBLE: {INT32, INT64, DOUBLE},
    "decimal": {INT32, INT64, DOUBLE, DECIMAL},
    T_TIMESTAMP: {DATE, TIMESTAMP},
    T_BINARY: {BINARY, UUID},
}

RESERVED_COLUMNS = ("_id", "_doc")
MAX_NAME_BYTES = 63  # PostgreSQL's limit; Redshift allows 127, Athena 255
SQL_KEYWORDS = frozenset(
    [
        "all",
        "analyse",
        "analyze",
        "and",
        "any",
        "array",
        "as",
        "asc",
        "asymmetric",
        "authorization",
        "between",
        "binary",
        "both",
        "case",
        "cast",
        "check",
        "collate",
        "column",
        "constraint",
        "create",
        "cross",
        "current_catalog",
        "current_date",
        "current_role",
        "current_schema",
        "current_time",
        "current_timestamp",
        "current_user",
        "default",
        "deferrable",
        "delete",
        "desc",
        "distinct",
        "do",
        "drop",
        "else",
        "end",
        "except",
        "false",
        "fetch",
        "for",
        "foreign",
        "freeze",
        "from",
        "full",
        "grant",
        "group",
        "having",
        "ilike",
        "in",
        "initially",
        "inner",
        "insert",
        "intersect",
        "interval",
        "into",
        "is",
        "isnull",
        "join",
        "lateral",
        "leading",
        "left",
        "like",
        "limit",
        "localtime",
        "localtimestamp",
        "natural",
        "not",
        "notnull",
        "null",
        "offset",
        "on",
        "only",
        "or",
        "order",
        "outer",
        "overlaps",
        "partition",
        "placing",
        "primary",
        "range",
        "references",
        "returning",
        "right",
        "row",
        "rows",
        "select",
        "session_user",
        "similar",
        "some",
        "symmetric",
        "table",
        "tablesample",
        "then",
        "time",
        "timestamp",
        "to",
        "trailing",
        "true",
        "union",
        "unique",
        "update",
        "user",
        "using",
        "values",
        "variadic",
        "verbose",
        "when",
        "where",
        "window",
        "with",
        "date",
        "map",
        "struct",
        # DuckDB and Athena (Trino) reserve these too.
        "at",
        "qualify",
        "pivot",
        "unpivot",
        "summarize",
        "describe",
        "show",
        "lambda",
    ]
)


@dataclass
class FieldStats:
    """What one field path held across some documents: kinds, nulls, and what decides widening."""

    kinds: Counter = field(default_factory=Counter)
    nulls: int = 0
    int_min: int | None = None
    int_max: int | None = None
    int_digits: int = 0  # most integer digits of a decimal or double value
    scale: int = 0  # most fractional digits of a decimal or double value
    element_kinds: Counter = field(default_factory=Counter)
    max_bytes: int = 0  # longest string, for VARCHAR widths

    @property
    def present(self) -> int:
        return sum(self.kinds.values()) + self.nulls

    def merge(self, other: FieldStats) -> None:
        self.kinds.update(other.kinds)
        self.element_kinds.update(other.element_kinds)
        self.nulls += other.nulls
        for name, pick in (("int_min", min), ("int_max", max)):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs if mine is None else mine if theirs is None else pick(mine, theirs))
        self.int_digits = max(self.int_digits, other.int_digits)
        self.scale = max(self.scale, other.scale)
        self.max_bytes = max(self.max_bytes, other.max_bytes)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kinds": dict(sorted(self.kinds.items()))}
        for name in ("nulls", "int_min", "int_max", "int_digits", "scale", "max_bytes"):
            if getattr(self, name):
                body[name] = getattr(self, name)
        if self.element_kinds:
            body["element_kinds"] = dict(sorted(self.element_kinds.items()))
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> FieldStats:
        return cls(
            kinds=Counter(body.get("kinds", {})),
            nulls=body.get("nulls", 0),
            int_min=body.get("int_min"),
            int_max=body.get("int_max"),
            int_digits=body.get("int_digits", 0),
            scale=body.get("scale", 0),
            element_kinds=Counter(body.get("element_kinds", {})),
            max_bytes=body.get("max_bytes", 0),
        )


@dataclass
class TypeStats:
    """Statistics of a set of documents (a bucket, or a whole collection)."""

    documents: int = 0
    fields: dict[Path, FieldStats] = field(default_factory=dict)
    maps: set[Path] = field(default_factory=set)  # documents whose keys are data

    def merge(self, other: TypeStats) -> None:
        self.documents += other.documents
        for path, stats in other.fields.items():
            self.fields.setdefault(path, FieldStats()).merge(stats)
        self.maps |= other.maps

    def to_json(self) -> str:
        return json.dumps(
            {
                "documents": self.documents,
                "fields": [[list(p), s.to_json()] for p, s in sorted(self.fields.items())],
                "maps": sorted(list(p) for p in self.maps),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> TypeStats:
        body = json.loads(text)
        return cls(
            documents=body["documents"],
            fields={tuple(p): FieldStats.from_json(s) for p, s in body["fields"]},
            maps={tuple(p) for p in body.get("maps", [])},
        )


@dataclass(frozen=True)
class SchemaOptions:
    """Per-collection knobs from the config."""

    overrides: dict[str, str] = field(default_factory=dict)  # dotted path -> type
    exclude: tuple[str, ...] = ()  # dotted paths never written anywhere
    max_depth: int = 5
    max_columns: int = 500
    outlier_share: float = 0.01  # up to this share of other kinds stay outliers, not a wider type
    evolution: str = "rebuild"  # or "append"
    infer: bool = True  # False: only _id and _doc


@dataclass(frozen=True)
class ColumnSpec:
    """One column of the collection schema."""

    path: Path
    name: str
    type: str  # see T_* and "decimal(p,s)", "list<T>"
    accepts: frozenset[str]  # kinds written to this column; others are outliers (or another variant)
    present: int = 0
    nulls: int = 0
    shares: tuple[tuple[str, float], ...] = ()

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    def shares_text(self) -> str:
        return ", ".join(f"{kind} {share:.1%}" for kind, share in self.shares) or "no values"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": list(self.path),
            "name": self.name,
            "type": self.type,
            "accepts": sorted(self.accepts),
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ColumnSpec:
        return cls(tuple(body["path"]), body["name"], body["type"], frozenset(body["accepts"]))


@dataclass
class InferredSchema:
    """The one schema every bucket file of a collection follows."""

    version: int = 0
    columns: list[ColumnSpec] = field(default_factory=list)
    stats: TypeStats = field(default_factory=TypeStats)
    names: dict[Path, str] = field(default_factory=dict)  # every name ever given: names never move
    actions: list[str] = field(default_factory=list)  # what the last change did, for the UI

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": self.version,
                "columns": [c.to_json() for c in self.columns],
                "names": [[list(p), n] for p, n in sorted(self.names.items())],
                "actions": self.actions,
                "stats": json.loads(self.stats.to_json()),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> InferredSchema:
        body = json.loads(text)
        stats = TypeStats.from_json(json.dumps(body["stats"]))
        schema = cls(
            version=body["version"],
            columns=[ColumnSpec.from_json(c) for c in body["columns"]],
            stats=stats,
            names={tuple(p): n for p, n in body["names"]},
            actions=body.get("actions", []),
        )
        schema.columns = [_with_shares(c, stats.fields.get(c.path)) for c in schema.columns]
        return schema

    def signature(self) -> list[tuple[Path, str, str, tuple[str, ...]]]:
        return [(c.path, c.name, c.type, tuple(sorted(c.accepts))) for c in self.columns]


# --- naming -------------------------------------------------------------------------------------


def _short_hash(path: Path) -> str:
    return hashlib.sha1("\x00".join(path).encode("utf-8")).hexdigest()[:6]


def base_name(path: Path) -> str:
    """Lowercase ASCII, words joined by `_`, levels by `__`: safe unquoted almost everywhere."""
    parts = []
    for part in path:
        ascii_part = unicodedata.normalize("NFKD", part).encode("ascii", "ignore").decode().lower()
        cleaned = re.sub(r"[^a-z0-9]+", "_", ascii_part).strip("_")
        parts.append(cleaned or f"f{_short_hash((part,))}")
    name = "__".join(parts)
    if name[0].isdigit():
        name = f"c_{name}"
    if name in SQL_KEYWORDS:  # `_id` and `_doc` cannot clash: base names never start with "_"
        name = f"{name}_"
    if len(name.encode()) > MAX_NAME_BYTES:
        name = f"{name[: MAX_NAME_BYTES - 7]}_{_short_hash(path)}"
    return name


def assign_name(path: Path, taken: set[str]) -> str:
    """A name for a new path that no existing column has, case-insensitively."""
    name = base_name(path)
    if name not in taken:
        return name
    candidate = f"{name[: MAX_NAME_BYTES - 7]}_{_short_hash(path)}"
    counter = 2
    while candidate in taken:
        candidate = f"{name[: MAX_NAME_BYTES - 10]}_{_short_hash(path)}{counter}"
        counter += 1
    return candidate


# --- type resolution ----------------------------------------------------------------------------


def decimal_type(precision: int, scale: int) -> str:
    return f"decimal({precision},{scale})"


def parse_decimal(type_name: str) -> tuple[int, int] | None:
    match = _DECIMAL_TYPE.match(type_name)
    if not match:
        return None
    return (int(match.group(1)), int(match.group(2))) if match.group(1) else (MAX_DECIMAL_PRECISION, 0)


def accepted_kinds(type_name: str) -> frozenset[str]:
    if type_name in (T_STRING, T_JSON):
        return frozenset(SCALAR_KINDS | {ARRAY, DOCUMENT, OTHER})
    if type_name.startswith("list<"):
        return frozenset({ARRAY})
    if parse_decimal(type_name):
        return frozenset(_ACCEPTS["decimal"])
    return frozenset(_ACCEPTS[type_name])


def _numeric_type(kinds: set[str], stats: FieldStats) -> str | None:
    """The narrowest type on bool < int32 < int64 < double < decimal that holds every value."""
    if not kinds or not kinds <= {BOOL, INT32, INT64, DOUBLE, DECIMAL}:
        return None
    if kinds == {BOOL}:
        return T_BOOL
    if BOOL in kinds:
        # The seed's "all 1s" question: booleans mixed with only 0/1 integers are flags.
        ints_are_flags = (
            kinds <= {BOOL, INT32, INT64} and (stats.int_min or 0) >= 0 and (stats.int_max or 0) <= 1
        )
        return T_BOOL if ints_are_flags else None
    if kinds == {INT32}:
        return T_INT32
    if kinds <= {INT32, INT64}:
        return T_INT64
    largest = max(abs(stats.int_min or 0), abs(stats.int_max or 0))
    if DECIMAL not in kinds and largest <= _MAX_EXACT_INT_IN_DOUBLE:
        return T_DOUBLE
    int_digits = max(stats.int_digits, len(str(largest)))
    if int_digits + stats.scale <= MAX_DECIMAL_PRECISION:
        return decimal_type(MAX_DECIMAL_PRECISION, stats.scale)
    return None


def _scalar_type(kinds: set[str], stats: FieldStats) -> str | None:
    numeric = _numeric_type(kinds, stats)
    if numeric:
        return numeric
    if kinds <= {DATE, TIMESTAMP}:
        return T_TIMESTAMP
    if kinds == {BINARY}:
        return T_BINARY
    if kinds <= {STRING, OBJECTID, UUID}:
        return T_STRING
    return None


def resolve_type(stats: FieldStats, outlier_share: float) -> tuple[str, frozenset[str]]:
    """Column type and accepted kinds from the counts; rare other kinds become outliers."""
    kinds = set(stats.kinds)
    total = sum(stats.kinds.values())
    if not kinds:
        return T_STRING, accepted_kinds(T_STRING)
    if kinds == {ARRAY}:
        elements = set(stats.element_kinds) - {"null"}
        element_type = _scalar_type(elements, stats) if elements else T_STRING
        if element_type and element_type != T_BINARY:
            return f"list<{element_type}>", frozenset({ARRAY})
        return T_JSON, accepted_kinds(T_JSON)
    if kinds <= {DOCUMENT, ARRAY, OTHER}:
        return T_JSON, accepted_kinds(T_JSON)
    exact = _scalar_type(kinds, stats)
    if exact:
        return exact, accepted_kinds(exact)
    # Mostly one type with rare outliers: keep the type; outliers live on in `_doc`.
    for width in range(1, len(kinds)):
        common = {k for k, _ in ranked(stats.kinds)[:width]}
        rare = total - sum(stats.kinds[k] for k in common)
        typed = _scalar_type(common, stats)
        if typed and rare <= outlier_share * total:
            return typed, accepted_kinds(typed)
    if kinds <= SCALAR_KINDS:
        return T_STRING, accepted_kinds(T_STRING)
    return T_JSON, accepted_kinds(T_JSON)


def _override_type(type_name: str, stats: FieldStats) -> str:
    if type_name == "decimal":
        return decimal_type(MAX_DECIMAL_PRECISION, min(stats.scale, MAX_DECIMAL_PRECISION))
    decimal = parse_decimal(type_name)
    return decimal_type(*decimal) if decimal else type_name


def _with_shares(column: ColumnSpec, stats: FieldStats | None) -> ColumnSpec:
    if stats is None:
        return column
    total = sum(stats.kinds.values())
    shares = tuple((k, n / total) for k, n in ranked(stats.kinds)) if total else ()
    return replace(column, present=stats.present, nulls=stats.nulls, shares=shares)


def _under_map(path: Path, maps: set[Path]) -> bool:
    return any(path[: len(m)] == m and len(path) > len(m) for m in maps)


def resolve_schema(
    stats: TypeStats, previous: InferredSchema | None, options: SchemaOptions
) -> InferredSchema:
    """The collection schema for these statistics, keeping names (and, with `append`, types) stable."""
    previous = previous or InferredSchema()
    names = dict(previous.names)
    taken = {n.lower() for n in names.values()} | set(RESERVED_COLUMNS)
    old_columns = {(c.path, c.name): c for c in previous.columns}
    by_path: dict[Path, list[ColumnSpec]] = {}
    for column in previous.columns:
        by_path.setdefault(column.path, []).append(column)

    if not options.infer:
        return _finish(previous, [], stats, names)
    candidates = [
        p
        for p, s in stats.fields.items()
        if s.kinds and not _under_map(p, stats.maps) and ".".join(p) not in options.exclude
    ]
    # The column cap keeps the most frequent fields; the rest stay only in `_doc`.
    candidates.sort(key=lambda p: (-stats.fields[p].present, p))
    chosen = sorted(candidates[: options.max_columns])
    columns: list[ColumnSpec] = []
    for path in chosen:
        field_stats = stats.fields[path]
        override = options.overrides.get(".".join(path))
        if override:
            type_name = _override_type(override, field_stats)
            accepts = accepted_kinds(type_name)
        else:
            type_name, accepts = resolve_type(field_stats, options.outlier_share)
        if path not in names:
            names[path] = assign_name(path, taken)
            taken.add(names[path].lower())
        old_main = old_columns.get((path, names[path]))
        old_variants = [c for c in by_path.get(path, []) if c.name != names[path]]
        if options.evolution == "append" and old_main and old_main.type != type_name and not override:
            # Never change an existing column: keep it, and give the kinds it cannot hold a new one.
            kept = [old_main, *old_variants]
            rest = accepts - frozenset().union(*(c.accepts for c in kept))
            if not rest and not any(_holds_all(c.type, type_name) for c in kept):
                rest = accepts  # the same kinds, but values the kept columns cannot hold (a decimal's scale)
            if rest:
                variant_path = (*path, type_name)
                if variant_path not in names:
                    names[variant_path] = assign_name(variant_path, taken)
                    taken.add(names[variant_path].lower())
                kept.append(ColumnSpec(path, names[variant_path], type_name, frozenset(rest)))
            columns += [_with_shares(c, field_stats) for c in kept]
            continue
        columns.append(_with_shares(ColumnSpec(path, names[path], type_name, accepts), field_stats))
        if options.evolution == "append":
            columns += [_with_shares(c, field_stats) for c in old_variants]
    return _finish(previous, columns, stats, names)


def _holds_all(old_type: str, new_type: str) -> bool:
    """Whether every value of `new_type` fits `old_type` where both take the same kinds: only a
    decimal (or a list of decimals) with fewer integer digits or less scale does not."""
    old_decimal = parse_decimal(old_type.removeprefix("list<").removesuffix(">"))
    new_decimal = parse_decimal(new_type.removeprefix("list<").removesuffix(">"))
    if old_decimal is None or new_decimal is None:
        return True
    (old_precision, old_scale), (new_precision, new_scale) = old_decimal, new_decimal
    return new_scale <= old_scale and new_precision - new_scale <= old_precision - old_scale


def _finish(
    previous: InferredSchema, columns: list[ColumnSpec], stats: TypeStats, names: dict
) -> InferredSchema:
    columns.sort(key=lambda c: (c.path, c.name))
    schema = InferredSchema(previous.version, columns, stats, names, [])
    if schema.signature() != previous.signature():
        schema.version = previous.version + 1
        schema.actions = describe_changes(previous, schema)
    else:
        schema.actions = previous.actions
    return schema


def describe_changes(old: InferredSchema, new: InferredSchema) -> list[str]:
    before = {c.name: c for c in old.columns}
    after = {c.name: c for c in new.columns}
    changes = [f"added {n} ({after[n].type})" for n in after if n not in before]
    changes += [f"dropped {n}" for n in before if n not in after]
    changes += [
        f"changed {n}: {before[n].type} -> {after[n].type}"
        for n in after
        if n in before and before[n].type != after[n].type
    ]
    return changes


def changed_types(old: InferredSchema, new: InferredSchema) -> set[Path]:
    """Paths whose column a file written under `old` cannot represent under `new`."""
    before = {c.name: c for c in old.columns}
    return {c.path for c in new.columns if c.name in before and before[c.name].type != c.type}


# --- helpers for the converter -----------------------------------------------------------------

_DATA_KEY = re.compile(
    r"^(?:[0-9a-fA-F]{16,}|[0-9]+|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|\d{4}-\d{2}-\d{2}(?:[T ][0-9:.+Z-]*)?)$"
)


def looks_like_map(keys: list[str]) -> bool:
    """A document whose keys are data (ids, hashes, numbers, dates) rather than field names."""
    if not keys:
        return False
    data_like = sum(1 for k in keys if _DATA_KEY.match(k))
    return data_like * 2 >= len(keys)


def decimal_digits(value: Decimal) -> tuple[int, int]:
    """(integer digits, fractional digits) of a finite decimal."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        return 0, 0
    scale = max(0, -exponent)
    int_digits = max(0, len(digits) + exponent) if exponent < 0 else len(digits) + exponent
    return int_digits, scale
