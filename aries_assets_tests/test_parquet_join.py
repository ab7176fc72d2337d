"""New columns late in a bucket: the rows written before keep their column chunks, copied byte for byte."""

from __future__ import annotations

import datetime
import os

import bson
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bson import Binary, Decimal128, ObjectId

from aries_assets.core import arrow, parquet_join, snapshot
from aries_assets.core import schema as s
from aries_assets.core.snapshot import convert_to_parquet
from aries_assets_tests.test_converter_equivalence import CODEC_OPTIONS, comparable, events
from aries_assets_tests.test_messy import messy_documents

OPTIONS = s.SchemaOptions()


def write(documents: list[dict], path: str) -> None:
    raws = [bson.encode(d, codec_options=CODEC_OPTIONS) for d in documents]
    convert_to_parquet(path, raws, lambda stats: s.resolve_schema(stats, None, OPTIONS), OPTIONS)


def drifting() -> list[dict]:
    """Columns that arrive in three steps, of many types: three runs of row groups to join."""
    documents = events(400)
    at = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    for i, document in enumerate(documents[150:], start=150):
        document["note"] = f"note {i}"
        document["tags"] = [f"t{i % 7}", None][: 1 + i % 2]
    for i, document in enumerate(documents[300:], start=300):
        document["price"] = Decimal128(f"{i}.25")
        document["seen"] = at + datetime.timedelta(minutes=i)
        document["raw"] = Binary(bytes([i % 256]) * 5)
        document["place"] = {"city": f"c{i % 3}", "zip": i}
    documents.append({"_id": ObjectId(), "blob": "x" * 5000})
    return documents


@pytest.mark.parametrize("case", ["drifting", "messy"])
def test_rows_before_new_columns_are_copied_not_rewritten(case, tmp_path, monkeypatch):
    """The joined file reads as the rewritten one did (values, schema, footer metadata, in
    pyarrow and in DuckDB), and no row was rewritten: `_rewrite` is never called."""
    monkeypatch.setattr(arrow, "CHUNK_BYTES", 8192)
    monkeypatch.setattr(arrow, "MIN_CHUNK_BYTES", 8192)
    documents = drifting() if case == "drifting" else messy_documents() + events(300)
    rewritten = str(tmp_path / "rewritten.parquet")
    with monkeypatch.context() as patch:

        def cannot(*args, **kwargs):
            raise parquet_join.CannotJoin("for the comparison")

        patch.setattr(parquet_join, "join", cannot)
        write(documents, rewritten)

    def refuse(*args, **kwargs):
        raise AssertionError("rows were rewritten")

    monkeypatch.setattr(snapshot._SchemaRuns, "_rewrite", refuse)
    joined = str(tmp_path / "joined.parquet")
    write(documents, joined)
    assert sorted(os.listdir(tmp_path)) == ["joined.parquet", "rewritten.parquet"], "a run or nulls file left"

    expected, got = pq.read_table(rewritten), pq.read_table(joined)
    assert got.schema.equals(expected.schema, check_metadata=True)
    for name in expected.column_names:
        assert comparable(got.column(name)) == comparable(expected.column(name)), name
    assert pq.read_metadata(joined).metadata == pq.read_metadata(rewritten).metadata
    groups = pq.ParquetFile(joined).metadata
    assert groups.num_row_groups > 3 and groups.num_rows == len(documents)
    query = "SELECT _id_key, _doc FROM read_parquet('{}') ORDER BY _id_key"
    assert duckdb.sql(query.format(joined)).fetchall() == duckdb.sql(query.format(rewritten)).fetchall()
    for column in got.column_names:  # every column chunk reads in DuckDB as in the rewritten file
        quoted = column.replace('"', '""')
        sql = f'SELECT count("{quoted}"), count(DISTINCT "{quoted}"::VARCHAR) FROM read_parquet(?)'
        assert duckdb.execute(sql, [joined]).fetchall() == duckdb.execute(sql, [rewritten]).fetchall(), column


def test_a_footer_it_cannot_copy_from_is_refused_and_nothing_is_left(tmp_path):
    """A run with a page index (offsets of its own the join would not move) is refused before a
    byte is written; the caller then rewrites the rows."""
    first, second = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"n": [1, 2]}), first, write_page_index=True)
    pq.write_table(pa.table({"n": [3], "s": ["x"]}), second)
    schema = pa.schema([("n", pa.int64()), ("s", pa.string())])
    target = str(tmp_path / "joined.parquet")
    with pytest.raises(parquet_join.CannotJoin, match="page index"):
        parquet_join.join(
            [first, second], schema, target, lambda sink, columns: pq.ParquetWriter(sink, columns), {}
        )
    assert sorted(os.listdir(tmp_path)) == ["a.parquet", "b.parquet"]


