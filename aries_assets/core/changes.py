"""MongoDB change streams: read what changed, and record it in the collections' ledgers.

One stream serves a whole **scope**: a database (the default), a single
collection, or the deployment. It starts at the oldest position among the
scope's collections (`startAtOperationTime`, inclusive: a change read twice
only marks its bucket dirty twice), routes each document change to its
collection, and `record_changes` writes the dirty buckets into each ledger
before moving that ledger's position. The sensor, a run catching up and
`aries sync` all call `record_changes`; nothing else reads the stream.

When the stream cannot resume (the position fell off the oplog, or the
collection was dropped or renamed), the ledger asks for a re-read: the next
run reads the whole collection once and rewrites only buckets whose content
changed. No silent gap.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from bson import Timestamp, json_util
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from aries_assets.core.extract import CODEC_OPTIONS, SourceCollection
from aries_assets.core.lake import STATE_DIR, Lake, each_at_once, safe_segment
from aries_assets.core.ledger import Ledger, LedgerStore, later, now_iso

_CANONICAL = json_util.CANONICAL_JSON_OPTIONS
_log = logging.getLogger(__name__)

ScopeKind = Literal["database", "collection", "deployment"]

# ChangeStreamHistoryLost, ChangeStreamFatalError, InvalidResumeToken; SecantusDB answers
# FailedToParse for a position it cannot place.
HISTORY_LOST_CODES = {286, 280, 260, 9}
INVALIDATING = {"invalidate", "drop", "rename", "dropDatabase"}
DOCUMENT_EVENTS = ["insert", "update", "replace", "delete"]


@dataclass(frozen=True)
class StreamScope:
    """The collections one change stream serves."""

    name: str
    kind: ScopeKind
    members: tuple[SourceCollection, ...]

    def watch_target(self, client: MongoClient) -> Any:
        first = self.members[0]
        if self.kind == "collection":
            return first.open(client).with_options(codec_options=CODEC_OPTIONS)
        if self.kind == "database":
            return client.get_database(first.database, codec_options=CODEC_OPTIONS)
        return client.with_options(codec_options=CODEC_OPTIONS)

    def pipeline(self) -> list[dict[str, Any]]:
        watched = [
            {"ns.db": m.database, "ns.coll": m.collection} for m in self.members
        ]  # drops and renames of a member matter too
        # invalidate and dropDatabase carry no collection name, and must get through.
        watched.append({"operationType": {"$in": ["invalidate", "dropDatabase"]}})
        return [
            {"$match": {"$or": watched}},
            {"$project": {"operationType": 1, "documentKey": 1, "clusterTime": 1, "wallTime": 1, "ns": 1}},
        ]


def scopes_of(sources: Sequence[SourceCollection], kind: ScopeKind) -> list[StreamScope]:
    """Group the configured collections into streams: one per database, per collection, or one in all."""
    if kind == "deployment":
        return [StreamScope("deployment", kind, tuple(sources))]
    if kind == "collection":
        return [StreamScope(s.label, kind, (s,)) for s in sources]
    by_db: dict[str, list[SourceCollection]] = {}
    for source in sources:
        by_db.setdefault(source.database, []).append(source)
    return [StreamScope(db, kind, tuple(members)) for db, members in by_db.items()]


def majority_time(client: MongoClient, source: SourceCollection) -> Timestamp:
    """A cluster time every majority-committed change at or before which a stream opened now delivers."""
    with client.start_session(causal_consistency=True) as session:
        source.open(client).find_one({"_id": None}, {"_id": 1}, session=session)
        return session.operation_time


@dataclass(frozen=True)
class StreamMark:
    """Where a first load starts: its collection's stream token, then the cluster time after it."""

    token: dict[str, Any] | None
    start: Timestamp


