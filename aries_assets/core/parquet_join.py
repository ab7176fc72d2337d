"""Join Parquet files that differ only by columns the earlier ones lack, without decoding a value.

A bucket written a chunk at a time may learn new columns part way through: the rows written
before have no value there. Read back and written again, they cost as much as converting them
did. Here their column chunks are copied byte for byte instead; the columns they lack come,
all null, from a small file written in those columns alone; and one footer, in the joined
schema, points at every chunk where it now lies.

The footer is Thrift's compact protocol (`FileMetaData` in parquet-format). It is decoded
into plain lists and encoded back as read, field by field; only the offsets of copied chunks,
the row groups' column lists and sizes, and the row count change. Anything unexpected in the
files (page indexes, bloom filters, encryption, a column in two files unalike) raises
`CannotJoin`, and the caller rewrites the rows as before.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

_MAGIC = b"PAR1"
# Compact protocol types.
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
# Field ids (parquet.thrift).
_FILE_SCHEMA = 2
_ELEMENT_NAME, _ELEMENT_CHILDREN = 4, 5
_FILE_NUM_ROWS, _FILE_ROW_GROUPS = 3, 4
_GROUP_COLUMNS, _GROUP_BYTES, _GROUP_ROWS, _GROUP_SORTING = 1, 2, 3, 4
_GROUP_OFFSET, _GROUP_COMPRESSED, _GROUP_ORDINAL = 5, 6, 7
_CHUNK_FILE_PATH, _CHUNK_FILE_OFFSET, _CHUNK_META = 1, 2, 3
_META_PATH, _META_UNCOMPRESSED, _META_COMPRESSED = 3, 6, 7
_META_DATA_PAGE, _META_INDEX_PAGE, _META_DICTIONARY_PAGE = 9, 10, 11
# What a copied chunk may not carry: page indexes and encryption (ColumnChunk), bloom filters
# (ColumnMetaData): each lies elsewhere in the file, at an offset of its own.
_CHUNK_ELSEWHERE = {4, 5, 6, 7, 8, 9}
_META_ELSEWHERE = {14, 15}


class CannotJoin(Exception):
    """These files cannot be joined by copying their chunks: rewrite their rows instead."""


# --- Thrift compact protocol ---------------------------------------------------------------------
# A struct is a list of [field id, type, value]; a list or set is (element type, [values]).


class _Raw(bytes):
    """A value kept as it was encoded: read past, written back as is."""


# Which fields are read, and in what shape: a column chunk's metadata only for its path, sizes
# and page offsets (the rest, statistics above all, as bytes: most of a footer, and untouched).
_READ = "read"
_META_READ = {
    _META_PATH,
    _META_UNCOMPRESSED,
    _META_COMPRESSED,
    _META_DATA_PAGE,
    _META_INDEX_PAGE,
    _META_DICTIONARY_PAGE,
}
_META_SHAPE = {_READ: _META_READ}
_FILE_SHAPE = {_FILE_ROW_GROUPS: {_GROUP_COLUMNS: {_CHUNK_META: _META_SHAPE}}}


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        shift = result = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def struct(self, shape: dict | None = None) -> list:
        """A struct's fields; with `shape`, a field it names is read in its own shape, and where
        it lists the fields to read (`_READ`), the others are kept as their bytes (`_Raw`)."""
        shape = shape or {}
        read = shape.get(_READ)
        fields: list = []
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            kind, delta = head & 0x0F, head >> 4
            last = last + delta if delta else self.zigzag()
            if kind in (_TRUE, _FALSE):
                fields.append([last, kind, kind == _TRUE])
            elif read is not None and last not in read:
                start = self.pos
                self.skip(kind)
                fields.append([last, kind, _Raw(self.data[start : self.pos])])
            else:
                fields.append([last, kind, self.value(kind, shape.get(last))])

    def value(self, kind: int, shape: dict | None = None):
        if kind == _BYTE:
            return self.byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            self.pos += 8
            return self.data[self.pos - 8 : self.pos]
        if kind == _BINARY:
            size = self.varint()
            self.pos += size
            return self.data[self.pos - size : self.pos]
        if kind in (_LIST, _SET):
            element, size = self._collection()
            # A boolean element is a byte of its own (kept as read).
            read = self.byte if element in (_TRUE, _FALSE) else lambda: self.value(element, shape)
            return (element, [read() for _ in range(size)])
        if kind == _STRUCT:
            return self.struct(shape)
        raise CannotJoin(f"a Thrift value of type {kind} in a Parquet footer")

    def skip(self, kind: int) -> None:
        """Past a value (of a struct's field: a boolean field has none)."""
        if kind == _BYTE:
            self.pos += 1
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind == _DOUBLE:
            self.pos += 8
        elif kind == _BINARY:
            size = self.varint()  # read first: `self.pos += self.varint()` would drop its own bytes
            self.pos += size
        elif kind in (_LIST, _SET):
            element, size = self._collection()
            if element in (_TRUE, _FALSE):
                self.pos += size
            else:
                for _ in range(size):
                    self.skip(element)
        elif kind == _STRUCT:
            while True:
                head = self.byte()
                if head == 0:
                    return
                if not head >> 4:
                    self.zigzag()
                if head & 0x0F not in (_TRUE, _FALSE):
                    self.skip(head & 0x0F)
        else:
            raise CannotJoin(f"a Thrift value of type {kind} in a Parquet footer")

    def _collection(self) -> tuple[int, int]:
        head = self.byte()
        size, element = head >> 4, head & 0x0F
        return element, self.varint() if size == 15 else size


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, n: int) -> None:
        while True:
            if n < 0x80:
                self.out.append(n)
                return
            self.out.append((n & 0x7F) | 0x80)
            n >>= 7

    def zigzag(self, n: int) -> None:
        self.varint((n << 1) ^ (n >> 63))

    def struct(self, fields: list) -> None:
        last = 0
        for field_id, kind, value in fields:
            written = (_TRUE if value else _FALSE) if kind in (_TRUE, _FALSE) else kind
            if 0 < field_id - last <= 15:
                self.out.append(((field_id - last) << 4) | written)
            else:
                self.out.append(written)
                self.zigzag(field_id)
            last = field_id
            if kind not in (_TRUE, _FALSE):
                self.value(kind, value)
        self.out.append(0)

    def value(self, kind: int, value) -> None:
        if type(value) is _Raw:
            self.out += value
        elif kind == _BYTE:
            self.out.append(value)
        elif kind in (_I16, _I32, _I64):
            self.zigzag(value)
        elif kind == _DOUBLE:
            self.out += value
        elif kind == _BINARY:
            self.varint(len(value))
            self.out += value
        elif kind in (_LIST, _SET):
            element, items = value
            if len(items) < 15:
                self.out.append((len(items) << 4) | element)
            else:
                self.out.append(0xF0 | element)
                self.varint(len(items))
            for item in items:
                if element in (_TRUE, _FALSE):
                    self.out.append(item)
                else:
                    self.value(element, item)
        elif kind == _STRUCT:
            self.struct(value)
        else:
            raise CannotJoin(f"a Thrift value of type {kind} in a Parquet footer")


