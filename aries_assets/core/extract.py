"""Streaming reads from MongoDB: `_id`-ordered raw BSON, bounded by bytes.

Range reads use the `_id` index bounds (`min`/`max` with a hint) rather than
`$gte`/`$lt` filters: MongoDB's query operators only match values of the same
type class, while a bucket of a mixed-type collection spans several classes.
"""

from __future__ import annotations

import collections
import contextlib
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import Int64, ObjectId, Timestamp
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.raw_bson import RawBSONDocument
from pymongo import MongoClient
from pymongo.collection import Collection
from pymongo.errors import ConnectionFailure
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import ReadPreference

# Decode dates beyond Python's datetime range as DatetimeMS instead of failing.
CODEC_OPTIONS = CodecOptions(tz_aware=True, datetime_conversion=DatetimeConversion.DATETIME_AUTO)
_ID_INDEX = [("_id", 1)]
_RAW_OPTIONS = CodecOptions(
    document_class=RawBSONDocument, tz_aware=True, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_LENGTH = struct.Struct("<i")
_INT64 = struct.Struct("<q")
_OID_PREFIX = b"\x07_id\x00"  # element type 0x07 (ObjectId) named "_id"

# Documents per server batch: small enough that converting one batch overlaps the server
# producing the next, large enough that round trips do not count (the server caps batches at 16 MB).
READ_BATCH = 10_000
# Raw BSON a read fetches ahead of its reader: a few batches, so the server never waits on us.
PREFETCH_BYTES = 16 * 1024 * 1024


class MongoUnreachable(RuntimeError):
    """MongoDB did not answer; the message names the server, never the password."""


def open_client(uri: str, server_selection_ms: int = 10_000) -> MongoClient:
    """A client as Aries uses one: named in the server's logs, dates tz-aware, a bounded wait for a server."""
    return MongoClient(uri, appname="aries", serverSelectionTimeoutMS=server_selection_ms, tz_aware=True)


@dataclass(frozen=True)
class SourceCollection:
    """A MongoDB collection as Aries reads it: names and the optional filter."""

    database: str
    collection: str
    query: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.database}.{self.collection}"

    def open(self, client: Any) -> Collection:
        # Majority reads: a bucket file never holds a write that could roll back.
        return client[self.database].get_collection(self.collection, read_concern=ReadConcern("majority"))


def raw_documents(batch: bytes) -> list[bytes]:
    """The documents of a server batch (concatenated BSON documents), each its own bytes."""
    documents = []
    offset, end, unpack = 0, len(batch), _LENGTH.unpack_from
    while offset < end:
        (length,) = unpack(batch, offset)
        documents.append(batch[offset : offset + length])
        offset += length
    return documents


def raw_id(raw: memoryview | bytes) -> Any:
    """The `_id` of a raw document, without decoding the rest when it leads as an ObjectId."""
    if raw[4:9] == _OID_PREFIX:
        return ObjectId(bytes(raw[9:21]))
    value = RawBSONDocument(bytes(raw), _RAW_OPTIONS)["_id"]
    if isinstance(value, RawBSONDocument):  # a compound _id: decode just that sub-document
        return bson.decode(value.raw, CODEC_OPTIONS)
    return value


def _index_bounds(lower: Any, upper: Any) -> dict[str, dict[str, Any]]:
    """A range's `min`/`max` on the `_id` index, as a find command takes them (none for an open end)."""
    bounds = {}
    if not isinstance(lower, MinKey):
        bounds["min"] = {"_id": lower}
    if not isinstance(upper, MaxKey):
        bounds["max"] = {"_id": upper}
    return bounds


def _range_cursor(collection: Collection, query: dict[str, Any], lower: Any, upper: Any, **kwargs: Any):
    cursor = collection.find_raw_batches(query, batch_size=READ_BATCH, **kwargs)
    cursor = cursor.sort(_ID_INDEX).hint(_ID_INDEX)
    bounds = _index_bounds(lower, upper)
    if "min" in bounds:
        cursor = cursor.min(list(bounds["min"].items()))
    if "max" in bounds:
        cursor = cursor.max(list(bounds["max"].items()))
    return cursor


