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
_GROUP_COLUMNS, _GROUP_BYTES, _GROUP_ROWS, _GROUP_OFFSET, _GROUP_COMPRESSED, _GROUP_ORDINAL = 1, 2, 3, 5, 6, 7
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

    def struct(self) -> list:
        fields: list = []
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            kind, delta = head & 0x0F, head >> 4
            last = last + delta if delta else self.zigzag()
            fields.append([last, kind, kind == _TRUE if kind in (_TRUE, _FALSE) else self.value(kind)])

    def value(self, kind: int):
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
            head = self.byte()
            size, element = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            # A boolean element is a byte of its own (kept as read).
            read = self.byte if element in (_TRUE, _FALSE) else lambda: self.value(element)
            return (element, [read() for _ in range(size)])
        if kind == _STRUCT:
            return self.struct()
        raise CannotJoin(f"a Thrift value of type {kind} in a Parquet footer")


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
        if kind == _BYTE:
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
        self.metadata = _Reader(raw).struct()
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
    """
    footers = [_Footer(path) for path in runs]
    # The joined footer's schema and key-value metadata: an empty file in `schema`, written alike.
    empty = io.BytesIO()
    writer = open_writer(empty, schema)
    writer.add_key_value_metadata(late_metadata)
    writer.close()
    final = _Footer(empty.getvalue())
    leaves = _leaves(final.metadata)

    # The columns each run lacks, all null, a row group per run's row group, in one more file.
    missing: list[tuple[int, list[str]]] = []  # (row count, columns) for each run's row groups
    for footer, path in zip(footers, runs, strict=True):
        names = set(pq.read_schema(path).names)
        lacking = [f.name for f in schema if f.name not in names]
        for group in footer.row_groups():
            missing.append((_field(group, _GROUP_ROWS)[2], lacking))
    needed = sorted({name for _, lacking in missing for name in lacking}, key=schema.names.index)
    nulls_path = f"{target}.nulls"
    if needed:
        nulls_schema = pa.schema([schema.field(name) for name in needed])
        if any(not f.nullable for f in nulls_schema):
            raise CannotJoin("a column the earlier rows lack cannot be null")
        with open_writer(nulls_path, nulls_schema) as nulls_writer:
            for rows, _ in missing:
                nulls_writer.write_table(
                    nulls_schema.empty_table() if not rows else _nulls(nulls_schema, rows)
                )
        nulls = _Footer(nulls_path)
        nulls_groups = nulls.row_groups()
        if len(nulls_groups) != len(missing):
            raise CannotJoin("the null columns' row groups do not line up")
    try:
        groups: list = []
        total_rows = 0
        with open(target, "wb") as out:
            out.write(_MAGIC)
            shifts = []
            for footer, path in zip(footers, runs, strict=True):
                shifts.append(out.tell() - 4)
                _copy_range(path, 4, footer.data_end, out)
            nulls_shift = out.tell() - 4
            if needed:
                _copy_range(nulls_path, 4, nulls.data_end, out)
            index = 0
            for footer, shift in zip(footers, shifts, strict=True):
                for group in footer.row_groups():
                    own = _columns_by_path(group)
                    null_columns = _columns_by_path(nulls_groups[index]) if needed else {}
                    chunks = []
                    for leaf in leaves:
                        if leaf in own:
                            chunks.append(_moved(own.pop(leaf), shift))
                        elif leaf in null_columns:
                            chunks.append(_moved(null_columns[leaf], nulls_shift))
                        else:
                            raise CannotJoin(f"no column chunk for {b'.'.join(leaf).decode()!r}")
                    if own:
                        raise CannotJoin("a run holds a column the joined schema does not")
                    joined = [list(entry) for entry in group]
                    metas = [_field(c, _CHUNK_META)[2] for c in chunks]
                    _set(joined, _GROUP_COLUMNS, _LIST, (_STRUCT, chunks))
                    _set(joined, _GROUP_BYTES, _I64, sum(_field(m, _META_UNCOMPRESSED)[2] for m in metas))
                    if _field(joined, _GROUP_OFFSET) is not None:
                        _set(joined, _GROUP_OFFSET, _I64, _start(chunks[0]))
                    if _field(joined, _GROUP_COMPRESSED) is not None:
                        _set(
                            joined,
                            _GROUP_COMPRESSED,
                            _I64,
                            sum(_field(m, _META_COMPRESSED)[2] for m in metas),
                        )
                    if _field(joined, _GROUP_ORDINAL) is not None:
                        _set(joined, _GROUP_ORDINAL, _I16, len(groups))
                    groups.append(joined)
                    total_rows += _field(group, _GROUP_ROWS)[2]
                    index += 1
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
    except BaseException:
        if os.path.exists(target):
            os.unlink(target)
        raise
    finally:
        if os.path.exists(nulls_path):
            os.unlink(nulls_path)


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
