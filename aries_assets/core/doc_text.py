"""`_doc`: each document as libbson's canonical Extended JSON, rendered a chunk at a time.

python-bsonjs (libbson) renders one document per call, about 5 µs for a 230-byte
event: the largest cost of a bucket write. Documents of a chunk mostly share one
shape (the same keys, in the same order, holding the same BSON types), so this
module walks them together: at each element, one NumPy operation reads the type
byte, the key or the value of every document of the chunk at once, and Arrow
formats the numbers and joins the pieces. The text is libbson's, byte for byte:
the literal parts are libbson's own spacing, and every value is formatted as
libbson formats it (the tests compare the two on every BSON type and on the
sample datasets).

Where documents part ways (a field missing here, an int there, an array one
element longer), the walk splits them into groups that go on separately; inside a
value where they part many ways (a map keyed by ids), that value is rendered by
bsonjs alone, document by document, and the group goes on whole. So is a string or
key that libbson escapes. What it does not render at all goes to bsonjs, one
document at a time, as before: a type it does not know (regex, code, timestamps,
min/max keys, the old binary subtype, ...), a group too small to repay a walk, or
more groups than `MAX_GROUPS`.

A step of the walk has a fixed cost (a few NumPy calls), whatever the number of
documents it takes: a chunk of documents of many shapes, wide ones especially,
would cost more walked than rendered one by one. So the walk has a budget, what
bsonjs would take for the chunk by the bytes (`BSONJS_NS_PER_BYTE`), and spends
it on the largest groups first; what is left when it runs out goes to bsonjs. A
chunk never costs much more than bsonjs alone, and one of one shape far less.

What the walk reads on the way it keeps for the columnar path (`Found`, in
`Rendered.found`): each value's type and text at its field path, array elements,
arrays' lengths, where records begin, and which documents hold what only the exact
path takes. `bson_columns.found_part` builds the chunk's columns from them, with
no JSON parsed.
"""

from __future__ import annotations

import base64
import io
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import bson
import bsonjs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from bson.codec_options import CodecOptions, DatetimeConversion

# A group of fewer documents, and fewer bytes, goes to bsonjs: a walk's fixed cost per element is
# tens of µs, while bsonjs's cost follows the bytes (a few large documents are worth a walk: it
# writes a long string at once, where libbson escapes it character by character).
MIN_GROUP = 24
MIN_GROUP_BYTES = 64 * 1024
# Groups a chunk may split into before the rest goes to bsonjs (a chunk of documents of many shapes).
MAX_GROUPS = 48
# The cost model of the budget, in ns (measured on events: bsonjs renders about 22 ns a byte; a
# step of the walk costs about 25 µs, and 50 ns a document).
BSONJS_NS_PER_BYTE = 22
STEP_NS = 25_000
STEP_NS_PER_DOCUMENT = 50
# The share of bsonjs's cost the walk may spend: if it renders nothing, the chunk costs 1.75x.
BUDGET_SHARE = 0.75
# A group under `MIN_GROUP` documents walked for its bytes (`MIN_GROUP_BYTES`): a step of one
# document was measured at 50 to 110 µs (the higher is charged), and the walk may spend this share
# of bsonjs's cost for them before bsonjs renders them (a million-element array: about 1.2x).
FEW_STEP_NS = 110_000
FEW_BUDGET_SHARE = 0.25

_DOUBLE, _STRING, _DOCUMENT, _ARRAY, _BINARY, _OBJECTID, _BOOL, _DATE, _NULL = 1, 2, 3, 4, 5, 7, 8, 9, 10
_INT32, _INT64, _DECIMAL = 16, 18, 19
_FIXED_WIDTH = {_DOUBLE: 8, _OBJECTID: 12, _BOOL: 1, _DATE: 8, _NULL: 0, _INT32: 4, _INT64: 8, _DECIMAL: 16}
_RAGGED_KINDS = {*_FIXED_WIDTH, _STRING, _BINARY}  # elements `_Walk._ragged` walks for some documents
_NOTHING = pa.array([b""], pa.binary())
# A map (`_Walk._map`) is walked element by element up to this many; a longer one, bsonjs renders.
MAP_ELEMENTS = 64
BASE64_ALPHABET = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", np.uint8)
_VALUE_HEAD = struct.Struct("<iBx")  # a document's length, then its one element's type and empty key
_OLD_BINARY = 2  # a binary subtype that nests its own length, which libbson reads its own way
# libbson writes a key's or a string's text as is unless it holds a control character, a quote or
# a backslash (`_escaped`). How it escapes them: a backslash first (the others write one), then
# the short escapes; any other control character as `\u00XX` (left to bsonjs, see `_Walk._string`).
_SHORT_ESCAPES = [(b"\\", b"\\\\"), (b'"', b'\\"')] + [
    (bytes([code]), b"\\" + bytes([letter])) for code, letter in zip(b"\b\t\n\f\r", b"btnfr", strict=True)
]
_RARE_CONTROL = np.zeros(256, bool)  # control characters with no short escape
_RARE_CONTROL[:0x20] = True
_RARE_CONTROL[list(b"\b\t\n\f\r")] = False
# Bytes a test over text (`rows_with`) flags at a time: a 2 MB string's flags and comparisons,
# whole, were five copies of its size, and a small bucket with one such document went past three
# times its BSON.
BLOCK_BYTES = 256 * 1024


@dataclass
class Whole:
    """Values at one field path, each rendered whole for the columnar path to take as its text:
    arrays of documents (`documents` and `nulls` count their elements) and documents whose keys
    part ways (maps, likely: `keys` lists each one's). While a group is walked, one of its
    pieces: its text in `_doc`, `null` in the columnar text (`_joined`)."""

    path: tuple[str, ...]
    is_array: bool
    text: pa.BinaryArray  # each value's canonical text, as in `_doc`
    documents: np.ndarray | None = None
    nulls: np.ndarray | None = None
    keys: MapKeys | None = None
    rows: np.ndarray | None = None  # the documents' rows in the chunk, once their group is walked

    def filter(self, mask: pa.BooleanArray) -> Whole:
        keep = mask.to_numpy(zero_copy_only=False)
        return Whole(
            self.path,
            self.is_array,
            self.text.filter(mask),
            None if self.documents is None else self.documents[keep],
            None if self.nulls is None else self.nulls[keep],
            None if self.keys is None else self.keys.filter(keep),
            self.rows,
        )


@dataclass
class MapKeys:
    """Each map's keys (`Whole.keys`): all of them in one array, map after map, and how many each has."""

    flat: pa.StringArray
    lengths: np.ndarray

    @staticmethod
    def of(keys: list[list[str]]) -> MapKeys:
        flat = pa.array(itertools.chain.from_iterable(keys), pa.string())
        return MapKeys(flat, np.fromiter(map(len, keys), np.int64, len(keys)))

    def filter(self, keep: np.ndarray) -> MapKeys:
        return MapKeys(self.flat.filter(pa.array(np.repeat(keep, self.lengths))), self.lengths[keep])


# What a `Found` says of its group's documents at its path.
VALUE, ELEMENT, ARRAY_OF, RECORD, EXACT = range(5)


@dataclass
class Found:
    """What the walk read for the columnar path, for every document of its group at once: a
    `VALUE` at a field path (its BSON type, and its text as `_doc` writes it inside the wrapper:
    digits, hex, epoch milliseconds; a string as it is, unescaped; a boolean array for booleans;
    none for null), an `ELEMENT` of the array at the path (at `index`), the array's length
    (`ARRAY_OF`, after its elements), a `RECORD` (a document of fields) beginning at the path,
    or that the documents hold what only the exact path takes (`EXACT`: an empty document, a
    document or an array in an array not held whole)."""

    what: int
    path: tuple[str, ...] = ()
    kind: int = 0  # the BSON type
    text: pa.Array | None = None
    index: int = 0
    uuid: np.ndarray | None = None  # binaries: which are UUIDs (subtype 4, 16 bytes)
    # Which of its group's documents it speaks of (their array reached `index`: see `_Walk._ragged`);
    # None: all of them. `text` and `uuid` hold a value for each of those only.
    rows: np.ndarray | None = None

    def part(self, keep: np.ndarray, mask: pa.BooleanArray) -> Found:
        if self.rows is not None:
            inner = keep[self.rows]  # of the documents it speaks of, those kept
            text = None if self.text is None else self.text.filter(pa.array(inner))
            uuid = None if self.uuid is None else self.uuid[inner]
            return Found(self.what, self.path, self.kind, text, self.index, uuid, self.rows[keep])
        if self.text is None:
            return self
        # Built, not `dataclasses.replace`d: a split parts every value found so far.
        uuid = None if self.uuid is None else self.uuid[keep]
        return Found(self.what, self.path, self.kind, self.text.filter(mask), self.index, uuid)


