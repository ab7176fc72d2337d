"""The Aries configuration file (`aries.yaml`): typed, validated, one clear message per mistake.

Values may reference environment variables as `${NAME}`. The unexpanded text is
what Dagster resources receive, so secrets are read from the environment at
the moment of use and never shown in the UI, logs or errors.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import yaml
from bson import json_util

from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import LakeSpec
from aries_assets.core.schema import OVERRIDE_TYPES, SchemaOptions, parse_decimal

DEFAULT_CONFIG = "aries.yaml"
DEFAULT_BUCKET_SIZE = 50_000
DEFAULT_BUCKET_MB = 64
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"[^A-Za-z0-9_]+")

_TOP_KEYS = {"mongo", "lake", "warehouse", "sync", "collections"}
_SYNC_KEYS = {"workers", "linger_seconds", "change_streams", "lease_seconds"}
_STREAM_SCOPES = ("database", "collection", "deployment")
_MONGO_KEYS = {"uri"}
_LAKE_KEYS = {"url", "endpoint_url", "region"}
_WAREHOUSE_KEYS = {"url", "iam_role"}
_COLLECTION_KEYS = {
    "database", "collection", "bucket_size", "bucket_bytes", "query", "owners",
    "schema", "evolution", "max_depth", "max_columns", "infer_schema", "warehouse_schema", "warehouse_table",
}  # fmt: skip
_WAREHOUSE_SCHEMES = ("duckdb", "postgresql", "postgres", "redshift")


class ConfigError(ValueError):
    """A mistake in the configuration, worded for the person who made it."""


def _env_value(name: str, where: str) -> str:
    if name not in os.environ:
        raise ConfigError(
            f"{where} refers to ${{{name}}}, but {name} is not set; set it in the environment "
            "Aries runs in (or write the value in the config file)"
        )
    return os.environ[name]


def expand_env(text: str, where: str = "value") -> str:
    """Replace `${NAME}` with the environment variable NAME; a missing one is an error naming `where`."""
    return _ENV_REF.sub(lambda match: _env_value(match.group(1), where), text)


def expand_url(text: str, where: str = "value") -> str:
    """`expand_env` for a URL: a value landing in the userinfo (`user:password@`) is percent-encoded,
    so a password with `@`, `#`, `/`, `:` or `%` means itself. A whole URL from one variable is the
    user's own, taken as it is."""
    userinfo = _userinfo_span(text)

    def substitute(match: re.Match) -> str:
        value = _env_value(match.group(1), where)
        if userinfo and userinfo[0] <= match.start() and match.end() <= userinfo[1]:
            return quote(value, safe="")
        return value

    return _ENV_REF.sub(substitute, text)


def _userinfo_span(template: str) -> tuple[int, int] | None:
    """Where `user:password` sits in an unexpanded URL (a `${NAME}` holds no / ? # or @)."""
    scheme = template.find("://")
    if scheme < 0:
        return None
    start = scheme + 3
    ends = [i for i in (template.find(c, start) for c in "/?#") if i >= 0]
    at = template.rfind("@", start, min(ends, default=len(template)))
    return (start, at) if at >= 0 else None


def redact_uri(uri: str) -> str:
    """A URI safe to print: any password replaced by ***."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{userinfo.split(':', 1)[0]}:***@{host}").geturl()


def scrub(message: str, *secrets: str | None) -> str:
    """`message` with every secret (as given and percent-encoded) replaced by ***."""
    for secret in secrets:
        if secret:
            for form in {secret, quote(secret, safe=""), quote(secret)}:
                message = message.replace(form, "***")
    return message


def url_password(url: str) -> str | None:
    """The password of a URL, decoded (to scrub it from messages)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def dagster_name(text: str) -> str:
    """A name Dagster accepts for asset key parts, jobs and partition sets."""
    return _NAME.sub("_", text).strip("_") or "x"


