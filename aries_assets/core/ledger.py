"""The ledger: one collection's durable sync state, shared by the sensor, runs and `aries sync`.

It lives in the lake at `<db>/<collection>/_aries/ledger.json` and holds

- the change-stream **position**: the cluster time up to which every change of the
  collection has been recorded here;
- the **bucket map** (the `_id` lower bounds of the buckets; none before the first load);
- the **dirty buckets**: for each, the `_id` range it covered when the change was
  recorded and the cluster time of the newest change it must include;
- a **re-read** request, when history was lost or a full pass was asked for;
- the outcome of the last run, for `aries status` and the UI.

Every update is a compare-and-swap on the file (`Lake.write_if`), so the sensor
appending dirty buckets and a run clearing the ones it wrote never lose each
other's changes. A bucket leaves the ledger only once a file covering its
newest change is written (and loaded, when a warehouse is configured); the
position moves only after the changes before it are recorded.

Beside it, `lease.json` names the one writer of the collection; see `Lease`.
"""

from __future__ import annotations

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

from aries_assets.core.buckets import BucketMap
from aries_assets.core.lake import STATE_DIR, Lake, bucket_map_file, collection_prefix
from aries_assets.core.ordering import sort_key

_CANONICAL = json_util.CANONICAL_JSON_OPTIONS
LEDGER_VERSION = 1


class LedgerConflict(RuntimeError):
    """The ledger kept changing under a compare-and-swap; names the collection."""


def ledger_file(database: str, collection: str) -> str:
    return f"{collection_prefix(database, collection)}/{STATE_DIR}/ledger.json"


def lease_file(database: str, collection: str) -> str:
    return f"{collection_prefix(database, collection)}/{STATE_DIR}/lease.json"


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

    def merge(self, other: DirtyBucket) -> None:
        """Widen to cover both marks (the bucket map may have changed between them)."""
        if sort_key(other.upper) > sort_key(self.upper):
            self.upper = other.upper
        self.time = max(self.time, other.time)


