"""`${VAR}` references: in every string of the config, checked at load, expanded only when used.

Passwords with URL-special characters work, and no password ever reaches a message, a log
line or the Dagster instance.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pyarrow as pa
import pytest
import yaml
from botocore.exceptions import BotoCoreError
from bson import ObjectId
from pymongo import MongoClient

from aries_assets.config import ConfigError, expand_url, load_config
from aries_assets.core import schema as s
from aries_assets.core.warehouse import TableRef
from aries_assets.demo.mongo_server import embedded_mongo, free_port
from aries_assets.resources import LakeResource, MongoResource, WarehouseResource
from aries_assets_tests.support import run_cli, unique_name

CANARY = "Sekr1t-Canary-42"
NASTY = f"{CANARY}@#/:%?&+ "  # every character that means something in a URL


def config_text(**overrides) -> str:
    body = {
        "mongo": {"uri": "mongodb://aries:${ARIES_T_MONGO_PW}@${ARIES_T_MONGO_HOST}/?directConnection=true"},
        "lake": {
            "url": "s3://${ARIES_T_BUCKET}/raw",
            "endpoint_url": "${ARIES_T_S3_ENDPOINT}",
            "region": "${ARIES_T_REGION}",
        },
        "warehouse": {
            "url": "redshift://aries:${ARIES_T_PG_PW}@${ARIES_T_PG_HOST}:5439/dev",
            "iam_role": "arn:aws:iam::${ARIES_T_ACCOUNT}:role/copy",
        },
        "collections": [
            {
                "database": "app",
                "collection": "events",
                "query": {
                    "tenant": "${ARIES_T_TENANT}",
                    "$or": [{"kind": {"$in": ["a", "${ARIES_T_KIND}"]}}],
                },
            }
        ],
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        body[section][name] = value
    return yaml.safe_dump(body, sort_keys=False)


ENV = {
    "ARIES_T_MONGO_PW": NASTY,
    "ARIES_T_MONGO_HOST": "127.0.0.1:27017",
    "ARIES_T_BUCKET": "lake-bucket",
    "ARIES_T_S3_ENDPOINT": "http://127.0.0.1:9",
    "ARIES_T_REGION": "eu-west-1",
    "ARIES_T_PG_PW": NASTY,
    "ARIES_T_PG_HOST": "cluster.example",
    "ARIES_T_ACCOUNT": "123456789012",
    "ARIES_T_TENANT": "acme",
    "ARIES_T_KIND": "b",
}


@pytest.fixture
def env(monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_every_string_key_may_reference_the_environment(workdir, env):
    (workdir / "aries.yaml").write_text(config_text())
    config = load_config()
    # Resources get the references, not the values: the UI shows ${ARIES_T_PG_PW}, never the password.
    assert config.mongo_uri.startswith("mongodb://aries:${ARIES_T_MONGO_PW}@")
    assert config.warehouse_url == "redshift://aries:${ARIES_T_PG_PW}@${ARIES_T_PG_HOST}:5439/dev"
    assert config.lake_endpoint_url == "${ARIES_T_S3_ENDPOINT}" and config.lake_region == "${ARIES_T_REGION}"
    assert config.warehouse_iam_role == "arn:aws:iam::${ARIES_T_ACCOUNT}:role/copy"
    assert config.collections[0].query == {"tenant": "acme", "$or": [{"kind": {"$in": ["a", "b"]}}]}

    lake = LakeResource(
        url=config.lake_url,
        endpoint_url=config.lake_endpoint_url,
        region_name=config.lake_region,
    )
    store = lake.open()
    assert store.url == "s3://lake-bucket/raw"
    assert (
        store.client.meta.endpoint_url == "http://127.0.0.1:9"
        and store.client.meta.region_name == "eu-west-1"
    )
    glue = lake.glue()
    assert glue.meta.endpoint_url == "http://127.0.0.1:9" and glue.meta.region_name == "eu-west-1"

    warehouse = WarehouseResource(url=config.warehouse_url, iam_role=config.warehouse_iam_role)
    loader = warehouse.loader()
    assert loader.iam_role == "arn:aws:iam::123456789012:role/copy"
    assert CANARY not in repr(vars(loader)), "the loader holds no expanded password"


@pytest.mark.parametrize(
    ("key", "override"),
    [
        ("mongo.uri", {"mongo__uri": "mongodb://u:${ARIES_T_UNSET}@h/"}),
        ("lake.url", {"lake__url": "s3://${ARIES_T_UNSET}/x"}),
        ("lake.endpoint_url", {"lake__endpoint_url": "http://${ARIES_T_UNSET}:9000"}),
        ("lake.region", {"lake__region": "${ARIES_T_UNSET}"}),
        ("warehouse.url", {"warehouse__url": "postgresql://u:${ARIES_T_UNSET}@h/db"}),
        ("warehouse.iam_role", {"warehouse__iam_role": "${ARIES_T_UNSET}"}),
    ],
)
def test_an_unset_variable_is_rejected_at_load_naming_the_key(workdir, env, key, override):
    env.delenv("ARIES_T_UNSET", raising=False)
    (workdir / "aries.yaml").write_text(config_text(**override))
    with pytest.raises(ConfigError) as error:
        load_config()
    message = str(error.value)
    assert message.startswith(f"aries.yaml: {key} refers to ${{ARIES_T_UNSET}}, but ARIES_T_UNSET is not set")
    assert "set it in the environment" in message and "\n" not in message


def test_an_unset_variable_in_a_query_is_rejected_naming_the_field(workdir, env):
    env.delenv("ARIES_T_KIND")
    (workdir / "aries.yaml").write_text(config_text())
    with pytest.raises(
        ConfigError,
        match=r"^aries\.yaml: collections\[0\] \(app\.events\)\.query\.\$or\[0\]\.kind\.\$in\[1\] refers to \$\{ARIES_T_KIND\}",
    ):
        load_config()


def test_values_in_the_userinfo_are_percent_encoded(monkeypatch):
    monkeypatch.setenv("PW", "p@ss#w/rd:50%")
    monkeypatch.setenv("HOST", "db.example:5432")
    monkeypatch.setenv("WHOLE", "postgresql://u:already%40encoded@h/db")
    assert expand_url("postgresql://user:${PW}@${HOST}/db", "warehouse.url") == (
        "postgresql://user:p%40ss%23w%2Frd%3A50%25@db.example:5432/db"
    )
    assert (
        expand_url("mongodb://${PW}@h/?x=${PW}", "mongo.uri")
        == "mongodb://p%40ss%23w%2Frd%3A50%25@h/?x=p@ss#w/rd:50%"
    )
    assert (
        expand_url("${WHOLE}", "warehouse.url") == "postgresql://u:already%40encoded@h/db"
    )  # the user's own URL
    assert expand_url("postgresql://u:${PW}@/db?host=/tmp/sock", "warehouse.url").startswith(
        "postgresql://u:p%40ss"
    )


@pytest.fixture
def postgres_role(postgres_server, postgres_url):
    """A login role whose password is full of URL-special characters, and that must give it."""
    user = unique_name("aries_pw")
    admin = psycopg2.connect(postgres_server.get_uri())
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{user}" LOGIN PASSWORD %s', (NASTY,))
        database = urlsplit(postgres_url).path.lstrip("/")
        cursor.execute(f'GRANT ALL ON DATABASE "{database}" TO "{user}"')
        cursor.execute(f'ALTER DATABASE "{database}" OWNER TO "{user}"')
        cursor.execute("SHOW hba_file")
        hba = Path(cursor.fetchone()[0])
        rules = hba.read_text()
        hba.write_text(f"local all {user} scram-sha-256\nhost all {user} 127.0.0.1/32 scram-sha-256\n{rules}")
        cursor.execute("SELECT pg_reload_conf()")
    try:
        yield user, database, postgres_server.get_uri()
    finally:
        hba.write_text(rules)
        with admin.cursor() as cursor:
            cursor.execute("SELECT pg_reload_conf()")
        admin.close()


def test_a_postgres_password_with_url_characters_connects(postgres_role, monkeypatch):
    user, database, admin_uri = postgres_role
    socket_dir = admin_uri.split("host=", 1)[1]
    template = f"postgresql://{user}:${{PGPASS}}@/{database}?host={socket_dir}"

    monkeypatch.setenv("PGPASS", "wrong password")  # the server does ask for it
    with pytest.raises(Exception) as error:
        WarehouseResource(url=template).loader().loaded(TableRef("app", "t"))
    assert "password authentication failed" in str(error.value)

    monkeypatch.setenv("PGPASS", NASTY)
    loader = WarehouseResource(url=template).loader()
    schema = s.InferredSchema(version=1)
    data = pa.table({"_id": ["1"], "_id_key": ['"1"'], "_doc": ['{"_id": "1"}']})
    assert loader.replace_bucket(TableRef("app", "t"), schema, "rebuild", "b", "d", data, "").rows == 1


def test_a_mongodb_password_with_url_characters_connects(tmp_path, monkeypatch):
    storage, port = tmp_path / "mongo", free_port()
    with embedded_mongo(storage, port=port) as uri, MongoClient(uri) as client:
        client.admin.command("createUser", "aries", pwd=NASTY, roles=["root"])
    with embedded_mongo(storage, port=port, extra_args=("--auth",)):
        template = f"mongodb://aries:${{MONGO_PW}}@127.0.0.1:{port}/?directConnection=true&authSource=admin"
        monkeypatch.setenv("MONGO_PW", NASTY)
        client = MongoResource(uri=template).client()
        try:
            client.aries_t.things.insert_one({"_id": ObjectId()})
            assert client.aries_t.things.count_documents({}) == 1
        finally:
            client.close()


def all_text_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def assert_no_canary(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for form in (CANARY, CANARY.replace("-", "%2D")):
            assert form.encode() not in data, (
                f"the password leaked: ...{data[data.find(form.encode()) - 200 :][:400]!r}"
            )


def write_config(workdir: Path, mongo_uri: str, database: str, **sections) -> None:
    body = {
        "mongo": {"uri": mongo_uri},
        "lake": {"url": "./lake"},
        "collections": [{"database": database, "collection": "events", "bucket_size": 5}],
        **sections,
    }
    (workdir / "aries.yaml").write_text(yaml.safe_dump(body, sort_keys=False))


def test_no_password_in_messages_or_the_instance_when_mongodb_is_unreachable(workdir, monkeypatch):
    monkeypatch.setattr("aries_assets.resources.SERVER_SELECTION_TIMEOUT_MS", 1500)
    monkeypatch.setenv("MONGO_PW", NASTY)
    write_config(
        workdir, f"mongodb://aries:${{MONGO_PW}}@127.0.0.1:{free_port()}/?directConnection=true", "app"
    )
    code, out, err = run_cli("sync")
    assert code == 2 and "cannot reach MongoDB at mongodb://aries:***@127.0.0.1:" in err
    assert_no_canary(out, err, all_text_under(workdir))


def test_no_password_in_messages_or_the_instance_when_postgres_is_unreachable(
    client, mongo_uri, database, workdir, monkeypatch
):
    client[database].events.insert_many([{"_id": i} for i in range(7)])
    monkeypatch.setenv("PGPASS", NASTY)
    url = f"postgresql://aries:${{PGPASS}}@127.0.0.1:{free_port()}/warehouse"
    write_config(workdir, mongo_uri, database, warehouse={"url": url})
    code, out, err = run_cli("sync", "--workers", "1")
    assert code == 2  # refused before anything is written
    assert "cannot connect to the warehouse at postgresql://aries:***@127.0.0.1:" in out + err
    assert_no_canary(out, err, all_text_under(workdir))


def test_no_secret_in_messages_or_the_instance_when_s3_is_unreachable(
    client, mongo_uri, database, workdir, monkeypatch
):
    client[database].events.insert_many([{"_id": i} for i in range(7)])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "aries-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    write_config(workdir, mongo_uri, database)
    text = (
        (workdir / "aries.yaml")
        .read_text()
        .replace(
            "url: ./lake", "url: s3://lake-bucket/raw\n  endpoint_url: ${S3_ENDPOINT}\n  region: us-east-1"
        )
    )
    (workdir / "aries.yaml").write_text(text)
    try:
        code, out, err = run_cli("sync", "--workers", "1")
        raised = ""
    except BotoCoreError as error:  # `aries sync` does not catch BotoCoreError (yet): its message counts too
        code, out, err, raised = 1, "", "", str(error)
    assert code != 0
    assert "127.0.0.1" in out + err + raised, "the failure names the endpoint"
    assert_no_canary(out, err, raised, all_text_under(workdir))


def test_dagster_shows_references_not_values(workdir, env):
    from aries_assets.definitions import build_definitions

    (workdir / "aries.yaml").write_text(config_text())
    defs = build_definitions(load_config())
    shown = repr({name: resource for name, resource in defs.resources.items()})
    assert "${ARIES_T_PG_PW}" in shown and "${ARIES_T_MONGO_PW}" in shown
    assert_no_canary(shown)
    assert os.environ["ARIES_T_PG_PW"] == NASTY  # the value was there to leak