def mark_stream(client: MongoClient, source: SourceCollection) -> StreamMark:
    """The collection's own stream marked first, then the cluster time: nothing is written yet.

    Every change after the mark is in the stream, and every change before the
    returned time is in a causal read at that time. (Resuming after a token is an
    index lookup on every server; starting at a time is a scan of the oplog on some.)
    """
    scope = collection_scope(source)
    with scope.watch_target(client).watch(scope.pipeline(), max_await_time_ms=1) as stream:
        stream.try_next()
        token = stream.resume_token
    return StreamMark(token, majority_time(client, source))


def adopt_mark(lake: Lake, source: SourceCollection, mark: StreamMark) -> Timestamp:
    """Save the mark's token as the collection's own stream position (the lease holder only): the run
    that loads catches up from it. Returns where the load's read starts."""
    if mark.token is not None:
        save_scope_token(lake, collection_scope(source), mark.token, {source.label})
    return mark.start


def stream_start(client: MongoClient, lake: Lake, source: SourceCollection) -> Timestamp:
    """Where a first load starts, marked and saved now (see `mark_stream`)."""
    return adopt_mark(lake, source, mark_stream(client, source))


def collection_scope(source: SourceCollection) -> StreamScope:
    """The stream of one collection: a run catching up on its own changes reads it."""
    return StreamScope(source.label, "collection", (source,))


def oplog_start(client: MongoClient) -> Timestamp | None:
    """The oldest cluster time still in the oplog, where the user may read it (None otherwise).

    Some servers start a stream at a time older than their oplog without an error;
    checking first is what makes a lost history visible on all of them.
    """
    try:
        entry = client.local["oplog.rs"].find_one({}, {"ts": 1}, sort=[("$natural", 1)])
    except (OperationFailure, PyMongoError):
        return None
    return entry.get("ts") if entry else None


@dataclass
class CollectionChanges:
    ids: list[tuple[Any, Timestamp]] = field(default_factory=list)  # changed `_id` and its cluster time
    lost: str | None = None  # dropped or renamed: the collection must be re-read
    newest_wall: datetime.datetime | None = None


@dataclass
class ScopeChanges:
    """What one bounded read of a scope's stream found."""

    by_collection: dict[str, CollectionChanges]
    position: Timestamp  # every change at or before it has been read (when caught up)
    caught_up: bool
    events: int = 0
    history_lost: str | None = None
    token: dict[str, Any] | None = None  # resume here next time (the server checks it is still in the oplog)


def read_changes(
    client: MongoClient,
    scope: StreamScope,
    start: Timestamp | None,
    max_events: int = 20_000,
    max_seconds: float = 3.0,
    token: dict[str, Any] | None = None,
    check_oplog: bool = True,
) -> ScopeChanges:
    """Read the scope's changes after `token`, or from `start`, or (neither) from now, until caught
    up, `max_events` or `max_seconds`."""
    now = majority_time(client, scope.members[0])
    labels = {(m.database, m.collection): m.label for m in scope.members}
    result = ScopeChanges({m.label: CollectionChanges() for m in scope.members}, start or now, False)
    deadline = time.monotonic() + max_seconds
    last: Timestamp | None = None
    operation = None
    if token is None and start is not None and check_oplog:
        # A time, unlike a token, is not checked by every server: check it against the oplog.
        oldest = oplog_start(client)
        if oldest is not None and start < oldest:
            result.history_lost = "the stream position is no longer in the oplog"
            result.position = now
            return result
    where: dict[str, Any] = {}
    if token is not None:
        where = {"resume_after": token}
    elif start is not None:
        where = {"start_at_operation_time": start}
    try:
        with scope.watch_target(client).watch(
            scope.pipeline(), max_await_time_ms=100, batch_size=5000, **where
        ) as stream:
            resume_at = None  # set when the read stops before a change it took from the stream
            while True:
                # At least one read, however slow opening the stream was. Past the limit the read
                # ends only between cluster times: every change of a transaction carries one, and
                # a change at the newest time recorded is taken for one recorded already.
                full = result.events and (result.events >= max_events or time.monotonic() >= deadline)
                if full and last is None:
                    break
                before = stream.resume_token
                change = stream.try_next()
                if change is None:
                    result.caught_up = True
                    break
                when = change.get("clusterTime")
                if full and when != last:
                    resume_at = before  # the next read starts with this change
                    break
                result.events += 1
                operation = change["operationType"]
                ns = change.get("ns") or {}
                label = labels.get((ns.get("db"), ns.get("coll")))
                last = when or last
                if operation == "invalidate":
                    # The stream ends after a drop or rename; the next read starts just past it.
                    last = Timestamp(when.time, when.inc + 1) if when else last
                    break
                if operation == "dropDatabase":
                    for changes in result.by_collection.values():
                        changes.lost = "dropDatabase event"
                    continue
                if label is None:
                    continue
                changes = result.by_collection[label]
                if operation in INVALIDATING:
                    changes.lost = f"{operation} event on the collection"
                elif operation in DOCUMENT_EVENTS:
                    changes.ids.append((change["documentKey"]["_id"], when))
                    wall = change.get("wallTime")
                    if isinstance(wall, datetime.datetime):
                        changes.newest_wall = wall if wall.tzinfo else wall.replace(tzinfo=datetime.UTC)
            result.token = resume_at or stream.resume_token
    except OperationFailure as error:
        if error.code in HISTORY_LOST_CODES:
            result.history_lost = f"the stream position is no longer in the oplog ({error.code})"
            result.position = now
            return result
        raise
    if result.caught_up:
        result.position = max(now, last) if last else now
    elif last is not None and operation == "invalidate":
        result.position = last
    elif last is not None:
        result.position = last  # stopped between cluster times: every change up to `last` is read
    return result


