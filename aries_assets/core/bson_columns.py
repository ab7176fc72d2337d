"""A bucket batch as Arrow columns without a Python object per value, for the documents that allow it.

Each field path becomes one `Values` (a kind code per document, and the values'
text), from which the type statistics and the typed columns follow with vectorised
compute. Documents are taken only when the result is provably what the exact path
(decode every document, walk it in Python) would give.

Where the `_doc` walk (`doc_text`) walked nearly all of a chunk, it read every value
on the way, a NumPy array per field for all of a group's documents at once:
`found_part` puts those together (`Rendered.found`), and nothing is parsed. It sets
aside the documents the exact path must take by the rules the text reader below
follows, and the walk itself tells a null from a missing field.

Otherwise (the walk left more than a tenth of the chunk to bsonjs) the `_doc` column, canonical
Extended JSON, in which every value names its BSON type, is parsed with Arrow's JSON
reader (C++), which gives each field path as one Arrow array. It parses
`doc_text.Rendered.columnar`: `_doc`, but with each array of
documents and each map the `_doc` walk held whole written `null`. Those values
come from `Rendered.wholes` instead, as their canonical text (`_take_wholes`):
values of their own in the schema, as the exact path keeps them.

`columnar_part` first sets aside, by their text, the documents the walk would
refuse: maps and arrays of documents not held whole, arrays of arrays, empty
documents, arrays that begin with null, the rarer BSON types (regex, code,
timestamps, min/max keys, old binaries), keys named like an Extended JSON wrapper;
and, when Arrow's reader meets a field in two JSON shapes, the documents of the
rarer shape. Those take the exact path; the rest are walked. A null and a missing
field are both null in Arrow; the keys counted in the text tell them apart, and a
document where the count cannot settle it takes the exact path alone
(`_SetAside`). What the walk still refuses (documents deeper than `max_depth`, two
`_id` types, a document whose keys all start with `$`) sends the whole chunk down
the exact path.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import bson
import bsonjs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
from bson import Binary, Decimal128, Int64, ObjectId
from bson.codec_options import CodecOptions
from bson.datetime_ms import _millis_to_datetime

from aries_assets.core import doc_text
from aries_assets.core import schema as s
from aries_assets.core.doc_text import (
    BASE64_ALPHABET,
    Found,
    MapKeys,
    Rendered,
    Whole,
    hex_digits,
    value_bson,
    value_text,
)

# Kind codes of one value: ABSENT and NULL first, then the kinds the statistics count.
ABSENT, NULL = -1, 0
CODES = {s.BOOL: 1, s.INT32: 2, s.INT64: 3, s.DOUBLE: 4, s.DECIMAL: 5, s.STRING: 6, s.OBJECTID: 7}
CODES.update({s.DATE: 8, s.ARRAY: 9, s.UUID: 10, s.BINARY: 11, s.DOCUMENT: 12})
KIND_OF_CODE = {code: kind for kind, code in CODES.items()}
_NUMBER_WRAPPERS = {
    "$numberInt": CODES[s.INT32],
    "$numberLong": CODES[s.INT64],
    "$numberDouble": CODES[s.DOUBLE],
    "$numberDecimal": CODES[s.DECIMAL],
}
_KEY_SEPARATOR = '" : '  # how libbson writes a key; a string holding it shows as `\\" : `
# The separator where no key ends: inside a string (`\" : `), or a string or key that begins with
# ` : ` (a member's value after ` : `, an array's element after `[ ` or `, `, a key after `{ ` or `, `).
_NOT_A_KEY_SEPARATOR = r'\\" : |: " : |\[ " : |, " : |\{ " : '
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_ .:/'-]+$")  # written as is in JSON, no escapes
# Each wrapper the walk reads, and the keys its text holds (`{ "$date" : { "$numberLong" : ... } }`: 2).
_WRAPPERS = {"$oid": 1, "$date": 2, "$binary": 3} | {name: 1 for name in _NUMBER_WRAPPERS}
# A key named like a wrapper, as BSON holds it (the name, then its terminating zero byte), after
# its `$` (`wrapper_rows`).
# `$ref` too: pymongo decodes a document holding one (and `$id`) as a DBRef, not a document.
_WRAPPER_KEYS = [name[1:].encode() + b"\x00" for name in [*_WRAPPERS, "$ref"]]
_NOT_DECIMAL = s.MAX_DECIMAL_PRECISION + 1
_PLAIN_DECIMAL = r"^-?[0-9]+\.?[0-9]*$"


class Refused(Exception):
    """This batch needs the exact path."""


@dataclass
class Values:
    """One field path's values (or one array field's elements): kind codes and their text.

    `text` is a string array (the value as Extended JSON writes it inside its
    wrapper: digits, hex, epoch milliseconds) or a boolean array; `kinds` holds
    a kind code per slot, ABSENT where the document lacks the field.
    """

    kinds: np.ndarray
    text: pa.Array
    elements: Values | None = None  # for arrays: every element, in order
    offsets: np.ndarray | None = None  # for arrays: where each slot's elements start and end
    # Arrays and documents held whole (`doc_text.Whole`): `text` is their canonical text, and
    # `elements` only counts their elements' kinds.
    whole: bool = False

    def rows(self) -> np.ndarray:
        return np.flatnonzero(self.kinds != ABSENT)


@dataclass
class ColumnarBatch:
    ids: pa.Array
    keys: pa.Array
    docs: Any  # pa.Array, or what the converter packs it into while the batch waits
    paths: dict[s.Path, Values] = field(default_factory=dict)
    stats: s.TypeStats = field(default_factory=s.TypeStats)

    @property
    def rows(self) -> int:
        return len(self.ids)


# A chunk this share of whose documents the walk would refuse takes the exact path whole: the
# columnar part would not repay its fixed cost (a JSON reader, a walk, a table to interleave).
MOSTLY_REFUSED = 0.8
# Fields of two JSON shapes (an int here, a string there) set aside per chunk before giving up on it.
_CONFLICTS_SET_ASIDE = 4
# Fields of two shapes a bucket remembers, to set their rarer shape aside in its next chunks.
_CONFLICTS_REMEMBERED = 16


def columnar_part(
    raw_documents: list[bytes],
    rendered: Rendered,
    options: s.SchemaOptions,
    known_maps: set[s.Path],
    expect_refusals: bool = True,
    conflicts: list[_TypeConflict] | None = None,
) -> tuple[ColumnarBatch, np.ndarray] | None:
    """The chunk's documents the walk takes, as a batch, and their rows in the chunk; the rest are
    the exact path's. None when the walk takes too few of them to be worth it, or refuses them all.

    The documents its text shows the walk would refuse are set aside (`refused_documents`): first,
    with `expect_refusals` (the chunk before had some), else once the walk refused the chunk (so a
    plain chunk is spared the search). A field holding two JSON shapes (`"n" : {` in most,
    `"n" : "` in a few) stops Arrow's reader: the documents of the rarer shape are set aside, and
    the rest read again.

    The walk parses `rendered.columnar`, where arrays of documents and maps are `null`: those it
    takes whole from `rendered.wholes` (a map only if the exact path would call it one).

    `conflicts` are the fields met in two shapes in the bucket's chunks so far (this chunk's are
    added): their rarer shape is set aside before the reader starts, not after it stopped.
    """
    if rendered.found is not None:
        return found_part(raw_documents, rendered, options, known_maps)
    docs = rendered.columnar
    # Always: the reader would lose these documents' nulls, not refuse them.
    refused = pc.match_substring_regex(docs, _BEGINS_WITH_NULL).to_numpy(zero_copy_only=False)
    if rendered.exact is not None:
        refused |= rendered.exact
    for whole in rendered.wholes:
        refused[whole.rows[~_takes_whole(whole, options, known_maps)]] = True
    # Where the walk held values whole, the documents it left to bsonjs still hold theirs in the
    # text: those would meet the others' `null` as another JSON shape.
    searched = expect_refusals or bool(rendered.wholes)
    if searched:
        refused |= refused_documents(raw_documents, docs, known_maps)
    for known in conflicts or ():
        rarer = known.rarer_shape(docs)
        if rarer is not None:
            refused |= rarer
    for _ in range(_CONFLICTS_SET_ASIDE + 2):
        if np.count_nonzero(refused) > MOSTLY_REFUSED * len(raw_documents):
            return None
        rows = np.flatnonzero(~refused)
        whole = len(rows) == len(raw_documents)
        part = raw_documents if whole else [raw_documents[i] for i in rows.tolist()]
        try:
            batch = columnar_batch(
                part,
                docs if whole else docs.take(rows),
                options,
                known_maps,
                _wholes_of(rendered.wholes, rows, len(raw_documents)),
                rendered.docs if whole else None,
                screened=searched,
            )
        except _SetAside as set_aside:
            refused[rows[set_aside.rows]] = True
            continue
        except _TypeConflict as conflict:
            rarer = conflict.rarer_shape(docs)
            if rarer is not None and conflicts is not None and len(conflicts) < _CONFLICTS_REMEMBERED:
                conflicts.append(conflict)  # one whose shape cannot be found by its key would not help
            if rarer is None or not (rarer & ~refused).any():
                if searched:
                    return None
                rarer = refused_documents(raw_documents, docs, known_maps)
                searched = True
            refused |= rarer
            continue
        if batch is None and not searched:
            searched = True
            refused |= refused_documents(raw_documents, docs, known_maps)
            continue
        return None if batch is None else (batch, rows)
    return None


# --- the values the `_doc` walk read ----------------------------------------------------------

# Kind codes of the BSON types the walk reads (a binary is a UUID or not by its subtype and length).
_CODE_OF_TYPE = {
    1: CODES[s.DOUBLE],
    2: CODES[s.STRING],
    5: CODES[s.BINARY],
    7: CODES[s.OBJECTID],
    8: CODES[s.BOOL],
    9: CODES[s.DATE],
    10: NULL,
    16: CODES[s.INT32],
    18: CODES[s.INT64],
    19: CODES[s.DECIMAL],
}
_EMPTY_DOCUMENT = (3, b"{  }")  # its BSON type, and its text as libbson writes it
_CODE_OF_TYPE[_EMPTY_DOCUMENT[0]] = CODES[s.DOCUMENT]
_ARRAYS, _BOOLEANS, _TEXTS = "arrays", "booleans", "texts"  # a field's shapes one `Values` cannot mix


def found_part(
    raw_documents: list[bytes], rendered: Rendered, options: s.SchemaOptions, known_maps: set[s.Path]
) -> tuple[ColumnarBatch, np.ndarray] | None:
    """`columnar_part` from the values the `_doc` walk read (`Rendered.found`), not from its text:
    no JSON to parse, and a null is told from a missing field by the walk itself.

    The documents the exact path must take are set aside as the text reader's rules set them
    aside (a record keyed by data or past `max_depth`, a key named like a wrapper, an array of
    documents not held whole, ...); so are a field's rarer shape where one `Values` cannot hold
    both (arrays beside scalars, booleans beside text), and what the walk left to bsonjs."""
    count = len(raw_documents)
    exact = np.zeros(count, bool) if rendered.exact is None else rendered.exact.copy()
    exact[rendered.unwalked] = True
    exact |= wrapper_rows(raw_documents, rendered.dollars)
    for whole in rendered.wholes:
        exact[whole.rows[~_takes_whole(whole, options, known_maps)]] = True
        if not _a_field(whole.path):
            exact[whole.rows] = True
    by_path: dict[s.Path, list[tuple[np.ndarray, Found]]] = {}
    for group_rows, found in rendered.found:
        for item in found:
            rows = group_rows if item.rows is None else group_rows[item.rows]
            if not len(rows):
                continue  # an element only documents split off since had (`doc_text._Walk._ragged`)
            if item.what == doc_text.EXACT or not _a_field(item.path):
                exact[rows] = True
            elif item.what == doc_text.RECORD:
                path = item.path
                if len(path) >= options.max_depth or path in known_maps or path == ("_id",):
                    exact[rows] = True
            else:
                by_path.setdefault(item.path, []).append((rows, item))
    held = {whole.path for whole in rendered.wholes}
    for path, items in by_path.items():
        _set_aside_rarer_shape(items, exact, path in held)
    for _ in range(3):
        if np.count_nonzero(exact) > MOSTLY_REFUSED * count:
            return None
        taken = np.flatnonzero(~exact)
        try:
            batch = _found_batch(by_path, rendered, taken, count, options)
        except _SetAside as set_aside:
            exact[taken[set_aside.rows]] = True
            continue
        except Refused:
            return None
        return batch, taken
    return None


def wrapper_rows(raw_documents: list[bytes], dollars: np.ndarray | None = None) -> np.ndarray:
    """Which documents hold a key named like a wrapper (`_WRAPPER_KEYS`), at any depth, by their
    BSON: each `$` of the documents that hold one, and what follows it, all at once (a regular
    expression searching the bytes took six times as long). Most documents hold none: they are
    not joined, nor is a document searched beside the others' copy. `dollars`: which documents
    hold a `$`, where the walk found them in the chunk's bytes (asking each document took 1.8 ms
    per 8,000 events)."""
    rows = np.zeros(len(raw_documents), bool)
    if dollars is not None:
        some = np.flatnonzero(dollars).tolist()
    else:
        some = [i for i, raw in enumerate(raw_documents) if b"$" in raw]
    if not some:
        return rows
    width = max(map(len, _WRAPPER_KEYS))
    picked = [raw_documents[i] for i in some]
    ends = np.cumsum(np.fromiter(map(len, picked), np.int64, len(picked)))
    buf = np.frombuffer(b"".join(picked), np.uint8)  # one document: itself, not a copy
    dollars = doc_text.positions_of(buf, ord("$"))
    # What follows each `$`; past the end, the last byte again (a document's closing zero, which
    # no key begins with: at worst a document goes to the exact path, which is always right).
    after = buf.take(dollars[:, None] + 1 + np.arange(width), mode="clip")
    named = np.zeros(len(dollars), bool)
    for key in _WRAPPER_KEYS:
        named |= (after[:, : len(key)] == np.frombuffer(key, np.uint8)).all(axis=1)
    rows[np.asarray(some, np.intp)[np.searchsorted(ends, dollars[named], side="right")]] = True
    return rows


def _a_field(path: s.Path) -> bool:
    """Whether the columnar path takes a value at `path` as this field, as the text walk does: not
    in a record with a key like an operator's (`$...`) or keyed by data (a map, maybe). A key
    named like a wrapper, at any depth, sets its document aside by its BSON (`wrapper_rows`)."""
    return not any(name.startswith("$") or s._DATA_KEY.match(name) for name in path[1:])


def _shape(item: Found) -> str | None:
    if item.what == doc_text.ARRAY_OF:
        return _ARRAYS
    if item.kind == 10:  # null: beside any shape
        return None
    return _BOOLEANS if item.kind == 8 else _TEXTS


def _set_aside_rarer_shape(items: list[tuple[np.ndarray, Found]], exact: np.ndarray, held: bool) -> None:
    """Documents holding a shape of the field one `Values` cannot hold beside the commonest are
    the exact path's; beside values held whole, arrays not empty and booleans are."""
    for elements in (False, True):
        rows_of: dict[str, list[np.ndarray]] = {}
        for rows, item in items:
            if (item.what == doc_text.ELEMENT) != elements:
                continue
            shape = _shape(item)
            if shape == _ARRAYS and held and item.index == 0:
                continue  # an empty array joins arrays held whole
            if shape is not None:
                rows_of.setdefault(shape, []).append(rows)
        if held and not elements:
            for shape in (_ARRAYS, _BOOLEANS):
                for rows in rows_of.pop(shape, []):
                    exact[rows] = True
        if len(rows_of) < 2:
            continue
        sizes = {shape: sum(len(r) for r in rows) for shape, rows in rows_of.items()}
        kept = max(sizes, key=sizes.__getitem__)
        for shape, rows_list in rows_of.items():
            if shape != kept:
                for rows in rows_list:
                    exact[rows] = True