@dataclass(frozen=True)
class CollectionConfig:
    database: str
    collection: str
    bucket_size: int = DEFAULT_BUCKET_SIZE
    bucket_bytes: int = DEFAULT_BUCKET_MB * 1024 * 1024
    query: dict[str, Any] = field(default_factory=dict)
    owners: tuple[str, ...] = ()
    schema: SchemaOptions = field(default_factory=SchemaOptions)
    warehouse_schema: str | None = None
    warehouse_table: str | None = None

    @property
    def table(self) -> tuple[str, str]:
        """The warehouse table: `"<db>"."<collection>"` unless overridden."""
        return self.warehouse_schema or self.database, self.warehouse_table or self.collection

    @property
    def label(self) -> str:
        return f"{self.database}.{self.collection}"

    @property
    def name(self) -> str:
        """The collection's Dagster name: `<db>__<coll>`."""
        return f"{dagster_name(self.database)}__{dagster_name(self.collection)}"

    @property
    def source(self) -> SourceCollection:
        return SourceCollection(self.database, self.collection, self.query)


def lake_spec(url: str, endpoint_url: str | None, region: str | None) -> LakeSpec:
    """The lake as plain values, its `${VAR}` references read from the environment for this use only."""
    return LakeSpec(
        expand_url(url, "lake.url"),
        expand_url(endpoint_url, "lake.endpoint_url") if endpoint_url else None,
        expand_env(region, "lake.region") if region else None,
    )


@dataclass(frozen=True)
class SyncOptions:
    """How runs work: parallel writers, how long a sensor's run keeps following changes, stream scope."""

    workers: int = 2
    linger_seconds: float = 30.0
    change_streams: str = "database"  # one stream per database, per collection, or one for the deployment
    lease_seconds: float = 30.0


@dataclass(frozen=True)
class AriesConfig:
    mongo_uri: str  # unexpanded: may hold ${VAR} references
    lake_url: str
    lake_endpoint_url: str | None
    lake_region: str | None
    warehouse_url: str | None
    warehouse_iam_role: str | None
    collections: tuple[CollectionConfig, ...]
    path: str
    sync: SyncOptions = field(default_factory=SyncOptions)

    @property
    def lake_on_s3(self) -> bool:
        return expand_env(self.lake_url).startswith("s3://")


def config_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("ARIES_CONFIG") or DEFAULT_CONFIG


def load_config(path: str | None = None) -> AriesConfig:
    """Read and validate the config file; raise ConfigError naming the file and the key."""
    path = config_path(path)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: no such config file (pass --config or set ARIES_CONFIG)")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    try:
        return _parse(raw, path)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def _mapping(value: Any, where: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping with keys {sorted(allowed)}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(value))
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string")
    return value


def _optional_string(section: dict[str, Any], key: str, where: str) -> str | None:
    value = section.get(key)
    return None if value is None else _string(value, f"{where}.{key}")


