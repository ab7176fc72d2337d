"""Bring one collection's lake files and warehouse table up to date: the one path every run takes.

A Dagster run started by the sensor, a bucket materialized from the UI and
`aries sync` all call `sync_collection`. Under the collection's lease it reads
the ledger and does what it asks, in one ordered read per stretch of buckets:

- **first load**: stream the whole collection once in `_id` order, cutting
  buckets on the fly, and hand finished buckets to parallel writers;
- **re-read** (history lost, `--full`): the same single pass, rewriting only
  buckets whose documents or options changed;
- **changes**: read each run of adjacent dirty buckets in one range read.

Then it settles the collection schema (rewriting files that disagree),
removes files no bucket names, updates Glue, loads every bucket the warehouse
does not hold as it is in the lake, and only then clears the ledger entries it
covered. Any failure leaves them dirty for the next run; nothing is lost.

A first load split into `_id` ranges (`aries split`) is read by `sync_range`,
one run per range, several at once; the next whole-collection run settles it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import hashlib
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from bson import Timestamp, json_util
from bson.max_key import MaxKey
from bson.min_key import MinKey
from pymongo import MongoClient

from aries_assets.core import arrow, catalog, read_ahead, snapshot
from aries_assets.core import schema as s
from aries_assets.core.buckets import Bucket, BucketCutter, BucketDocuments, BucketMap
from aries_assets.core.changes import (
    StreamMark,
    adopt_mark,
    collection_scope,
    majority_time,
    record_changes,
    stream_start,
)
from aries_assets.core.extract import SourceCollection, check_collection, range_batches, raw_id
from aries_assets.core.lake import Lake, LakeSpec, bucket_file, collection_prefix, remove_temporary_files
from aries_assets.core.ledger import DirtyBucket, Lease, LeaseHeld, Ledger, LedgerStore, later, now_iso
from aries_assets.core.ordering import sort_key
from aries_assets.core.warehouse import TableRef
from aries_assets.core.warehouse.loader import (
    BucketLoad,
    BucketRefused,
    LoadedBucket,
    Loader,
    RebuildNeeded,
    oversize_documents,
)

DEFAULT_BUCKET_BYTES = 64 * 1024 * 1024
MAX_SCHEMA_ROUNDS = 3
MAX_LINGER_SECONDS = 600  # a run that keeps following a busy collection ends after this, and the next begins


@dataclass(frozen=True)
class CollectionSpec:
    """What the engine needs to know about one configured collection."""

    source: SourceCollection
    bucket_size: int
    options: s.SchemaOptions
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    table: TableRef | None = None

    @property
    def written_with(self) -> str:
        """A fingerprint of what shapes every file of the collection: its schema options and its query."""
        query = json_util.dumps(
            self.source.query, json_options=json_util.CANONICAL_JSON_OPTIONS, sort_keys=True
        )
        body = f"{snapshot.options_fingerprint(self.options)}\n{query}"
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class SyncSettings:
    workers: int = 2  # bucket writers in parallel (processes)
    lease_seconds: float = 30.0
    lease_wait_seconds: float = 120.0
    linger_seconds: float = 0.0  # keep following the collection's changes this long after catching up
    catch_up_rounds: int = 50
    catch_up: bool = True  # read the collection's own stream after each round (off when a sensor does)


class Reporter(Protocol):
    """How the engine tells the outside world what it does (Dagster events, a terminal)."""

    def message(self, text: str) -> None: ...

    def progress(self, documents: int, nbytes: int, total: int | None) -> None: ...

    def bucket_written(self, written: snapshot.WrittenBucket, bucket_range: str) -> None: ...

    def bucket_loaded(
        self, loaded: LoadedBucket, in_file: int, in_table: int, missing: int, extra: int
    ) -> None: ...

    def buckets_added(self, keys: list[str]) -> None: ...

    def keep_lingering(self) -> bool: ...

    def wants_total(self) -> bool:
        """Whether progress is shown against a total (a count costs a scan on some servers)."""
        ...


@dataclass
class SyncOutcome:
    """What one run did to one collection; `failures` are why it failed, as whoever ran it says."""

    label: str
    mode: str = "up to date"
    documents: int = 0
    buckets: int = 0
    written: int = 0
    loaded: int = 0
    documents_read: int = 0
    bytes_out: int = 0
    rounds: int = 0
    schema_version: int = 0
    seconds: float = 0.0
    new_buckets: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Targets:
    """Where a collection goes: the lake (and how writer processes reopen it), a warehouse, Glue."""

    lake: Lake
    lake_spec: LakeSpec
    loader: Loader | None = None
    glue: Any = None


def sync_collection(
    spec: CollectionSpec,
    client: MongoClient,
    targets: Targets,
    settings: SyncSettings,
    reporter: Reporter,
    holder: str,
    run_id: str | None = None,
    keys: list[str] | None = None,
    full: bool = False,
) -> SyncOutcome:
    """Under the collection's lease: do what its ledger asks until it asks nothing more."""
    source = spec.source
    outcome = SyncOutcome(source.label)
    store = LedgerStore(targets.lake, source.database, source.collection)
    lease = Lease(targets.lake, source.database, source.collection, holder, run_id, settings.lease_seconds)
    loaded = store.load().loaded
    if not loaded and settings.workers > 1:
        # A first load: the writers' imports run now, while this process waits on MongoDB (checks,
        # the lease, the first batch), not beside the read and the writing once the documents come.
        with contextlib.suppress(Exception):  # only a head start: starting the writers says what failed
            _warm_writers()
    with _writing(client, source, store, lease, settings, reporter, outcome, loaded):
        for leftover in remove_temporary_files(
            targets.lake, collection_prefix(source.database, source.collection)
        ):
            reporter.message(f"{source.label}: removed {leftover}, left by a writer that stopped half way")
        if full or keys:
            now = majority_time(client, source)
            store.update(lambda led: _request(led, now, full, keys))
        _reread_if_written_otherwise(client, spec, store, targets.lake, reporter)
        sync = _CollectionSync(spec, client, targets, settings, reporter, store, lease, outcome)
        sync.requested = frozenset(keys or ())
        # Lingering ends once the collection has been quiet for linger_seconds, or at the cap.
        deadline = time.monotonic() + settings.linger_seconds
        cap = time.monotonic() + max(settings.linger_seconds * 10, MAX_LINGER_SECONDS)
        idle_rounds = 0
        while True:
            ledger = store.load()
            if ledger.needs_work():
                sync.round(ledger)
                idle_rounds = 0
                deadline = min(cap, time.monotonic() + settings.linger_seconds)
                if time.monotonic() >= cap or (
                    not settings.linger_seconds and outcome.rounds >= settings.catch_up_rounds
                ):
                    break
            else:
                idle_rounds += 1
            if not settings.catch_up and not sync.loaded_first:
                break
            # Catch up on the collection's own changes: those during this round, or a first load.
            record_changes(
                client,
                targets.lake,
                collection_scope(source),
                idle_persist_seconds=0 if idle_rounds <= 1 else 10,
                check_oplog=not sync.loaded_first,  # a first load's start was recorded moments ago
            )
            if store.load().needs_work():
                continue
            if time.monotonic() >= deadline or not reporter.keep_lingering():
                break
            time.sleep(0.2)
        if outcome.rounds == 0:
            # Nothing changed in MongoDB; the warehouse may still lack buckets (added to the config, restored).
            sync.settle_targets(store.load())
        sync.summarise()
    return outcome


