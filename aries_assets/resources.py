"""Dagster resources: MongoDB, the lake and the warehouse. Secrets stay in the environment.

Each resource holds the configured text with its `${VAR}` references intact and
expands them only when it connects, so the Dagster UI never shows a password.
"""

from urllib.parse import unquote, urlsplit

import dagster as dg
import psycopg2
from pydantic import Field as PydanticField
from pymongo import MongoClient
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from aries_assets.config import expand_env, expand_url, lake_spec, redact_uri, scrub, url_password
from aries_assets.core.extract import MongoUnreachable, SourceCollection, open_client
from aries_assets.core.lake import Lake, LakeSpec
from aries_assets.core.warehouse import Loader, open_loader
from aries_assets.core.warehouse.loader import WarehouseError

SERVER_SELECTION_TIMEOUT_MS = 10_000


class MongoRefused(RuntimeError):
    """MongoDB answered a run's command with an error; the message names the collection and the error."""


class MongoResource(dg.ConfigurableResource):
    """The MongoDB deployment Aries reads from."""

    uri: str = PydanticField(description="mongodb:// URI; ${VAR} references are read from the environment")

    def client(self) -> MongoClient:
        uri = expand_url(self.uri, "mongo.uri")
        client = None
        try:
            client = open_client(uri, SERVER_SELECTION_TIMEOUT_MS)
            client.admin.command("ping")
        except PyMongoError as error:
            if client is not None:
                client.close()
            detail = scrub(type(error).__name__, url_password(uri))
            if isinstance(error, OperationFailure) and error.code in (18, 13):
                raise MongoUnreachable(
                    f"MongoDB at {redact_uri(uri)} refused the login: authentication failed "
                    f"(code {error.code}); check the user, password and authSource in mongo.uri"
                ) from None
            raise MongoUnreachable(
                f"cannot reach MongoDB at {redact_uri(uri)}: {detail}; "
                "check mongo.uri and that the server is running"
            ) from None
        return client

    def refused(self, error: OperationFailure, source: SourceCollection) -> MongoRefused:
        """MongoDB refusing a command of a run (an unknown operator in the query, a missing privilege),
        in one line: the driver's message appends the whole server reply, raw BSON included."""
        details = error.details or {}
        text = str(details.get("errmsg") or str(error).split(", full error:")[0])
        hint = "; check the collection's query in the config" if source.query else ""
        return MongoRefused(f"MongoDB refused a command for {source.label}: {text} (code {error.code}){hint}")

    def lost(self, error: ConnectionFailure) -> MongoUnreachable:
        """The driver losing MongoDB during a run (its message is a topology dump), said in one line."""
        uri = expand_url(self.uri, "mongo.uri")
        return MongoUnreachable(
            f"lost MongoDB at {redact_uri(uri)} during the run ({type(error).__name__}); check that the "
            "server is running and mongo.uri. Nothing is lost: the next run or `aries sync` resumes"
        )


class LakeResource(dg.ConfigurableResource):
    """Where bucket files go: a directory, or s3://bucket/prefix through a pooled boto3 client.

    boto3 (a sixth of a second to import, paid by every run's process start) is imported only
    when the lake is on S3.
    """

    url: str = PydanticField(description="directory path or s3://bucket/prefix")
    endpoint_url: str | None = PydanticField(default=None, description="S3: endpoint URL (MinIO, moto)")
    region_name: str | None = PydanticField(default=None, description="S3: region")

    def open(self) -> Lake:
        return self.spec().open()

    def spec(self) -> LakeSpec:
        """The lake as plain values, for writer processes that open it again."""
        return lake_spec(self.url, self.endpoint_url, self.region_name)

    @property
    def kind(self) -> str:
        return "s3" if expand_env(self.url, "lake.url").startswith("s3://") else "file"

    def glue(self):
        """A Glue client in the lake's region and endpoint (same credentials as S3)."""
        import boto3

        spec = self.spec()
        return boto3.client("glue", region_name=spec.region, endpoint_url=spec.endpoint_url)


class WarehouseResource(dg.ConfigurableResource):
    """The SQL warehouse: duckdb:///path, postgresql://... or redshift://... (credentials via ${VAR})."""

    url: str = PydanticField(description="warehouse URL; ${VAR} references are read from the environment")
    iam_role: str | None = PydanticField(default=None, description="Redshift: IAM role for COPY from S3")

    def loader(self) -> Loader:
        """A loader that reads the password from the environment at each connection, and holds none."""
        url = expand_url(self.url, "warehouse.url")
        iam_role = expand_env(self.iam_role, "warehouse.iam_role") if self.iam_role else None
        if url.startswith("duckdb://"):
            return open_loader(url)
        return open_loader(redact_uri(url), iam_role, connect=self.connect)

    def connect(self):
        """A DB-API connection to the PostgreSQL or Redshift warehouse; errors never carry the password."""
        url = expand_url(self.url, "warehouse.url")
        try:
            if url.startswith("redshift://"):
                return psycopg2.connect(**redshift_conn_args(redshift_resource(url)))
            return psycopg2.connect(url)
        except psycopg2.Error as error:
            lines = str(error).strip().splitlines()
            detail = scrub(lines[0] if lines else type(error).__name__, url_password(url))
            raise WarehouseError(f"cannot connect to the warehouse at {redact_uri(url)}: {detail}") from None

    @property
    def kind(self) -> str:
        return expand_env(self.url, "warehouse.url").split(":", 1)[0].replace("postgresql", "postgres")


def redshift_resource(url: str):
    """dagster-aws's Redshift resource for a redshift://user:password@host:port/database URL."""
    from dagster_aws.redshift import RedshiftClientResource

    parts = urlsplit(url)
    return RedshiftClientResource(
        host=parts.hostname or "",
        port=parts.port or 5439,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        database=parts.path.lstrip("/") or "dev",
    )


def redshift_conn_args(resource) -> dict:
    """The connection RedshiftClientResource's client opens, for a transaction spanning several statements."""
    return {
        "host": resource.host,
        "port": resource.port,
        "user": resource.user,
        "password": resource.password,
        "database": resource.database,
        "connect_timeout": resource.connect_timeout,
        "sslmode": resource.sslmode,
    }