def _expand_query(value: Any, where: str) -> Any:
    """The filter with `${NAME}` expanded in every string, keys included; `where` names the field."""
    if isinstance(value, str):
        return expand_env(value, where)
    if isinstance(value, dict):
        return {expand_env(str(k), where): _expand_query(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_query(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _parse(raw: Any, path: str) -> AriesConfig:
    top = _mapping(raw, "the top level", _TOP_KEYS, {"mongo", "lake", "collections"})

    mongo = _mapping(top["mongo"], "mongo", _MONGO_KEYS, {"uri"})
    mongo_uri = _string(mongo["uri"], "mongo.uri")
    if not expand_url(mongo_uri, "mongo.uri").startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError("mongo.uri must start with mongodb:// or mongodb+srv://")

    lake = _mapping(top["lake"], "lake", _LAKE_KEYS, {"url"})
    lake_url = _string(lake["url"], "lake.url")
    lake_endpoint_url = _optional_string(lake, "endpoint_url", "lake")
    if lake_endpoint_url and not expand_url(lake_endpoint_url, "lake.endpoint_url").startswith(
        ("http://", "https://")
    ):
        raise ConfigError("lake.endpoint_url must start with http:// or https://")
    lake_region = _optional_string(lake, "region", "lake")
    if lake_region:
        expand_env(lake_region, "lake.region")
    expanded = expand_url(lake_url, "lake.url")
    scheme = urlsplit(expanded).scheme
    if scheme == "s3":
        if not urlsplit(expanded).netloc:
            raise ConfigError(f"lake.url {expanded!r} names no S3 bucket (use s3://bucket/prefix)")
    elif scheme not in ("", "file"):
        raise ConfigError(f"lake.url {expanded!r}: use a directory path or s3://bucket/prefix")

    warehouse_url = warehouse_iam_role = warehouse_scheme = None
    if top.get("warehouse") is not None:
        warehouse = _mapping(top["warehouse"], "warehouse", _WAREHOUSE_KEYS, {"url"})
        warehouse_url = _string(warehouse["url"], "warehouse.url")
        warehouse_scheme = urlsplit(expand_url(warehouse_url, "warehouse.url")).scheme
        if warehouse_scheme not in _WAREHOUSE_SCHEMES:
            raise ConfigError(
                f"warehouse.url must start with one of {', '.join(s + '://' for s in _WAREHOUSE_SCHEMES)}"
            )
        warehouse_iam_role = _optional_string(warehouse, "iam_role", "warehouse")
        if warehouse_iam_role:
            expand_env(warehouse_iam_role, "warehouse.iam_role")
        if warehouse_scheme == "redshift" and not expanded.startswith("s3://"):
            raise ConfigError(
                "a redshift:// warehouse loads with COPY from S3: lake.url must be s3://bucket/prefix"
            )

    entries = top["collections"]
    if not isinstance(entries, list) or not entries:
        raise ConfigError("collections must be a non-empty list of {database, collection} entries")
    collections = tuple(_collection(entry, i) for i, entry in enumerate(entries))
    seen: dict[str, str] = {}
    for coll in collections:
        if coll.name in seen:
            raise ConfigError(
                f"collections: {coll.label} and {seen[coll.name]} map to the same asset name {coll.name!r}"
            )
        seen[coll.name] = coll.label
    if warehouse_scheme is not None:
        # Each table is one collection's: a load deletes the rows of buckets its collection no
        # longer has. Compared as the warehouse compares quoted names: DuckDB and Redshift case
        # aside, PostgreSQL exactly.
        exact_case = warehouse_scheme.startswith("postgres")
        tables: dict[tuple[str, ...], str] = {}
        for coll in collections:
            table = coll.table if exact_case else tuple(part.lower() for part in coll.table)
            if table in tables:
                raise ConfigError(
                    f"collections: {coll.label} and {tables[table]} load the same warehouse table "
                    f'"{coll.table[0]}"."{coll.table[1]}"; give one its own warehouse_schema or warehouse_table'
                )
            tables[table] = coll.label

    return AriesConfig(
        sync=_sync_options(top.get("sync")),
        mongo_uri=mongo_uri,
        lake_url=lake_url,
        lake_endpoint_url=lake_endpoint_url,
        lake_region=lake_region,
        warehouse_url=warehouse_url,
        warehouse_iam_role=warehouse_iam_role,
        collections=collections,
        path=path,
    )


def _sync_options(block: Any) -> SyncOptions:
    if block is None:
        return SyncOptions()
    block = _mapping(block, "sync", _SYNC_KEYS, set())
    defaults = SyncOptions()
    workers = block.get("workers", defaults.workers)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
        raise ConfigError(f"sync.workers must be a whole number from 1 to 64, got {workers!r}")
    numbers = {}
    for key, low in (("linger_seconds", 0), ("lease_seconds", 5)):
        value = block.get(key, getattr(defaults, key))
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < low
        ):
            raise ConfigError(f"sync.{key} must be a number of seconds, at least {low}, got {value!r}")
        numbers[key] = float(value)
    scope = block.get("change_streams", defaults.change_streams)
    if scope not in _STREAM_SCOPES:
        raise ConfigError(f"sync.change_streams must be one of {', '.join(_STREAM_SCOPES)}, got {scope!r}")
    return SyncOptions(workers=workers, change_streams=scope, **numbers)


def _collection(entry: Any, index: int) -> CollectionConfig:
    where = f"collections[{index}]"
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("database"), str)
        and isinstance(entry.get("collection"), str)
    ):
        where = f"{where} ({entry['database']}.{entry['collection']})"
    entry = _mapping(entry, where, _COLLECTION_KEYS, {"database", "collection"})
    database = _string(entry["database"], f"{where}.database")
    collection = _string(entry["collection"], f"{where}.collection")
    if any(c in database for c in '/\\. "$\0'):
        raise ConfigError(f'{where}: database name may not contain / \\ . space " $ or NUL')
    if "\0" in collection or collection.startswith("system."):
        raise ConfigError(f"{where}: collection name may not contain NUL or start with 'system.'")
    bucket_size = entry.get("bucket_size", DEFAULT_BUCKET_SIZE)
    if not isinstance(bucket_size, int) or isinstance(bucket_size, bool) or bucket_size < 1:
        raise ConfigError(f"{where}: bucket_size must be a positive whole number, got {bucket_size!r}")
    bucket_mb = entry.get("bucket_bytes", DEFAULT_BUCKET_MB * 1024 * 1024)
    if not isinstance(bucket_mb, int) or isinstance(bucket_mb, bool) or bucket_mb < 1024:
        raise ConfigError(
            f"{where}: bucket_bytes must be a whole number of bytes, at least 1024, got {bucket_mb!r}"
        )
    query = entry.get("query") or {}
    if not isinstance(query, dict):
        raise ConfigError(f"{where}: query must be a mapping (a MongoDB filter), got {type(query).__name__}")
    # `${NAME}` first, then Extended JSON ({"$oid": "${ID}"}, {"$date": ...}) becomes BSON types.
    query = json_util.loads(json_util.dumps(_expand_query(query, f"{where}.query")))
    owners = entry.get("owners") or []
    if not isinstance(owners, list) or not all(isinstance(o, str) for o in owners):
        raise ConfigError(f"{where}: owners must be a list of emails or team:name strings")
    table_names = {}
    for key, default in (("warehouse_schema", database), ("warehouse_table", collection)):
        value = entry.get(key)
        if value is not None and (not isinstance(value, str) or not value or len(value.encode()) > 63):
            raise ConfigError(f"{where}: {key} must be a name of 1 to 63 bytes")
        if value is None and len(default.encode()) > 63:
            raise ConfigError(
                f"{where}: {default!r} is longer than 63 bytes, too long for a table name; set {key}"
            )
        table_names[key] = value
    return CollectionConfig(
        database,
        collection,
        bucket_size,
        bucket_mb,
        query,
        tuple(owners),
        _schema_options(entry, where),
        **table_names,
    )