@dataclass
class Ledger:
    collection: str
    position: Timestamp | None = None
    lowers: list[Any] | None = None  # the bucket map; None until the first load
    bucket_size: int = 0
    dirty: dict[str, DirtyBucket] = field(default_factory=dict)
    reread: dict[str, Any] | None = None  # {"reason": str, "time": Timestamp}
    last_run: dict[str, Any] = field(default_factory=dict)  # outcome of the last run that finished

    # --- the bucket map ------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.lowers is not None

    def bucket_map(self) -> BucketMap:
        if self.lowers is None:
            raise ValueError(f"{self.collection}: no bucket map yet (first load pending)")
        return BucketMap(self.bucket_size, list(self.lowers))

    # --- changes --------------------------------------------------------------------------------

    def mark_ids(self, ids_with_times: list[tuple[Any, Timestamp]]) -> int:
        """Mark the buckets holding these changed `_id`s dirty; returns how many buckets were marked."""
        if self.lowers is None:
            return 0  # the first load reads everything after the position anyway
        bucket_map = self.bucket_map()
        buckets = bucket_map.buckets
        marked: dict[str, DirtyBucket] = {}
        for _id, when in ids_with_times:
            bucket = buckets[bucket_map.index_of(_id)]
            mark = DirtyBucket(bucket.lower, bucket.upper, when)
            if bucket.key in marked:
                marked[bucket.key].merge(mark)
            else:
                marked[bucket.key] = mark
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
        if self.dirty:
            return f"{len(self.dirty)} dirty bucket{'s' if len(self.dirty) != 1 else ''}"
        return None

    def dirty_keys(self) -> list[str]:
        """The current buckets overlapping any dirty range, in `_id` order."""
        if self.lowers is None or not self.dirty:
            return []
        bucket_map = self.bucket_map()
        keys = []
        for bucket in bucket_map.buckets:
            low, high = sort_key(bucket.lower), sort_key(bucket.upper)
            for mark in self.dirty.values():
                if low < sort_key(mark.upper) and sort_key(mark.lower) < high:
                    keys.append(bucket.key)
                    break
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
            low, high = sort_key(mark.lower), sort_key(mark.upper)
            overlapping = [b.key for b in buckets if sort_key(b.lower) < high and low < sort_key(b.upper)]
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
            "bucket_size": self.bucket_size,
            "lowers": self.lowers,
            "dirty": {
                k: {"lower": m.lower, "upper": m.upper, "time": m.time, "since": m.since}
                for k, m in sorted(self.dirty.items())
            },
            "reread": self.reread,
            "last_run": self.last_run,
        }
        return json_util.dumps(body, json_options=_CANONICAL, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        body = json_util.loads(text, json_options=_CANONICAL)
        return cls(
            collection=body["collection"],
            position=body.get("position"),
            lowers=body.get("lowers"),
            bucket_size=int(body.get("bucket_size") or 0),
            dirty={
                k: DirtyBucket(m["lower"], m["upper"], m["time"], m.get("since", now_iso()))
                for k, m in body.get("dirty", {}).items()
            },
            reread=body.get("reread"),
            last_run=body.get("last_run") or {},
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
    released_at: float | None = None  # set by `release()`: the holder finished, it did not die

    @property
    def expired(self) -> bool:
        return self.expires_at <= time.time()

    def describe(self) -> str:
        left = self.expires_at - time.time()
        run = f", run {self.run_id}" if self.run_id else ""
        state = f"expires in {left:.0f}s" if left > 0 else "expired"
        return f"{self.holder} (pid {self.pid} on {self.host}{run}; {state})"

    def to_json(self) -> str:
        return json.dumps(self.__dict__ | {"expires_at_iso": _iso(self.expires_at)})

    @classmethod
    def from_json(cls, text: str) -> LeaseInfo:
        body = json.loads(text)
        released_at = body.get("released_at")
        return cls(
            body["holder"],
            body["host"],
            int(body["pid"]),
            body.get("run_id"),
            float(body["expires_at"]),
            float(released_at) if released_at is not None else None,
        )


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


class Lease:
    """One writer per collection: an expiring lease in the lake, renewed in the background.

    Taken with a compare-and-swap on `lease.json` (exclusive create locally,
    If-None-Match / If-Match on S3). A holder that dies stops renewing, the lease
    expires after `ttl` seconds, and the next writer takes it over and repairs
    whatever was left half done (the ledger still lists the unfinished buckets).
    """

    def __init__(self, lake: Lake, database: str, collection: str, holder: str, run_id: str | None = None,
                 ttl: float = 30.0) -> None:  # fmt: skip
        self.lake = lake
        self.label = f"{database}.{collection}"
        self.path = lease_file(database, collection)
        self.ttl = ttl
        self.me = LeaseInfo(holder, socket.gethostname(), os.getpid(), run_id, 0.0)
        self._version: str | None = None
        self._expires_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def current(self) -> LeaseInfo | None:
        text, _ = self.lake.read_versioned(self.path)
        return LeaseInfo.from_json(text) if text else None

    def try_acquire(self) -> LeaseInfo | None:
        """Take the lease if it is free or expired; return the other holder if not."""
        text, version = self.lake.read_versioned(self.path)
        if text:
            other = LeaseInfo.from_json(text)
            if not other.expired and not self._is_me(other):
                return other
        mine = self._renewed()
        new_version = self.lake.write_if(self.path, mine.to_json(), version)
        if new_version is None:
            return self.current() or mine  # someone else won the race
        self._expires_at, self._version = mine.expires_at, new_version
        return None

    def acquire(self, wait: float, on_wait: Callable[[LeaseInfo], None] | None = None) -> None:
        """Take the lease, waiting up to `wait` seconds (telling `on_wait` who holds it), then renew it."""
        deadline = time.monotonic() + wait
        told: LeaseInfo | None = None
        while True:
            other = self.try_acquire()
            if other is None:
                break
            if time.monotonic() >= deadline:
                raise LeaseHeld(
                    f"{self.label}: another writer holds the lease: {other.describe()}; "
                    "it is released when that writer finishes, or expires if it died; try again then"
                )
            if on_wait and (told is None or told.holder != other.holder or told.pid != other.pid):
                on_wait(other)
                told = other
            time.sleep(min(1.0, max(0.05, other.expires_at - time.time())))
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease {self.label}", daemon=True)
        self._thread.start()

    def _is_me(self, other: LeaseInfo) -> bool:
        return (other.holder, other.host, other.pid) == (self.me.holder, self.me.host, self.me.pid)

    def _renewed(self) -> LeaseInfo:
        return LeaseInfo(self.me.holder, self.me.host, self.me.pid, self.me.run_id, time.time() + self.ttl)

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
        mine = self._renewed()
        new_version = self.lake.write_if(self.path, mine.to_json(), self._version)
        if new_version is None:
            other = self.current()
            self.lost = f"the lease was taken over by {other.describe() if other else 'nobody'}"
            self._stop.set()
            return
        self._expires_at, self._version = mine.expires_at, new_version

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
        released = LeaseInfo(self.me.holder, self.me.host, self.me.pid, self.me.run_id, 0.0, time.time())
        self.lake.write_if(self.path, released.to_json(), self._version)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