def _found_batch(
    by_path: dict[s.Path, list[tuple[np.ndarray, Found]]],
    rendered: Rendered,
    taken: np.ndarray,
    count: int,
    options: s.SchemaOptions,
) -> ColumnarBatch:
    n = len(taken)
    position = np.full(count, -1, np.int64)
    position[taken] = np.arange(n)
    paths: dict[s.Path, Values] = {}
    for path, items in by_path.items():
        values = _found_values(items, position, n)
        if values is not None:
            paths[path] = values
    wholes = _wholes_of(rendered.wholes, taken, count)
    for whole, at, keep in wholes:  # null until `_take_wholes` puts the values held there
        values = paths.get(whole.path)
        if values is None:
            values = paths[whole.path] = Values(np.full(n, ABSENT, np.int8), pa.nulls(n))
        values.kinds[at[keep]] = NULL
    maps = _take_wholes(paths, n, wholes)
    for values in paths.values():
        if values.elements is not None and not values.whole:
            _no_text_beside_arrays(values)
    if ("_id",) not in paths:
        raise Refused("no _id")
    ids, keys = _ids(paths.pop(("_id",)))
    stats = s.TypeStats(documents=n)
    if options.infer:
        stats.fields = {path: field_stats(values) for path, values in paths.items()}
    else:
        paths = {}
    stats.maps = maps if options.infer else set()
    docs = rendered.docs if n == count else rendered.docs.take(pa.array(taken))
    return ColumnarBatch(ids, keys, docs, paths, stats)