def test_footers_decode_and_encode_back_byte_for_byte(tmp_path):
    """Thrift's compact protocol, read and written back: every type of column, statistics,
    dictionaries, key-value metadata, more than fifteen columns and row groups."""
    columns = {
        "i": pa.array(range(40), pa.int32()),
        "l": pa.array([2**40 + i for i in range(40)], pa.int64()),
        "f": pa.array([i / 3 for i in range(40)]),
        "b": pa.array([i % 2 == 0 for i in range(40)]),
        "s": pa.array([f"s{i % 5}" for i in range(40)]),
        "d": pa.array([None] * 40, pa.decimal128(38, 4)),
        "t": pa.array([datetime.datetime(2024, 1, 1)] * 40, pa.timestamp("ms", tz="UTC")),
        "bin": pa.array([bytes([i]) for i in range(40)], pa.binary()),
        "list": pa.array([[f"x{i}"] * (i % 3) for i in range(40)], pa.list_(pa.string())),
    }
    columns |= {f"extra{i}": pa.array([i] * 40) for i in range(12)}
    path = str(tmp_path / "wide.parquet")
    table = pa.table(columns).replace_schema_metadata({"aries.note": "é" * 300})
    pq.write_table(table, path, row_group_size=7, compression="zstd")
    footer = parquet_join._Footer(path)  # raises unless it encodes back to the same bytes
    assert len(footer.row_groups()) == 6
    assert parquet_join._leaves(footer.metadata)[:9] == [
        (b"i",),
        (b"l",),
        (b"f",),
        (b"b",),
        (b"s",),
        (b"d",),
        (b"t",),
        (b"bin",),
        (b"list", b"list", b"element"),
    ]


def test_every_byte_copied_is_a_chunk_the_footer_points_at(tmp_path):
    """No dead bytes: the null columns are written only for the row groups that lack them, and
    a row group's offset is where its first chunk lies, whichever column comes first (readers
    split files by that offset)."""
    first, second, target = (str(tmp_path / n) for n in ("r0.parquet", "r1.parquet", "j.parquet"))
    pq.write_table(pa.table({"a": list(range(5000))}), first, row_group_size=1000)
    pq.write_table(pa.table({"z": ["q", "r"], "a": [1, 2]}), second)
    schema = pa.schema([("z", pa.string()), ("a", pa.int64())])
    parquet_join.join(
        [first, second], schema, target, lambda sink, columns: pq.ParquetWriter(sink, columns), {}
    )
    footer = parquet_join._Footer(target)
    spans = []
    for group in footer.row_groups():
        fields = {entry[0]: entry[2] for entry in group}
        chunks = fields[1][1]
        starts = [parquet_join._start(chunk) for chunk in chunks]
        assert fields[5] == min(starts)
        for chunk, start in zip(chunks, starts, strict=True):
            spans.append((start, start + parquet_join._field(parquet_join._field(chunk, 3)[2], 7)[2]))
    spans.sort()
    assert spans[0][0] == 4 and spans[-1][1] == footer.data_end
    assert all(end == start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)), (
        "a gap of unreferenced bytes"
    )
    assert pq.read_table(target).to_pydict() == {"z": [None] * 5000 + ["q", "r"], "a": [*range(5000), 1, 2]}


def test_a_stated_sort_order_is_refused(tmp_path):
    """A row group's sorting columns count the run's own columns: joined, they could point at
    another column. Such runs (Aries writes none) are refused, not copied."""
    first, second, target = (str(tmp_path / n) for n in ("r0.parquet", "r1.parquet", "j.parquet"))
    sorting = [pq.SortingColumn(0)]
    pq.write_table(pa.table({"n": [1, 2]}), first, sorting_columns=sorting)
    pq.write_table(pa.table({"m": ["x"], "n": [3]}), second)
    schema = pa.schema([("m", pa.string()), ("n", pa.int64())])
    with pytest.raises(parquet_join.CannotJoin, match="sort order"):
        parquet_join.join(
            [first, second], schema, target, lambda sink, columns: pq.ParquetWriter(sink, columns), {}
        )
    assert sorted(os.listdir(tmp_path)) == ["r0.parquet", "r1.parquet"]