@dataclass
class Recorded:
    """What recording a scope's changes did to one collection's ledger."""

    ledger: Ledger
    marked: int
    events: int
    lag_seconds: float


def scope_file(scope: StreamScope) -> str:
    """Where a scope's stream keeps its resume token: at the lake's root, beside the databases."""
    return f"{STATE_DIR}/streams/{safe_segment(f'{scope.kind}-{scope.name}')}.json"


def _scope_body(lake: Lake, scope: StreamScope) -> dict[str, Any] | None:
    text = lake.read_text(scope_file(scope))
    return json_util.loads(text, json_options=_CANONICAL) if text else None


def load_scope_token(lake: Lake, scope: StreamScope) -> tuple[dict[str, Any] | None, set[str]]:
    """The scope's resume token, and the collections whose every change before it is recorded."""
    body = _scope_body(lake, scope) or {}
    return body.get("token"), set(body.get("members", []))


def save_scope_token(
    lake: Lake,
    scope: StreamScope,
    token: dict[str, Any] | None,
    members: set[str],
    waiting: list[str] | None = None,
) -> None:
    body = {
        "token": token,
        "members": sorted(members) if token else [],
        "waiting": waiting or [],  # collections whose ledgers ask for work: what a serving run polls
        "saved_at": now_iso(),
    }
    lake.write_text(scope_file(scope), json_util.dumps(body, json_options=_CANONICAL))


def waiting_collections(lake: Lake, scope: StreamScope) -> list[str] | None:
    """The collections the scope's last recording found with work waiting (None: never recorded)."""
    body = _scope_body(lake, scope)
    return None if body is None else list(body.get("waiting", []))


def scope_start(ledgers: dict[str, Ledger]) -> Timestamp | None:
    """The oldest position among collections that can record (a time to start a stream at, when
    there is no token to resume after).

    A collection still in its first load is left out: its load run catches it up
    from its own position when the bucket map exists.
    """
    positions = [led.position for led in ledgers.values() if led.loaded and led.position is not None]
    return min(positions) if positions else None