@contextlib.contextmanager
def _writing(
    client: MongoClient,
    source: SourceCollection,
    store: LedgerStore,
    lease: Lease,
    settings: SyncSettings,
    reporter: Reporter,
    outcome: SyncOutcome,
    synced_before: bool,
) -> Iterator[None]:
    """A writer's frame: the collection checked, the lease taken (waiting for it, saying for whom),
    how the run ended noted in the ledger (a failure counts for the retry backoff), the lease
    given back."""
    started = time.monotonic()
    try:
        if not read_ahead.checked(source):
            check_collection(client, source, synced_before)
    except Exception as error:  # MongoDB unreachable, the collection gone: counts for the backoff
        _note_run(store, "failed", f"{type(error).__name__}: {error}", outcome)
        raise
    lease.acquire(
        settings.lease_wait_seconds,
        on_wait=lambda other: reporter.message(
            f"{source.label}: waiting for the lease held by {other.describe()}"
        ),
    )
    try:
        yield
        _note_run(store, "ok", None, outcome)
    except BaseException as error:
        _note_run(store, "failed", f"{type(error).__name__}: {error}", outcome)
        raise
    finally:
        lease.release()
        outcome.seconds = time.monotonic() - started


def serve_collections(
    specs: list[CollectionSpec],
    lake: Lake,
    sync_one: Callable[[CollectionSpec], SyncOutcome],
    settings: SyncSettings,
    keep_lingering: Callable[[], bool],
    waiting: Callable[[], list[str] | None] = lambda: None,
    follow: Callable[[], object] = lambda: None,
) -> dict[str, SyncOutcome | Exception]:
    """One run serving several collections whose changes a sensor records.

    Each collection whose ledger asks for work, that is not waiting out a retry backoff and
    whose lease is free, is synced by `sync_one` (the same `sync_collection`, under its own
    lease), up to `settings.workers` collections at a time. A collection another writer holds
    is left for later; one that fails does not stop the others. Between changes the run polls
    `waiting()` (the sensor's list of collections with work: one small read) and reads only
    those ledgers, every collection's when it is None; `follow()` records the stream's newest
    changes itself, so a change waits for no sensor tick. It keeps serving until every collection
    has been quiet for `linger_seconds` (capped), or another run waits for a slot.
    Returns each collection's last outcome, or its last error.
    """
    by_label = {spec.source.label: spec for spec in specs}
    stores = {
        label: LedgerStore(lake, s.source.database, s.source.collection) for label, s in by_label.items()
    }
    results: dict[str, SyncOutcome | Exception] = {}
    in_flight: dict[str, concurrent.futures.Future] = {}
    held: dict[str, float] = {}  # collections another writer holds: not asked again before then
    started = time.monotonic()
    cap = started + max(settings.linger_seconds * 10, MAX_LINGER_SECONDS)
    deadline = started + settings.linger_seconds
    candidates: list[str] | None = list(by_label)  # every ledger on the first pass
    with concurrent.futures.ThreadPoolExecutor(max(1, settings.workers), "aries collection") as pool:
        while True:
            for label in candidates if candidates is not None else list(by_label):
                if label in in_flight or label not in by_label or held.get(label, 0) > time.monotonic():
                    continue
                ledger = stores[label].load()
                # A split first load's ranges belong to their range runs (a backfill).
                if ledger.needs_work() and not ledger.ranges and ledger.retry_wait(time.time()) <= 0:
                    in_flight[label] = pool.submit(sync_one, by_label[label])
            if in_flight:
                concurrent.futures.wait(
                    in_flight.values(), timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED
                )
            for label in [label for label, future in in_flight.items() if future.done()]:
                try:
                    results[label] = in_flight.pop(label).result()
                except LeaseHeld:
                    held[label] = time.monotonic() + 5  # another writer has it: it does the work, or later
                except Exception as error:  # the others go on; the error is the run's result
                    results[label] = error
                deadline = min(cap, time.monotonic() + settings.linger_seconds)
            if in_flight:
                candidates = waiting()
                continue
            now = time.monotonic()
            if now >= deadline or now >= cap or not keep_lingering():
                return results
            time.sleep(0.3)
            with contextlib.suppress(Exception):  # the sensor records the changes anyway
                follow()
            candidates = waiting()