def _found_values(items: list[tuple[np.ndarray, Found]], position: np.ndarray, n: int) -> Values | None:
    """One field's values in the rows taken (`position`: each chunk row's, -1 where not taken)."""
    kinds = np.full(n, ABSENT, np.int8)
    texts: list[tuple[np.ndarray, pa.Array]] = []
    lengths: np.ndarray | None = None
    elements: list[tuple[np.ndarray, Found]] = []
    for rows, item in items:
        if item.what == doc_text.ELEMENT:
            elements.append((rows, item))  # placed once the arrays' lengths are known
            continue
        taken = _taken(rows, position)
        if taken is None:
            continue
        at, keep = taken
        if item.what == doc_text.VALUE:
            _put(item, at, keep, kinds, texts)
        else:  # ARRAY_OF
            kinds[at] = CODES[s.ARRAY]
            if lengths is None:
                lengths = np.zeros(n, np.int64)
            lengths[at] = item.index
    if not (kinds != ABSENT).any():
        return None
    if lengths is None:  # empty documents are values held whole: the exact path keeps them so
        return Values(kinds, _placed(texts, n), whole=bool((kinds == CODES[s.DOCUMENT]).any()))
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    element_kinds = np.full(total, NULL, np.int8)
    element_texts: list[tuple[np.ndarray, pa.Array]] = []
    for rows, item in elements:
        taken = _taken(rows, position)
        if taken is not None:
            at, keep = taken
            _put(item, offsets[at] + item.index, keep, element_kinds, element_texts)
    element_values = Values(element_kinds, _placed(element_texts, total))
    # Beside arrays only values held whole have text (`_set_aside_rarer_shape`): strings, and `{}`.
    text = _placed(texts, n) if texts else pa.nulls(n, pa.string())
    return Values(kinds, text, element_values, offsets)


def _no_text_beside_arrays(values: Values) -> None:
    """Arrays and values with text (strings, `{}`) side by side, which only values held whole
    allow (an empty array joins them: `_set_aside_rarer_shape`): where none is held in the rows
    taken, the rarer shape is set aside."""
    arrays = values.kinds == CODES[s.ARRAY]
    others = (values.kinds > NULL) & ~arrays
    if others.any():
        rarer = others if np.count_nonzero(others) <= np.count_nonzero(arrays) else arrays
        raise _SetAside(np.flatnonzero(rarer))


def _taken(rows: np.ndarray, position: np.ndarray) -> tuple[np.ndarray, np.ndarray | None] | None:
    """A group's rows among those taken, and which of the group's are (None: all); None if none."""
    at = position[rows]
    keep = at >= 0
    if keep.all():
        return at, None
    return (at[keep], keep) if keep.any() else None


def _put(item: Found, slots: np.ndarray, keep: np.ndarray | None, kinds: np.ndarray, texts: list) -> None:
    """A value's (or element's) kind codes and text at `slots`, of the group's documents `keep`s."""
    code = _CODE_OF_TYPE[item.kind]
    if item.uuid is None:
        kinds[slots] = code
    else:
        kinds[slots] = np.where(item.uuid if keep is None else item.uuid[keep], CODES[s.UUID], code)
    if item.kind == _EMPTY_DOCUMENT[0]:
        texts.append((slots, pa.array(np.full(len(slots), _EMPTY_DOCUMENT[1]), pa.binary())))
    elif item.text is not None:
        texts.append((slots, item.text if keep is None else item.text.filter(pa.array(keep))))


def _placed(texts: list[tuple[np.ndarray, pa.Array]], n: int) -> pa.Array:
    """Texts (or booleans) each at its slots, null elsewhere: one array of `n`."""
    if not texts:
        return pa.nulls(n)
    arrays = [text if pa.types.is_boolean(text.type) else text.view(pa.string()) for _, text in texts]
    if len(texts) == 1 and len(texts[0][0]) == n and (np.diff(texts[0][0]) == 1).all():
        return arrays[0]  # one group, in order: as the walk read it
    index = np.full(n, -1, np.int64)
    start = 0
    for at, text in texts:
        index[at] = np.arange(start, start + len(text))
        start += len(text)
    return pa.concat_arrays(arrays).take(pa.array(index, mask=index < 0))


def _takes_whole(whole: Whole, options: s.SchemaOptions, known_maps: set[s.Path]) -> np.ndarray:
    """Which of a `Whole`'s values the exact path would keep whole too (`arrow.BucketConverter._flatten`):
    arrays (of documents and nulls) always, documents if it would call them maps; not `_id`."""
    if whole.path == ("_id",):
        return np.zeros(len(whole.rows), bool)
    if whole.is_array:
        return np.ones(len(whole.rows), bool)
    if len(whole.path) >= options.max_depth:
        return np.zeros(len(whole.rows), bool)
    if whole.path in known_maps:
        return np.ones(len(whole.rows), bool)
    return looks_like_maps(whole.keys)


def looks_like_maps(keys: MapKeys) -> np.ndarray:
    """`schema.looks_like_map` of each document's keys, the keys matched by Arrow at once. Keys
    not ASCII, or with a newline, are matched by Python's `re` (whose `\\d` takes any Unicode
    digit, and whose `$` matches before a final newline): the same answer as the exact path's."""
    flat, lengths = keys.flat, keys.lengths
    data_like = pc.fill_null(pc.match_substring_regex(flat, s._DATA_KEY.pattern), False)
    data_like = data_like.to_numpy(zero_copy_only=False)
    plain = pc.and_(pc.string_is_ascii(flat), pc.invert(pc.match_substring(flat, "\n")))
    for at in np.flatnonzero(~plain.to_numpy(zero_copy_only=False)).tolist():
        data_like[at] = s._DATA_KEY.match(flat[at].as_py()) is not None
    counts = np.bincount(np.repeat(np.arange(len(lengths)), lengths), data_like, len(lengths))
    return (lengths > 0) & (counts * 2 >= lengths)


def _wholes_of(
    wholes: list[Whole], rows: np.ndarray, count: int
) -> list[tuple[Whole, np.ndarray, np.ndarray]]:
    """The wholes of the documents at `rows`: each with its values' positions among those rows,
    and which of its values are there."""
    if not wholes:
        return []
    position = np.full(count, -1, np.int64)
    position[rows] = np.arange(len(rows))
    taken = []
    for whole in wholes:
        at = position[whole.rows]
        keep = at >= 0
        if keep.any():
            taken.append((whole, at, keep))
    return taken


class _SetAside(Exception):
    """Documents of the batch (by their rows in it) that only the exact path can take."""

    def __init__(self, rows: np.ndarray) -> None:
        super().__init__(f"{len(rows)} documents")
        self.rows = rows


class _TypeConflict(Exception):
    """Arrow's reader met a field in two JSON shapes: `Column(/a/b) changed from string to object`."""

    _MESSAGE = re.compile(r"Column\(([^)]*)\) changed from (\w+) to (\w+)")
    # How each shape's value begins after its key, in libbson's text.
    _OPENING = {
        "object": r"\{",
        "array": r"\[",
        "string": '"',
        "boolean": "(?:true|false)",
        "number": "-?[0-9]",
    }

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.found = self._MESSAGE.search(message)

    def rarer_shape(self, docs: pa.Array) -> np.ndarray | None:
        """The documents holding the field's rarer shape, told by its key (at any depth); None if the
        message or the key cannot be read that way (an array's elements, a key with escapes)."""
        if self.found is None:
            return None
        path, *shapes = self.found.groups()
        name = path.rsplit("/", 1)[-1]
        if not _PLAIN_KEY.match(name) or any(shape not in self._OPENING for shape in shapes):
            return None
        holding = [
            pc.match_substring_regex(docs, f'"{re.escape(name)}" : {self._OPENING[shape]}').to_numpy(
                zero_copy_only=False
            )
            for shape in shapes
        ]
        return min(holding, key=np.count_nonzero)


