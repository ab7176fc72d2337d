"""The ledger: one collection's durable sync state, shared by the sensor, runs and `aries sync`.

It lives in the lake at `<db>/<collection>/_aries/ledger.json` and holds

- the change-stream **position**: the cluster time up to which every change of the
  collection has been recorded here;
- the **bucket map** (the `_id` lower bounds of the buckets; none before the first load);
- the **dirty buckets**: for each, the `_id` range it covered when the change was
  recorded and the cluster time of the newest change it must include;
- a **re-read** request, when history was lost or a full pass was asked for;
- for a first load split into `_id`-range runs (`aries split`): the **ranges** whose run
  has not finished, and whether the collection-wide steps (schema, orphans, Glue, the
  warehouse) still wait for a whole-collection run (**unsettled**);
- the outcome of the last run, for `aries status` and the UI.

Every update is a compare-and-swap on the file (`Lake.write_if`), so the sensor
appending dirty buckets and a run clearing the ones it wrote never lose each
other's changes. A bucket leaves the ledger only once a file covering its
newest change is written (and loaded, when a warehouse is configured); the
position moves only after the changes before it are recorded.

Beside it, `lease.json` names the one writer of the collection; see `Lease`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bson import Timestamp, json_util

from aries_assets.core.buckets import BucketMap, bucket_key
from aries_assets.core.lake import STATE_DIR, Lake, bucket_map_file, collection_prefix, safe_segment
from aries_assets.core.ordering import sort_key

_CANONICAL = json_util.CANONICAL_JSON_OPTIONS
LEDGER_VERSION = 1
# Inside an unfinished range of a split first load, changes mark their `_id` (the range's buckets are
# being cut); past this many such marks, whole buckets, so the ledger stays small.
MAX_ID_MARKS = 10_000


class LedgerConflict(RuntimeError):
    """The ledger kept changing under a compare-and-swap; names the collection."""


def ledger_file(database: str, collection: str) -> str:
    return f"{collection_prefix(database, collection)}/{STATE_DIR}/ledger.json"


def lease_file(database: str, collection: str) -> str:
    return f"{collection_prefix(database, collection)}/{STATE_DIR}/lease.json"


RETRY_BACKOFF_SECONDS = (5, 15, 30, 60, 120, 300)  # after 1, 2, ... runs that failed in a row


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def later(a: Timestamp | None, b: Timestamp | None) -> Timestamp | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass
class DirtyBucket:
    """A bucket with changes not yet in its file: the range it covered when marked, and the newest change."""

    lower: Any
    upper: Any  # MaxKey for the last bucket
    time: Timestamp  # cluster time of the newest change the bucket's file must include
    since: str = field(default_factory=now_iso)  # when it first became dirty

    def overlaps(self, low: tuple, high: tuple) -> bool:
        """Whether the mark touches the bucket [low, high) (sort keys). A mark whose bounds are equal
        is one changed `_id`: it touches the one bucket holding it."""
        lower, upper = sort_key(self.lower), sort_key(self.upper)
        if lower == upper:
            return low <= lower < high
        return low < upper and lower < high

    def merge(self, other: DirtyBucket) -> None:
        """Widen to cover both marks (the bucket map may have changed between them)."""
        if sort_key(other.upper) > sort_key(self.upper):
            self.upper = other.upper
        self.time = max(self.time, other.time)


@dataclass
class Ledger:
    collection: str
    position: Timestamp | None = None
    # The newest cluster time of a change recorded here, whichever stream delivered it (the
    # position may be ahead of changes not yet delivered: it moves to the server's majority time).
    recorded_through: Timestamp | None = None
    lowers: list[Any] | None = None  # the bucket map; None until the first load
    bucket_size: int = 0
    dirty: dict[str, DirtyBucket] = field(default_factory=dict)
    reread: dict[str, Any] | None = None  # {"reason": str, "time": Timestamp}
    ranges: dict[str, DirtyBucket] = field(default_factory=dict)  # a split first load's unfinished ranges
    unsettled: str | None = None  # why the collection-wide steps wait for a whole-collection run
    last_run: dict[str, Any] = field(default_factory=dict)  # outcome of the last run that finished
    # A fingerprint of what shaped every file (schema options, query) as of the last first load or
    # re-read; None for a lake written before it was kept (the files' footers tell, `engine`).
    written_with: str | None = None

    # --- the bucket map ------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.lowers is not None

    def bucket_map(self) -> BucketMap:
        if self.lowers is None:
            raise ValueError(f"{self.collection}: no bucket map yet (first load pending)")
        return BucketMap(self.bucket_size, list(self.lowers))

    def add_lowers(self, lowers: list[Any], bucket_size: int) -> None:
        """Merge bucket boundaries into the map: boundaries never move, so runs writing different
        ranges at once each add theirs and none is lost."""
        self.bucket_size = bucket_size
        if self.lowers is None:
            self.lowers = list(lowers)
            return
        merged = self.bucket_map()
        for lower in lowers:
            merged.add_lower(lower)
        self.lowers = merged.lowers

    # --- a split first load ---------------------------------------------------------------------

    def split(self, lowers: list[Any], bucket_size: int, now: Timestamp) -> list[str]:
        """Record a first load split into `_id` ranges: each range is a bucket, dirty until its run
        (or a whole-collection run) has written it; returns the ranges' keys."""
        if self.loaded:
            raise ValueError(
                f"{self.collection}: it has a bucket map already (its first load ran or was split); "
                "only a first load can be split"
            )
        self.lowers, self.bucket_size = list(lowers), bucket_size
        self.advance(now)
        for bucket in self.bucket_map().buckets:
            self.mark(bucket.key, DirtyBucket(bucket.lower, bucket.upper, now))
            self.ranges[bucket.key] = DirtyBucket(bucket.lower, bucket.upper, now)
        self.unsettled = "a split first load"
        return list(self.ranges)

    def range_bucket_keys(self) -> set[str]:
        """The buckets inside unfinished ranges: loaded for the first time, cut as soon as full."""
        if not self.ranges or self.lowers is None:
            return set()
        spans = [(sort_key(r.lower), sort_key(r.upper)) for r in self.ranges.values()]
        return {
            b.key
            for b in self.bucket_map().buckets
            if any(low <= sort_key(b.lower) < high for low, high in spans)
        }

    def finish_ranges(self, written: set[str]) -> None:
        """Drop the ranges whose every bucket was written (a range run's, or a whole-collection run's)."""
        if not self.ranges:
            return
        buckets = self.bucket_map().buckets
        for key, span in list(self.ranges.items()):
            low, high = sort_key(span.lower), sort_key(span.upper)
            inside = [b.key for b in buckets if low <= sort_key(b.lower) < high]
            if all(k in written for k in inside):
                del self.ranges[key]

    def settled(self) -> None:
        """A whole-collection run settled schema, orphans, Glue and warehouse after every range."""
        if not self.ranges:
            self.unsettled = None

    # --- changes --------------------------------------------------------------------------------

    def mark_ids(self, ids_with_times: list[tuple[Any, Timestamp]]) -> int:
        """Mark the buckets holding these changed `_id`s dirty; returns how many buckets were marked."""
        if self.lowers is None:
            return 0  # the first load reads everything after the position anyway
        bucket_map = self.bucket_map()
        buckets = bucket_map.buckets
        fresh = self.range_bucket_keys()
        id_marks = sum(1 for k in self.dirty if k.startswith("id:"))
        marked: dict[str, DirtyBucket] = {}
        for _id, when in ids_with_times:
            bucket = buckets[bucket_map.index_of(_id)]
            if bucket.key in fresh and id_marks < MAX_ID_MARKS:
                # The range's run cuts this bucket as it reads: only the document's future bucket is stale.
                key, mark = f"id:{bucket_key(_id)}", DirtyBucket(_id, _id, when)
                id_marks += key not in self.dirty and key not in marked
            else:
                key, mark = bucket.key, DirtyBucket(bucket.lower, bucket.upper, when)
            if key in marked:
                marked[key].merge(mark)
            else:
                marked[key] = mark
        for key, mark in marked.items():
            self.mark(key, mark)
        return len(marked)

    def mark(self, key: str, mark: DirtyBucket) -> None:
        if key in self.dirty:
            self.dirty[key].merge(mark)
        else:
            self.dirty[key] = mark

    def advance(self, position: Timestamp | None) -> None:
        """Move the position forward (never back)."""
        self.position = later(self.position, position)

    def needs_work(self) -> str | None:
        """Why a run is needed now, or None."""
        if self.lowers is None:
            return "first load"
        if self.reread:
            return f"re-read: {self.reread['reason']}"
        if self.ranges:
            return f"split first load: {len(self.ranges)} ranges waiting for their range runs"
        if self.dirty:
            return f"{len(self.dirty)} dirty bucket{'s' if len(self.dirty) != 1 else ''}"
        if self.unsettled:
            return f"settle after {self.unsettled}: schema, orphans, Glue, warehouse"
        return None

    def ask_reread(self, reason: str, now: Timestamp) -> bool:
        """Ask for a re-read of the whole collection, unless one is asked already or a split first
        load is under way; True if asked now."""
        if not self.loaded or self.reread or self.ranges:
            return False
        self.reread = {"reason": reason, "time": now}
        return True

    def note_run(self, status: str, at: str, details: dict[str, Any]) -> None:
        """Record how a run ended; failures in a row are counted, for the retry backoff."""
        previous = self.last_run
        self.last_run = {"status": status, "at": at, **details}
        if status == "ok":
            self.last_run["last_success"] = at
        else:
            self.last_run["failures"] = int(previous.get("failures", 0)) + 1
            if previous.get("last_success"):
                self.last_run["last_success"] = previous["last_success"]

    def retry_wait(self, now: float) -> float:
        """Seconds before the next try, after runs that failed in a row (0: go ahead)."""
        failures = int(self.last_run.get("failures", 0)) if self.last_run.get("status") == "failed" else 0
        if not failures:
            return 0.0
        try:
            ended = datetime.datetime.fromisoformat(self.last_run["at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return 0.0
        delay = RETRY_BACKOFF_SECONDS[min(failures, len(RETRY_BACKOFF_SECONDS)) - 1]
        return max(0.0, ended + delay - now)

    def dirty_keys(self) -> list[str]:
        """The current buckets overlapping any dirty range, in `_id` order."""
        if self.lowers is None or not self.dirty:
            return []
        bucket_map = self.bucket_map()
        keys = []
        for bucket in bucket_map.buckets:
            low, high = sort_key(bucket.lower), sort_key(bucket.upper)
            if any(mark.overlaps(low, high) for mark in self.dirty.values()):
                keys.append(bucket.key)
        return keys

    def newest_dirty_time(self) -> Timestamp | None:
        times = [m.time for m in self.dirty.values()]
        if self.reread:
            times.append(self.reread["time"])
        return max(times) if times else None

    def clear(
        self, covered: dict[str, DirtyBucket], reread: dict[str, Any] | None, written: set[str]
    ) -> None:
        """Drop the marks a run covered: each mark whose every overlapping bucket was written,
        unless a newer change marked it again since the run read it."""
        bucket_map = self.bucket_map()
        buckets = bucket_map.buckets
        for key, seen in covered.items():
            mark = self.dirty.get(key)
            if mark is None or mark.time > seen.time:
                continue
            overlapping = [b.key for b in buckets if mark.overlaps(sort_key(b.lower), sort_key(b.upper))]
            if all(k in written for k in overlapping):
                del self.dirty[key]
        if reread and self.reread and self.reread["time"] <= reread["time"]:
            self.reread = None

    # --- serialisation --------------------------------------------------------------------------

    def to_json(self) -> str:
        body = {
            "version": LEDGER_VERSION,
            "collection": self.collection,
            "position": self.position,
            "recorded_through": self.recorded_through,
            "bucket_size": self.bucket_size,
            "lowers": self.lowers,
            "dirty": {
                k: {"lower": m.lower, "upper": m.upper, "time": m.time, "since": m.since}
                for k, m in sorted(self.dirty.items())
            },
            "reread": self.reread,
            "ranges": {
                k: {"lower": r.lower, "upper": r.upper, "time": r.time, "since": r.since}
                for k, r in sorted(self.ranges.items())
            },
            "unsettled": self.unsettled,
            "last_run": self.last_run,
            "written_with": self.written_with,
        }
        return json_util.dumps(body, json_options=_CANONICAL, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        body = json_util.loads(text, json_options=_CANONICAL)
        return cls(
            collection=body["collection"],
            position=body.get("position"),
            recorded_through=body.get("recorded_through"),
            lowers=body.get("lowers"),
            bucket_size=int(body.get("bucket_size") or 0),
            dirty={
                k: DirtyBucket(m["lower"], m["upper"], m["time"], m.get("since", now_iso()))
                for k, m in body.get("dirty", {}).items()
            },
            reread=body.get("reread"),
            ranges={
                k: DirtyBucket(r["lower"], r["upper"], r["time"], r.get("since", now_iso()))
                for k, r in (body.get("ranges") or {}).items()
            },
            unsettled=body.get("unsettled"),
            last_run=body.get("last_run") or {},
            written_with=body.get("written_with"),
        )


class LedgerStore:
    """Reads and compare-and-swaps one collection's ledger in the lake."""

    ATTEMPTS = 50

    def __init__(self, lake: Lake, database: str, collection: str) -> None:
        self.lake = lake
        self.label = f"{database}.{collection}"
        self.database, self.collection = database, collection
        self.path = ledger_file(database, collection)

    def load(self) -> Ledger:
        return self._read()[0]

    def _read(self) -> tuple[Ledger, str | None]:
        text, version = self.lake.read_versioned(self.path)
        if text is not None:
            return Ledger.from_json(text), version
        return self._upgraded(), None

    def _upgraded(self) -> Ledger:
        """A lake written before the ledger existed: keep its bucket map and re-read once."""
        ledger = Ledger(self.label)
        old_map = self.lake.read_text(bucket_map_file(self.database, self.collection))
        if old_map:
            bucket_map = BucketMap.from_json(old_map)
            ledger.lowers, ledger.bucket_size = bucket_map.lowers, bucket_map.bucket_size
            ledger.reread = {"reason": "lake written by an older Aries", "time": Timestamp(0, 0)}
        return ledger

    def update(self, change: Callable[[Ledger], Any]) -> tuple[Ledger, Any]:
        """Apply `change` to the current ledger and save it, retrying when another writer got there first."""
        for attempt in range(self.ATTEMPTS):
            ledger, version = self._read()
            result = change(ledger)
            if self.lake.write_if(self.path, ledger.to_json(), version) is not None:
                return ledger, result
            time.sleep(min(0.5, 0.01 * (attempt + 1)))
        raise LedgerConflict(
            f"{self.label}: the ledger at {self.lake.uri(self.path)} kept changing during "
            f"{self.ATTEMPTS} attempts to update it; check that no other tool rewrites it"
        )


# --- the writer lease -------------------------------------------------------------------------


class LeaseHeld(RuntimeError):
    """Another writer holds the collection's lease; the message says who and until when."""


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    host: str
    pid: int
    run_id: str | None
    expires_at: float
    range: str | None = None  # the range of a split first load this holder writes; None: the whole collection
    released_at: float | None = None  # set by `release()`: the holder finished, it did not die
    process: str | None = None  # `process_identity()` of the holder: lets its own machine see it died

    @property
    def expired(self) -> bool:
        return self.expires_at <= time.time() or self.holder_exited

    @property
    def holder_exited(self) -> bool:
        """The holder's process is gone, as this machine can tell: same kernel boot and pid namespace,
        and no process of that pid started when the holder did (a holder elsewhere: False)."""
        if self.process is None or self.released_at is not None:
            return False
        where, _, started = self.process.rpartition("/")
        return where == _PID_SPACE and _PID_SPACE is not None and _exited(self.pid, started)

    def describe(self) -> str:
        left = self.expires_at - time.time()
        run = f", run {self.run_id}" if self.run_id else ""
        part = f", range {self.range}" if self.range else ""
        state = (
            "its process has exited"
            if self.holder_exited
            else f"expires in {left:.0f}s"
            if left > 0
            else "expired"
        )
        return f"{self.holder} (pid {self.pid} on {self.host}{run}{part}; {state})"

    def to_dict(self) -> dict[str, Any]:
        optional = ("range", "released_at", "process")
        body = {k: v for k, v in self.__dict__.items() if k not in optional or v is not None}
        return body | {"expires_at_iso": _iso(self.expires_at)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> LeaseInfo:
        return cls(
            body["holder"],
            body["host"],
            int(body["pid"]),
            body.get("run_id"),
            float(body["expires_at"]),
            body.get("range"),
            float(body["released_at"]) if body.get("released_at") is not None else None,
            body.get("process"),
        )

    @classmethod
    def from_json(cls, text: str) -> LeaseInfo:
        return cls.from_dict(json.loads(text))


def _pid_space() -> str | None:
    """Where a pid names one process: this boot of this kernel, this pid namespace (None off Linux)."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()  # noqa: SIM115
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot), "Z" for a zombie (its files are closed,
    its writers gone), None where /proc does not say (no such process, or hidden: `hidepid`)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "Z" if fields[0] in ("Z", "X") else fields[19]


def _exited(pid: int, started: str) -> bool:
    """Process `pid` of this pid namespace, started at `started`, has exited. Only what the kernel
    proves counts: no such pid, a zombie, or a pid since taken by a process started at another
    time. Another user's process whose /proc entry is hidden is taken to be alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, as another user's
    now = _started(pid)
    return now == "Z" or (now is not None and now != started)


_PID_SPACE = _pid_space()


def process_identity(pid: int) -> str | None:
    """What tells process `pid` from any other, now and later, on this machine (None off Linux)."""
    started = _started(pid)
    return f"{_PID_SPACE}/{started}" if _PID_SPACE is not None and started not in (None, "Z") else None


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


@dataclass
class _LeaseFile:
    """`lease.json`: the collection writer (at the top level, as before ranges existed) and the
    range runs of a split first load under `ranges`, one entry per range."""

    writer: LeaseInfo | None = None
    ranges: dict[str, LeaseInfo] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> _LeaseFile:
        if not text:
            return cls()
        body = json.loads(text)
        writer = LeaseInfo.from_dict(body) if body.get("holder") else None
        return cls(writer, {k: LeaseInfo.from_dict(v) for k, v in (body.get("ranges") or {}).items()})

    def to_json(self) -> str:
        body = self.writer.to_dict() if self.writer else {}
        if self.ranges:
            body["ranges"] = {k: v.to_dict() for k, v in sorted(self.ranges.items())}
        return json.dumps(body)

    def live_writer(self) -> LeaseInfo | None:
        return self.writer if self.writer is not None and not self.writer.expired else None

    def live_ranges(self) -> dict[str, LeaseInfo]:
        return {k: v for k, v in self.ranges.items() if not v.expired}


class Lease:
    """One writer per collection: an expiring lease in the lake, renewed in the background.

    Taken with a compare-and-swap on `lease.json` (exclusive create locally,
    If-None-Match / If-Match on S3). A holder that dies stops renewing, the lease
    expires after `ttl` seconds, and the next writer takes it over and repairs
    whatever was left half done (the ledger still lists the unfinished buckets).

    With `range_key`, the lease is shared: the range runs of a split first load
    hold the collection together, one entry per range in the same file, while a
    collection writer waits until none is live (and they wait while it is).
    Whoever takes over an expired holder rewrites the file, so a holder that was
    only paused finds its entry gone at its next renewal and stops.
    """

    ATTEMPTS = 50

    def __init__(self, lake: Lake, database: str, collection: str, holder: str, run_id: str | None = None,
                 ttl: float = 30.0, range_key: str | None = None) -> None:  # fmt: skip
        self.lake = lake
        self.label = f"{database}.{collection}"
        self.path = lease_file(database, collection)
        self.ttl = ttl
        self.range_key = range_key
        self.me = LeaseInfo(
            holder,
            socket.gethostname(),
            os.getpid(),
            run_id,
            0.0,
            range_key,
            process=process_identity(os.getpid()),
        )
        self._version: str | None = None
        self._expires_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def current(self) -> LeaseInfo | None:
        """The collection writer named in the file (expired or not), if any."""
        return self._read()[0].writer

    def range_holders(self) -> dict[str, LeaseInfo]:
        """The live range runs of a split first load, by range."""
        return self._read()[0].live_ranges()

    def _read(self) -> tuple[_LeaseFile, str | None]:
        text, version = self.lake.read_versioned(self.path)
        return _LeaseFile.parse(text), version

    def try_acquire(self) -> LeaseInfo | None:
        """Take the lease if it is free or expired; return the other holder if not."""
        for attempt in range(self.ATTEMPTS):
            found, version = self._read()
            writer = found.live_writer()
            if writer is not None and not self._is_me(writer):
                return writer
            mine = self._renewed()
            if self.range_key is None:
                live = [r for r in found.live_ranges().values() if not self._is_me(r)]
                if live:
                    return live[0]
                updated = _LeaseFile(mine)  # expired range entries are dropped: their holders stop
            else:
                other = found.live_ranges().get(self.range_key)
                if other is not None and not self._is_me(other):
                    return other
                updated = _LeaseFile(found.writer, found.live_ranges() | {self.range_key: mine})
            new_version = self.lake.write_if(self.path, updated.to_json(), version)
            if new_version is not None:
                self._expires_at, self._version = mine.expires_at, new_version
                return None
            time.sleep(min(0.2, 0.01 * (attempt + 1)))  # another holder wrote the file first: read again
        raise LeaseHeld(f"{self.label}: the lease at {self.lake.uri(self.path)} kept changing; try again")

    def acquire(self, wait: float, on_wait: Callable[[LeaseInfo], None] | None = None) -> None:
        """Take the lease, waiting up to `wait` seconds (telling `on_wait` who holds it), then renew it.

        A collection writer waits for range runs however long they take: each ends, or
        expires once its holder dies, and new ones cannot start while it holds the lease.
        """
        deadline = time.monotonic() + wait
        told: LeaseInfo | None = None
        while True:
            other = self.try_acquire()
            if other is None:
                break
            if other.range is not None and self.range_key is None:
                deadline = max(deadline, time.monotonic() + wait)
            if time.monotonic() >= deadline:
                raise LeaseHeld(
                    f"{self.label}: another writer holds the lease: {other.describe()}; "
                    "it is released when that writer finishes, or expires if it died; try again then"
                )
            if on_wait and (
                told is None or (told.holder, told.pid, told.range) != (other.holder, other.pid, other.range)
            ):
                on_wait(other)
                told = other
            time.sleep(min(1.0, max(0.05, other.expires_at - time.time())))
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.label}", daemon=True)
        self._thread.start()

    def _is_me(self, other: LeaseInfo) -> bool:
        mine = (self.me.holder, self.me.host, self.me.pid, self.me.range)
        return (other.holder, other.host, other.pid, other.range) == mine

    def _renewed(self) -> LeaseInfo:
        me = self.me
        return dataclasses.replace(me, expires_at=time.time() + self.ttl)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception as error:
                # A blip (S3 5xx, a full disk): the next beat tries again; past expiry the lease is lost.
                if time.time() >= self._expires_at:
                    self.lost = f"the lease could not be renewed before it expired ({type(error).__name__})"
                    return

    def renew(self) -> None:
        if self.range_key is not None:
            self._renew_range()
            return
        mine = self._renewed()
        new_version = self.lake.write_if(self.path, _LeaseFile(mine).to_json(), self._version)
        if new_version is None:
            other = self.current()
            self.lost = f"the lease was taken over by {other.describe() if other else 'nobody'}"
            self._stop.set()
            return
        self._expires_at, self._version = mine.expires_at, new_version

    def _renew_range(self) -> None:
        """Renew this range's entry; other range runs renew theirs in the same file, so read first."""
        for attempt in range(self.ATTEMPTS):
            found, version = self._read()
            entry = found.ranges.get(self.range_key)
            writer = found.live_writer()
            if entry is None or not self._is_me(entry) or writer is not None:
                taker = writer or entry
                self.lost = (
                    f"the lease was taken over by {taker.describe() if taker else 'a collection writer'}"
                )
                self._stop.set()
                return
            mine = self._renewed()
            found.ranges[self.range_key] = mine
            new_version = self.lake.write_if(self.path, found.to_json(), version)
            if new_version is not None:
                self._expires_at, self._version = mine.expires_at, new_version
                return
            time.sleep(min(0.2, 0.01 * (attempt + 1)))
        raise LeaseHeld(f"{self.label}: the lease at {self.lake.uri(self.path)} kept changing while renewing")

    def check(self) -> None:
        """Raise if the lease was lost: the caller must not publish anything more."""
        if self.lost:
            raise LeaseHeld(f"{self.label}: {self.lost}; stopping so that two writers never interleave")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self.lost:
            return
        if self.range_key is None:
            released = dataclasses.replace(self.me, expires_at=0.0, released_at=time.time())
            self.lake.write_if(self.path, _LeaseFile(released).to_json(), self._version)
            return
        for _ in range(self.ATTEMPTS):
            found, version = self._read()
            entry = found.ranges.get(self.range_key)
            if entry is None or not self._is_me(entry):
                return  # taken over meanwhile: nothing of ours to give back
            del found.ranges[self.range_key]
            if self.lake.write_if(self.path, found.to_json(), version) is not None:
                return
            time.sleep(0.02)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunHeartbeat(Lease):
    """A run's sign of life where others can see it: an expiring lease of its own, renewed in the
    background and released when the run ends (swept a day later). A run serving several collections holds no
    collection's lease while it waits for changes; this tells a live run from a dead one."""

    def __init__(self, lake: Lake, run_id: str, holder: str, ttl: float = 30.0) -> None:
        super().__init__(lake, STATE_DIR, "runs", holder, run_id, ttl)
        self.label = f"run {run_id}"
        self.path = heartbeat_file(run_id)

    @classmethod
    def info(cls, lake: Lake, run_id: str) -> LeaseInfo | None:
        """The run's heartbeat as last written (None if it never had one)."""
        return _LeaseFile.parse(lake.read_text(heartbeat_file(run_id))).writer

    @classmethod
    def sweep(cls, lake: Lake, older_than: float = 86_400.0) -> None:
        """Remove the heartbeats of runs that ended (or died) over `older_than` seconds ago."""
        for path in lake.list(f"{STATE_DIR}/runs/"):
            with contextlib.suppress(Exception):
                info = _LeaseFile.parse(lake.read_text(path)).writer
                ended = (info.released_at or info.expires_at) if info else 0.0
                if time.time() - ended > older_than:
                    lake.delete(path)


def heartbeat_file(run_id: str) -> str:
    return f"{STATE_DIR}/runs/{safe_segment(run_id)}.json"