def sync_each(
    specs: list[CollectionSpec], sync_one: Callable[[CollectionSpec], SyncOutcome], at_once: int
) -> dict[str, SyncOutcome | Exception]:
    """Each collection synced once by `sync_one`, up to `at_once` at a time (what `aries sync`
    does in one run per change stream). One failing does not stop the others: each collection's
    outcome, or its error."""

    def attempt(spec: CollectionSpec) -> SyncOutcome | Exception:
        try:
            return sync_one(spec)
        except Exception as error:
            return error

    if at_once <= 1 or len(specs) <= 1:
        return {spec.source.label: attempt(spec) for spec in specs}
    pool = concurrent.futures.ThreadPoolExecutor(at_once, "aries collection")
    try:
        results = dict(zip((s.source.label for s in specs), pool.map(attempt, specs), strict=True))
    except BaseException:
        # Ctrl-C: stop at once, not once the collections under way are synced (their leases end
        # with this process, and the next writer repairs what they left).
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


OPTIONS_CHANGED = "its files were written with other schema options or another query"


def _reread_if_written_otherwise(
    client: MongoClient, spec: CollectionSpec, store: LedgerStore, lake: Lake, reporter: Reporter
) -> None:
    """Re-read a collection whose files were written with other schema options or another query:
    the buckets whose files differ are rewritten, and reloaded into the warehouse."""
    ledger = store.load()
    if not ledger.loaded or ledger.reread or ledger.ranges or ledger.written_with == spec.written_with:
        return
    if ledger.written_with is None:
        # A lake written before the fingerprint was kept: each file's footer names its options.
        options = snapshot.options_fingerprint(spec.options)
        files = snapshot.inspect_files(spec.source, lake, ledger.bucket_map().keys)
        if all(f is None or f.options == options for f in files.values()):
            store.update(lambda led: setattr(led, "written_with", led.written_with or spec.written_with))
            return
    now = majority_time(client, spec.source)
    _, asked = store.update(lambda led: led.ask_reread(OPTIONS_CHANGED, now))
    if asked:
        reporter.message(f"{spec.source.label}: {OPTIONS_CHANGED}; re-reading it to rewrite them")


def _request(ledger: Ledger, now: Timestamp, full: bool, keys: list[str] | None) -> None:
    if full and ledger.loaded:
        ledger.reread = {"reason": "requested", "time": now}
    if keys and ledger.loaded:
        by_key = {b.key: b for b in ledger.bucket_map().buckets}
        unknown = [k for k in keys if k not in by_key]
        if unknown:
            raise KeyError(
                f"{ledger.collection}: no bucket {unknown[0]!r} in the bucket map; "
                "pick a partition the UI lists, or run `aries sync`"
            )
        for key in keys:
            ledger.mark(key, DirtyBucket(by_key[key].lower, by_key[key].upper, now))


def note_failure(lake: Lake, source: SourceCollection, error: BaseException) -> None:
    """A run that failed before it could start on the collection (MongoDB unreachable): noted in the
    ledger all the same, so the next try waits out the backoff."""
    store = LedgerStore(lake, source.database, source.collection)
    _note_run(store, "failed", f"{type(error).__name__}: {error}", SyncOutcome(source.label))


def _note_run(store: LedgerStore, status: str, error: str | None, outcome: SyncOutcome) -> None:
    def note(ledger: Ledger) -> None:
        details: dict[str, Any] = {"mode": outcome.mode, "written": outcome.written, "loaded": outcome.loaded}
        if error:
            details["error"] = error[:500]
        ledger.note_run(status, now_iso(), details)

    # The outcome note is a courtesy; when it cannot be written the real failure is still raised.
    with contextlib.suppress(Exception):
        store.update(note)


# --- range runs of a split first load -----------------------------------------------------------


def sync_range(
    spec: CollectionSpec,
    client: MongoClient,
    targets: Targets,
    settings: SyncSettings,
    reporter: Reporter,
    holder: str,
    run_id: str | None,
    key: str,
) -> SyncOutcome | None:
    """One range of a split first load, beside the other ranges' runs: read it once, cut it into
    buckets and write them. None if `key` is no unfinished range: sync the bucket as usual then.

    Collection-wide steps (schema, orphans, Glue, the warehouse) are left to the next
    whole-collection run, which the ledger asks for while it is `unsettled`.
    """
    source = spec.source
    store = LedgerStore(targets.lake, source.database, source.collection)
    if key not in store.load().ranges:
        return None
    outcome = SyncOutcome(source.label, mode=f"split range {key}")
    lease = Lease(
        targets.lake,
        source.database,
        source.collection,
        holder,
        run_id,
        settings.lease_seconds,
        range_key=key,
    )
    with _writing(client, source, store, lease, settings, reporter, outcome, True):
        ledger = store.load()
        if key not in ledger.ranges:
            return None  # written meanwhile by a whole-collection run
        sync = _CollectionSync(spec, client, targets, settings, reporter, store, lease, outcome)
        sync.range_round(ledger, key)
        sync.summarise()
    return outcome