def columnar_batch(
    raw_documents: list[bytes],
    docs: pa.Array,
    options: s.SchemaOptions,
    known_maps: set[s.Path],
    wholes: list[tuple[Whole, np.ndarray, np.ndarray]] = (),
    doc_text: pa.Array | None = None,
    screened: bool = False,
) -> ColumnarBatch | None:
    """The batch as columns, or None when only the exact path can convert it; raises `_TypeConflict`
    for a field of two JSON shapes, `_SetAside` for documents only the exact path can take.
    `docs` is the text parsed, `doc_text` the batch's `_doc` where they differ; `screened`: the
    documents passed `refused_documents`."""
    if wrapper_rows(raw_documents).any():
        return None  # a key that would read as Extended JSON syntax (or, rarely, bytes that look like one)
    # The documents back to back, read straight from `_doc`'s buffer: each is one JSON object, so
    # the reader needs no separator between them, and no copy of the text is made.
    docs = pa.concat_arrays([docs]) if docs.offset else docs
    _, offsets_buffer, data = docs.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32, len(docs) + 1)
    text = data[int(offsets[0]) : int(offsets[-1])] if len(docs) else pa.py_buffer(b"")
    try:
        if _refused_by_sample(docs, options, known_maps):
            return None
        table = pajson.read_json(
            pa.BufferReader(text),
            read_options=pajson.ReadOptions(use_threads=False, block_size=max(text.size + 1, 1 << 20)),
        )
        if table.num_rows != len(docs):
            return None
        batch = _Walker(table, docs, options, known_maps, wholes, screened).batch()
        if doc_text is not None:
            batch.docs = doc_text
        return batch
    except pa.ArrowInvalid as error:
        if "changed from" in str(error):
            raise _TypeConflict(str(error)) from None
        return None
    except Refused:
        return None


# What makes the walk refuse a document, found in the texts of a whole chunk at once by one regular
# expression (Arrow's RE2 kernel: a few milliseconds a megabyte, as each choice starts with a
# literal), so that those documents alone take the exact path. A choice may match a document the
# walk would take (a string that looks like syntax): it only converts slower. A document it misses
# (one whose nested document has only `$` keys, a type conflict) is refused by the walk, and its
# whole chunk takes the exact path, as every chunk did before.
_REFUSED_TEXT = "|".join(
    [
        r'\[ \{ "[^$]',  # an array of documents (wrappers in arrays start `{ "$`)
        r', \{ "[^$]',  # a document later in an array (a member's value follows ` : `, not `, `)
        r"\[ \[",  # an array of arrays
        r", \[",
        r"\{ +\}",  # an empty document
        _NOT_A_KEY_SEPARATOR,  # a string or key holding what looks like a key separator (`_settle_nulls`)
        # The wrappers the walk does not read.
        r'\{ "\$(?:code|timestamp|regularExpression|symbol|dbPointer|minKey|maxKey|undefined)"',
        r'"subType" : "02" \}',  # the old binary subtype, which nests its own length
        '"(?:' + s._DATA_KEY.pattern[4:-2] + ')" : ',  # a key that is data: maybe a map
    ]
)


# An array that begins with null: Arrow's reader drops the nulls an array begins with while its
# element type is unknown (`[null, "x"]` reads as `["x"]`).
_BEGINS_WITH_NULL = r"\[ null"
# A key holding null, as libbson writes it, ends `" : null`; its name has no escape (no quote, no
# backslash), and the quote before it is no string's (inside a string, every quote follows a
# backslash). `(?:^|[^\\])` keeps a key `a\"name` from passing for `name`.
_NULL_KEY_END = '" : null'
_NULL_KEY_NAME = r'(?:^|[^\\])"(?P<name>[^"\\]*)$'


def _null_keys(texts: pa.Array) -> dict[str, np.ndarray]:
    """How many keys of each name hold null in each text: the text split at each `" : null`, and
    the name read off the end of each piece but the last. The tally in `_settle_nulls` checks the
    counts against the keys each document holds."""
    pieces = pc.split_pattern(texts, _NULL_KEY_END)
    offsets = pieces.offsets.to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(pieces).to_numpy(zero_copy_only=False)
    keep = np.ones(len(parents), bool)
    keep[offsets[1:][offsets[1:] > offsets[:-1]] - 1] = False  # each text's last piece: after its last null
    flat = pc.list_flatten(pieces).filter(pa.array(keep))
    names = pc.struct_field(pc.extract_regex(flat, _NULL_KEY_NAME), [0])
    parents = parents[keep]
    counts: dict[str, np.ndarray] = {}
    for name in pc.unique(names).drop_null().to_pylist():
        mask = pc.fill_null(pc.equal(names, name), False).to_numpy(zero_copy_only=False)
        counts[name] = np.bincount(parents[mask], minlength=len(texts)).astype(np.int64)
    return counts


def refused_documents(raw_documents: list[bytes], docs: pa.Array, known_maps: set[s.Path]) -> np.ndarray:
    """Which documents of a chunk the walk would refuse (or may: see above), from their `_doc` text."""
    refused = pc.match_substring_regex(docs, _REFUSED_TEXT).to_numpy(zero_copy_only=False)
    for path in known_maps:
        key = json.dumps(path[-1], ensure_ascii=False) + " : {"
        refused |= pc.match_substring(docs, key).to_numpy(zero_copy_only=False)
    refused |= wrapper_rows(raw_documents)
    return refused


# Documents of a chunk parsed first, evenly spaced, to see whether the chunk can be taken at all;
# only in a chunk of more rows than this. What Arrow's reader spends on maps keyed by data grows
# with the square of the rows (a field per key, each as long as the chunk), not with the bytes:
# a few hundred rows cost little whatever they hold, 2,000 rows of maps cost 20 MB.
_SAMPLE = 64
_SAMPLE_FROM_ROWS = 4 * _SAMPLE


def _refused_by_sample(docs: pa.Array, options: s.SchemaOptions, known_maps: set[s.Path]) -> bool:
    """True when a sample of the chunk already holds what the walk would refuse: a document keyed
    by data (a map), an array of documents or arrays, nesting past `max_depth`. Arrow's reader
    makes a field of every key it meets, so a chunk of maps keyed by ids costs it seconds and a
    hundred MB before the refusal."""
    if len(docs) <= _SAMPLE_FROM_ROWS:
        return False
    rows = np.linspace(0, len(docs) - 1, _SAMPLE).astype(np.int64)
    sample = docs.take(pa.array(rows))  # its texts back to back in one buffer: the reader's input
    text = sample.buffers()[2][: int(np.frombuffer(sample.buffers()[1], np.int32, _SAMPLE + 1)[-1])]
    table = pajson.read_json(pa.BufferReader(text), read_options=pajson.ReadOptions(use_threads=False))
    stack: list[tuple[s.Path, pa.DataType]] = [((f.name,), f.type) for f in table.schema]
    while stack:
        path, kind = stack.pop()
        wrapper = pa.types.is_struct(kind) and kind.num_fields and all(f.name.startswith("$") for f in kind)
        if pa.types.is_list(kind):
            element = kind.value_type
            element_wrapper = pa.types.is_struct(element) and all(f.name.startswith("$") for f in element)
            if pa.types.is_list(element) or (pa.types.is_struct(element) and not element_wrapper):
                return True
            continue
        if not pa.types.is_struct(kind) or wrapper:
            continue
        names = [f.name for f in kind]
        if len(path) >= options.max_depth or path in known_maps or any(s._DATA_KEY.match(n) for n in names):
            return True
        stack.extend(((*path, f.name), f.type) for f in kind)
    return False