def record_changes(
    client: MongoClient,
    lake: Lake,
    scope: StreamScope,
    max_events: int = 20_000,
    max_seconds: float = 3.0,
    idle_persist_seconds: float = 10.0,
    check_oplog: bool = True,
) -> tuple[dict[str, Recorded], ScopeChanges | None]:
    """Read the scope's stream after its token and record the changes in every ledger.

    A ledger's position moves only in the same write that records its dirty
    buckets, and the token only after every ledger is written, so a crash between
    reading and recording reads the changes again. An idle ledger's position is
    saved only when it moved `idle_persist_seconds`.

    **Joining.** A collection whose changes before the scope's token nobody recorded (the
    scope's first read, a first load that finished since, a new entry in the config)
    joins through its own stream: its first load saved that stream's token, so after
    this read of the scope, its own stream is read from there until caught up. Both are
    resumed after tokens. A stream started at a time is not exact on every server:
    SecantusDB places a start time past writes still being committed, and loses them.
    So a scope with no token is opened at the present, never at its oldest position; only
    a collection with no token of its own (a lake of an older Aries, a lost history) starts
    at its position. `check_oplog=False` skips checking that time against the oplog (a
    scan on some servers): only for a position the caller recorded moments ago.
    """
    stores = {m.label: LedgerStore(lake, m.database, m.collection) for m in scope.members}
    ledgers = dict(zip(stores, each_at_once(LedgerStore.load, stores.values()), strict=True))
    loaded = {label for label, led in ledgers.items() if led.loaded and led.position is not None}
    if not loaded:
        return {label: Recorded(led, 0, 0, 0.0) for label, led in ledgers.items()}, None
    deadline = time.monotonic() + max_seconds
    token, members = load_scope_token(lake, scope)
    members &= loaded
    if token is None and scope.kind == "collection":
        # The collection's own stream, with no token: a first load split into ranges, a lake of an
        # older Aries, a lost history. Start at its position.
        changes = read_changes(
            client, scope, scope_start(ledgers), max_events, max_seconds, None, check_oplog
        )
        recorded = _record(stores, ledgers, changes, idle_persist_seconds, by_position=True)
        joined = set() if changes.history_lost else loaded
    else:
        changes = read_changes(client, scope, None, max_events, max_seconds, token)
        joining = loaded - members
        recorded = _record(stores, ledgers, changes, idle_persist_seconds, False, joining)
        joined = set(members)
        if joining and not changes.history_lost:
            by_label = {m.label: m for m in scope.members}
            order = sorted(joining)  # at once, as ledgers are read: a tick over 150 new collections

            def join(label: str) -> tuple[bool, Recorded] | None:
                if time.monotonic() >= deadline and label != order[0]:
                    return None  # joins on the next read
                try:
                    return _join(
                        client,
                        lake,
                        by_label[label],
                        stores[label],
                        recorded[label].ledger,
                        max_events,
                        deadline,
                    )
                except PyMongoError as error:
                    # It joins on a later read, the others now; its changes are marked meanwhile.
                    _log.warning(
                        f"{label}: its own change stream failed ({type(error).__name__}); it joins later"
                    )
                    return None

            for label, outcome in zip(order, each_at_once(join, order), strict=True):
                if outcome is None:
                    continue
                caught_up, after = outcome
                # Its own stream read what the scope's read marked for it, or will on its next read:
                # counted once, there. (The scope's marks stand, in case that read fails.)
                recorded[label] = Recorded(
                    after.ledger,
                    after.marked,
                    after.events,
                    max(recorded[label].lag_seconds, after.lag_seconds),
                )
                if caught_up:
                    joined.add(label)
    waiting = [label for label in stores if recorded[label].ledger.needs_work()]
    # Only now, with every change before it recorded: the token the next read resumes after.
    save_scope_token(lake, scope, None if changes.history_lost else changes.token, joined, waiting)
    return recorded, changes