def _field(fields: list, field_id: int):
    for entry in fields:
        if entry[0] == field_id:
            return entry
    return None


def _set(fields: list, field_id: int, kind: int, value) -> None:
    entry = _field(fields, field_id)
    if entry is None:
        fields.append([field_id, kind, value])
        fields.sort(key=lambda e: e[0])
    else:
        entry[2] = value


# --- files ---------------------------------------------------------------------------------------


class _Footer:
    """A Parquet file's footer, decoded, and where its column chunks lie."""

    def __init__(self, path_or_bytes: str | bytes) -> None:
        if isinstance(path_or_bytes, bytes):
            data = path_or_bytes
            self.size = len(data)
            tail = data[-8:]
        else:
            self.size = os.path.getsize(path_or_bytes)
            with open(path_or_bytes, "rb") as handle:
                handle.seek(self.size - 8)
                tail = handle.read(8)
                length = int.from_bytes(tail[:4], "little")
                handle.seek(self.size - 8 - length)
                data = handle.read(length) + tail
        if tail[4:] != _MAGIC:
            raise CannotJoin("not a Parquet file (or an encrypted one)")
        length = int.from_bytes(tail[:4], "little")
        raw = bytes(data[len(data) - 8 - length : len(data) - 8])
        self.metadata = _Reader(raw).struct(_FILE_SHAPE)
        writer = _Writer()
        writer.struct(self.metadata)
        if bytes(writer.out) != raw:  # what this module cannot write back as it was, it does not touch
            raise CannotJoin("a Parquet footer that does not encode back to itself")
        self.data_end = self.size - 8 - length  # the chunks lie in [4, data_end)

    def row_groups(self) -> list[list]:
        entry = _field(self.metadata, _FILE_ROW_GROUPS)
        return [] if entry is None else entry[2][1]