class _Walker:
    def __init__(
        self,
        table: pa.Table,
        docs: pa.Array,
        options: s.SchemaOptions,
        known_maps: set[s.Path],
        wholes: list[tuple[Whole, np.ndarray, np.ndarray]] = (),
        screened: bool = False,
    ):
        self.screened = screened
        self.wholes = wholes
        self.held: dict[s.Path, np.ndarray] = {}  # rows of each path whose values are held whole
        for whole, at, keep in wholes:
            rows = self.held.setdefault(whole.path, np.zeros(table.num_rows, bool))
            rows[at[keep]] = True
        self.table = table
        self.docs = docs
        self.options = options
        self.known_maps = known_maps
        self.n = table.num_rows
        self.found_keys = np.zeros(self.n, np.int64)  # keys accounted for by non-null values
        self.unknown: list[
            tuple[s.Path, np.ndarray]
        ] = []  # members null in a present parent: null or missing
        self.paths: dict[s.Path, Values] = {}
        self.maybe_empty: list[
            tuple[np.ndarray, list[s.Path]]
        ] = []  # records with no value but nulls, if any

    def batch(self) -> ColumnarBatch:
        present = np.ones(self.n, bool)
        for name, column in zip(self.table.column_names, self.table.columns, strict=True):
            self._member((name,), _combined(column), present)
        self._settle_nulls()
        for rows, children in self.maybe_empty:
            has_null = np.zeros(self.n, bool)
            for child in children:
                if child in self.paths:
                    has_null |= self.paths[child].kinds == NULL
            if (rows & ~has_null).any():
                raise Refused("an empty document")  # a value of its own at its path: the exact path keeps it
        maps = _take_wholes(self.paths, self.n, self.wholes)
        if ("_id",) not in self.paths:
            raise Refused("no _id")
        ids, keys = _ids(self.paths.pop(("_id",)))
        stats = s.TypeStats(documents=self.n)
        if self.options.infer:
            stats.fields = {path: field_stats(values) for path, values in self.paths.items()}
        else:
            self.paths = {}
        stats.maps = maps if self.options.infer else set()  # the exact path finds none without inference
        return ColumnarBatch(ids, keys, self.docs, self.paths, stats)

    def _member(self, path: s.Path, array: pa.Array, parent: np.ndarray) -> None:
        """A key of a document at `path`, present or not in each row where its parent is."""
        valid = _valid(array) & parent
        held = self.held.get(path)
        present = valid if held is None else valid | held  # `null` in the text, held whole
        self.found_keys += present
        null_here = parent & ~present
        if null_here.any():
            self.unknown.append((path, null_here))
        kind = array.type
        if pa.types.is_struct(kind) and kind.num_fields and all(f.name.startswith("$") for f in kind):
            self.paths[path] = self._wrapped(array, valid, path)
        elif pa.types.is_struct(kind):
            self._record(path, array, valid)
        elif pa.types.is_list(kind):
            self.paths[path] = self._array(array, valid)
        else:
            self.paths[path] = _scalar(array, valid)
        if held is not None:  # null until `_take_wholes` puts the values held there
            values = self.paths.get(path)
            if values is None:
                values = self.paths[path] = Values(np.full(self.n, ABSENT, np.int8), pa.nulls(self.n))
            values.kinds[held] = NULL

    def _record(self, path: s.Path, array: pa.StructArray, valid: np.ndarray) -> None:
        names = [f.name for f in array.type]
        if (
            not names
            or len(path) >= self.options.max_depth
            or path in self.known_maps
            or any(s._DATA_KEY.match(n) for n in names)  # could be a map in some row: the exact path decides
            # A wrapped value in some rows and a record in others: the reader merged both shapes.
            or any(n.startswith("$") for n in names)
        ):
            raise Refused(f"{path} is not a plain record")
        children = array.flatten()
        nonempty = np.zeros(self.n, bool)
        for child in children:
            nonempty |= _valid(child)
        only_nulls = valid & ~nonempty
        if only_nulls.any():  # `{}` or a document of nulls: told apart once nulls are settled
            self.maybe_empty.append((only_nulls, [(*path, n) for n in names]))
        for name, child in zip(names, children, strict=True):
            self._member((*path, name), child, valid)

    def _wrapped(self, array: pa.StructArray, valid: np.ndarray, path: s.Path) -> Values:
        """Values of wrapped types (`{ "$oid" : ... }`, `{ "$binary" : ... }`, ...), several kinds at
        one path too: the reader merges their wrappers into one struct, a member valid per kind."""
        names = [f.name for f in array.type]
        if not set(names) <= _WRAPPERS.keys():
            raise Refused(f"{path}: {names}")
        kinds = np.where(valid, NULL, ABSENT).astype(np.int8)
        holding = np.zeros(len(kinds), bool)
        texts = []
        for name, child in zip(names, array.flatten(), strict=True):
            here = _valid(child)
            if (holding & here).any():
                raise Refused(f"{path}: two wrappers in one value")
            holding |= here
            text, codes = self._unwrapped(name, child, path)
            kinds[here] = codes if isinstance(codes, int) else codes[here]
            self.found_keys += _WRAPPERS[name] * here
            texts.append(text)
        if (valid & ~holding).any():  # `{}` beside wrapped values: the reader made it a wrapper of nulls
            raise Refused(f"{path}: an empty document")
        return Values(kinds, texts[0] if len(texts) == 1 else pc.coalesce(*texts))

    @staticmethod
    def _unwrapped(name: str, child: pa.Array, path: s.Path) -> tuple[pa.Array, int | np.ndarray]:
        """A wrapper's values as text (what `_CONVERT` and the casts read) and their kind codes."""
        if name in _NUMBER_WRAPPERS:
            return child, _NUMBER_WRAPPERS[name]
        if name == "$oid":
            return child, CODES[s.OBJECTID]
        inner = [f.name for f in child.type] if pa.types.is_struct(child.type) else None
        if name == "$date":
            if inner != ["$numberLong"]:
                raise Refused(f"{path}: a date beyond the canonical form")
            return child.flatten()[0], CODES[s.DATE]
        if inner != ["base64", "subType"]:  # "$binary"
            raise Refused(f"{path}: a binary beyond the canonical form")
        encoded, subtype = child.flatten()
        # A UUID is subtype 4 of 16 bytes (24 characters of base64, the last two `=`), as
        # `arrow.kind_of` tells them.
        uuid = pc.and_(
            pc.equal(subtype, "04"),
            pc.and_(pc.equal(pc.binary_length(encoded), 24), pc.ends_with(encoded, "==")),
        )
        codes = np.where(uuid.to_numpy(zero_copy_only=False), CODES[s.UUID], CODES[s.BINARY])
        return pc.binary_join_element_wise(subtype, encoded, ""), codes  # "04" + base64: `_binary` reads both

    def _array(self, array: pa.ListArray, valid: np.ndarray) -> Values:
        kinds = np.where(valid, CODES[s.ARRAY], ABSENT).astype(np.int8)
        offsets = array.offsets.to_numpy(zero_copy_only=False)
        flat = array.values
        element_type = flat.type
        flat_valid = _valid(flat)
        if pa.types.is_struct(element_type) and element_type.num_fields:
            if not all(f.name.startswith("$") for f in element_type):
                raise Refused("an array of documents")
            # Wrapper keys inside arrays count too; the walker's key tally is per row.
            counter = np.zeros(len(flat), np.int64)
            saved, self.found_keys = self.found_keys, counter
            elements = self._wrapped(flat, flat_valid, ("[]",))
            self.found_keys = saved
            per_row = np.add.reduceat(np.append(counter, 0), offsets[:-1]) if len(flat) else 0
            per_row = np.where(offsets[1:] > offsets[:-1], per_row, 0)
            self.found_keys += per_row
        elif pa.types.is_struct(element_type) or pa.types.is_list(element_type):
            raise Refused("an array of documents or arrays")
        else:
            elements = _scalar(flat, flat_valid)
        elements.kinds[elements.kinds == ABSENT] = NULL  # an array element is never missing, only null
        return Values(kinds, pa.nulls(len(kinds), pa.string()), elements, offsets)

    def _settle_nulls(self) -> None:
        """Tell a null field from a missing one, from the keys each document's text holds.

        The keys not accounted for by values are the null ones. Where a document
        has both null and missing fields, `"name" : null` counted per name settles
        which is which, when names are plain enough to find that way.
        """
        if not self.unknown:
            return
        # Documents whose count cannot settle it go to the exact path (`_SetAside`), the rest stay.
        if self.screened:  # `_REFUSED_TEXT` holds `_NOT_A_KEY_SEPARATOR`: none is left
            aside = np.zeros(self.n, bool)
        else:
            aside = pc.match_substring_regex(self.docs, _NOT_A_KEY_SEPARATOR).to_numpy(zero_copy_only=False)
        in_text = pc.count_substring(self.docs, _KEY_SEPARATOR).to_numpy(zero_copy_only=False)
        null_keys = in_text - self.found_keys
        candidates = np.zeros(self.n, np.int64)
        for _, null_here in self.unknown:
            candidates += null_here
        none_null = null_keys == 0
        all_null = null_keys == candidates
        settled = none_null | all_null
        # Only the documents the counts leave unsettled are searched, by name: a chunk of documents
        # that differ in their fields has many names, and searching all of its text for each is
        # most of its walk.
        unsettled = np.flatnonzero(~settled & ~aside)
        null_by_name: dict[str, np.ndarray] = {}
        if len(unsettled):
            found_names = _null_keys(self.docs.take(pa.array(unsettled)))
            by_name: dict[str, np.ndarray] = {}
            for path, null_here in self.unknown:
                by_name[path[-1]] = by_name.get(path[-1], 0) + null_here[unsettled]
            for name, expected in by_name.items():
                if not expected.any():
                    continue  # no null of this name to find (the tally below still checks every row)
                found = found_names.get(name)
                found = np.zeros(len(unsettled), np.int64) if found is None else found.copy()
                for path, held in self.held.items():  # a value held whole is `null` in the text
                    if path[-1] == name:
                        found -= held[unsettled]
                aside[unsettled[(found != 0) & (found != expected)]] = True
                null_by_name[name] = np.zeros(self.n, bool)
                null_by_name[name][unsettled] = found == expected
        resolved = np.zeros(self.n, np.int64)
        nulls_of: list[tuple[s.Path, np.ndarray]] = []
        for path, null_here in self.unknown:
            by_key = null_by_name.get(path[-1])
            is_null = np.where(settled, all_null & ~none_null, by_key if by_key is not None else False)
            nulls = null_here & is_null
            resolved += nulls
            nulls_of.append((path, nulls))
        aside |= resolved != null_keys
        if aside.any():
            raise _SetAside(np.flatnonzero(aside))
        for path, nulls in nulls_of:
            if not nulls.any():
                continue
            values = self.paths.get(path)
            if values is None:  # a record that is null in some documents: a null value at its path
                values = self.paths[path] = Values(np.full(self.n, ABSENT, np.int8), pa.nulls(self.n))
            values.kinds[nulls] = NULL