def range_batches(
    client: Any, source: SourceCollection, lower: Any, upper: Any, after: Timestamp | None = None
) -> Iterator[list[bytes]]:
    """Every matching document of [lower, upper) as raw BSON, in `_id` order, in one read, a server
    batch at a time.

    With `after`, the read is causally consistent with that cluster time: a change
    the ledger recorded is visible even when reading from a secondary that lags.
    """
    yield from RangeRead(client, source, lower, upper, after).batches()


class RangeRead:
    """One ordered read of [lower, upper), begun at once: the server prepares its first batch from
    here on, while the caller does something else (see `read_ahead`). Closed when read to the end,
    or by `close`; with `owns_client`, the client is closed with it."""

    def __init__(
        self,
        client: Any,
        source: SourceCollection,
        lower: Any,
        upper: Any,
        after: Timestamp | None,
        owns_client: bool = False,
        ahead_bytes: int = PREFETCH_BYTES,
    ):
        session = client.start_session(causal_consistency=True)
        try:
            if after is not None:
                session.advance_operation_time(after)
            collection = source.open(client)
            if _one_server_answers(client, collection):
                cursor: Any = _RawFind(collection, source.query, lower, upper, after, session)
            else:
                cursor = _SplitBatches(_range_cursor(collection, source.query, lower, upper, session=session))
        except BaseException:
            session.end_session()
            raise

        def release() -> None:
            session.end_session()
            if owns_client:
                client.close()

        self.prefetch = _Prefetch(cursor, release, ahead_bytes)

    def batches(self) -> Iterator[list[bytes]]:
        """The documents, a server batch at a time: the per-document work is the caller's to do
        where it needs it (a first load reads one `_id` per bucket, not one per document)."""
        try:
            yield from self.prefetch
        finally:
            self.close()

    def fetch_ahead(self, ahead_bytes: int) -> None:
        """From now on fetch up to `ahead_bytes` of raw BSON ahead of the reader."""
        self.prefetch.limit(ahead_bytes)

    def close(self) -> None:
        self.prefetch.close()


def _one_server_answers(client: Any, collection: Collection) -> bool:
    """Whether every command of a read goes to the server that holds its cursor: one server, or
    a replica set's primary read from the primary. Not so with several mongos, or reads from
    secondaries: there only pymongo's cursor knows where to send a getMore."""
    kind = client.topology_description.topology_type_name
    return kind == "Single" or (
        kind == "ReplicaSetWithPrimary" and collection.read_preference == ReadPreference.PRIMARY
    )


class _RawFind:
    """A `_id`-ordered find and its getMores sent as commands whose replies stay raw bytes.

    pymongo's raw-batch cursor makes a Python object of every document of a reply, twice,
    only to join them into one buffer again: on a fast server that is most of a reader's
    time. Here a reply's batch is cut into documents by reading BSON lengths, nothing
    decoded. Iterating yields each batch as a list of documents (raw BSON, in `_id` order).
    Used only where every command reaches the cursor's server (`_one_server_answers`).
    """

    def __init__(
        self,
        collection: Collection,
        query: dict[str, Any],
        lower: Any,
        upper: Any,
        after: Timestamp | None,
        session: Any,
    ) -> None:
        # The filter is encoded as the collection's own read encodes it (its UUID representation
        # among them); replies are kept raw.
        self.codec_options = collection.codec_options.with_options(document_class=RawBSONDocument)
        self.database = collection.database
        self.name = collection.name
        self.session = session
        self.cursor_id = 0
        read_concern: dict[str, Any] = {"level": "majority"}
        if after is not None:
            read_concern["afterClusterTime"] = after
        self.find: dict[str, Any] = {
            "find": self.name,
            "filter": query,
            "sort": {"_id": 1},
            "hint": {"_id": 1},
            "batchSize": READ_BATCH,
            "readConcern": read_concern,
            **_index_bounds(lower, upper),
        }

    def _command(self, command: dict[str, Any]) -> list[bytes]:
        reply = self.database.command(
            command,
            session=self.session,
            read_preference=ReadPreference.PRIMARY,
            codec_options=self.codec_options,
        )
        self.cursor_id, documents = cursor_batch(bytes(reply["cursor"].raw))  # a view of the reply
        return documents

    def __iter__(self) -> Iterator[list[bytes]]:
        try:
            documents = self._command(self.find)
        except ConnectionFailure:  # retried once, as pymongo retries a find (a getMore is not)
            documents = self._command(self.find)
        while True:
            if documents:
                yield documents
            if not self.cursor_id:
                return
            documents = self._command(
                {"getMore": Int64(self.cursor_id), "collection": self.name, "batchSize": READ_BATCH}
            )

    def close(self) -> None:
        """Kill the server's cursor if the read stopped before its end."""
        cursor_id, self.cursor_id = self.cursor_id, 0
        if cursor_id:
            with contextlib.suppress(Exception):  # the server drops idle cursors itself
                self.database.command(
                    {"killCursors": self.name, "cursors": [Int64(cursor_id)]},
                    session=self.session,
                    read_preference=ReadPreference.PRIMARY,
                )