# The walk reads the values for the columnar path while it renders (`Rendered.found`) where it
# leaves at most this share of a chunk's documents to bsonjs; else Arrow's JSON reader parses the
# text (`Rendered.columnar`), bsonjs's documents too.
FOUND_UNWALKED_SHARE = 0.1


@dataclass
class Rendered:
    """A chunk's `_doc`, and what the walk found in it for the columnar path."""

    docs: pa.StringArray
    # `docs` with each `Whole` value written `null`: what the columnar path parses (its
    # values come from `wholes`); `docs` itself where there are none.
    columnar: pa.StringArray | None
    wholes: list[Whole] = field(default_factory=list)
    # Documents that hold, at a path of documents, what neither the walk nor `wholes` can give the
    # columnar path (an array of documents beside other values, a record of many shapes).
    exact: np.ndarray | None = None
    # What the walk read, group by group (the documents' rows, and their values), where it walked
    # nearly all of the chunk; `columnar` is then None. `unwalked`: the rows bsonjs rendered.
    found: list[tuple[np.ndarray, list[Found]]] | None = None
    unwalked: np.ndarray | None = None
    # Which documents' BSON holds a `$` byte (where the walk read the chunk joined): the only ones
    # that can hold a key named like a wrapper.
    dollars: np.ndarray | None = None


def canonical_json(raw_documents: list[bytes]) -> pa.StringArray:
    """What `bsonjs.dumps(raw, bsonjs.CANONICAL)` gives for each document, as one Arrow array."""
    return render(raw_documents).docs


def render(raw_documents: list[bytes], hold: bool = True) -> Rendered:
    """The chunk's `_doc` (see `canonical_json`), and its text and values for the columnar path
    (with `hold`; else `_doc` alone, for a chunk the exact path converts)."""
    count = len(raw_documents)
    sizes = np.fromiter(map(len, raw_documents), np.int64, count)
    if count < MIN_GROUP and sizes.sum() < MIN_GROUP_BYTES:
        docs = one_by_one(raw_documents)
        return Rendered(docs, docs)
    buf = np.frombuffer(b"".join(raw_documents), np.uint8)
    starts = np.zeros(count, np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    dollars = np.zeros(count, bool) if hold else None  # (a chunk for the exact path needs none)
    if dollars is not None:
        dollars[np.searchsorted(starts, positions_of(buf, ord("$")), "right") - 1] = True
    walk = _Walk(buf, BUDGET_SHARE * BSONJS_NS_PER_BYTE * len(buf), hold, sizes)
    try:
        done = walk.run(_Group(np.arange(count), starts + 4, ["{ "], [_Frame(False, path=())]))
    except (IndexError, ValueError):  # bytes that are not BSON: bsonjs says what is wrong with them
        docs = one_by_one(raw_documents)
        return Rendered(docs, docs)
    rest, exact_rows = walk.by_bsonjs, walk.exact
    del walk, buf  # the chunk's bytes, joined: not alive beside its text (but where `_gather` refers to them)
    unwalked = np.concatenate(rest) if rest else np.zeros(0, np.int64)
    found = [(group.rows, group.values) for group in done] if hold else None
    if found is not None and len(unwalked) > FOUND_UNWALKED_SHARE * count:
        found = None  # Arrow's JSON reader parses the chunk's text instead, bsonjs's documents too
    held = found is None and any(isinstance(p, Whole) for group in done for p in group.pieces)
    parts: list[tuple[np.ndarray, pa.Array]] = []
    columnar_parts: list[tuple[np.ndarray, pa.Array]] | None = [] if held else None
    wholes: list[Whole] = []
    for group in done:  # each group's pieces freed once joined
        parts.append((group.rows, _joined(group.pieces, len(group.rows))))
        if columnar_parts is not None:
            columnar_parts.append((group.rows, _joined(group.pieces, len(group.rows), held=False)))
        wholes += [replace(p, rows=group.rows) for p in group.pieces if isinstance(p, Whole)]
        group.pieces = group.values = []
    if rest:
        rows = np.concatenate(rest)
        text = one_by_one([raw_documents[i] for i in rows.tolist()]).view(pa.binary())
        parts.append((rows, text))
        if columnar_parts is not None:
            columnar_parts.append((rows, text))
        del text
    docs = _in_order(parts)
    exact = np.zeros(count, bool)
    for rows in exact_rows:
        exact[rows] = True
    if found is not None:
        return Rendered(docs, None, wholes, exact, found, unwalked, dollars)
    columnar = docs if columnar_parts is None else _in_order(columnar_parts)
    return Rendered(docs, columnar, wholes, exact, dollars=dollars)


def _in_order(parts: list[tuple[np.ndarray, pa.Array]]) -> pa.StringArray:
    """The parts' texts in the chunk's order. Takes the parts: the list is emptied, so that only
    the joined text and its reordered copy are alive at once."""
    if len(parts) == 1 and (np.diff(parts[0][0]) > 0).all():
        return parts.pop()[1].view(pa.string())  # one shape, or bsonjs's alone, in order
    order = np.concatenate([rows for rows, _ in parts])
    text = pa.concat_arrays([array for _, array in parts])
    parts.clear()
    return text.take(pa.array(np.argsort(order, kind="stable"))).view(pa.string())


def one_by_one(raw_documents: list[bytes]) -> pa.StringArray:
    """bsonjs, document by document. Each text is encoded into one growing buffer as it is
    rendered, so the texts exist once (not as strings, then joined, then encoded)."""
    out = io.BytesIO()
    # Chained maps, not a generator: no Python frame per document. The mode goes by position
    # (parsing a keyword costs more).
    texts = map(bsonjs.dumps, raw_documents, itertools.repeat(bsonjs.CANONICAL))
    lengths = np.fromiter(map(out.write, map(str.encode, texts)), np.int64, len(raw_documents))
    # A chunk is CHUNK_BYTES plus at most one 16 MB document: its text is far below int32 offsets' 2 GB.
    offsets = np.zeros(len(raw_documents) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:], dtype=np.int32)
    return pa.StringArray.from_buffers(
        len(raw_documents), pa.py_buffer(offsets), pa.py_buffer(out.getbuffer())
    )


@dataclass
class _Frame:
    is_array: bool
    members: int = 0
    # Where the value began, to render it by bsonjs instead (`_Walk._rewind`): each document's
    # offset of its length, and the group's piece its text begins at.
    start: np.ndarray | None = None
    pieces_at: int = 0
    values_at: int = 0  # the group's values found before the value began (`_Group.values`)
    path: tuple[str, ...] | None = None  # the field path of the value, if only documents lead to it
    # An array's elements so far: documents, nulls, and whether any other value.
    documents: int = 0
    nulls: int = 0
    others: bool = False
    keys: set[bytes] = field(default_factory=set)  # a document's keys so far (one twice: see `_walk`)
    # An array's length in each document, once they part ways (`_Walk._ragged`); else `members`.
    lengths: np.ndarray | None = None

    def part(self, keep: np.ndarray) -> _Frame:
        start = None if self.start is None else self.start[keep]
        lengths = None if self.lengths is None else self.lengths[keep]
        return _Frame(
            self.is_array, self.members, start, self.pieces_at, self.values_at, self.path,
            self.documents, self.nulls, self.others, set(self.keys), lengths,
        )  # fmt: skip