def _take_wholes(
    paths: dict[s.Path, Values], n: int, wholes_taken: list[tuple[Whole, np.ndarray, np.ndarray]]
) -> set[s.Path]:
    """Put the values held whole where `paths` says null (the text's `null`); the maps among them."""
    by_path: dict[s.Path, list[tuple[Whole, np.ndarray, np.ndarray]]] = {}
    for whole, at, keep in wholes_taken:
        by_path.setdefault(whole.path, []).append((whole, at, keep))
    maps: set[s.Path] = set()
    for path, wholes in by_path.items():
        values = paths.get(path)
        if values is None or values.elements is not None and values.whole:
            raise Refused(f"{path}: values held whole where the reader saw none")
        at = np.concatenate([a[k] for _, a, k in wholes])
        if (values.kinds[at] != NULL).any():
            raise Refused(f"{path}: a value held whole is not null in the text")
        codes = np.concatenate(
            [np.full(np.count_nonzero(k), CODES[s.ARRAY if w.is_array else s.DOCUMENT], np.int8)
             for w, _, k in wholes]
        )  # fmt: skip
        documents = np.zeros(n, np.int64)
        nulls = np.zeros(n, np.int64)
        for whole, a, keep in wholes:
            if whole.is_array:
                documents[a[keep]] = whole.documents[keep]
                nulls[a[keep]] = whole.nulls[keep]
            else:
                maps.add(path)
        if values.elements is not None:
            # Arrays the reader parsed, beside arrays held whole: only empty ones can join them.
            lengths = np.diff(values.offsets)
            parsed = (values.kinds == CODES[s.ARRAY]) & (lengths > 0)
            if parsed.any():
                raise _SetAside(np.flatnonzero(parsed))
        empty = values.kinds == CODES[s.ARRAY]  # arrays the reader parsed: empty ones (above)
        if pa.types.is_string(values.text.type):
            text = values.text
        elif pa.types.is_null(values.text.type):
            text = pa.nulls(n, pa.string())
        else:  # booleans beside arrays or maps: rare
            raise Refused(f"{path}: {values.text.type} beside values held whole")
        if empty.any():
            text = pc.if_else(pa.array(empty), pa.scalar("[  ]"), text)  # libbson: two spaces
        texts = [t.text.filter(pa.array(k)).view(pa.string()) for t, _, k in wholes]
        order = np.arange(n)
        order[at] = n + np.arange(len(at))
        text = pa.concat_arrays([text, *texts]).take(pa.array(order))
        kinds = values.kinds.copy()
        kinds[at] = codes
        counts = documents + nulls
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        total = int(offsets[-1])
        row = np.repeat(np.arange(n), counts)
        element_kinds = np.where(np.arange(total) - offsets[row] < documents[row], CODES[s.DOCUMENT], NULL)
        elements = Values(element_kinds.astype(np.int8), pa.nulls(total, pa.string()))
        paths[path] = Values(kinds, text, elements, offsets, whole=True)
    return maps


def _combined(column: pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)


def _valid(array: pa.Array) -> np.ndarray:
    if array.null_count == 0:
        return np.ones(len(array), bool)
    return array.is_valid().to_numpy(zero_copy_only=False)


def _scalar(array: pa.Array, valid: np.ndarray) -> Values:
    kinds = np.where(valid, NULL, ABSENT).astype(np.int8)
    if pa.types.is_string(array.type):
        kinds[valid] = CODES[s.STRING]
    elif pa.types.is_boolean(array.type):
        kinds[valid] = CODES[s.BOOL]
    elif not pa.types.is_null(array.type):
        raise Refused(f"a JSON {array.type}")  # canonical Extended JSON has no bare numbers
    return Values(kinds, array)


def _ids(values: Values) -> tuple[pa.Array, pa.Array]:
    """`_id` text and `_id` key, as `arrow.id_string` and `arrow.id_key` write them."""
    codes = _present(values.kinds)
    text = values.text
    if len(codes) != 1:
        raise Refused("_id of several types")
    (code,) = codes
    if code == CODES[s.OBJECTID]:
        return text, pc.binary_join_element_wise('{"$oid": "', text, '"}', "")
    if code == CODES[s.STRING]:
        return text, pa.array([json.dumps(v) for v in text.to_pylist()], pa.string())
    if code in (CODES[s.INT32], CODES[s.INT64]):
        wrapper = "$numberInt" if code == CODES[s.INT32] else "$numberLong"
        return text, pc.binary_join_element_wise(f'{{"{wrapper}": "', text, '"}', "")
    raise Refused("an _id of another type")


# --- statistics ---------------------------------------------------------------------------------


_CODE_SLOTS = max(KIND_OF_CODE) + 2  # ABSENT (-1) to the largest code, shifted by one


def _counts(kinds: np.ndarray) -> np.ndarray:
    """How many slots hold each code, indexed by code + 1 (a chunk's arrays are small: np.unique and
    np.isin cost more in their setup than in their work)."""
    return np.bincount(kinds.astype(np.intp) + 1, minlength=_CODE_SLOTS)


def _present(kinds: np.ndarray) -> set[int]:
    return set((np.flatnonzero(_counts(kinds)) - 1).tolist())


def _among(kinds: np.ndarray, codes) -> np.ndarray:
    """Which slots hold one of `codes`."""
    table = np.zeros(_CODE_SLOTS, bool)
    table[np.asarray(list(codes), np.intp) + 1] = True
    return table[kinds.astype(np.intp) + 1]


def field_stats(values: Values) -> s.FieldStats:
    """What `arrow._field_stats` counts over the same values."""
    stats = s.FieldStats()
    present = values.kinds[values.kinds != ABSENT]
    for code, count in enumerate(_counts(present).tolist(), start=ABSENT):
        if code > NULL and count:
            stats.kinds[KIND_OF_CODE[code]] = count  # in any order: equal counts rank alike (`schema.ranked`)
    stats.nulls = int(np.count_nonzero(present == NULL))
    _measure(stats, values)
    if values.elements is not None and stats.kinds[s.ARRAY]:
        elements = field_stats(values.elements)
        stats.element_kinds = Counter(elements.kinds)
        if elements.nulls:
            stats.element_kinds["null"] = elements.nulls
        stats.merge(s.FieldStats(int_min=elements.int_min, int_max=elements.int_max,
                                 int_digits=elements.int_digits, scale=elements.scale,
                                 max_bytes=elements.max_bytes))  # fmt: skip
    return stats


