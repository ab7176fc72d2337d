"""MongoDB change streams: which buckets changed since a resume token.

`aries sync` and the Dagster sensor both call `plan_sync`: read the change
stream from a token for a bounded time, map every changed `_id` to its bucket,
open new buckets when the newest fills, and hand back the buckets to rewrite
with the token to resume from once they are written. When the stream cannot
resume (the token fell off the oplog, or the collection was dropped or
renamed), the whole collection is re-read and only buckets whose content hash
changed are rewritten: no silent gap.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass, field
from typing import Any

from bson import Timestamp, json_util
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from aries_assets.core import snapshot
from aries_assets.core.arrow import CODEC_OPTIONS
from aries_assets.core.buckets import BucketMap, plan_buckets
from aries_assets.core.extract import SourceCollection, scan_bucket_ids
from aries_assets.core.lake import Lake, bucket_file, collection_prefix, load_bucket_map, save_bucket_map

ResumeToken = dict[str, Any]

# ChangeStreamHistoryLost, ChangeStreamFatalError, InvalidResumeToken; SecantusDB answers
# FailedToParse for a token it cannot place.
HISTORY_LOST_CODES = {286, 280, 260, 9}
INVALIDATING = {"invalidate", "drop", "rename", "dropDatabase"}
DOCUMENT_EVENTS = {"insert", "update", "replace", "delete"}
_PROJECTION = [{"$project": {"operationType": 1, "documentKey": 1, "clusterTime": 1, "wallTime": 1}}]


def token_to_text(token: ResumeToken | None) -> str | None:
    return None if token is None else json_util.dumps(token, json_options=json_util.CANONICAL_JSON_OPTIONS)


def token_from_text(text: str | None) -> ResumeToken | None:
    return None if not text else json_util.loads(text, json_options=json_util.CANONICAL_JSON_OPTIONS)


def stream_file(database: str, collection: str) -> str:
    return f"{collection_prefix(database, collection)}/_aries/stream.json"


def load_token(lake: Lake, source: SourceCollection) -> ResumeToken | None:
    text = lake.read_text(stream_file(source.database, source.collection))
    return token_from_text(json.loads(text)["token"]) if text else None


def save_token(lake: Lake, source: SourceCollection, token: ResumeToken) -> None:
    body = {"token": token_to_text(token), "saved_at": datetime.datetime.now(datetime.UTC).isoformat()}
    lake.write_text(stream_file(source.database, source.collection), json.dumps(body))


def current_token(collection: Collection) -> ResumeToken:
    """A token for "now": changes after it are read by the next catch-up."""
    with collection.watch(_PROJECTION, max_await_time_ms=1) as stream:
        stream.try_next()
        return stream.resume_token


@dataclass
class ChangeBatch:
    """Changes read from the stream in one bounded pass."""

    ids: list[Any] = field(default_factory=list)  # changed `_id`s, in stream order
    inserted: list[Any] = field(default_factory=list)
    token: ResumeToken | None = None  # resume here next time
    events: int = 0
    caught_up: bool = False  # the stream had nothing more to give
    history_lost: str | None = None  # why the stream cannot resume, if it cannot
    newest_change: datetime.datetime | None = None


def read_changes(
    collection: Collection, token: ResumeToken, max_events: int = 10_000, max_seconds: float = 20.0
) -> ChangeBatch:
    """Read changes after `token` until caught up, `max_events` or `max_seconds`."""
    batch = ChangeBatch(token=token)
    deadline = time.monotonic() + max_seconds
    watched = collection.with_options(codec_options=CODEC_OPTIONS)
    try:
        with watched.watch(_PROJECTION, resume_after=token, max_await_time_ms=200, batch_size=5000) as stream:
            while batch.events < max_events and time.monotonic() < deadline:
                change = stream.try_next()
                if change is None:
                    batch.caught_up = True
                    break
                operation = change["operationType"]
                if operation in INVALIDATING:
                    batch.history_lost = f"{operation} event on the collection"
                    return batch
                batch.events += 1
                if operation in DOCUMENT_EVENTS:
                    _id = change["documentKey"]["_id"]
                    batch.ids.append(_id)
                    if operation == "insert":
                        batch.inserted.append(_id)
                batch.newest_change = _change_time(change) or batch.newest_change
            # After the last event read, or the server's post-batch token when idle:
            # a quiet collection's token still moves forward with the oplog.
            batch.token = stream.resume_token
    except OperationFailure as error:
        if error.code in HISTORY_LOST_CODES:
            batch.history_lost = f"the resume token is no longer in the oplog ({error.code})"
            return batch
        raise
    return batch


def _change_time(change: dict[str, Any]) -> datetime.datetime | None:
    wall = change.get("wallTime")
    if isinstance(wall, datetime.datetime):
        return wall if wall.tzinfo else wall.replace(tzinfo=datetime.UTC)
    cluster = change.get("clusterTime")
    if isinstance(cluster, Timestamp):
        return cluster.as_datetime()
    return None


def changed_buckets(
    source: SourceCollection,
    collection: Collection,
    lake: Lake,
    bucket_map: BucketMap,
    batch: ChangeBatch,
) -> tuple[list[str], list[str]]:
    """Buckets touched by the changes, and buckets opened because inserts filled one up."""
    touched: dict[str, None] = {}
    inserts: dict[str, int] = {}
    for _id in batch.ids:
        touched[bucket_map.find(_id).key] = None
    for _id in batch.inserted:
        key = bucket_map.find(_id).key
        inserts[key] = inserts.get(key, 0) + 1
    size = bucket_map.bucket_size
    opened: list[str] = []
    for bucket in [b for b in bucket_map.buckets if b.key in inserts]:
        limit = size if bucket.is_last else 2 * size
        if documents_in_file(source, lake, bucket.key) + inserts[bucket.key] <= limit:
            continue
        # Re-plan just this range from its `_id`s: the newest bucket closes, a swollen one splits.
        ids = ((i, b"") for i in scan_bucket_ids(source, collection, bucket))
        sub = plan_buckets(ids, BucketMap(size, [bucket.lower]), size)
        for lower in sub.bucket_map.lowers[1:]:
            bucket_map.add_lower(lower)
        opened += sub.new_keys
    if opened:
        save_bucket_map(lake, source.database, source.collection, bucket_map)
    keys = bucket_map.keys
    return sorted(set(touched) | set(opened), key=keys.index), opened


def documents_in_file(source: SourceCollection, lake: Lake, key: str) -> int:
    metadata = lake.parquet_metadata(bucket_file(source.database, source.collection, key)) or {}
    return int(metadata.get(snapshot.META_COUNT, 0))


@dataclass
class SyncPlan:
    """The buckets to write now for one collection, and the token to resume from after."""

    buckets: list[str]
    new_buckets: list[str]
    token: ResumeToken | None
    mode: str  # "stream", "initial load", or "re-read: <why>"
    events: int = 0
    caught_up: bool = True
    newest_change: datetime.datetime | None = None
    counts: dict[str, int] | None = None  # documents per bucket, when the pass counted them

    @property
    def lag_seconds(self) -> float:
        if self.newest_change is None or self.caught_up:
            return 0.0
        return max(0.0, (datetime.datetime.now(datetime.UTC) - self.newest_change).total_seconds())


def plan_sync(
    source: SourceCollection,
    collection: Collection,
    lake: Lake,
    bucket_size: int,
    token: ResumeToken | None,
    full: bool = False,
    max_events: int = 10_000,
    max_seconds: float = 20.0,
) -> SyncPlan:
    """What to write: the buckets changed since `token`, or, when there is no usable token,
    every bucket whose content differs from its file (the whole collection is re-read)."""
    bucket_map = load_bucket_map(lake, source.database, source.collection)
    if bucket_map is None:
        mode = "initial load"
    elif full:
        mode = "re-read: requested"
    elif token is None:
        mode = "re-read: no resume token"
    else:
        batch = read_changes(collection, token, max_events, max_seconds)
        if not batch.history_lost:
            keys, opened = changed_buckets(source, collection, lake, bucket_map, batch)
            return SyncPlan(
                keys, opened, batch.token, "stream", batch.events, batch.caught_up, batch.newest_change
            )
        mode = f"re-read: {batch.history_lost}"
    # The token comes first: whatever changes while the collection is read is replayed after.
    fresh = current_token(collection)
    result = snapshot.plan(source, collection, lake, bucket_size)
    files = snapshot.inspect_files(source, lake, result.bucket_map.keys)
    return SyncPlan(snapshot.content_stale(result, files), result.new_keys, fresh, mode, counts=result.counts)