@dataclass
class _Group:
    """Documents walked together: each one's offset of its next element, the text so far."""

    rows: np.ndarray  # the documents' positions in the chunk
    pos: np.ndarray  # offset in the chunk's bytes of each document's next element
    pieces: list  # str, or an Arrow binary array with a value per document
    frames: list[_Frame] = field(default_factory=list)
    # What the walk read for the columnar path (`Found`), in the order it read it.
    values: list[Found] = field(default_factory=list)
    nested: bool = False  # walking one value inside documents (`_Walk._ragged_documents`)

    def part(self, keep: np.ndarray) -> _Group:
        mask = pa.array(keep)
        return _Group(
            self.rows[keep],
            self.pos[keep],
            [p if isinstance(p, str) else p.filter(mask) for p in self.pieces],
            [f.part(keep) for f in self.frames],
            [found.part(keep, mask) for found in self.values],
            self.nested,
        )


class _Walk:
    def __init__(self, buf: np.ndarray, budget_ns: float, hold: bool, sizes: np.ndarray) -> None:
        self.hold = hold
        self.buf = buf
        self.sizes = sizes  # each document's bytes
        self.budget_ns = budget_ns
        self.by_bsonjs: list[np.ndarray] = []
        self.exact: list[np.ndarray] = []  # rows only the exact path can take (`Rendered.exact`)
        self.groups = 1
        self._windows: dict[int, np.ndarray] = {}

    def run(self, first: _Group) -> list[_Group]:
        done: list[_Group] = []
        todo = [first]
        while todo:
            todo.sort(key=lambda g: len(g.rows))
            group = todo.pop()  # the largest: the budget goes where a step renders the most
            if self._few(group.rows) or self.budget_ns <= 0:
                self.by_bsonjs.append(group.rows)
                continue
            finished = self._walk(group, todo)
            if finished is not None:
                done.append(finished)
        return done

    def _few(self, rows: np.ndarray) -> bool:
        """Too few documents, and bytes, to repay a walk: bsonjs renders them."""
        return len(rows) < MIN_GROUP and self.sizes[rows].sum() < MIN_GROUP_BYTES

    def _split(self, group: _Group, same: np.ndarray, todo: list[_Group]) -> _Group | None:
        """Go on with the documents that agree with the first; the others are walked later."""
        self.groups += 1
        if self.groups > MAX_GROUPS:
            self.by_bsonjs.append(group.rows[~same])
        else:
            todo.append(group.part(~same))
        kept = group.part(same)
        if self._few(kept.rows):
            self.by_bsonjs.append(kept.rows)
            return None
        return kept

    def _walk(self, group: _Group, todo: list[_Group]) -> _Group | None:
        buf = self.buf
        # A group of a few large documents has its own budget, a share of what bsonjs would take for
        # them, spent at what a step of one document costs: a long string takes a step, an array
        # of a million numbers a million, so that one goes back to bsonjs soon.
        few = (
            FEW_BUDGET_SHARE * BSONJS_NS_PER_BYTE * self.sizes[group.rows].sum()
            if len(group.rows) < MIN_GROUP
            else None
        )
        while True:
            if few is not None:
                few -= FEW_STEP_NS
                spent = few <= 0
            else:
                self.budget_ns -= STEP_NS + STEP_NS_PER_DOCUMENT * len(group.rows)
                spent = self.budget_ns <= 0
            if spent:  # bsonjs renders the rest faster than more steps would
                self.by_bsonjs.append(group.rows)
                return None
            kind = buf[group.pos]
            same = kind == kind[0]
            if not same.all() or (kind[0] == _DOCUMENT and group.frames[-1].is_array):
                ragged = self._ragged(group, kind)
                if ragged is not None:
                    if not ragged:
                        return None
                    continue
            if not same.all() and self._diverse(group, same, kind):
                self._rewind(group)
                if not group.frames:  # the value walked was rendered by bsonjs whole
                    return group
                continue
            if not same.all():
                split = self._split(group, same, todo)
                if split is None:
                    return None
                group, kind = split, kind[same]
            frame = group.frames[-1]
            if kind[0] == 0:  # the end of a document or array
                if len(group.frames) == 1 and not frame.members and not group.nested:  # `{ }`: no `_id`
                    self.by_bsonjs.append(group.rows)
                    return None
                group.pieces.append(" ]" if frame.is_array else " }")
                group.pos = group.pos + 1
                group.frames.pop()
                if not group.frames:
                    return group
                if self.hold:
                    self._closed(group, frame)
                continue
            key_at = group.pos + 1
            if frame.is_array:
                key = str(frame.members).encode()
                key_text = ""
            else:
                key, key_text = self._key(int(key_at[0]))
            if key is None:
                if len(group.frames) > 1:
                    self._rewind(group)
                    continue
                self.by_bsonjs.append(group.rows)
                return None
            same = self._equal(key_at, key + b"\x00")
            if (
                not same.all()
                and not frame.is_array
                and self._diverse(group, same, self._window(key_at, len(key) + 1))
            ):
                self._rewind(group)
                if not group.frames:  # the value walked was rendered by bsonjs whole
                    return group
                continue
            if not same.all():
                # An array keyed other than `0`, `1`, ...: bsonjs reads it its own way.
                split = self._keep(group, same) if frame.is_array else self._split(group, same, todo)
                if split is None:
                    return None
                group, key_at = split, key_at[same]
                frame = group.frames[-1]
            if not frame.is_array:
                if key in frame.keys:  # a key twice: decoded, the exact path keeps the last only
                    self.exact.append(group.rows)
                frame.keys.add(key)
            separator = ", " if frame.members else ""
            frame.members += 1
            if frame.lengths is not None:  # arrays that parted ways earlier: each has this element
                frame.lengths = frame.lengths + 1
            prefix = separator if frame.is_array else f'{separator}"{key_text}" : '
            group.pos = key_at + len(key) + 1
            value_kind = int(kind[0])
            path = None
            slot: tuple[int, tuple[str, ...], int] | None = None  # where the value goes in `Found`
            if frame.is_array:
                if value_kind == _DOCUMENT:
                    frame.documents += 1
                elif value_kind == _NULL:
                    frame.nulls += 1
                else:
                    frame.others = True
                if frame.path is not None:
                    slot = (ELEMENT, frame.path, frame.members - 1)
            elif frame.path is not None:
                path = (*frame.path, key.decode())
                slot = (VALUE, path, 0)
            if not self._value(group, value_kind, prefix, path, slot if self.hold else None):
                return None

    def _closed(self, group: _Group, frame: _Frame) -> None:
        """A document or array just walked (not the top one), as the columnar path takes it."""
        if frame.is_array and frame.documents and frame.path is not None:
            self._hold_array(group, frame)
        elif frame.is_array and frame.path is not None and frame.lengths is not None:
            for length in np.unique(frame.lengths).tolist():  # arrays that ended apart (`_ragged`)
                group.values.append(Found(ARRAY_OF, frame.path, index=length, rows=frame.lengths == length))
        elif frame.is_array and frame.path is not None:
            group.values.append(Found(ARRAY_OF, frame.path, index=frame.members))
        elif not frame.is_array and not frame.members and frame.path is not None:
            group.values.append(Found(VALUE, frame.path, _DOCUMENT))  # `{}`: a value of its own

    def _hold_array(self, group: _Group, frame: _Frame) -> None:
        """An array of documents (and nulls) at a path of documents, just walked: its text becomes
        one `Whole` value. Beside other values, its documents are the exact path's."""
        if frame.others:
            self.exact.append(group.rows)
            return
        pieces = group.pieces
        text = _joined(pieces[frame.pieces_at :], len(group.rows))
        del pieces[frame.pieces_at :]
        del group.values[frame.values_at :]
        rows = len(group.rows)
        self.exact.append(group.rows[_unreadable(text)])
        # Arrays that ended apart hold documents but for the nulls all of them reached (`_ragged`).
        documents = np.full(rows, frame.documents) if frame.lengths is None else frame.lengths - frame.nulls
        pieces.append(Whole(frame.path, True, text, documents, np.full(rows, frame.nulls)))

    def _ragged(self, group: _Group, kind: np.ndarray) -> bool | None:
        """Arrays of scalars whose documents part ways at an element: ending at different lengths
        (tags, scores), or holding scalars of different types there (an int, a null). The element
        is walked for the documents of each type apart, while those whose array ended wait at its
        end, so the group stays whole (split, each part walked every field after the array again,
        and an array's patterns of nulls made groups by the hundred). Where fewer than `MIN_GROUP`
        documents go on, bsonjs renders those. True: the element is walked (or the few are gone);
        False: the group left; None: not such arrays (the walk splits the group as before)."""
        frame = group.frames[-1]
        if not frame.is_array or len(group.rows) < MIN_GROUP:
            return None
        going = kind != 0
        kinds = np.unique(kind[going]).tolist()
        documents = kinds == [_DOCUMENT] and not frame.others  # an array of documents (and nulls) so far
        if not documents and (frame.documents or not _RAGGED_KINDS.issuperset(kinds)):
            return None  # documents beside other values, or arrays in arrays
        if not kinds or (not frame.members and not going.all()):
            return None  # some arrays empty, others not
        count = int(np.count_nonzero(going))
        if count < MIN_GROUP:
            kept = self._keep(group, ~going)
            if kept is None:
                return False
            _go_on_with(group, kept)
            return True
        key = str(frame.members).encode() + b"\x00"
        if not self._equal(group.pos[going] + 1, key).all():
            return None  # an array keyed other than `0`, `1`, ...
        if documents:
            return self._ragged_documents(group, frame, going, key)
        left = len(self.by_bsonjs), len(self.exact)
        slot = (ELEMENT, frame.path, frame.members) if self.hold and frame.path is not None else None
        texts, order, found = [], [], []
        pos = group.pos.copy()
        for element_kind in kinds:
            rows = kind == element_kind
            at = np.flatnonzero(rows)
            element = _Group(group.rows[at], group.pos[at] + 1 + len(key), [])
            walked = self._value(element, element_kind, ", " if frame.members else "", None, slot)
            if not walked or len(element.rows) != len(at):
                return self._undone(left)  # some it cannot walk: split
            texts.append(_joined(element.pieces, len(at)))
            order.append(at)
            for value in element.values:
                value.rows = rows
                found.append(value)
            pos[at] = element.pos
        group.pieces.append(_in_rows(texts, order, len(group.rows)))  # where an array ended: no text
        group.values += found
        group.pos = pos
        _grown(frame, going)
        frame.others = True  # documents later in these arrays: the exact path's (`_hold_array`)
        return True

    def _ragged_documents(self, group: _Group, frame: _Frame, going: np.ndarray, key: bytes) -> bool:
        """`_ragged` for an array of documents (line items): the next document is walked whole, by
        a walk of its own, for the documents whose array has one; where they part ways inside it
        (a field some lack), each part is walked whole in turn. A document it leaves to bsonjs
        (a part of fewer than `MIN_GROUP`, a type it does not render) leaves the group for bsonjs."""
        at = np.flatnonzero(going)
        start = group.pos[at] + 1 + len(key)
        prefix = ", " if frame.members else ""
        element = _Frame(False, start=start, pieces_at=1)
        todo = [_Group(group.rows[at], start + 4, [prefix, "{ "], [element], nested=True)]
        left, walked = len(self.by_bsonjs), []
        while todo:
            part = todo.pop()
            if self._few(part.rows):
                self.by_bsonjs.append(part.rows)
                continue
            done = self._walk(part, todo)
            if done is not None:
                walked.append(done)
        if len(self.by_bsonjs) > left:  # those documents are bsonjs's: the group goes on without them
            kept = self._keep_only(group, ~np.isin(group.rows, np.concatenate(self.by_bsonjs[left:])))
            if kept is None:
                return False
            going, frame = going[kept], group.frames[-1]  # the group's own, parted
            if not going.any():
                return True  # each array left has ended: the walk closes them
        texts, order, pos = [], [], group.pos.copy()
        for done in walked:
            rows = np.searchsorted(group.rows, done.rows)  # a part's documents among the group's
            texts.append(_joined(done.pieces, len(rows)))
            order.append(rows)
            pos[rows] = done.pos
        group.pieces.append(_in_rows(texts, order, len(group.rows)))  # where an array ended: no text
        if self.hold:  # as `_value` marks a document in an array: the array is held whole, or exact
            group.values.append(Found(EXACT, rows=going))
        group.pos = pos
        _grown(frame, going)
        frame.documents += 1  # in each, as many as its length (`_hold_array`)
        return True

    def _keep_only(self, group: _Group, keep: np.ndarray) -> np.ndarray | None:
        """The group without documents already gone to bsonjs; None (and all of them bsonjs's)
        when too few are left to walk on. Returns which it kept."""
        if keep.all():
            return keep
        kept = group.part(keep)
        if self._few(kept.rows):
            self.by_bsonjs.append(kept.rows)
            return None
        _go_on_with(group, kept)
        return keep

    def _keep(self, group: _Group, keep: np.ndarray) -> _Group | None:
        """The group without the documents not kept, which are bsonjs's; None when too few are
        left to walk on (those too are bsonjs's)."""
        self.by_bsonjs.append(group.rows[~keep])
        kept = group.part(keep)
        if self._few(kept.rows):
            self.by_bsonjs.append(kept.rows)
            return None
        return kept

    def _diverse(self, group: _Group, same: np.ndarray, values: np.ndarray) -> bool:
        """Whether the documents part many ways inside a value (a map's keys, arrays of documents
        of many shapes), not a few: neither the first document nor the first that differs is
        shared by `MIN_GROUP` documents. Such a value is rendered by bsonjs (`_rewind`), document
        by document, and the group goes on whole; at the top level, groups split."""
        if len(group.frames) + group.nested < 2 or np.count_nonzero(same) >= MIN_GROUP:
            return False
        other = int(np.argmin(same))
        agree = (values == values[other]).reshape(len(values), -1).all(axis=1)
        return np.count_nonzero(agree) < MIN_GROUP

    def _rewind(self, group: _Group) -> None:
        """Render the innermost value being walked by bsonjs, one document at a time, in place of
        its pieces so far, and go on after it. At a path of documents, it is a `Whole` value."""
        frame = group.frames.pop()
        del group.pieces[frame.pieces_at :]
        del group.values[frame.values_at :]
        size = self._fixed(frame.start, 4).view("<i4").ravel().astype(np.int64)
        kind = _ARRAY if frame.is_array else _DOCUMENT
        values: list | None = [] if frame.path is not None and self.hold else None
        mapped = None
        if not frame.is_array and len(group.rows) >= MIN_GROUP:
            mapped = self._map(group.rows, frame.start, size, values is not None)
        text = mapped[0] if mapped is not None else self._by_bsonjs(kind, frame.start, size, values)
        group.pos = frame.start + size
        if values is None:
            group.pieces.append(text)
            return
        self.exact.append(group.rows[_unreadable(text)])
        if not frame.is_array:  # a map, likely: the columnar path tells by its keys
            if mapped is not None:
                keys, exact = mapped[1], mapped[2]
            else:
                decoded = [list(v) if type(v) is dict else None for v in values]
                keys = MapKeys.of([k or [] for k in decoded])
                exact = np.array([k is None for k in decoded], bool)
            self.exact.append(group.rows[exact])
            group.pieces.append(Whole(frame.path, False, text, keys=keys))
            return
        values = [v if type(v) is list else [0] for v in values]
        documents = np.array([sum(type(e) is dict for e in v) for v in values], np.int64)
        nulls = np.array([sum(e is None for e in v) for v in values], np.int64)
        lengths = np.array([len(v) for v in values], np.int64)
        whole = (documents > 0) & (documents + nulls == lengths)
        if not whole.any():
            self.exact.append(group.rows)  # arrays of mixed values: as before, the exact path's
            group.pieces.append(text)
            return
        self.exact.append(group.rows[~whole])
        group.pieces.append(Whole(frame.path, True, text, documents, nulls))

    def _by_bsonjs(
        self, kind: int, starts: np.ndarray, sizes: np.ndarray, values: list | None = None
    ) -> pa.BinaryArray:
        """Values of one BSON type, each rendered by bsonjs alone: in `{"": value}`, whose text is
        `{ "" : <value> }`. With `values`, each is decoded into it too."""
        count = len(sizes)
        heads = np.empty((count, 6), np.uint8)  # each `{"": value}`'s length, type and empty key
        heads[:, :4] = (sizes + 7).astype("<i4").view(np.uint8).reshape(count, 4)
        heads[:, 4], heads[:, 5] = kind, 0
        alone = pc.binary_join_element_wise(
            _fixed_text(heads), _gather(self.buf, starts, sizes), pa.scalar(b"\x00", pa.binary()), b""
        )
        raws = alone.to_pylist()
        if values is not None:
            values += _all_decoded(alone, raws)
        texts = pa.array(map(bsonjs.dumps, raws, itertools.repeat(bsonjs.CANONICAL)), pa.string())
        return pc.binary_slice(texts.view(pa.binary()), 7, -2)  # `{ "" : <value> }`

    def _map(
        self, rows: np.ndarray, starts: np.ndarray, sizes: np.ndarray, keyed: bool
    ) -> tuple[pa.BinaryArray, MapKeys | None, np.ndarray] | None:
        """Documents whose keys part many ways (a map: scores keyed by id), rendered element by
        element for all of them at once: the first element of each, then the second of those that
        have one, and so on; each element's key by Arrow, its value by the walk's own renderers
        (a document or an array in it by bsonjs). bsonjs took a few microseconds per map, most of
        it writing doubles. Returns each one's text, with `keyed` its keys, and which ones only
        the exact path takes (a key twice: decoded, the last one wins; a value that does not
        decode back). None where a key is escaped or not UTF-8, a value of a type the walk leaves
        to bsonjs, a map longer than `MAP_ELEMENTS`, or the budget is spent: bsonjs renders them."""
        count = len(starts)
        pos, ends = starts + 4, starts + sizes - 1
        left = len(self.by_bsonjs), len(self.exact)
        # Where each key ends: the maps' bytes, one after another, and their zero bytes (the
        # chunk's own would be a quarter of its bytes, in 8-byte positions).
        together = _gather(self.buf, starts, sizes)
        zeros = positions_of(np.frombuffer(together.buffers()[2], np.uint8), 0)
        shift = np.cumsum(sizes) - sizes - starts  # a map's offset among them, less its own in the chunk
        del together
        exact = np.zeros(count, bool)
        element_rows: list[np.ndarray] = []
        element_texts: list[pa.BinaryArray] = []
        element_keys: list[pa.BinaryArray] = []
        active = np.flatnonzero(pos < ends)
        while len(active):
            self.budget_ns -= STEP_NS + STEP_NS_PER_DOCUMENT * len(active)
            if len(element_rows) == MAP_ELEMENTS or self.budget_ns <= 0:
                return self._undone(left)
            at = pos[active]
            kind = self.buf[at]
            key_end = zeros[np.searchsorted(zeros, at + 1 + shift[active])] - shift[active]
            key = _gather(self.buf, at + 1, key_end - at - 1)
            if _escaped(np.frombuffer(key.buffers()[2] or b"", np.uint8)).any():
                return self._undone(left)  # a key libbson escapes: `_key` does that one by one
            try:
                key.view(pa.string()).validate(full=True)
            except pa.ArrowInvalid:
                return self._undone(left)  # a key that is not UTF-8
            value_at = key_end + 1
            texts, order, after = [], [], np.empty(len(active), np.int64)
            for value_kind in np.unique(kind).tolist():
                these = np.flatnonzero(kind == value_kind)
                if value_kind in (_DOCUMENT, _ARRAY):
                    size = self._fixed(value_at[these], 4).view("<i4").ravel().astype(np.int64)
                    decoded: list | None = [] if keyed else None
                    texts.append(self._by_bsonjs(value_kind, value_at[these], size, decoded))
                    if decoded is not None:
                        exact[active[these[np.array([v is None for v in decoded], bool)]]] = True
                    after[these] = value_at[these] + size
                    order.append(these)
                    continue
                value = _Group(rows[active[these]], value_at[these], [])
                if not _RAGGED_KINDS.issuperset([value_kind]) or not self._value(value, value_kind, ""):
                    return self._undone(left)
                if len(value.rows) != len(these):  # some it left to bsonjs (a string not UTF-8)
                    return self._undone(left)
                texts.append(_joined(value.pieces, len(these)))
                after[these] = value.pos
                order.append(these)
            value_text = _in_rows(texts, order, len(active))
            element_texts.append(pc.binary_join_element_wise(b'"', key, b'" : ', value_text, b""))
            element_keys.append(key)
            element_rows.append(active)
            pos[active] = after
            active = active[pos[active] < ends[active]]
        counts = np.zeros(count, np.int64)
        offsets = np.zeros(count + 1, np.int32)
        if element_rows:
            every = np.concatenate(element_rows)
            counts = np.bincount(every, minlength=count)
            np.cumsum(counts, out=offsets[1:])
            # Elements in each map's order: by map, then by step (a stable sort keeps the steps' order).
            by_map = pa.array(np.argsort(every, kind="stable"))
            elements = pa.concat_arrays(element_texts).take(by_map)
            joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), elements), b", ")
        else:
            joined = pa.array(np.full(count, b""), pa.binary())
        text = pc.binary_join_element_wise(b"{ ", joined, b" }", b"")  # an empty one too: `{  }`
        if not keyed:
            return text, None, exact
        if not element_rows:
            return text, MapKeys(pa.array([], pa.string()), counts), exact
        flat = pa.concat_arrays(element_keys).take(by_map).view(pa.string())
        # A key twice in a map: each (map, key) pair as one number, sorted; equal neighbours.
        encoded = flat.dictionary_encode()
        pairs = np.repeat(np.arange(count), counts) * len(encoded.dictionary)
        pairs += encoded.indices.to_numpy().astype(np.int64)
        pairs.sort()
        exact[pairs[1:][pairs[1:] == pairs[:-1]] // len(encoded.dictionary)] = True
        return text, MapKeys(flat, counts), exact

    def _undone(self, left: tuple[int, int]) -> None:
        """Forget the documents a walk of values sent to bsonjs or to the exact path since `left`
        (their counts then): bsonjs renders the values whole instead."""
        del self.by_bsonjs[left[0] :], self.exact[left[1] :]

    def _key(self, at: int) -> tuple[bytes | None, str]:
        """The key at `at` and its text as libbson writes it (escaped: as bsonjs does); None for
        a key that is not UTF-8."""
        end = at
        while self.buf[end]:
            end += 1
        key = self.buf[at:end]
        try:
            text = key.tobytes().decode()
        except UnicodeDecodeError:
            return None, ""
        if _escaped(key).any():  # `{key: null}` by bsonjs: `{ "<key>" : null }`
            null = _VALUE_HEAD.pack(len(key) + 7, _NULL)[:-1] + key.tobytes() + b"\x00\x00"
            text = bsonjs.dumps(null, bsonjs.CANONICAL)[3 : -len('" : null }')]
        return key.tobytes(), text

    def _equal(self, at: np.ndarray, expected: bytes) -> np.ndarray:
        """Whether the bytes at each offset are `expected`: not where they would run past the
        chunk's end (a shorter key ending the last document, compared with a longer one)."""
        width = len(expected)
        inside = at + width <= len(self.buf)
        if inside.all():
            return (self._fixed(at, width) == np.frombuffer(expected, np.uint8)).all(axis=1)
        equal = np.zeros(len(at), bool)
        equal[inside] = (self._fixed(at[inside], width) == np.frombuffer(expected, np.uint8)).all(axis=1)
        return equal

    def _window(self, at: np.ndarray, width: int) -> np.ndarray:
        """`_fixed`, but where the bytes would run past the chunk's end, the last `width` bytes
        instead: for comparing keys only (`_diverse`), where those rows are known to differ."""
        return self._fixed(np.minimum(at, len(self.buf) - width), width)

    def _fixed(self, at: np.ndarray, width: int) -> np.ndarray:
        """The `width` bytes at each offset, a row each (one index per row, not per byte)."""
        windows = self._windows.get(width)
        if windows is None:
            windows = self._windows[width] = np.lib.stride_tricks.sliding_window_view(self.buf, width)
        return windows[at]

    def _value(
        self,
        group: _Group,
        kind: int,
        prefix: str,
        path: tuple[str, ...] | None = None,
        slot: tuple[int, tuple[str, ...], int] | None = None,
    ) -> bool:
        """Append the value's text to the group's pieces and step past it; False if the group left.
        `path`: the value's field path, if only documents lead to it; `slot`: where it goes in the
        group's `Found` values (None: nowhere, or the walk reads none)."""
        at = group.pos
        pieces = group.pieces
        if kind in (_DOCUMENT, _ARRAY):
            pieces.append(prefix)
            values_at = len(group.values)
            if self.hold:
                if slot is None or slot[0] == ELEMENT:  # in an array: held whole with it, or exact
                    group.values.append(Found(EXACT))
                    values_at += 1
                elif kind == _DOCUMENT:  # before `values_at`: a record rewound into a map is no record
                    group.values.append(Found(RECORD, path))
            frame = _Frame(kind == _ARRAY, start=at, pieces_at=len(pieces), values_at=values_at, path=path)
            group.frames.append(frame)
            pieces.append("[ " if kind == _ARRAY else "{ ")
            group.pos = at + 4
            return True
        if kind == _STRING:
            return self._string(group, prefix, slot)
        if kind == _BINARY:
            return self._binary(group, prefix, slot)
        width = _FIXED_WIDTH.get(kind)
        if width is None:  # regex, code, timestamp, min/max key, ...: bsonjs's
            self.by_bsonjs.append(group.rows)
            return False
        raw = self._fixed(at, width)
        group.pos = at + width
        text = None
        if kind == _NULL:
            pieces.append(prefix + "null")
        elif kind == _BOOL:
            flags = raw[:, 0]
            if (flags > 1).any():
                self.by_bsonjs.append(group.rows)
                return False
            text = pa.array(flags == 1)
            pieces += [prefix, pc.if_else(text, b"true", b"false")]
        elif kind == _OBJECTID:
            hexed = np.empty((len(raw), 24), np.uint8)
            hexed[:, 0::2] = hex_digits(raw >> 4)
            hexed[:, 1::2] = hex_digits(raw & 15)
            text = _fixed_text(hexed)
            pieces += [prefix + '{ "$oid" : "', text, '" }']
        elif kind == _INT32:
            text = _decimal_text(raw.view("<i4").ravel())
            pieces += [prefix + '{ "$numberInt" : "', text, '" }']
        elif kind == _INT64:
            text = _decimal_text(raw.view("<i8").ravel())
            pieces += [prefix + '{ "$numberLong" : "', text, '" }']
        elif kind == _DATE:
            text = _decimal_text(raw.view("<i8").ravel())
            pieces += [prefix + '{ "$date" : { "$numberLong" : "', text, '" } }']
        elif kind == _DOUBLE:
            text = double_texts(raw.view("<f8").ravel())
            pieces += [prefix + '{ "$numberDouble" : "', text, '" }']
        else:  # _DECIMAL
            text = decimal_texts(raw)
            pieces += [prefix + '{ "$numberDecimal" : "', text, '" }']
        _found(group, slot, kind, text)
        return True

    def _string(self, group: _Group, prefix: str, slot: tuple | None = None) -> bool:
        at = group.pos
        size = self._fixed(at, 4).view("<i4").ravel().astype(np.int64)  # with the terminating zero
        if (size < 1).any() or self.buf[at + 3 + size].any():
            self.by_bsonjs.append(group.rows)
            return False
        text = _gather(self.buf, at + 4, size - 1)
        data = np.frombuffer(text.buffers()[2] or b"", np.uint8)
        offsets = np.frombuffer(text.buffers()[1], np.int32, len(text) + 1)
        # libbson writes a string as is unless it holds a byte it escapes; one that is not UTF-8
        # (checked where not ASCII) it writes its own way, in its document.
        escaped = rows_with(data, offsets, _escaped)
        utf8 = _utf8(text, data, offsets)
        group.pos = at + 4 + size
        if not utf8.all():
            kept = self._keep(group, utf8)
            if kept is None:
                return False
            _go_on_with(group, kept)
            text, escaped, at, size = text.filter(pa.array(utf8)), escaped[utf8], at[utf8], size[utf8]
        _found(group, slot, _STRING, text)
        if not escaped.any():
            group.pieces += [prefix + '"', text, '"']
            return True
        # Strings with a quote, a backslash or a control character (a newline in an address):
        # escaped as libbson escapes them, by Arrow's kernels; those with a control character
        # that has no short escape (`\u0001`) by bsonjs, value by value, quotes included.
        rare = rows_with(data, offsets, _RARE_CONTROL.__getitem__)
        plain = np.flatnonzero(~rare)
        odd = np.flatnonzero(rare)
        common = text.take(pa.array(plain))
        for raw, written in _SHORT_ESCAPES:
            common = pc.replace_substring(common, raw, written)
        quote = pa.scalar(b'"', pa.binary())
        quoted = pc.binary_join_element_wise(quote, common, quote, b"")
        if not len(odd):
            group.pieces += [prefix, quoted]
            return True
        texts = pa.concat_arrays([quoted, self._by_bsonjs(_STRING, at[odd], 4 + size[odd])])
        group.pieces += [prefix, texts.take(pa.array(np.argsort(np.concatenate([plain, odd]))))]
        return True

    def _binary(self, group: _Group, prefix: str, slot: tuple | None = None) -> bool:
        """`{ "$binary" : { "base64" : ..., "subType" : "04" } }`: UUIDs and other binaries."""
        at = group.pos
        size = self._fixed(at, 4).view("<i4").ravel().astype(np.int64)
        if (size < 0).any():
            self.by_bsonjs.append(group.rows)
            return False
        group.pos = at + 5 + size
        subtype = self.buf[at + 4]
        plain = subtype != _OLD_BINARY
        if not plain.all():
            kept = self._keep(group, plain)
            if kept is None:
                return False
            _go_on_with(group, kept)
            at, size, subtype = at[plain], size[plain], subtype[plain]
        hexed = np.empty((len(subtype), 2), np.uint8)
        hexed[:, 0] = hex_digits(subtype >> 4)
        hexed[:, 1] = hex_digits(subtype & 15)
        encoded, hex_subtype = self._base64(at + 5, size), _fixed_text(hexed)
        group.pieces += [
            prefix + '{ "$binary" : { "base64" : "',
            encoded,
            '", "subType" : "',
            hex_subtype,
            '" } }',
        ]
        if slot is not None:  # the subtype in hex, then base64, as `bson_columns` reads a binary
            text = pc.binary_join_element_wise(hex_subtype, encoded, b"")
            _found(group, slot, _BINARY, text, (subtype == 4) & (size == 16))
        return True

    def _base64(self, starts: np.ndarray, sizes: np.ndarray) -> pa.BinaryArray:
        """Each byte range in standard base64 with padding, as libbson writes it."""
        width = int(sizes[0])
        if not (sizes == width).all():  # binaries of several lengths: one at a time
            view = memoryview(self.buf)
            spans = zip(starts.tolist(), sizes.tolist(), strict=True)
            encoded = [base64.b64encode(view[start : start + size]) for start, size in spans]
            return pa.array(encoded, pa.binary())
        # One length (UUIDs, hashes): three bytes give four characters, for every row at once.
        triples = -(-width // 3)
        padded = np.zeros((len(starts), triples * 3), np.uint8)
        if width:
            padded[:, :width] = self._fixed(starts, width)
        bits = padded.reshape(len(starts), triples, 3).astype(np.uint32)
        word = (bits[:, :, 0] << 16) | (bits[:, :, 1] << 8) | bits[:, :, 2]
        chars = np.empty((len(starts), triples, 4), np.uint8)
        for i, shift in enumerate((18, 12, 6, 0)):
            chars[:, :, i] = base64_digits((word >> shift) & 63)
        chars = chars.reshape(len(starts), triples * 4)
        missing = triples * 3 - width  # the last triple's missing bytes are written as `=`
        if missing:
            chars[:, -missing:] = ord("=")
        return _fixed_text(chars)


def _found(
    group: _Group, slot: tuple | None, kind: int, text: pa.Array | None, uuid: np.ndarray | None = None
) -> None:
    if slot is not None:
        what, path, index = slot
        group.values.append(Found(what, path, kind, text, index, uuid))


def _in_rows(texts: list[pa.BinaryArray], rows: list[np.ndarray], count: int) -> pa.BinaryArray:
    """Texts walked for parts of `count` documents apart (each element type, each shape), put
    back in the documents' order: each part's text at its `rows`; empty where no part has one."""
    index = np.full(count, sum(map(len, texts)))
    start = 0
    for text, at in zip(texts, rows, strict=True):
        index[at] = np.arange(start, start + len(text))
        start += len(text)
    return pa.concat_arrays([*texts, _NOTHING]).take(pa.array(index))


def _grown(frame: _Frame, going: np.ndarray) -> None:
    """An element walked for the documents `going` only: each one's array length, apart."""
    if frame.lengths is None:
        frame.lengths = np.full(len(going), frame.members)
    frame.lengths[going] += 1
    frame.members += 1


def _go_on_with(group: _Group, kept: _Group) -> None:
    """Go on walking `kept`, part of `group`, in its place."""
    group.rows, group.pos, group.pieces, group.frames, group.values = (
        kept.rows, kept.pos, kept.pieces, kept.frames, kept.values
    )  # fmt: skip


def _gather(buf: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> pa.BinaryArray:
    """The byte ranges [start, start + size) of `buf`, as one binary array of their own.

    The ranges follow one another in `buf` (a group's documents are in the chunk's order; others
    are put in order first): read as every other value of one array over `buf` (the gaps between
    them the others), Arrow's `take` copies them out, a byte for a byte. One range that is most of
    `buf` is not copied."""
    count = len(sizes)
    ends = starts + sizes
    if count and (starts[1:] < ends[:-1]).any():  # not in order: gathered in order, then put back
        order = np.lexsort((ends, starts))  # by start, an empty range before one that begins there
        if (starts[order][1:] < ends[order][:-1]).any():
            raise ValueError("overlapping byte ranges: not BSON")  # `render` hands the chunk to bsonjs
        return _gather(buf, starts[order], sizes[order]).take(pa.array(np.argsort(order)))
    if not count:
        return pa.array([], pa.binary())
    first = int(starts[0])
    bounds = np.empty(2 * count, np.int32)
    bounds[0::2] = starts - first
    bounds[1::2] = ends - first
    spans = pa.BinaryArray.from_buffers(
        pa.binary(), 2 * count - 1, [None, pa.py_buffer(bounds), pa.py_buffer(buf[first : int(ends[-1])])]
    )
    if count == 1 and 2 * int(sizes[0]) >= len(buf):
        # Most of the buffer: referred to, not copied. A long string is most often in a document
        # that is a chunk of its own, whose bytes the buffer is (`render` joins one document into
        # itself): keeping them alive costs nothing. Where the buffer joins several documents, it
        # costs at most twice the copy, until the chunk is written.
        return spans
    return spans.take(pa.array(np.arange(0, 2 * count, 2, dtype=np.int32)))


def _utf8(text: pa.BinaryArray, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Which of the strings are UTF-8: Arrow checks them all at once; where one is not, each
    string that is not ASCII is tried on its own."""
    utf8 = np.ones(len(text), bool)
    try:
        text.view(pa.string()).validate(full=True)
        return utf8
    except pa.ArrowInvalid:
        pass
    for row in np.flatnonzero(rows_with(data, offsets, _non_ascii)).tolist():
        try:
            data[offsets[row] : offsets[row + 1]].tobytes().decode()
        except UnicodeDecodeError:
            utf8[row] = False
    return utf8


def _escaped(data: np.ndarray) -> np.ndarray:
    """Which bytes libbson escapes in a key or a string: control characters, `"` and `\\`. By
    comparisons: a table lookup per byte costs six times more."""
    return (data < 0x20) | (data == ord('"')) | (data == ord("\\"))


def hex_digits(nibbles: np.ndarray) -> np.ndarray:
    """Each value from 0 to 15 as its lowercase hex digit, by arithmetic (a table lookup per
    value costs six times more)."""
    digits = nibbles.astype(np.uint8) + np.uint8(ord("0"))
    digits += (digits > ord("9")) * np.uint8(ord("a") - ord("9") - 1)
    return digits


def base64_digits(values: np.ndarray) -> np.ndarray:
    """Each value from 0 to 63 as its base64 digit (`BASE64_ALPHABET`), by arithmetic."""
    v = values.astype(np.int16)
    digits = v + ord("A") + (v > 25) * 6 - (v > 51) * 75 - (v == 62) * 15 - (v == 63) * 12
    return digits.astype(np.uint8)


def _non_ascii(data: np.ndarray) -> np.ndarray:
    return data >= 0x80


def rows_with(data: np.ndarray, offsets: np.ndarray, test: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """For each row's span of `data` (by `offsets`), whether `test` flags any of its bytes. A block
    of `BLOCK_BYTES` at a time: the flags (and `test`'s own temporaries) of a long string are not
    several copies of its size."""
    start, end = int(offsets[0]), int(offsets[-1])
    if end - start <= BLOCK_BYTES:
        return _any_per_row(test(data[:end]), offsets)
    found = np.zeros(len(offsets) - 1, bool)
    for low in range(start, end, BLOCK_BYTES):
        high = min(low + BLOCK_BYTES, end)
        # The rows holding the block's first and last bytes, and those between, cut to the block.
        first = int(np.searchsorted(offsets, low, "right")) - 1
        last = int(np.searchsorted(offsets, high - 1, "right")) - 1
        spans = np.clip(offsets[first : last + 2].astype(np.int64) - low, 0, high - low)
        found[first : last + 1] |= _any_per_row(test(data[low:high]), spans)
    return found


def positions_of(data: np.ndarray, byte: int) -> np.ndarray:
    """Where `byte` is in `data`, found a block at a time (see `rows_with`)."""
    return np.concatenate(
        [
            np.flatnonzero(data[low : low + BLOCK_BYTES] == byte) + low
            for low in range(0, len(data), BLOCK_BYTES)
        ]
        or [np.zeros(0, np.intp)]
    )


def _any_per_row(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """For each row's span of `flags` (by `offsets`), whether any is set; an empty span: False."""
    found = np.zeros(len(offsets) - 1, bool)
    if not flags.any():
        return found
    filled = offsets[1:] > offsets[:-1]
    if filled.any():
        # Each filled span runs to the next filled one's start: the empty ones between add nothing.
        found[filled] = np.logical_or.reduceat(flags[: int(offsets[-1])], offsets[:-1][filled])
    return found


def _fixed_text(chars: np.ndarray) -> pa.BinaryArray:
    rows, width = chars.shape
    offsets = np.arange(rows + 1, dtype=np.int32) * width
    return pa.BinaryArray.from_buffers(pa.binary(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def _decimal_text(numbers: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(numbers), pa.string()).view(pa.binary())


def double_texts(values: np.ndarray) -> pa.BinaryArray:
    """`double_text` of each, formatted by one C method per value (not a Python function): only
    whole numbers (which need `.0`) and NaN and the infinities are then mended."""
    texts = list(map(_TWENTY_DIGITS, values.tolist()))
    finite = np.isfinite(values)
    for row in np.flatnonzero(~finite).tolist():
        texts[row] = double_text(float(values[row]))
    text = pa.array(texts, pa.binary())
    # `%.20g` writes a finite value without a point or an exponent only where it is a whole number
    # under 1e20 (a fraction has at most 16 digits before the point, a tiny one an exponent).
    with np.errstate(invalid="ignore"):  # NaN, mended above
        whole = finite & (np.floor(values) == values) & (np.abs(values) < 1e20)
    if whole.any():
        text = pc.if_else(pa.array(whole), pc.binary_join_element_wise(text, b".0", b""), text)
    return text


_TWENTY_DIGITS = "{:.20g}".format


def double_text(value: float) -> str:
    """A double as libbson writes it: `%.20g`, with `.0` where that reads as an integer."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    text = f"{value:.20g}"
    return text if "." in text or "e" in text else text + ".0"


_COEFFICIENT_HIGH = (1 << 49) - 1
_EXPONENT_BIAS = 6176


def decimal_texts(raw: np.ndarray) -> pa.Array:
    """Decimal128 values (16 bytes each, little-endian BID) as libbson writes them.

    Most values are a coefficient under 2**64 at an exponent from 0 down to a few places, written
    as plain digits with a point: done with Arrow's kernels. Any other (a huge coefficient, an
    exponent notation, NaN, infinities, a non-canonical coefficient) is written by libbson itself.
    """
    low = raw[:, :8].copy().view("<u8").ravel()
    high = raw[:, 8:].copy().view("<u8").ravel()
    exponent = ((high >> np.uint64(49)) & np.uint64(0x3FFF)).astype(np.int64) - _EXPONENT_BIAS
    negative = (high >> np.uint64(63)).astype(bool)
    digits = pc.cast(pa.array(low), pa.string())
    length = pc.utf8_length(digits).to_numpy()
    adjusted = exponent + length - 1
    common = (
        ((high >> np.uint64(61)) & np.uint64(3) != 3)
        & ((high & np.uint64(_COEFFICIENT_HIGH)) == 0)
        & (exponent <= 0)
        & (adjusted >= -6)
    )
    texts: list[pa.Array] = []
    order: list[np.ndarray] = []
    for places in np.unique(exponent[common]).tolist():
        rows = np.flatnonzero(common & (exponent == places))
        part = digits.take(pa.array(rows))
        if places < 0:
            shift = -places
            padded = pc.utf8_lpad(part, width=shift + 1, padding="0")
            part = pc.binary_join_element_wise(
                pc.utf8_slice_codeunits(padded, 0, -shift), pc.utf8_slice_codeunits(padded, -shift), "."
            )
        sign = pc.if_else(pa.array(negative[rows]), "-", "")
        texts.append(pc.binary_join_element_wise(sign, part, "").cast(pa.string()))
        order.append(rows)
    rare = np.flatnonzero(~common)
    if len(rare):
        texts.append(pa.array([_rare_decimal(raw[row].tobytes()) for row in rare.tolist()], pa.string()))
        order.append(rare)
    text = pa.concat_arrays(texts) if len(texts) > 1 else texts[0]
    if len(order) > 1:
        text = text.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))
    return text.view(pa.binary())


_DECIMAL_DOCUMENT = (b"\x17\x00\x00\x00\x13\x00", b"\x00")  # `{"": <decimal>}` around the value's bytes
_DECIMAL_TEXT = slice(len('{ "" : { "$numberDecimal" : "'), -len('" } }'))


def _rare_decimal(bid: bytes) -> str:
    """libbson's own text of the value (its non-canonical coefficients are its own too)."""
    head, tail = _DECIMAL_DOCUMENT
    return bsonjs.dumps(head + bid + tail, bsonjs.CANONICAL)[_DECIMAL_TEXT]


# Only keys and types are read from a decoded value: no datetime objects, and what decoding refuses
# makes its document the exact path's (which says what is wrong with it).
_DECODE_OPTIONS = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_MS)


# A decimal written with more than 34 significant digits (leading zeros aside): only a
# non-canonical coefficient is; canonical ones have at most 34.
_DECIMAL_PAST_34_DIGITS = r'"\$numberDecimal" : "-?0*\.?0*[1-9](?:\.?[0-9]){34}'


def value_bson(text: str) -> bytes:
    """`{"": value}` as BSON, read back by libbson from the value's canonical text."""
    return bsonjs.loads('{"": ' + text + "}")


def value_text(document: str) -> str:
    """The value's text in libbson's text of a one-element document, `{ "<key>" : <value> }`."""
    return document[document.index(":") + 1 : document.rindex("}")].strip()


def _unreadable(text: pa.BinaryArray) -> np.ndarray:
    """Which held values libbson cannot read back from their text, as the columnar path does
    where it needs the value (a date to write in relaxed form, a column of another type): a
    Decimal128 whose coefficient is past 34 digits, which libbson writes but refuses to read.
    Only values whose text shows such a decimal are tried."""
    unreadable = np.zeros(len(text), bool)
    past_34_digits = pc.fill_null(pc.match_substring_regex(text, _DECIMAL_PAST_34_DIGITS), False)
    rows = np.flatnonzero(past_34_digits.to_numpy(zero_copy_only=False))
    for row, value in zip(rows.tolist(), text.take(pa.array(rows)).to_pylist(), strict=True):
        try:
            value_bson(value.decode())
        except Exception:  # libbson's ValueError, or bytes that are not UTF-8
            unreadable[row] = True
    return unreadable


def _all_decoded(alone: pa.BinaryArray, raws: list[bytes]) -> list:
    """`_decoded` of each, the decoding done in one call where every value decodes."""
    try:
        offsets = np.frombuffer(alone.buffers()[1], np.int32, len(alone) + 1, alone.offset * 4)
        data = alone.buffers()[2][int(offsets[0]) : int(offsets[-1])]
        documents = bson.decode_all(data.to_pybytes(), _DECODE_OPTIONS)
    except Exception:  # one that does not decode: each on its own
        return list(map(_decoded, raws))
    if _encoded_alike(documents, raws):
        return [document[""] for document in documents]
    return [
        document[""] if bson.encode(document, codec_options=_DECODE_OPTIONS) == raw else None
        for document, raw in zip(documents, raws, strict=True)
    ]


_ELEMENT_HEADS = [b"\x03%d\x00" % i for i in range(4096)]  # a document's type and key in an array


def _encoded_alike(documents: list[dict], raws: list[bytes]) -> bool:
    """Whether each document encodes back to its raw bytes, checked in one encoding: as the
    elements of one array, `[d0, d1, ...]`, whose bytes are each element's type and key, then its
    document. Equal bytes part into the same documents (each begins with its own length), so
    every one is equal to its own."""
    count = len(documents)
    heads = _ELEMENT_HEADS if count <= len(_ELEMENT_HEADS) else [b"\x03%d\x00" % i for i in range(count)]
    encoded = bson.encode({"": documents}, codec_options=_DECODE_OPTIONS)
    # `{"": [...]}`: its length, the array's type and empty key, the array's length; two ends.
    return encoded[10:-2] == b"".join(itertools.chain.from_iterable(zip(heads[:count], raws, strict=True)))


def _decoded(raw: bytes) -> dict | list | None:
    """The value in `{"": value}`, or None where decoding does not give it back byte for byte (the
    exact path would see another value: a key twice, a DBRef, a symbol, undefined, ...)."""
    try:
        value = bson.decode(raw, _DECODE_OPTIONS)[""]
        return value if bson.encode({"": value}, codec_options=_DECODE_OPTIONS) == raw else None
    except Exception:  # bson.errors.InvalidBSON and what it wraps
        return None


def _joined(pieces: list, rows: int, held: bool = True) -> pa.BinaryArray:
    """The group's text, `rows` long: its pieces joined row by row (runs of literal pieces first
    joined once). `held=False`: the columnar text, `Whole` values written `null`."""
    merged: list = []
    for piece in pieces:
        if isinstance(piece, Whole):
            piece = piece.text if held else "null"
        if isinstance(piece, str) and merged and isinstance(merged[-1], str):
            merged[-1] += piece
        else:
            merged.append(piece)
    if all(isinstance(p, str) for p in merged):  # literals only (`[ {  } ]`): the same text in each row
        merged.append(pa.array(np.full(rows, b""), pa.binary()))
    args = [pa.scalar(p.encode(), pa.binary()) if isinstance(p, str) else p for p in merged]
    return pc.binary_join_element_wise(*args, pa.scalar(b"", pa.binary()))