def _of_kind(values: Values, *codes: int) -> pa.Array:
    mask = _among(values.kinds, codes)
    return values.text.filter(pa.array(mask))


def _measure(stats: s.FieldStats, values: Values) -> None:
    if stats.kinds[s.INT32] or stats.kinds[s.INT64]:
        ints = pc.cast(_of_kind(values, CODES[s.INT32], CODES[s.INT64]), pa.int64())
        low, high = pc.min_max(ints).values()
        stats.int_min, stats.int_max = low.as_py(), high.as_py()
    if stats.kinds[s.STRING]:
        # Lengths first: a string's bytes are not copied to be measured.
        lengths = pc.binary_length(values.text).filter(pa.array(_among(values.kinds, [CODES[s.STRING]])))
        stats.max_bytes = pc.max(lengths).as_py()
    if stats.kinds[s.DOUBLE]:
        double_digits(stats, pc.cast(_of_kind(values, CODES[s.DOUBLE]), pa.float64()))
    if stats.kinds[s.DECIMAL]:
        _decimal_digits(stats, _of_kind(values, CODES[s.DECIMAL]))


def _decimal_digits(stats: s.FieldStats, text: pa.Array) -> None:
    """Digits of Decimal128 values from their text: plain forms vectorised, exponent forms in Python."""
    plain = pc.match_substring_regex(text, _PLAIN_DECIMAL)
    every = pc.all(plain).as_py()
    simple = text if every else text.filter(plain)
    if len(simple):
        # The coefficient has no leading zeros, so a plain form's integer digits are its integer
        # part's, but for a lone 0; its scale is what follows the point.
        length = pc.binary_length(simple)
        dot = pc.find_substring(simple, ".")
        no_dot = pc.equal(dot, -1)
        sign = pc.cast(pc.starts_with(simple, "-"), pa.int32())
        whole = pc.subtract(pc.if_else(no_dot, length, dot), sign)
        zero = pc.match_substring_regex(simple, r"^-?0\.")  # a lone 0 has one integer digit
        stats.int_digits = max(stats.int_digits, pc.max(pc.if_else(zero, 0, whole)).as_py())
        scale = pc.if_else(no_dot, 0, pc.subtract(pc.subtract(length, dot), 1))
        stats.scale = max(stats.scale, pc.max(scale).as_py())
        # Digits written (leading zeros too: such a value goes to the exact path, which is sure).
        written = pc.subtract(pc.subtract(length, sign), pc.cast(pc.invert(no_dot), pa.int32()))
        if pc.max(written).as_py() > s.DECIMAL128_DIGITS:
            raise Refused("a Decimal128 beyond 34 digits")
    if not every:
        others = [Decimal(t) for t in pc.unique(text.filter(pc.invert(plain))).to_pylist()]
        # libbson writes a negative one in exponent form with 34 of its digits: as many digits as a
        # canonical value may have, so such a value (rare) is left to the exact path too.
        if any(
            len(n.as_tuple().digits) > s.DECIMAL128_DIGITS - n.is_signed() for n in others if n.is_finite()
        ):
            raise Refused("a Decimal128 beyond 34 digits")
        _digits(stats, others)


# A double's shortest text as Arrow writes it: `12.5`, `0.00001`, `1e+16`, `1.5e-7`.
_SHORTEST = r"^(?P<whole>[0-9]*)\.?(?P<fraction>[0-9]*)(?:e\+?(?P<exponent>-?[0-9]+))?$"


def double_digits(stats: s.FieldStats, floats: pa.Array) -> None:
    """Integer digits and scale of doubles as the exact path counts them, `Decimal(repr(value))`,
    for all at once. Arrow's text of a double has the same digits as Python's `repr` (each the
    shortest that reads back as the double, the nearest of those), written another way: so it is
    read as digits and an exponent, and laid out as `repr` lays them out (plain from 1e-4 up to
    1e16, with at least one digit after the point; else in exponent form)."""
    if not len(floats):
        return
    finite = pc.is_finite(floats)
    if not pc.all(finite).as_py():
        stats.scale = max(stats.scale, _NOT_DECIMAL)  # NaN and infinities have no decimal form
        floats = floats.filter(finite)
    zero = pc.equal(floats, 0.0)
    if pc.any(zero).as_py():
        stats.scale = max(stats.scale, 1)  # `0.0`: no integer digit, one after the point
        floats = floats.filter(pc.invert(zero))
    if not len(floats):
        return
    parts = pc.extract_regex(pc.cast(pc.abs(floats), pa.string()), _SHORTEST)
    whole, fraction, exponent = (parts.field(i) for i in range(3))
    digits = pc.binary_join_element_wise(whole, fraction, "")
    significant = pc.utf8_rtrim(pc.utf8_ltrim(digits, "0"), "0")
    count = pc.binary_length(significant).to_numpy().astype(np.int64)
    leading = pc.subtract(pc.binary_length(digits), pc.binary_length(pc.utf8_ltrim(digits, "0")))
    power = pc.cast(pc.if_else(pc.equal(exponent, ""), "0", exponent), pa.int64()).to_numpy()
    # The first significant digit's power of ten: `1.5e-7` -> -7, `0.001` -> -3, `12.5` -> 1.
    first = pc.binary_length(whole).to_numpy() - 1 - leading.to_numpy() + power
    plain = (first >= -4) & (first < 16)
    scale = np.where(plain, np.maximum(1, count - 1 - first), np.maximum(0, count - 1 - first))
    stats.int_digits = max(stats.int_digits, int(np.maximum(0, first + 1).max()))
    stats.scale = max(stats.scale, int(scale.max()))


def _digits(stats: s.FieldStats, numbers) -> None:
    """Integer digits and scale as the exact path counts them (Decimal128 digits: coefficient and exponent)."""
    for number in numbers:
        if not number.is_finite():
            stats.scale = max(stats.scale, _NOT_DECIMAL)  # the largest counts, in any order
            continue
        _, digits, exponent = number.as_tuple()
        stats.int_digits = max(stats.int_digits, max(0, len(digits) + exponent))
        stats.scale = max(stats.scale, max(0, -exponent))


# --- typed columns ------------------------------------------------------------------------------


def python_values(values: Values, codec_options: CodecOptions) -> tuple[np.ndarray, list[Any]]:
    """Rows and the values `bson.decode` would have given there: the bridge to the exact converters."""
    rows = values.rows()
    return rows, _python(values, rows, codec_options)


def _python(values: Values, rows: np.ndarray, codec_options: CodecOptions) -> list[Any]:
    kinds = values.kinds[rows].tolist()
    text = values.text.take(pa.array(rows, pa.int64())).to_pylist() if len(rows) else []
    if values.whole:  # arrays and documents from their text; the other kinds as usual
        convert = _CONVERT | _CONVERT_WHOLE
        return [convert[k](t, codec_options) for k, t in zip(kinds, text, strict=True)]
    if values.elements is not None:
        offsets = values.offsets
        element_list = _python(values.elements, np.arange(len(values.elements.kinds)), codec_options)
        out: list[Any] = []
        for row, kind in zip(rows.tolist(), kinds, strict=True):
            out.append(None if kind == NULL else element_list[offsets[row] : offsets[row + 1]])
        return out
    return [_CONVERT[k](t, codec_options) for k, t in zip(kinds, text, strict=True)]


_CONVERT: dict[int, Callable[[Any, CodecOptions], Any]] = {
    NULL: lambda t, o: None,
    CODES[s.BOOL]: lambda t, o: t,
    CODES[s.STRING]: lambda t, o: t,
    CODES[s.INT32]: lambda t, o: int(t),
    CODES[s.INT64]: lambda t, o: Int64(int(t)),
    CODES[s.DOUBLE]: lambda t, o: float(t),
    CODES[s.DECIMAL]: lambda t, o: Decimal128(t),
    CODES[s.OBJECTID]: lambda t, o: ObjectId(t),
    CODES[s.DATE]: lambda t, o: _millis_to_datetime(int(t), o),
    CODES[s.UUID]: lambda t, o: _binary(t),
    CODES[s.BINARY]: lambda t, o: _binary(t),
}


def _decoded_whole(text: str, codec_options: CodecOptions) -> Any:
    """A value held whole, from its canonical text, as `bson.decode` gives it: libbson reads the
    text back into the value's own BSON."""
    return bson.decode(value_bson(text), codec_options)[""]


_CONVERT_WHOLE = {CODES[s.ARRAY]: _decoded_whole, CODES[s.DOCUMENT]: _decoded_whole}


