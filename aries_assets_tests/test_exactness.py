"""Exactness defects of the engine: schema convergence, option changes, causal reads, collations."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
from pymongo import monitoring

from aries_assets.core.lake import LocalLake
from aries_assets.core.ledger import LedgerStore
from aries_assets_tests.faults import assert_table_exact, table_rows
from aries_assets_tests.support import (
    assert_same_documents,
    lake_documents,
    mongo_documents,
    run_cli,
    write_config,
)


def test_a_type_minority_in_one_bucket_converges_and_a_second_sync_rewrites_nothing(
    client, mongo_uri, database, workdir
):
    # 12k documents, `zip` an int except 0.8% strings, all of them in one 1,000-document bucket.
    rng = random.Random(5)
    docs = [{"_id": i, "zip": rng.randint(10_000, 99_999)} for i in range(12_000)]
    for i in rng.sample(range(3_000, 4_000), 96):
        docs[i]["zip"] = f"Z-{i}"
    client[database].people.insert_many(docs)
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": "people", "bucket_size": 1_000}],
    )
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    folder = workdir / "lake" / database / "people"
    types = {pq.read_schema(p).field("zip").type for p in folder.glob("*.parquet")}
    assert {str(t) for t in types} == {"int32"}, "99.2% ints keep an int column; the strings stay in _doc"
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert " 0 written" in out
    assert_same_documents(mongo_documents(client, database, "people"), lake_documents(folder))


def test_changed_collection_options_rewrite_files_already_written(client, mongo_uri, database, workdir):
    client[database].events.insert_many([{"_id": i, "a": {"b": {"c": i}}} for i in range(50)])
    entry = {"database": database, "collection": "events", "bucket_size": 20}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry])
    assert run_cli("sync", "--workers", "1")[0] == 0
    folder = workdir / "lake" / database / "events"
    assert "a__b__c" in pq.read_schema(next(folder.glob("*.parquet"))).names
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [{**entry, "max_depth": 1}])
    code, out, err = run_cli("sync", "--workers", "1", "--full")
    assert code == 0, out + err
    for path in folder.glob("*.parquet"):
        assert "a__b__c" not in pq.read_schema(path).names, f"{path.name} still follows the old options"


def _lake_holds(folder, text: str) -> list[str]:
    """The lake files of `folder` whose columns or `_doc` hold `text`."""
    found = []
    for path in folder.glob("*.parquet"):
        table = pq.read_table(path)
        if any(text in name for name in table.column_names) or any(
            text in doc for doc in table.column("_doc").to_pylist()
        ):
            found.append(path.name)
    return found


def test_an_exclude_added_to_the_config_reaches_lake_and_warehouse_with_a_plain_sync(
    client, mongo_uri, database, workdir
):
    """Without `--full`, and without any document changing: a field excluded for privacy must leave
    every file and the table, and come back when the exclude is removed."""
    coll = client[database].users
    coll.insert_many([{"_id": i, "name": f"n{i}", "password": f"secret-{i}"} for i in range(30)])
    url = f"duckdb:///{workdir / 'w.duckdb'}"
    entry = {"database": database, "collection": "users", "bucket_size": 10}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry], warehouse={"url": url})
    assert run_cli("sync", "--workers", "1")[0] == 0
    folder = workdir / "lake" / database / "users"
    assert _lake_holds(folder, "password")

    write_config(
        workdir / "aries.yaml", mongo_uri, "./lake", [{**entry, "schema": {"exclude": ["password"]}}],
        warehouse={"url": url},
    )  # fmt: skip
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert not _lake_holds(folder, "secret-"), "an excluded field is still in the lake"
    assert not _lake_holds(folder, "password")
    rows = table_rows(url, database, "users")
    assert len(rows) == 30 and not [doc for _, doc in rows if "secret-" in doc], "still in the warehouse"
    assert run_cli("status", "--json")[0] == 0

    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry], warehouse={"url": url})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert_same_documents(mongo_documents(client, database, "users"), lake_documents(folder))
    assert_table_exact(url, database, coll)


def test_a_lake_from_before_the_fingerprint_is_checked_by_its_footers(client, mongo_uri, database, workdir):
    """A ledger without `written_with` (an older Aries): the files' footers decide. Options as they
    were: nothing is re-read; an exclude added since: the files are rewritten."""
    client[database].users.insert_many([{"_id": i, "password": f"secret-{i}"} for i in range(30)])
    entry = {"database": database, "collection": "users", "bucket_size": 10}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry])
    assert run_cli("sync", "--workers", "1")[0] == 0
    store = LedgerStore(LocalLake(workdir / "lake"), database, "users")
    fingerprint = store.load().written_with
    assert fingerprint

    store.update(lambda led: setattr(led, "written_with", None))
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0 and "0 written" in out and "up to date" in out, out + err
    assert store.load().written_with == fingerprint, (
        "footers matching: the fingerprint is recorded, no re-read"
    )

    store.update(lambda led: setattr(led, "written_with", None))
    write_config(
        workdir / "aries.yaml", mongo_uri, "./lake", [{**entry, "schema": {"exclude": ["password"]}}]
    )
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert not _lake_holds(workdir / "lake" / database / "users", "secret-")
    assert store.load().written_with not in (None, fingerprint)


def test_a_changed_query_reaches_the_lake_with_a_plain_sync(client, mongo_uri, database, workdir):
    coll = client[database].orders
    coll.insert_many([{"_id": i, "region": "eu" if i % 3 else "us"} for i in range(40)])
    entry = {"database": database, "collection": "orders", "bucket_size": 10}
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [entry])
    assert run_cli("sync", "--workers", "1")[0] == 0
    folder = workdir / "lake" / database / "orders"
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [{**entry, "query": {"region": "us"}}])
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 0, out + err
    assert_same_documents(
        mongo_documents(client, database, "orders", {"region": "us"}), lake_documents(folder)
    )


class ReadConcerns(monitoring.CommandListener):
    def __init__(self) -> None:
        self.finds: list[dict] = []

    def started(self, event):
        if event.command_name == "find":
            self.finds.append(dict(event.command))

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


def test_bucket_reads_are_causally_after_the_recorded_change_with_a_secondary_read_preference(
    client, mongo_uri, database, workdir
):
    client[database].events.insert_many([{"_id": i, "v": 0} for i in range(30)])
    separator = "&" if "?" in mongo_uri else "?"
    uri = f"{mongo_uri}{separator}readPreference=secondaryPreferred"
    write_config(workdir / "aries.yaml", uri, "./lake", [{"database": database, "collection": "events"}])
    assert run_cli("sync", "--workers", "1")[0] == 0
    client[database].events.update_one({"_id": 3}, {"$set": {"v": 1}})
    listener = ReadConcerns()
    monitoring.register(listener)
    try:
        assert run_cli("sync", "--workers", "1")[0] == 0
    finally:
        monitoring._LISTENERS.command_listeners.remove(listener)
    bucket_reads = [
        f for f in listener.finds if f.get("find") == "events" and f.get("filter") != {"_id": None}
    ]
    assert bucket_reads, "the dirty bucket was read"
    for read in bucket_reads:
        concern = read.get("readConcern", {})
        assert concern.get("level") == "majority" and "afterClusterTime" in concern, read
    assert_same_documents(
        mongo_documents(client, database, "events"), lake_documents(workdir / "lake" / database / "events")
    )


def test_a_collection_with_a_locale_collation_is_refused_with_one_clear_line(
    client, mongo_uri, database, workdir
):
    client[database].create_collection("names", collation={"locale": "en", "strength": 2})
    client[database].names.insert_many([{"_id": "a"}, {"_id": "B"}])
    info = list(client[database].list_collections(filter={"name": "names"}))[0]
    write_config(workdir / "aries.yaml", mongo_uri, "./lake", [{"database": database, "collection": "names"}])
    code, out, err = run_cli("sync", "--workers", "1")
    if not (info.get("options") or {}).get("collation"):
        # A server that ignores collations orders `_id`s by bytes: nothing to refuse.
        assert code == 0
        return
    assert code == 1
    assert f"{database}.names" in out and "collation is 'en'" in out
    assert not list((workdir / "lake").rglob("*.parquet")), "nothing is written"


def test_a_file_schema_is_compared_with_the_collection_schema_by_columns_not_version():
    """Two writers can each produce a different version N+1: the warehouse step must keep every
    column of the collection schema, and add the file's own, whatever the version numbers say."""
    from aries_assets.core import schema as s
    from aries_assets.core import snapshot

    def column(name: str, type_name: str) -> s.ColumnSpec:
        return s.ColumnSpec((name,), name, type_name, s.accepted_kinds(type_name))

    collection = s.InferredSchema(version=3, columns=[column("a", s.T_INT32), column("b", s.T_STRING)])
    older_number = snapshot.BucketFile(
        key="first",
        format_version=snapshot.FORMAT_VERSION,
        digest="x",
        schema_version=2,  # an older number, but a column the collection schema lacks
        columns={"a": s.T_INT32, "c": s.T_DOUBLE},
        stats=s.TypeStats(),
    )
    widened = snapshot.file_schema(collection, older_number)
    assert {c.name: c.type for c in widened.columns} == {"a": s.T_INT32, "b": s.T_STRING, "c": s.T_DOUBLE}
    same_columns = snapshot.BucketFile(
        "first", snapshot.FORMAT_VERSION, "x", 9, {"a": s.T_INT32}, s.TypeStats()
    )
    assert snapshot.file_schema(collection, same_columns) is collection