def _join(
    client: MongoClient,
    lake: Lake,
    source: SourceCollection,
    store: LedgerStore,
    ledger: Ledger,
    max_events: int,
    deadline: float,
) -> tuple[bool, Recorded]:
    """Catch a collection joining its scope up from its own stream. True once that stream, read
    after the scope's, is caught up: then every change before the scope's new token is recorded.
    `ledger` is as the scope's read left it."""
    own = collection_scope(source)
    token, _ = load_scope_token(lake, own)
    seconds = max(0.5, deadline - time.monotonic())
    # No token of its own (a lake of an older Aries, a lost history): only its position is left. A
    # re-read waiting does not make that read needless: it may have read a bucket already when a
    # change before the scope's token came.
    changes = read_changes(client, own, None if token else ledger.position, max_events, seconds, token)
    recorded = _record({source.label: store}, {source.label: ledger}, changes, 0.0, token is None)
    save_scope_token(lake, own, None if changes.history_lost else changes.token, {source.label})
    return changes.caught_up or bool(changes.history_lost), recorded[source.label]


def _record(
    stores: dict[str, LedgerStore],
    ledgers: dict[str, Ledger],
    changes: ScopeChanges,
    idle_persist_seconds: float,
    by_position: bool,
    joining: set[str] = frozenset(),
) -> dict[str, Recorded]:
    """Write one read's changes into each loaded ledger (each its own compare-and-swap).

    Changes another stream recorded already are skipped. Read after a token, that is by
    `recorded_through`, the newest cluster time recorded: a stream delivers in cluster time
    order and each stream's recorded changes run on from its token, so every change up to
    that time is recorded. (Not by the position: it moves to the server's majority time,
    which may be ahead of changes the stream has yet to deliver; SecantusDB publishes an
    update_many's events after answering reads at a later time.) Read from a time, the
    stream starts at the oldest position of the scope: changes at or before a collection's
    own position are recorded already.

    For a collection `joining` the scope, changes before the scope's token were not read
    by this stream: its changes are marked, but neither its `recorded_through` nor its
    position moves; its own stream, read next, moves them.
    """
    recorded: dict[str, Recorded] = {}
    updates = []  # (label, the change to its ledger, events)
    for label, ledger in ledgers.items():
        found = changes.by_collection[label]
        lost = changes.history_lost or found.lost
        if not ledger.loaded or ledger.position is None:
            recorded[label] = Recorded(ledger, 0, 0, 0.0)
            continue
        if by_position:
            fresh = [(i, t) for i, t in found.ids if t is None or t > ledger.position]
        else:
            seen = ledger.recorded_through
            fresh = [(i, t) for i, t in found.ids if t is None or seen is None or t > seen]
        moved = changes.position.time - ledger.position.time
        if not fresh and not lost and (moved < idle_persist_seconds or label in joining):
            recorded[label] = Recorded(ledger, 0, 0, 0.0)
            continue

        def record(led: Ledger, fresh=fresh, lost=lost, label=label) -> int:
            if lost:
                led.reread = {"reason": lost, "time": changes.position}
            marked = led.mark_ids([(i, t or changes.position) for i, t in fresh])
            if label not in joining:
                times = [t for _, t in fresh if t is not None]
                led.recorded_through = later(led.recorded_through, max(times) if times else None)
                led.advance(changes.position)
            return marked

        updates.append((label, record, len(fresh)))
    done = each_at_once(lambda update: stores[update[0]].update(update[1]), updates)
    for (label, _, events), (ledger, marked) in zip(updates, done, strict=True):
        found = changes.by_collection[label]
        lag = 0.0
        if found.newest_wall is not None and not changes.caught_up:
            lag = max(0.0, (datetime.datetime.now(datetime.UTC) - found.newest_wall).total_seconds())
        recorded[label] = Recorded(ledger, marked, events, lag)
    return recorded


def follow_changes(client: MongoClient, lake: Lake, scope: StreamScope) -> bool:
    """Record the scope's changes if any came after its saved token: what a run serving the scope
    does between the sensor's ticks, so a change waits for neither. One round trip when there
    are none; the sensor's own recording of the same changes only marks them twice."""
    token, _ = load_scope_token(lake, scope)
    if token is None:
        return False  # nothing recorded yet: the sensor's first read saves one
    with scope.watch_target(client).watch(
        scope.pipeline(), max_await_time_ms=50, resume_after=token
    ) as stream:
        if stream.try_next() is None:
            return False
    record_changes(client, lake, scope, max_seconds=1.0)
    return True