# Relaxed Extended JSON differs from canonical only in numbers and dates (libbson's
# `bson_as_relaxed_extended_json`): int32 and int64 are bare digits, a finite double its digits
# (written alike in both), a date in years 1970 to 9999 ISO 8601. A wrapper cannot be a document's
# own key here: `columnar_batch` refuses a chunk that holds one (`wrapper_rows`).
# One pass: an int's digits, or a double's that begin with a digit (not NaN or ±Infinity,
# which both forms wrap).
_RELAXED_NUMBER = r'\{ "\$number(?:Int|Long|Double)" : "(-?[0-9][^"]*)" \}'


def relaxed_texts(text: pa.Array) -> pa.Array:
    """Values held whole (canonical text, or null), as relaxed Extended JSON (`arrow.relaxed_json_value`):
    numbers unwrapped by Arrow's regular expressions; a value that holds a date, by libbson."""
    canonical = text
    text = pc.replace_substring_regex(text, _RELAXED_NUMBER, r"\1")
    dated = pc.fill_null(pc.match_substring(canonical, '{ "$date" : '), False).to_numpy(zero_copy_only=False)
    if not dated.any():
        return text
    rows = np.flatnonzero(dated)
    relaxed = []
    for value in canonical.take(pa.array(rows)).to_pylist():
        relaxed.append(value_text(bsonjs.dumps(value_bson(value), bsonjs.RELAXED)))
    order = np.arange(len(text))
    order[rows] = len(text) + np.arange(len(rows))
    return pa.concat_arrays([text, pa.array(relaxed, text.type)]).take(pa.array(order))


def _binary(text: str) -> bytes | Binary:
    """What `bson.decode` gives for a binary (as `_wrapped` keeps it: subtype in hex, then base64):
    bytes for subtype 0, a `Binary` of its subtype for any other."""
    data = base64.b64decode(text[2:])
    subtype = int(text[:2], 16)
    return data if subtype == 0 else Binary(data, subtype)


# Kinds a column type takes straight from the text with one Arrow cast, and how.
_TIMESTAMP = pa.timestamp("ms", tz="UTC")


def fast_column(values: Values, type_name: str, accepts: frozenset[str]) -> tuple[pa.Array, int] | None:
    """The column and its outlier count by vectorised casts, or None when a value needs the exact converters."""
    kinds = values.kinds
    accepted = _among(kinds, [CODES[k] for k in accepts if k in CODES])
    outliers = int(np.count_nonzero((kinds > NULL) & ~accepted))
    codes = _present(kinds[accepted])
    if not codes:
        return pa.nulls(len(kinds), _arrow_type(type_name)), outliers
    target = _arrow_type(type_name)
    text = values.text
    if CODES[s.UUID] in codes or values.whole:  # decoded: only their own text, not an outlier's
        text = pc.if_else(pa.array(accepted), text, pa.scalar(None, text.type))
    if values.whole:
        if type_name != s.T_JSON or not codes <= {CODES[s.ARRAY], CODES[s.DOCUMENT]}:
            return None
        return relaxed_texts(text), outliers
    try:
        if type_name.startswith("list<"):
            column = _fast_list(values, type_name[5:-1], target, accepted)
        else:
            column = _fast_scalar(text, codes, type_name, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None  # an inexact decimal, an overflow: the exact converters count it as an outlier
    if column is None:
        return None
    if not accepted.all():
        column = pc.if_else(pa.array(accepted), column, pa.nulls(len(kinds), target))
    return column, outliers


def _fast_scalar(text: pa.Array, codes: set[int], type_name: str, target: pa.DataType) -> pa.Array | None:
    ints = {CODES[s.INT32], CODES[s.INT64]}
    if type_name == s.T_STRING and codes <= {CODES[s.STRING], CODES[s.OBJECTID]} | ints:
        return text
    if type_name == s.T_STRING and codes == {CODES[s.UUID]}:
        return _uuid_strings(text)
    if type_name == s.T_STRING and codes == {CODES[s.BOOL]}:
        return pc.if_else(text, "true", "false")
    if type_name == s.T_BOOL and codes == {CODES[s.BOOL]}:
        return text
    if type_name in (s.T_INT32, s.T_INT64) and codes <= ints:
        return pc.cast(text, target)
    if type_name == s.T_DOUBLE and codes == {CODES[s.DOUBLE]}:
        return pc.cast(text, target)
    if type_name == s.T_TIMESTAMP and codes == {CODES[s.DATE]}:
        return pc.cast(pc.cast(text, pa.int64()), target)
    if pa.types.is_decimal(target) and codes <= {CODES[s.DECIMAL]} | ints:
        # Arrow refuses a value with more digits than the scale keeps, or too many for the precision.
        column = pc.cast(text, target)
        # The exact path quantizes in Python's default context: more than 28 digits is an outlier there.
        limit = pa.scalar(Decimal(10) ** (s.QUANTIZE_DIGITS - target.scale), target)
        if pc.any(pc.greater_equal(pc.abs(column), limit)).as_py():
            return None
        return column
    return None


_BASE64_VALUES = np.zeros(256, np.uint8)
_BASE64_VALUES[BASE64_ALPHABET] = np.arange(64, dtype=np.uint8)
# Where each of a UUID's 32 hex digits goes in its 36 characters (`8-4-4-4-12`).
_UUID_DIGIT_AT = np.array([i + (i >= 8) + (i >= 12) + (i >= 16) + (i >= 20) for i in range(32)])


def _uuid_strings(text: pa.Array) -> pa.Array:
    """UUIDs (`"04"` and 24 characters of base64, valid or null in each row) as `arrow._text`
    writes them: `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`. Rows not valid are null."""
    valid = _valid(text)
    rows = int(np.count_nonzero(valid))
    data = text.filter(pa.array(valid)) if rows != len(text) else text
    data = pa.concat_arrays([data]) if data.offset else data
    chars = np.frombuffer(data.buffers()[2], np.uint8, rows * 26).reshape(rows, 26)[:, 2:]
    sextets = _BASE64_VALUES[chars].astype(np.uint32).reshape(rows, 6, 4)
    word = (sextets[:, :, 0] << 18) | (sextets[:, :, 1] << 12) | (sextets[:, :, 2] << 6) | sextets[:, :, 3]
    octets = np.stack([(word >> 16) & 255, (word >> 8) & 255, word & 255], axis=2).reshape(rows, 18)[:, :16]
    octets = octets.astype(np.uint8)
    out = np.full((rows, 36), ord("-"), np.uint8)
    out[:, _UUID_DIGIT_AT[0::2]] = hex_digits(octets >> 4)
    out[:, _UUID_DIGIT_AT[1::2]] = hex_digits(octets & 15)
    offsets = np.zeros(len(text) + 1, np.int32)
    np.cumsum(np.where(valid, 36, 0), out=offsets[1:])
    mask = None if rows == len(text) else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.StringArray.from_buffers(len(text), pa.py_buffer(offsets), pa.py_buffer(out), mask)


def _fast_list(
    values: Values, element_type: str, target: pa.DataType, accepted: np.ndarray
) -> pa.Array | None:
    elements = values.elements
    codes = _present(elements.kinds) - {NULL}
    if codes and not codes <= {c for c in _LIST_ELEMENTS.get(element_type, ())}:
        return None
    if codes:
        flat = _fast_scalar(elements.text, codes, element_type, target.value_type)
        if flat is None:
            return None
    else:
        flat = pa.nulls(len(elements.kinds), target.value_type)
    validity = pa.array(values.kinds == CODES[s.ARRAY])
    offsets = pa.array(values.offsets.astype(np.int32))
    return pa.ListArray.from_arrays(offsets, flat, type=target, mask=pc.invert(validity))


# Element kinds pyarrow ingests unchanged in the exact path (`arrow._NATIVE`), hence the same values.
_LIST_ELEMENTS = {
    s.T_STRING: {CODES[s.STRING]},
    s.T_INT32: {CODES[s.INT32]},
    s.T_INT64: {CODES[s.INT32], CODES[s.INT64]},
    s.T_DOUBLE: {CODES[s.DOUBLE]},
    s.T_BOOL: {CODES[s.BOOL]},
    s.T_TIMESTAMP: {CODES[s.DATE]},
}


def _arrow_type(type_name: str) -> pa.DataType:
    from aries_assets.core.arrow import arrow_type

    return arrow_type(type_name)
