"""The lake: Parquet bucket files and Aries' small state files, on a local disk or S3.

Writes are all-or-nothing: locally a temporary file in the same directory is
renamed over the target; on S3 the object is created by a single PUT. Readers
never see a half-written bucket, and a crash leaves the previous file in place.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

_SAFE_SEGMENT = re.compile(r"[^A-Za-z0-9_.=-]+")
STATE_DIR = "_aries"  # Athena and Hive skip paths starting with "_"


def safe_segment(name: str) -> str:
    """A path segment safe on every filesystem and in S3/Athena: ASCII, no separators.

    Names that had to change get a short digest of the original so two names
    never map to one directory.
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    cleaned = _SAFE_SEGMENT.sub("_", ascii_name).strip("._") or "x"
    cleaned = cleaned[:80]
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def collection_prefix(database: str, collection: str) -> str:
    return f"{safe_segment(database)}/{safe_segment(collection)}"


def bucket_file(database: str, collection: str, key: str) -> str:
    return f"{collection_prefix(database, collection)}/{key}.parquet"


def bucket_map_file(database: str, collection: str) -> str:
    return f"{collection_prefix(database, collection)}/{STATE_DIR}/buckets.json"


if TYPE_CHECKING:  # pyarrow is imported where files are read, not by every user of the lake
    import pyarrow as pa


class Lake(Protocol):
    """Where bucket files live. Paths are relative, '/'-separated, and already sanitised."""

    url: str

    def uri(self, path: str) -> str: ...

    def atomic_local_file(self, path: str) -> contextlib.AbstractContextManager[str]:
        """A local path to write; published at `path` only if the block succeeds."""
        ...

    def read_text(self, path: str) -> str | None: ...

    def write_text(self, path: str, text: str) -> None: ...

    def parquet_metadata(self, path: str) -> dict[str, str] | None:
        """The key-value footer metadata of a Parquet file, or None if there is no file."""
        ...

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table: ...

    def list(self, prefix: str) -> list[str]: ...

    def delete(self, path: str) -> None: ...

    def read_versioned(self, path: str) -> tuple[str | None, str | None]:
        """A small state file's text and a version token for `write_if` (None, None when absent)."""
        ...

    def write_if(self, path: str, text: str, version: str | None) -> str | None:
        """Compare-and-swap: write only if the file is still at `version` (None: still absent).
        Returns the new version, or None if the file had changed."""
        ...


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalLake:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, path: str) -> Path:
        return self.root / path

    def uri(self, path: str) -> str:
        return str(self._path(path))

    @contextlib.contextmanager
    def atomic_local_file(self, path: str) -> Iterator[str]:
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def read_text(self, path: str) -> str | None:
        try:
            return self._path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def write_text(self, path: str, text: str) -> None:
        with self.atomic_local_file(path) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")

    def parquet_metadata(self, path: str) -> dict[str, str] | None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_metadata(self._path(path)).metadata or {}
        except (FileNotFoundError, pa.ArrowInvalid):
            return None  # a missing or unreadable file is rewritten
        return {k.decode(): v.decode() for k, v in metadata.items()}

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow.parquet as pq

        return pq.read_table(self._path(path), columns=columns)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.exists():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def delete(self, path: str) -> None:
        self._path(path).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self, path: str) -> Iterator[None]:
        """An exclusive advisory lock beside the file, held only for one compare-and-swap."""
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def read_versioned(self, path: str) -> tuple[str | None, str | None]:
        try:
            data = self._path(path).read_bytes()
        except FileNotFoundError:
            return None, None
        return data.decode("utf-8"), _content_version(data)

    def write_if(self, path: str, text: str, version: str | None) -> str | None:
        with self._locked(path):
            _, current = self.read_versioned(path)
            if current != version:
                return None
            self.write_text(path, text)
            return _content_version(text.encode("utf-8"))