# Sizes of the values a cursor reply's fields can hold, by BSON type (strings and documents
# carry their own length).
_FIXED_SIZES = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16}


def cursor_batch(cursor: bytes) -> tuple[int, list[bytes]]:
    """The id and the documents of a reply's `cursor` sub-document (raw BSON): each document
    its own bytes, sliced by its length, none decoded."""
    unpack, cursor_id, documents = _LENGTH.unpack_from, 0, []
    position, end = 4, len(cursor) - 1
    while position < end:
        kind = cursor[position]
        key_end = cursor.index(b"\x00", position + 1)
        key, position = cursor[position + 1 : key_end], key_end + 1
        if kind == 0x04 and key in (b"firstBatch", b"nextBatch"):
            (size,) = unpack(cursor, position)
            documents, position = _array_documents(cursor, position, position + size), position + size
        elif kind == 0x12 and key == b"id":
            (cursor_id,) = _INT64.unpack_from(cursor, position)
            position += 8
        elif kind in (0x02, 0x0D, 0x0E):  # strings: a length, then the bytes
            position += 4 + unpack(cursor, position)[0]
        elif kind in (0x03, 0x04):
            position += unpack(cursor, position)[0]
        elif kind == 0x05:
            position += 5 + unpack(cursor, position)[0]
        elif kind in _FIXED_SIZES:
            position += _FIXED_SIZES[kind]
        else:
            raise bson.InvalidBSON(f"unexpected BSON type {kind:#04x} in a cursor reply")
    return cursor_id, documents


def _array_documents(raw: bytes, start: int, stop: int) -> list[bytes]:
    """The documents of a BSON array of documents spanning raw[start:stop]."""
    documents, unpack, find = [], _LENGTH.unpack_from, raw.index
    position, end = start + 4, stop - 1
    while position < end:
        if raw[position] != 0x03:
            raise bson.InvalidBSON(f"a cursor batch holds a BSON type {raw[position]:#04x}, not a document")
        position = find(b"\x00", position + 1) + 1  # past the array index
        (length,) = unpack(raw, position)
        documents.append(raw[position : position + length])
        position += length
    if position != end:
        raise bson.InvalidBSON("a cursor batch's lengths do not add up")
    return documents