def _schema_options(entry: dict[str, Any], where: str) -> SchemaOptions:
    block = entry.get("schema") or {}
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: schema must be a mapping of field: type, plus exclude: [fields]")
    block = dict(block)
    exclude = block.pop("exclude", []) or []
    if not isinstance(exclude, list):
        raise ConfigError(
            f"{where}: schema.exclude must be a list of field paths such as password or profile.ssn"
        )
    for i, path in enumerate(exclude):
        if not isinstance(path, str) or not path:
            raise ConfigError(
                f"{where}: schema.exclude[{i + 1}] must be a field path such as password or profile.ssn, "
                f"got {path!r}"
            )
        if path == "_id" or path.startswith("_id."):
            raise ConfigError(
                f"{where}: schema.exclude[{i + 1}]: _id cannot be excluded: it says which bucket a "
                "document belongs to and which row is which; remove this entry"
            )
    overrides = {}
    for name, type_name in block.items():
        if str(name) == "_id" or str(name).startswith("_id."):
            raise ConfigError(
                f"{where}: schema.{name}: _id is always a string column (ObjectId hex, the string, "
                "or the number in decimal), with its exact BSON value in _id_key; remove this entry"
            )
        type_text = str(type_name).strip().lower().replace(" ", "")
        if type_text not in OVERRIDE_TYPES and not (
            type_text.startswith("list<") or parse_decimal(type_text)
        ):
            raise ConfigError(
                f"{where}: schema.{name}: unknown type {type_name!r} "
                f"(use one of {', '.join(sorted(OVERRIDE_TYPES))}, decimal(p,s))"
            )
        decimal = parse_decimal(type_text)
        if decimal and not (1 <= decimal[0] <= 38 and 0 <= decimal[1] <= decimal[0]):
            raise ConfigError(f"{where}: schema.{name}: decimal precision must be 1-38 and scale 0-precision")
        overrides[str(name)] = type_text
    evolution = entry.get("evolution", "rebuild")
    if evolution not in ("rebuild", "append"):
        raise ConfigError(f"{where}: evolution must be rebuild or append, got {evolution!r}")
    numbers = {}
    for key, default in (("max_depth", 5), ("max_columns", 500)):
        value = entry.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{where}: {key} must be a positive whole number, got {value!r}")
        numbers[key] = value
    infer = entry.get("infer_schema", True)
    if not isinstance(infer, bool):
        raise ConfigError(f"{where}: infer_schema must be true or false")
    return SchemaOptions(
        overrides=overrides, exclude=tuple(exclude), evolution=evolution, infer=infer, **numbers
    )