class _CollectionSync:
    """One run's work on one collection; footers are read once and kept up to date in memory."""

    def __init__(self, spec, client, targets, settings, reporter, store, lease, outcome) -> None:
        self.spec: CollectionSpec = spec
        self.source: SourceCollection = spec.source
        self.client: MongoClient = client
        self.targets: Targets = targets
        self.lake: Lake = targets.lake
        self.settings: SyncSettings = settings
        self.reporter: Reporter = reporter
        self.store: LedgerStore = store
        self.lease: Lease = lease
        self.outcome: SyncOutcome = outcome
        self.files: dict[str, snapshot.BucketFile | None] | None = None
        self.unchanged: list[str] = []  # buckets read this round whose documents their files already hold
        self.loaded_first = False  # this run did the collection's first load
        self.requested: frozenset[str] = frozenset()  # buckets asked for by name (a partition run)
        self.schema: s.InferredSchema | None = snapshot.load_schema(self.lake, self.source)

    # --- one round: read, write, settle, load, clear --------------------------------------------

    def round(self, ledger: Ledger) -> None:
        label = self.source.label
        covered_dirty = {k: m for k, m in ledger.dirty.items()}
        covered_reread = dict(ledger.reread) if ledger.reread else None
        first_load = not ledger.loaded
        fresh = ledger.range_bucket_keys()  # a split first load's ranges that no range run finished
        self.outcome.rounds += 1
        # The read `aries sync` began for this first load, if it did (see `read_ahead`); not if a
        # writer marked the stream since: its mark may be newer than the read.
        ahead = read_ahead.take(self.source) if first_load else None
        if ahead is not None and ledger.position is not None:
            ahead.close()
            ahead = None
        try:
            if first_load:
                mode = "first load"
                # Changes from here on are caught up from the stream once the bucket map exists.
                start = self._mark_stream(ahead.mark if ahead else None)
                bucket_map = BucketMap(self.spec.bucket_size, [MinKey()])
                spans = [(0, 0)]
                after = start
            else:
                bucket_map = ledger.bucket_map()
                bucket_map.bucket_size = self.spec.bucket_size
                after = ledger.newest_dirty_time()
                if ledger.position is None:
                    # A lake written before the ledger: nothing recorded its changes. Its stream is
                    # marked now, as a first load's, and the re-read it asks for reads after the mark
                    # (causally: a lagging secondary waits for it).
                    after = later(after, self._mark_stream(None))
                if ledger.reread:
                    mode = f"re-read: {ledger.reread['reason']}"
                    spans = [(0, len(bucket_map.lowers) - 1)]
                else:
                    mode = (
                        "changes"
                        if ledger.dirty or not ledger.unsettled
                        else f"settle after {ledger.unsettled}"
                    )
                    spans = _spans(bucket_map, ledger.dirty_keys())
            self.outcome.mode = mode if self.outcome.rounds == 1 else self.outcome.mode
            self.reporter.message(f"{label}: {mode}")
            files = self._files(bucket_map.keys)
            self.unchanged = []
            touched = self._pass(
                bucket_map, spans, after, first_load, skip_unchanged=mode.startswith("re-read"), fresh=fresh,
                batches=ahead.read.batches() if ahead else None,
            )  # fmt: skip
        finally:
            if ahead is not None:
                ahead.close()
        dirty_unchanged = [k for k in self.unchanged if k in covered_dirty]
        if dirty_unchanged:
            touched |= self._read_unchanged_again(bucket_map, dirty_unchanged, after)
        if first_load:
            marks = {}
            if self.targets.loader is not None and self.spec.table is not None:
                # Until the warehouse holds them, the new buckets stay in the ledger: a load that
                # fails or is killed is retried by the next run, whoever starts it. Marked in the
                # update that saves the bucket map: a kill between two updates left a loaded lake
                # with nothing asking for its table.
                marks = {b.key: DirtyBucket(b.lower, b.upper, start) for b in bucket_map.buckets}
            self._save_map(bucket_map, marks)
            self.loaded_first = True
            covered_dirty.update(marks)
        touched |= self._settle_schema(bucket_map, after)
        self.lease.check()
        for orphan in snapshot.remove_orphans(self.source, self.lake, bucket_map.keys):
            self.reporter.message(f"{label}: removed {orphan}: no bucket of that name in the bucket map")
        self._register_glue()
        loaded_ok, refused = self._load_warehouse(bucket_map.keys)
        done = touched if loaded_ok is None else touched & loaded_ok
        self.lease.check()

        def clear(led: Ledger) -> None:
            led.clear(covered_dirty, covered_reread, done)
            led.finish_ranges(touched)
            led.settled()  # this round settled every bucket: nothing waits for a range run any more
            if (first_load or covered_reread) and not led.reread:
                led.written_with = self.spec.written_with  # every file follows these options now

        self.store.update(clear)
        _raise_first(refused)  # once every other bucket's mark is cleared: only the refused stay
        files = self.files or files
        self.outcome.buckets = len(bucket_map.keys)
        self.outcome.documents = sum(f.documents for f in files.values() if f is not None)
        if self.schema is not None:
            self.outcome.schema_version = self.schema.version

    def _mark_stream(self, mark: StreamMark | None) -> Timestamp:
        """Mark the collection's own stream (or adopt the mark a read begun ahead made), and make
        its time the ledger's position if it has none: where a read of every document starts."""
        start = (
            adopt_mark(self.lake, self.source, mark)
            if mark
            else stream_start(self.client, self.lake, self.source)
        )
        self.store.update(lambda led: led.advance(start) if led.position is None else None)
        return start

    def settle_targets(self, ledger: Ledger) -> None:
        """Glue and the warehouse caught up with the lake as it is, with no bucket to write."""
        if not ledger.loaded:
            return
        keys = ledger.bucket_map().keys
        if self.schema is None:
            # Files but no collection schema: a run stopped between its writes and settling them.
            self._settle_schema(ledger.bucket_map(), ledger.newest_dirty_time())
        files = self._files(keys)
        self._register_glue()
        _raise_first(self._load_warehouse(keys)[1])
        self.outcome.buckets = len(keys)
        self.outcome.documents = sum(f.documents for f in files.values() if f is not None)
        if self.schema is not None:
            self.outcome.schema_version = self.schema.version

    def range_round(self, ledger: Ledger, key: str) -> None:
        """A range run's one ordered read of its range, cut into buckets as they fill."""
        span = ledger.ranges[key]
        bucket_map = ledger.bucket_map()
        bucket_map.bucket_size = self.spec.bucket_size
        low, high = sort_key(span.lower), sort_key(span.upper)
        # The range's bucket and any piece a run that died before this one cut from it.
        inside = [i for i, lower in enumerate(bucket_map.lowers) if low <= sort_key(lower) < high]
        keys = [bucket_map.keys[i] for i in inside]
        covered = {k: m for k, m in ledger.dirty.items() if low <= sort_key(m.lower) < high}
        after = max([span.time, *(m.time for m in covered.values())])
        self.outcome.rounds += 1
        self.reporter.message(
            f"{self.source.label}: split first load, range {key} {Bucket(key, span.lower, span.upper).describe()}"
        )
        files = self._files(keys)
        # As a first load: the map is saved once the range is read, before the range is marked done.
        touched = self._pass(
            bucket_map, [(inside[0], inside[-1])], after, True, skip_unchanged=False, fresh=frozenset(keys)
        )
        self._save_map(bucket_map)
        self.lease.check()

        def finish(led: Ledger) -> None:
            led.clear(covered, None, touched)
            led.finish_ranges(touched)

        self.store.update(finish)
        self.outcome.buckets = len(touched)
        self.outcome.documents = sum(f.documents for k in touched if (f := files.get(k)) is not None)

    def summarise(self) -> None:
        self.reporter.message(
            f"{self.source.label}: {self.outcome.written} buckets written, {self.outcome.loaded} loaded, "
            f"{self.outcome.documents:,} documents in {self.outcome.buckets} buckets"
        )

    def _read_unchanged_again(
        self, bucket_map: BucketMap, keys: list[str], after: Timestamp | None
    ) -> set[str]:
        """Dirty buckets that read the same as their files: a change undone before the read, or a no-op.
        Or a read that did not see a change it was told of. Their marks would be cleared on the word of
        that read alone, so they are read once more, a moment later, before the marks go.

        Not for a collection with a `query` (every change outside the filter marks a bucket that then
        reads the same, and would cost a second read each time), nor for buckets asked for by name
        (a partition materialized from the UI: no change was recorded)."""
        touched: set[str] = set()
        again = [] if self.source.query else [k for k in keys if k not in self.requested]
        if again:
            _pause_before_second_read()
            self.unchanged = []
            touched = self._pass(bucket_map, _spans(bucket_map, again), after, False, False)
        label = self.source.label
        still = [k for k in keys if k not in again or k in self.unchanged]
        if still:
            shown = ", ".join(still[:10]) + (" ..." if len(still) > 10 else "")
            self.reporter.message(
                f"{label}: {len(still)} changed buckets read the same as their files: {shown}"
            )
        differed = [k for k in again if k not in self.unchanged]
        if differed:
            self.reporter.message(
                f"{label}: WARNING: {len(differed)} changed buckets read the same as their files, then "
                f"differently a moment later, and are written now: {', '.join(differed[:10])}. A read "
                "did not see a change the change stream had shown; please report it with your server's "
                "version and read preference"
            )
        return touched

    # --- reading and writing ----------------------------------------------------------------------

    def _files(self, keys: list[str]) -> dict[str, snapshot.BucketFile | None]:
        if self.files is None:
            self.files = snapshot.inspect_files(self.source, self.lake, keys)
        missing = [k for k in keys if k not in self.files]
        if missing:
            self.files.update(snapshot.inspect_files(self.source, self.lake, missing))
        return self.files

    def _pass(
        self,
        bucket_map: BucketMap,
        spans: list[tuple[int, int]],
        after: Timestamp | None,
        first_load: bool,
        skip_unchanged: bool,
        force: bool = False,
        fresh: frozenset[str] | set[str] = frozenset(),
        batches: Iterator[list[bytes]] | None = None,
    ) -> set[str]:
        """One ordered read per span; every bucket of a span is written (or found current).

        `batches`: the read of the one span, already begun (a first load's, see `read_ahead`).
        """
        touched: set[str] = set()
        if not spans:
            return touched
        total = None
        if (first_load or skip_unchanged) and self.reporter.wants_total():
            total = self.source.open(self.client).estimated_document_count()
        read_docs = read_bytes = 0
        expected = sum(b - a + 1 for a, b in spans)
        if total is not None:
            expected = max(expected, total // max(1, self.spec.bucket_size))
        # Writer processes cost a second or two to start: worth it only for several buckets (a split
        # range, read for the first time, is many). A first load's size is unknown until it is read:
        # its writers start once a bucket is cut with more documents still coming.
        many = expected > 2 or bool(fresh)
        workers = self.settings.workers if many or first_load else 1
        with _Writers(workers, self.targets.lake_spec) as writers, _heap_frozen():
            if many:
                writers.start()  # the writers start while the server prepares its first batch
            for first, last in spans:
                lower = bucket_map.lowers[first]
                upper = bucket_map.lowers[last + 1] if last + 1 < len(bucket_map.lowers) else MaxKey()
                cutter = BucketCutter(
                    bucket_map, first, last, self.spec.bucket_size, self.spec.bucket_bytes, fresh
                )
                if batches is None:
                    batches = range_batches(self.client, self.source, lower, upper, after)
                for raws in batches:
                    read_docs += len(raws)
                    read_bytes += sum(map(len, raws))
                    for done in cutter.add_many(raws, raw_id):
                        self._submit(writers, done, bucket_map, first_load, not force, touched)
                    self.reporter.progress(read_docs, read_bytes, total)
                for done in cutter.finish():
                    self._submit(writers, done, bucket_map, first_load, not force, touched, last=True)
                batches = None
            for written in writers.drain():
                self._written(written, touched)
        self.reporter.progress(read_docs, read_bytes, total)
        self.outcome.documents_read += read_docs
        return touched

    def _submit(
        self, writers, done: BucketDocuments, bucket_map, first_load, skip_current, touched, last=False
    ) -> None:
        key = done.bucket.key
        previous = self.files.get(key) if self.files else None
        if done.new and not first_load:
            # The map first, then the file: a crash in between leaves the old file whole.
            self._save_map(bucket_map)
        # A bucket asked for by name (materialized from the UI) is written even if its file is current:
        # that is what was asked, and its run reports the file it wrote.
        if (
            skip_current
            and key not in self.requested
            and snapshot.is_current(previous, done.digest, self.spec.options)
        ):
            touched.add(key)
            self.unchanged.append(key)
            return
        self.lease.check()
        job = _WriteJob(self.source, done, self.spec.options, self.schema, previous)
        for written in writers.submit(job, self.targets.lake, inline=last):
            self._written(written, touched)

    def _written(self, written: snapshot.WrittenBucket, touched: set[str]) -> None:
        touched.add(written.key)
        assert self.files is not None
        self.files[written.key] = snapshot.BucketFile(
            key=written.key,
            format_version=snapshot.FORMAT_VERSION,
            digest=written.digest,
            schema_version=written.schema.version,
            columns={c.name: c.type for c in written.schema.columns},
            stats=written.stats,
            options=snapshot.options_fingerprint(self.spec.options),
            documents=written.documents,
        )
        if written.rewritten:
            self.outcome.written += 1
            self.outcome.bytes_out += written.bytes_out
        bucket_range = written.key
        self.reporter.bucket_written(written, bucket_range)

    def _save_map(self, bucket_map: BucketMap, marks: dict[str, DirtyBucket] | None = None) -> None:
        """Save the bucket map, and `marks` with it in the same update."""
        self.lease.check()
        lowers = list(bucket_map.lowers)
        known = set(self._known_keys())
        added = [k for k in bucket_map.keys if k not in known]

        def save(ledger: Ledger) -> None:
            ledger.add_lowers(lowers, bucket_map.bucket_size)  # range runs add theirs at the same time
            for key, mark in (marks or {}).items():
                ledger.mark(key, mark)

        self.store.update(save)
        if added:
            self.outcome.new_buckets += added
            self.reporter.buckets_added(added)

    def _known_keys(self) -> list[str]:
        ledger = self.store.load()
        return ledger.bucket_map().keys if ledger.loaded else []

    # --- schema, Glue, warehouse ------------------------------------------------------------------

    def _settle_schema(self, bucket_map: BucketMap, after: Timestamp | None) -> set[str]:
        """Merge every file's statistics into the collection schema; rewrite files that disagree."""
        touched: set[str] = set()
        files = self._files(bucket_map.keys)
        for round_number in range(1, MAX_SCHEMA_ROUNDS + 1):
            state = snapshot.reconcile_schema(self.source, self.lake, files, self.spec.options)
            self.schema = state.schema
            if state.changed:
                self.reporter.message(
                    f"{self.source.label}: schema v{state.schema.version}: {'; '.join(state.schema.actions)}"
                )
            if not state.mismatched:
                return touched
            if round_number == MAX_SCHEMA_ROUNDS:
                raise snapshot.BucketWriteError(
                    f"{self.source.label}: buckets {', '.join(state.mismatched)} still disagree with schema "
                    f"v{state.schema.version} after {MAX_SCHEMA_ROUNDS} rounds; run the sync again"
                )
            self.reporter.message(
                f"{self.source.label}: rewriting {len(state.mismatched)} buckets to follow schema "
                f"v{state.schema.version}"
            )
            touched |= self._pass(bucket_map, _spans(bucket_map, state.mismatched), after, False, False, True)
        return touched

    def _register_glue(self) -> None:
        if self.targets.glue is None or self.schema is None or not self.schema.columns:
            return
        location = self.lake.uri(collection_prefix(self.source.database, self.source.collection))
        action = catalog.register_table(
            self.targets.glue, self.source.database, self.source.collection, self.schema, location
        )
        if action != "unchanged":
            self.reporter.message(f"{self.source.label}: Glue: {action}")

    def _bucket_data(self, key: str, loader: Loader) -> tuple[Any, str]:
        """A bucket's rows from its lake file, refused whole if a document is too large for the table."""
        path = bucket_file(self.source.database, self.source.collection, key)
        data = self.lake.read_table(path)
        oversize = oversize_documents(data, loader.dialect.max_document_bytes)
        if oversize:
            raise BucketRefused(
                f"{self.source.label}: bucket {key} has {len(oversize)} documents over "
                f"{loader.dialect.max_document_bytes:,} bytes, more than {self.spec.table.label} can hold in "
                f"`_doc` (e.g. _id {oversize[0]}); exclude their large fields (schema.exclude) or use another "
                "warehouse",
                key,
            )
        return data, self.lake.uri(path)

    def _report_load(self, loader: Loader, table: TableRef, result: LoadedBucket, data: Any) -> None:
        in_table = loader.bucket_ids(table, result.bucket)
        in_file = data.column("_id_key").to_pylist()
        missing, extra = set(in_file) - set(in_table), set(in_table) - set(in_file)
        self.outcome.loaded += 1
        self.reporter.bucket_loaded(result, len(in_file), len(in_table), len(missing), len(extra))

    def _load_warehouse(self, keys: list[str]) -> tuple[set[str] | None, list[BucketRefused]]:
        """Load every bucket whose lake file the table does not hold. Returns the buckets the table
        holds, and the refusals of those it cannot hold as they are (the others load regardless)."""
        loader, table = self.targets.loader, self.spec.table
        if loader is None or table is None or self.schema is None:
            return None, []
        refused: list[BucketRefused] = []
        files = self._files(keys)
        loaded = loader.loaded(table)
        stale = [
            k for k in keys if files.get(k) is not None and loaded.get(k) != snapshot.load_digest(files[k])
        ]
        for key in stale:
            self.lease.check()
            found = files[key]
            schema = snapshot.file_schema(self.schema, found)
            try:
                data, uri = self._bucket_data(key, loader)
                result = loader.replace_bucket(
                    table, schema, self.spec.options.evolution, key, snapshot.load_digest(found), data, uri
                )
            except BucketRefused as error:
                self.reporter.message(f"{self.source.label}: {error}")
                refused.append(error)
                continue
            except RebuildNeeded as needed:
                # A column changes type: build the table anew from every bucket, out of readers' sight.
                self.reporter.message(f"{self.source.label}: {needed}; rebuilding {table.label}")
                loads = (
                    BucketLoad(k, snapshot.load_digest(files[k]), *self._bucket_data(k, loader))
                    for k in keys
                    if files.get(k) is not None
                )
                for rebuilt in loader.rebuild(table, self.schema, loads):
                    in_table = len(loader.bucket_ids(table, rebuilt.bucket))
                    self.outcome.loaded += 1
                    self.reporter.bucket_loaded(rebuilt, rebuilt.rows, in_table, max(0, rebuilt.rows - in_table),
                                                max(0, in_table - rebuilt.rows))  # fmt: skip
                return {k for k in keys if files.get(k) is not None}, []
            self._report_load(loader, table, result, data)
        # Rows of buckets the bucket map no longer names (the lake was started afresh and cut other
        # buckets): live documents moved to the new buckets above, the rest were deleted meanwhile.
        # Not while a bucket is refused: its documents may still be only under the old keys.
        gone = sorted(set(loaded) - set(keys))
        if gone and not refused:
            self.lease.check()
            rows = loader.drop_buckets(table, gone)
            self.reporter.message(
                f"{self.source.label}: deleted {rows} rows of {len(gone)} buckets the lake no longer has "
                f"from {table.label}"
            )
        failed = {e.bucket for e in refused}
        return {k for k in keys if files.get(k) is not None and k not in failed}, refused


def _raise_first(refused: list[BucketRefused]) -> None:
    if refused:
        more = f" (and {len(refused) - 1} more buckets refused)" if len(refused) > 1 else ""
        raise BucketRefused(f"{refused[0]}{more}", refused[0].bucket) from refused[0]


def _spans(bucket_map: BucketMap, keys: list[str]) -> list[tuple[int, int]]:
    """Runs of adjacent buckets, as (first, last) indices: each is read with one range read."""
    index = {k: i for i, k in enumerate(bucket_map.keys)}
    positions = sorted(index[k] for k in set(keys) if k in index)
    spans: list[tuple[int, int]] = []
    for i in positions:
        if spans and spans[-1][1] == i - 1:
            spans[-1] = (spans[-1][0], i)
        else:
            spans.append((i, i))
    return spans


# --- parallel writers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _WriteJob:
    source: SourceCollection
    docs: BucketDocuments
    options: s.SchemaOptions
    schema: s.InferredSchema | None
    previous: snapshot.BucketFile | None

    def run(self, lake: Lake) -> snapshot.WrittenBucket:
        return snapshot.write_bucket(self.source, lake, self.docs, self.options, self.schema, self.previous)


_WORKER_LAKE: Lake | None = None


# How long a run waits before reading again the dirty buckets that read the same as their files.
SECOND_READ_PAUSE_SECONDS = 1.0


def _pause_before_second_read() -> None:
    time.sleep(SECOND_READ_PAUSE_SECONDS)


_frozen = {"passes": 0}
_frozen_lock = threading.Lock()


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """The objects alive now (Dagster's, a few hundred thousand in a run) out of the collector's way
    while a read runs: the collections that reading a million short-lived objects sets off would
    scan them all, again and again (pymongo's raw batches took 2.6x as long in a run as alone).

    Freezing is process-wide, and a serving run reads several collections at once, in threads:
    the heap is frozen by the first pass to begin and given back by the last to end."""
    with _frozen_lock:
        _frozen["passes"] += 1
        if _frozen["passes"] == 1:
            gc.freeze()
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen["passes"] -= 1
            if _frozen["passes"] == 0:
                gc.unfreeze()


def _worker_start(spec: LakeSpec, environ: dict[str, str], cwd: str, lifeline: Any) -> None:
    """A writer forked from the fork server has the server's environment and directory, as they were
    when it started: take the run's own (credentials, a relative lake path)."""
    global _WORKER_LAKE
    _exit_with_run(lifeline)
    # Ctrl-C reaches every process of the terminal's process group: the run decides what stops
    # (it stops handing out buckets and waits for the ones being written); a writer must not
    # die half way through a bucket with a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    _WORKER_LAKE = spec.open()
    gc.freeze()  # what the fork server imported lives as long as the writer: see `_heap_frozen`


def _exit_with_run(lifeline: Any) -> None:
    """A writer must not outlive its run. Orphaned by a `kill -9`, it would finish its bucket and
    publish the file after the run's lease has passed to another writer, over a newer file of the
    same bucket. The run holds the other end of `lifeline`: when the run dies, it reads EOF."""

    def watch() -> None:
        with contextlib.suppress(EOFError, OSError):
            lifeline.recv()
        os._exit(1)

    threading.Thread(target=watch, name="aries lifeline", daemon=True).start()


def _worker_ready() -> None:
    """Nothing: submitted once per writer so that the pool starts them all up front."""


def _worker_write(job: _WriteJob) -> snapshot.WrittenBucket:
    assert _WORKER_LAKE is not None
    return job.run(_WORKER_LAKE)


# How a writer's allocators are set when it starts (a user's own setting wins). Converting a chunk
# allocates and frees tens of MB. Arrow's C++ code allocates from its default pool, mimalloc,
# which keeps freed pages for later (`arrow.py` can only switch what Python asks for); glibc gives
# each thread that allocates an arena of its own, each keeping its free blocks. Either way a
# writer's RSS grew to several times a bucket's BSON, and stayed there. Measured with
# `benchmarks/transform_benchmark.py`: half the growth, for no loss of speed; jemalloc rather
# than the system allocator for Arrow (`arrow.MEMORY_POOL`) took a messy bucket's peak from 3.3x
# to 2.7x its BSON. (A fixed mmap threshold did about as well, but cost events a tenth of their
# conversion speed in page faults.)
WRITER_MEMORY_ENV = {
    "ARROW_DEFAULT_MEMORY_POOL": arrow.MEMORY_POOL,
    "MALLOC_ARENA_MAX": "1",  # glibc; ignored elsewhere
}


def _writer_context() -> multiprocessing.context.BaseContext:
    """Writers forked from a server that imported the writing code once, not Dagster and the CLI.

    A spawned writer re-imports the program that started it (Dagster included): seconds of
    CPU per writer, taken from the read. The fork server is started once per process and
    holds no thread or connection of ours, so forking it is safe. It, and the writers forked
    from it, start with `WRITER_MEMORY_ENV`: both settings are read when a process starts, so
    they are set in this process's environment (which only its children read them from).
    """
    for name, value in WRITER_MEMORY_ENV.items():
        os.environ.setdefault(name, value)
    if "forkserver" not in multiprocessing.get_all_start_methods() or not _socket_fits():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # pandas too: pyarrow imports it on the first `pa.array` of a list, half a second per writer.
    context.set_forkserver_preload([__name__, "pandas"])
    return context


# The fork server listens on `<temporary directory>/pymp-XXXXXXXX/listener-XXXXXXXX`; a Unix
# socket's path is at most 107 bytes (Linux; 103 on macOS).
_SOCKET_PATH_BYTES = 103
_LISTENER_SUFFIX_BYTES = len("/pymp-XXXXXXXX/listener-XXXXXXXX")


def _socket_fits() -> bool:
    """Whether the fork server's socket fits under the temporary directory (TMPDIR): a deeper one
    failed every run that needed writers with `AF_UNIX path too long`; spawned writers need no socket."""
    return len(os.fsencode(tempfile.gettempdir())) + _LISTENER_SUFFIX_BYTES <= _SOCKET_PATH_BYTES


def _warm_writers() -> None:
    """Start the fork server now: it imports the writing code while the server prepares its first
    batch, so writers forked later start in milliseconds. Nothing waits for it."""
    context = _writer_context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


class _Writers:
    """Bucket writes, in this process or in up to `workers` processes, at most `workers` in flight.

    Memory stays bounded: the bucket being read plus one per writer.
    """

    def __init__(self, workers: int, lake_spec: LakeSpec) -> None:
        self.workers = workers
        self.lake_spec = lake_spec
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pending: list[concurrent.futures.Future] = []

    def __enter__(self) -> _Writers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for end in self._lifelines:
                end.close()

    def start(self) -> None:
        """Start the writer processes now, rather than when the first bucket is ready."""
        if self.workers <= 1 or self._pool is not None:
            return
        context = _writer_context()
        # Writers get the reading end; this process alone holds the writing end, closed by the
        # kernel if it dies, so the writers die with it (see `_exit_with_run`).
        self._lifelines = context.Pipe(duplex=False)
        lifeline = self._lifelines[0]
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=context,
            initializer=_worker_start,
            initargs=(self.lake_spec, dict(os.environ), os.getcwd(), lifeline),
        )
        for _ in range(self.workers):  # a pool starts its processes on demand: ask for all of them
            self._pool.submit(_worker_ready)

    def submit(self, job: _WriteJob, lake: Lake, inline: bool = False) -> Iterator[snapshot.WrittenBucket]:
        """Hand the job to a writer; `inline` writes it here unless the writers already run."""
        if self.workers <= 1 or (inline and self._pool is None):
            yield job.run(lake)
            return
        self.start()
        while len(self._pending) >= self.workers:
            finished, _ = concurrent.futures.wait(
                self._pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                self._pending.remove(future)
                yield future.result()
        self._pending.append(self._pool.submit(_worker_write, job))

    def drain(self) -> Iterator[snapshot.WrittenBucket]:
        while self._pending:
            future = self._pending.pop(0)
            yield future.result()