class _SplitBatches:
    """pymongo's raw-batch cursor, each batch cut into its documents."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def __iter__(self) -> Iterator[list[bytes]]:
        for batch in self.cursor:
            yield raw_documents(batch)

    def close(self) -> None:
        self.cursor.close()


_DONE = object()


class _Prefetch:
    """The cursor's batches (each a list of raw documents), fetched by a thread (from construction
    on) while the caller works on the previous one: the server's time and ours overlap (the socket
    wait releases the GIL).

    The thread fetches ahead while the batches waiting for the caller hold less than
    `ahead_bytes` (always at least one batch): memory is bounded by bytes, not by batches.

    The thread that uses the cursor also closes it, and calls `release` (a cursor is not
    thread-safe): when the read ends, or once the call in flight returns after `close`."""

    def __init__(
        self, cursor: Any, release: Callable[[], None] | None = None, ahead_bytes: int = PREFETCH_BYTES
    ) -> None:
        self.cursor = cursor
        self.release = release
        self.ahead_bytes = ahead_bytes
        self.waiting: collections.deque = collections.deque()
        self.waiting_bytes = 0
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._fetch, name="aries prefetch", daemon=True)
        self.thread.start()

    def _fetch(self) -> None:
        try:
            for batch in self.cursor:
                if not self._hand_over(batch, sum(map(len, batch))):
                    return
            self._hand_over(_DONE, 0)
        except BaseException as error:  # handed to the reader, raised there
            self._hand_over(error, 0)
        finally:
            with contextlib.suppress(Exception):
                self.cursor.close()
            if self.release is not None:
                with contextlib.suppress(Exception):
                    self.release()

    def _hand_over(self, item: Any, size: int) -> bool:
        """Queue `item` for the reader once there is room; False once the reader has closed the read."""
        with self.changed:
            while self.waiting and self.waiting_bytes + size > self.ahead_bytes and not self.stop.is_set():
                self.changed.wait()
            if self.stop.is_set():
                return False
            self.waiting.append((item, size))
            self.waiting_bytes += size
            self.changed.notify_all()
            return True

    def limit(self, ahead_bytes: int) -> None:
        """Fetch ahead up to `ahead_bytes` from now on (what already waits stays)."""
        with self.changed:
            self.ahead_bytes = ahead_bytes
            self.changed.notify_all()

    def __iter__(self) -> Iterator[list[bytes]]:
        while True:
            with self.changed:
                while not self.waiting and not self.stop.is_set():
                    self.changed.wait()
                if not self.waiting:
                    return  # closed: nothing more comes
                item, size = self.waiting.popleft()
                self.waiting_bytes -= size
                self.changed.notify_all()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop fetching and drop what waits. Nothing waits for the thread: it ends (and closes the
        cursor) when its call in flight returns."""
        with self.changed:
            self.stop.set()
            self.waiting.clear()
            self.waiting_bytes = 0
            self.changed.notify_all()


class UnsupportedCollection(RuntimeError):
    """A collection Aries cannot keep exact yet; the message names it and says why."""


def check_collection(client: Any, source: SourceCollection, synced_before: bool) -> None:
    """Refuse a collection Aries cannot keep exact, in one round trip.

    - Not there: a typo in the config, or a drop or rename. A dropped collection is not
      mirrored as empty: the lake and warehouse keep its last copy until someone decides
      (remove it from the config, or recreate it).
    - A default collation that orders strings unlike BSON's byte order. Bucket ranges are
      `_id` ranges in BSON order; under a locale collation the server's `min`/`max` bounds
      would follow another order and buckets would overlap.
    """
    found = list(client[source.database].list_collections(filter={"name": source.collection}))
    if not found:
        if synced_before:
            raise UnsupportedCollection(
                f"{source.label}: the collection was dropped or renamed in MongoDB; the lake and warehouse "
                "keep its last copy. Remove it from the config, or recreate it to sync it again"
            )
        raise UnsupportedCollection(
            f"{source.label}: no such collection in database {source.database!r}; check the database and "
            "collection names in the config"
        )
    collation = (found[0].get("options") or {}).get("collation")
    if collation and collation.get("locale", "simple") != "simple":
        raise UnsupportedCollection(
            f"{source.label}: its default collation is {collation.get('locale')!r}, which orders string "
            "`_id`s differently from the byte order Aries buckets by; Aries does not support it yet. "
            "Remove the collection from the config, or sync a view or copy with the simple collation"
        )
