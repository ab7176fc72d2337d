"""The Dagster layer: one partitioned `mongo/...` and `lake/...` pair and a job per collection."""

from __future__ import annotations

import dagster as dg

from aries_assets.config import load_config
from aries_assets.definitions import build_definitions
from aries_assets_tests.support import write_config


def test_definitions_per_collection(workdir, monkeypatch):
    monkeypatch.setenv("ARIES_TEST_HOST", "localhost")
    write_config(
        workdir / "aries.yaml",
        "mongodb://${ARIES_TEST_HOST}:27017",
        "./lake",
        [
            {"database": "app", "collection": "apps", "owners": ["team:data"]},
            {"database": "app", "collection": "events-2024.v2", "bucket_size": 1000},
        ],
    )
    defs = build_definitions(load_config())
    graph = defs.resolve_asset_graph()
    lake = dg.AssetKey(["lake", "app", "events_2024_v2"])
    mongo = dg.AssetKey(["mongo", "app", "events_2024_v2"])
    assert graph.get(lake).parent_keys == {mongo}
    assert graph.get(mongo).is_external
    partitions = graph.get(lake).partitions_def
    assert isinstance(partitions, dg.DynamicPartitionsDefinition) and partitions.name == "app__events_2024_v2"
    assert graph.get(dg.AssetKey(["lake", "app", "apps"])).owners == ["team:data"]
    assert defs.resolve_job_def("sync__app__events_2024_v2") is not None
    # The resource keeps the ${VAR} reference: the UI never shows the expanded value.
    assert defs.resources["mongo"].uri == "mongodb://${ARIES_TEST_HOST}:27017"


def test_schema_changes_are_shown_only_on_the_first_write_under_a_version():
    """A bucket rewritten under the schema version it had says so, rather than repeating the
    changes that made that version (the UI once showed "added ..." on every rewrite)."""
    from types import SimpleNamespace

    from aries_assets.factory import schema_changes_text

    schema = SimpleNamespace(version=2, actions=["added plan (string)"])
    rewritten = SimpleNamespace(schema=schema, previous=SimpleNamespace(schema_version=2))
    first_under_v2 = SimpleNamespace(schema=schema, previous=SimpleNamespace(schema_version=1))
    new_bucket = SimpleNamespace(schema=schema, previous=None)
    assert schema_changes_text(rewritten) == "none (schema v2 unchanged)"
    assert schema_changes_text(first_under_v2) == schema_changes_text(new_bucket) == "v2: added plan (string)"