class S3Lake:
    """A lake under s3://bucket/prefix, through a boto3 client (`s3_client`)."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{self._key(path)}"

    @contextlib.contextmanager
    def atomic_local_file(self, path: str) -> Iterator[str]:
        fd, tmp = tempfile.mkstemp(prefix="aries-", suffix=".tmp")
        os.close(fd)
        try:
            yield tmp
            with open(tmp, "rb") as body:  # one PUT: the object appears whole or not at all
                self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=body)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def read_text(self, path: str) -> str | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
        except self.client.exceptions.NoSuchKey:
            return None
        return response["Body"].read().decode("utf-8")

    def write_text(self, path: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=text.encode("utf-8"))

    def _read_range(self, path: str, byte_range: str) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=self._key(path), Range=byte_range)
        return response["Body"].read()

    def parquet_metadata(self, path: str) -> dict[str, str] | None:
        """The footer's key-value metadata; None only when S3 says there is no such key.

        Any other refusal (throttling, 5xx, access denied, no such bucket) raises: taking it for
        a missing file would drop the bucket's statistics, narrow the schema and rebuild tables.
        """
        # The footer is the last 8 + N bytes; read the tail rather than the whole file.
        try:
            tail = self._read_range(path, "bytes=-65536")
        except self.client.exceptions.NoSuchKey:
            return None
        except self.client.exceptions.ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None  # a HEAD-style 404 without a body carries only the status as its code
            raise
        if len(tail) < 8 or tail[-4:] != b"PAR1":
            return None
        footer_length = int.from_bytes(tail[-8:-4], "little")
        if footer_length + 8 > len(tail):
            tail = self._read_range(path, f"bytes=-{footer_length + 8}")
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + tail)).metadata or {}
        except pa.ArrowInvalid:
            return None
        return {k.decode(): v.decode() for k, v in metadata.items()}

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        import pyarrow as pa
        import pyarrow.parquet as pq

        response = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
        return pq.read_table(pa.BufferReader(response["Body"].read()), columns=columns)

    def list(self, prefix: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            keys += [obj["Key"][strip:] for obj in page.get("Contents", [])]
        return sorted(keys)

    def delete(self, path: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(path))

    def read_versioned(self, path: str) -> tuple[str | None, str | None]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
        except self.client.exceptions.NoSuchKey:
            return None, None
        return response["Body"].read().decode("utf-8"), response["ETag"]

    def write_if(self, path: str, text: str, version: str | None) -> str | None:
        # S3 conditional writes: If-None-Match creates only, If-Match replaces only that ETag.
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            response = self.client.put_object(
                Bucket=self.bucket, Key=self._key(path), Body=text.encode("utf-8"), **condition
            )
        except self.client.exceptions.ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412) or error.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                return None
            raise
        return response["ETag"]


def schema_file(database: str, collection: str) -> str:
    return f"{collection_prefix(database, collection)}/{STATE_DIR}/schema.json"


@dataclass(frozen=True)
class LakeSpec:
    """Where the lake is, as plain values: opened again in each writer process."""

    url: str  # expanded: a directory or s3://bucket/prefix
    endpoint_url: str | None = None
    region: str | None = None

    def open(self) -> Lake:
        parts = urlsplit(self.url)
        if parts.scheme == "s3":
            return S3Lake(s3_client(self.endpoint_url, self.region), parts.netloc, parts.path)
        return LocalLake(parts.path if parts.scheme == "file" else self.url)


def s3_client(endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 S3 client with a pooled connection for every request a process has in flight:
    LAKE_CONCURRENCY from each of a few threads at once (a run serving several collections,
    writers uploading buckets). boto3 pools 10; past that, each request opens a connection,
    throws it away and logs a warning. Retries as dagster-aws's S3Resource does."""
    import boto3
    from botocore.config import Config

    config = Config(max_pool_connections=4 * LAKE_CONCURRENCY, retries={"max_attempts": 5})
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def remove_temporary_files(lake: Lake, prefix: str) -> list[str]:
    """Half-written files a killed writer left behind (only the lease holder may call this)."""
    leftovers = [p for p in lake.list(prefix) if p.rsplit("/", 1)[-1].startswith(".") and p.endswith(".tmp")]
    for path in leftovers:
        lake.delete(path)
    return leftovers


# Lake requests in flight at once (ledgers, leases): on S3 each is a round trip of tens of
# milliseconds, and 150 collections would take seconds one after another.
LAKE_CONCURRENCY = 32


def each_at_once(function: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """`function` of each item, in order, with up to LAKE_CONCURRENCY of them in flight."""
    items = list(items)
    if len(items) <= 2:
        return [function(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(min(LAKE_CONCURRENCY, len(items)), "aries lake") as pool:
        return list(pool.map(function, items))
