"""`exclude` removes a field at any depth, arrays of documents (and arrays of arrays) included."""

from __future__ import annotations

import duckdb
import pyarrow.parquet as pq
from bson import json_util

from aries_assets.core import schema as s
from aries_assets.core.arrow import options_fingerprint
from aries_assets_tests.support import run_cli, write_config

SECRET = "987-65-4329"


def people(count: int) -> list[dict]:
    return [
        {
            "_id": i,
            "name": f"p{i}",
            "addresses": [
                {"city": "Rome", "ssn": f"{SECRET}-{i}"},
                {"city": "Oslo", "ssn": {"value": SECRET}},
                [{"ssn": SECRET, "kept": 1}, [{"ssn": SECRET}]],
                "not a document",
            ],
            "profile": {"ssn": SECRET, "card": {"ssn": SECRET, "last4": "1234"}},
            "ssn_note": "kept",
        }
        for i in range(count)
    ]


def test_excluded_paths_leave_no_trace_in_lake_or_table(client, mongo_uri, database, workdir):
    client[database].people.insert_many(people(12))
    url = f"duckdb:///{workdir / 'warehouse.duckdb'}"
    entry = {
        "database": database,
        "collection": "people",
        "bucket_size": 5,
        "schema": {"exclude": ["addresses.ssn", "profile.ssn", "profile.card.ssn"]},
    }
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry], warehouse={"url": url})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, err + out

    files = sorted((workdir / "lake" / database / "people").glob("*.parquet"))
    assert len(files) == 3
    for path in files:
        assert SECRET.encode() not in path.read_bytes()
        table = pq.read_table(path)
        for column in table.columns:
            assert not any(SECRET in str(v) for v in column.to_pylist()), column
        for doc in table.column("_doc").to_pylist():
            document = json_util.loads(doc)
            assert "ssn" not in document["profile"] and "ssn" not in document["profile"]["card"]
            assert all("ssn" not in a for a in document["addresses"][:2])
            assert document["addresses"][2] == [{"kept": 1}, [{}]]
            assert document["ssn_note"] == "kept" and document["addresses"][3] == "not a document"

    with duckdb.connect(url[len("duckdb://") :], read_only=True) as connection:
        columns = [r[0] for r in connection.execute(f'DESCRIBE "{database}"."people"').fetchall()]
        body = " || '|' || ".join(f"COALESCE(CAST(\"{c}\" AS VARCHAR), '')" for c in columns)
        rows = connection.execute(f'SELECT {body} FROM "{database}"."people"').fetchall()
    assert len(rows) == 12
    assert not any(SECRET in row[0] for row in rows)


def test_options_fingerprint_follows_what_changes_the_files():
    base = s.SchemaOptions()
    assert options_fingerprint(base) == options_fingerprint(s.SchemaOptions())
    assert options_fingerprint(base) != options_fingerprint(s.SchemaOptions(exclude=("a.b",)))
    assert options_fingerprint(s.SchemaOptions(exclude=("a", "b"))) == options_fingerprint(
        s.SchemaOptions(exclude=("b", "a"))
    )
    assert options_fingerprint(base) != options_fingerprint(s.SchemaOptions(overrides={"a": "string"}))
    assert options_fingerprint(base) != options_fingerprint(s.SchemaOptions(max_depth=2))