def _columns_by_path(group: list) -> dict[tuple[bytes, ...], list]:
    columns = {}
    for chunk in _field(group, _GROUP_COLUMNS)[2][1]:
        if any(entry[0] in _CHUNK_ELSEWHERE for entry in chunk):
            raise CannotJoin("a column chunk with a page index or encryption")
        path = _field(chunk, _CHUNK_FILE_PATH)
        if path is not None:
            raise CannotJoin("a column chunk in another file")
        meta = _field(chunk, _CHUNK_META)[2]
        if any(entry[0] in _META_ELSEWHERE for entry in meta):
            raise CannotJoin("a column chunk with a bloom filter")
        columns[tuple(_field(meta, _META_PATH)[2][1])] = chunk
    return columns


def _moved(chunk: list, shift: int) -> list:
    """A column chunk's footer entry, its data `shift` bytes further into the file."""
    chunk = [list(entry) for entry in chunk]
    offset = _field(chunk, _CHUNK_FILE_OFFSET)
    if offset is not None and offset[2]:
        offset[2] += shift
    meta_entry = _field(chunk, _CHUNK_META)
    meta = [list(entry) for entry in meta_entry[2]]
    meta_entry[2] = meta
    for field_id in (_META_DATA_PAGE, _META_INDEX_PAGE, _META_DICTIONARY_PAGE):
        entry = _field(meta, field_id)
        if entry is not None:
            entry[2] += shift
    return chunk


def _start(chunk: list) -> int:
    meta = _field(chunk, _CHUNK_META)[2]
    dictionary = _field(meta, _META_DICTIONARY_PAGE)
    return dictionary[2] if dictionary is not None else _field(meta, _META_DATA_PAGE)[2]


def _copy_range(source: str, start: int, end: int, out) -> None:
    with open(source, "rb") as handle:
        handle.seek(start)
        remaining = end - start
        while remaining:
            block = handle.read(min(remaining, 1 << 20))
            if not block:
                raise CannotJoin(f"{source} ended early")
            out.write(block)
            remaining -= len(block)


def join(
    runs: list[str],
    schema: pa.Schema,
    target: str,
    open_writer: Callable[[object, pa.Schema], pq.ParquetWriter],
    late_metadata: dict[str, str],
) -> None:
    """Write `target`: the rows of `runs` (Parquet files, in order) in `schema`, every column a
    run lacks null for its rows. Each run's columns must be `schema`'s, written alike (the
    caller checks the Arrow fields). `open_writer(sink, schema)` opens a writer as the runs'
    were opened; `late_metadata` is added to the footer as the runs' writer added it on close.
    Raises `CannotJoin` (and leaves nothing behind) where the files are not as expected.
    """
    nulls_paths = [f"{target}.nulls{i}" for i in range(len(runs))]
    try:
        _join(runs, schema, target, open_writer, late_metadata, nulls_paths)
    except BaseException as error:
        if os.path.exists(target):
            os.unlink(target)
        if isinstance(
            error, (IndexError, KeyError, TypeError, ValueError, AttributeError, pa.ArrowException)
        ):
            raise CannotJoin(f"{type(error).__name__}: {error}") from error  # a footer not as expected
        raise
    finally:
        for path in nulls_paths:
            if os.path.exists(path):
                os.unlink(path)


