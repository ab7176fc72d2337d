"""Bad configuration and unreachable servers: one clear line, a non-zero exit, nothing written."""

from __future__ import annotations

import pytest

from aries_assets.config import ConfigError, load_config, redact_uri
from aries_assets.demo.mongo_server import free_port
from aries_assets_tests.support import run_cli

GOOD = """\
mongo: {uri: "mongodb://localhost:27017"}
lake: {url: ./lake}
collections:
  - database: app
    collection: apps
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("lake:", "laek:"), "unknown key 'laek'"),
        (GOOD + "    bucketsize: 5\n", "collections[0] (app.apps): unknown key 'bucketsize'"),
        (
            GOOD.replace("mongodb://localhost:27017", "http://localhost"),
            "mongo.uri must start with mongodb://",
        ),
        (GOOD.replace("./lake", "ftp://host/x"), "lake.url 'ftp://host/x': use a directory path or s3://"),
        (GOOD.replace("./lake", "s3://"), "names no S3 bucket"),
        (GOOD.split("collections:")[0], "missing key 'collections'"),
        (GOOD.split("collections:")[0] + "collections: []\n", "collections must be a non-empty list"),
        (GOOD + "    bucket_size: 0\n", "bucket_size must be a positive"),
        (GOOD + "    query: [1]\n", "query must be a mapping"),
        (GOOD.replace("    collection: apps\n", ""), "missing key 'collection'"),
        (GOOD + "  - {database: app, collection: apps}\n", "map to the same asset name"),
        (
            GOOD.replace("mongodb://localhost:27017", "${ARIES_TEST_UNSET_VAR}"),
            "ARIES_TEST_UNSET_VAR is not set",
        ),
        (GOOD + "warehouse: {url: mysql://x}\n", "warehouse.url must start with one of"),
        (
            GOOD
            + "  - {database: app, collection: Apps2, warehouse_table: APPS}\nwarehouse: {url: duckdb:///w.db}\n",
            'app.Apps2 and app.apps load the same warehouse table "app"."APPS"',
        ),
        ("mongo: [unclosed\n", "not valid YAML at line"),
    ],
)
def test_bad_config_gives_one_clear_line(workdir, text, message):
    (workdir / "aries.yaml").write_text(text)
    with pytest.raises(ConfigError, match=None) as error:
        load_config()
    assert message in str(error.value)
    assert str(error.value).startswith("aries.yaml: ")

    code, out, err = run_cli("sync")
    assert code == 2
    assert err.strip().count("\n") == 0 and message in err
    assert sorted(p.name for p in workdir.iterdir()) == ["aries.yaml"], "nothing may be written"


def test_tables_differing_only_by_case_are_two_tables_in_postgresql_one_in_duckdb(workdir):

    two = GOOD + "  - {database: app, collection: Apps2, warehouse_table: APPS}\n"
    (workdir / "aries.yaml").write_text(two + "warehouse: {url: postgresql://u@h/db}\n")
    assert len(load_config(workdir / "aries.yaml").collections) == 2
    (workdir / "aries.yaml").write_text(two + "warehouse: {url: duckdb:///w.db}\n")
    with pytest.raises(ConfigError, match="load the same warehouse table"):
        load_config(workdir / "aries.yaml")


def test_missing_config_file(workdir):
    code, _, err = run_cli("sync", "--config", "nope.yaml")
    assert code == 2 and "nope.yaml: no such config file" in err


def test_unreachable_mongo_fails_fast_without_writing(workdir, monkeypatch):
    monkeypatch.setattr("aries_assets.resources.SERVER_SELECTION_TIMEOUT_MS", 1500)
    port = free_port()  # nothing listens here
    monkeypatch.setenv("ARIES_TEST_PASSWORD", "s3cr3t-pw")
    uri = f"mongodb://aries:${{ARIES_TEST_PASSWORD}}@127.0.0.1:{port}/?directConnection=true"
    (workdir / "aries.yaml").write_text(GOOD.replace("mongodb://localhost:27017", uri))
    code, out, err = run_cli("sync")
    assert code == 2
    assert f"cannot reach MongoDB at mongodb://aries:***@127.0.0.1:{port}/" in err
    assert "s3cr3t-pw" not in err + out
    assert err.strip().count("\n") == 0
    assert sorted(p.name for p in workdir.iterdir()) == ["aries.yaml"]


def test_env_references_expand_and_redact(monkeypatch):
    monkeypatch.setenv("PW", "hunter2")
    assert redact_uri("mongodb://u:hunter2@h:1/db") == "mongodb://u:***@h:1/db"
    assert redact_uri("mongodb://h:1/db") == "mongodb://h:1/db"