def _join(runs, schema, target, open_writer, late_metadata, nulls_paths) -> None:
    footers = [_Footer(path) for path in runs]
    # The joined footer's schema and key-value metadata: an empty file in `schema`, written alike.
    empty = io.BytesIO()
    writer = open_writer(empty, schema)
    writer.add_key_value_metadata(late_metadata)
    writer.close()
    final = _Footer(empty.getvalue())
    leaves = _leaves(final.metadata)

    # The columns a run lacks, all null, a row group for each of its row groups, in a file of its own.
    nulls: list[_Footer | None] = []
    for footer, nulls_path in zip(footers, nulls_paths, strict=True):
        names = {leaf[0].decode() for leaf in _leaves(footer.metadata)}  # top-level columns
        lacking = pa.schema([f for f in schema if f.name not in names])
        if not len(lacking):
            nulls.append(None)
            continue
        if any(not f.nullable for f in lacking):
            raise CannotJoin("a column the earlier rows lack cannot be null")
        with open_writer(nulls_path, lacking) as nulls_writer:
            for group in footer.row_groups():
                rows = _field(group, _GROUP_ROWS)[2]
                nulls_writer.write_table(_nulls(lacking, rows) if rows else lacking.empty_table())
        nulls.append(_Footer(nulls_path))
        if len(nulls[-1].row_groups()) != len(footer.row_groups()):
            raise CannotJoin("the null columns' row groups do not line up")

    groups: list = []
    total_rows = 0
    with open(target, "wb") as out:
        out.write(_MAGIC)
        shifts = []
        for footer, path in zip(footers, runs, strict=True):
            shifts.append(out.tell() - 4)
            _copy_range(path, 4, footer.data_end, out)
        null_shifts = []
        for footer, path in zip(nulls, nulls_paths, strict=True):
            null_shifts.append(out.tell() - 4)
            if footer is not None:
                _copy_range(path, 4, footer.data_end, out)
        for footer, shift, null_footer, null_shift in zip(footers, shifts, nulls, null_shifts, strict=True):
            null_groups = null_footer.row_groups() if null_footer is not None else []
            for index, group in enumerate(footer.row_groups()):
                if _field(group, _GROUP_SORTING) is not None:
                    raise CannotJoin("row groups that state a sort order (by column numbers)")
                own = _columns_by_path(group)
                null_columns = _columns_by_path(null_groups[index]) if null_groups else {}
                chunks = []
                for leaf in leaves:
                    if leaf in own:
                        chunks.append(_moved(own.pop(leaf), shift))
                    elif leaf in null_columns:
                        chunks.append(_moved(null_columns.pop(leaf), null_shift))
                    else:
                        raise CannotJoin(f"no column chunk for {b'.'.join(leaf).decode()!r}")
                if own or null_columns:
                    raise CannotJoin("a column chunk the joined schema does not hold")
                groups.append(_group(group, chunks, len(groups)))
                total_rows += _field(group, _GROUP_ROWS)[2]
        metadata = [list(entry) for entry in final.metadata]
        _set(metadata, _FILE_NUM_ROWS, _I64, total_rows)
        _set(metadata, _FILE_ROW_GROUPS, _LIST, (_STRUCT, groups))
        writer = _Writer()
        writer.struct(metadata)
        out.write(writer.out)
        out.write(len(writer.out).to_bytes(4, "little"))
        out.write(_MAGIC)
    check = pq.ParquetFile(target)
    if check.metadata.num_rows != total_rows or not check.schema_arrow.equals(schema):
        raise CannotJoin("the joined file does not read back as written")


def _group(group: list, chunks: list, ordinal: int) -> list:
    """A run's row group with the joined schema's column chunks, its sizes and offset to match."""
    joined = [list(entry) for entry in group]
    metas = [_field(c, _CHUNK_META)[2] for c in chunks]
    _set(joined, _GROUP_COLUMNS, _LIST, (_STRUCT, chunks))
    _set(joined, _GROUP_BYTES, _I64, sum(_field(m, _META_UNCOMPRESSED)[2] for m in metas))
    if _field(joined, _GROUP_OFFSET) is not None:  # where its first byte is (readers split files by it)
        _set(joined, _GROUP_OFFSET, _I64, min(_start(c) for c in chunks))
    if _field(joined, _GROUP_COMPRESSED) is not None:
        _set(joined, _GROUP_COMPRESSED, _I64, sum(_field(m, _META_COMPRESSED)[2] for m in metas))
    if _field(joined, _GROUP_ORDINAL) is not None:
        if ordinal > 0x7FFF:
            raise CannotJoin("more row groups than an ordinal counts")
        _set(joined, _GROUP_ORDINAL, _I16, ordinal)
    return joined


def _nulls(schema: pa.Schema, rows: int) -> pa.Table:
    return pa.Table.from_arrays([pa.nulls(rows, f.type) for f in schema], schema=schema)


def _leaves(metadata: list) -> list[tuple[bytes, ...]]:
    """The leaf columns' paths, in order, from a footer's schema (a tree laid out depth first)."""
    elements = _field(metadata, _FILE_SCHEMA)[2][1]
    leaves: list[tuple[bytes, ...]] = []

    def walk(at: int, prefix: tuple[bytes, ...]) -> int:
        element = elements[at]
        children = _field(element, _ELEMENT_CHILDREN)
        path = (*prefix, _field(element, _ELEMENT_NAME)[2]) if at else ()
        if children is None:
            leaves.append(path)
            return at + 1
        at += 1
        for _ in range(children[2]):
            at = walk(at, path)
        return at

    walk(0, ())
    return leaves
