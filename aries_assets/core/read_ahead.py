"""A first load's ordered read, begun while the process that will write it is still starting.

`aries sync` spends a second or two importing Dagster and opening its instance
before its run asks MongoDB for anything, and a server preparing the first batch
of a large collection in `_id` order can take as long again (SecantusDB sorts the
whole collection; a busy mongod may page the index in). Begun here, the two
overlap.

Only reading is begun, and nothing is written: the collection is checked
(`extract.check_collection`, while the server is idle), its stream is marked
(`changes.mark_stream`), then the read starts at that cluster time. A collection
the check refuses is not read (its run checks again and says why): the next one
needing a first load is. The run that takes the lease adopts the read and the mark
(`take`), saving the mark as the first load's start, as if it had made them itself,
and does not check the collection again (`checked`). A read nobody adopts (the
ledger no longer asks for a first load, the run failed first) is closed by
`close_all`. One collection at a time: memory stays what the read fetches ahead
(`AHEAD_BYTES`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from bson.max_key import MaxKey
from bson.min_key import MinKey

from aries_assets.core.changes import StreamMark, mark_stream
from aries_assets.core.extract import (
    PREFETCH_BYTES,
    RangeRead,
    SourceCollection,
    UnsupportedCollection,
    check_collection,
    open_client,
)
from aries_assets.core.lake import LakeSpec
from aries_assets.core.ledger import Lease, LedgerStore

# How long a run waits for the read being begun before it reads on its own: beginning is a
# ledger read, two round trips and the query sent, far less than this.
BEGIN_WAIT_SECONDS = 15.0
HEAD_START_SECONDS = 0.5
# A read not adopted by then is dropped: its cursor may be near the server's idle timeout, and
# the collections synced before it took longer than a head start is worth.
MAX_AGE_SECONDS = 120.0
# Raw BSON fetched ahead while the process starts: seconds of a server's reading, bounded by bytes
# (a bucket's worth by default), not the few batches a read in a run fetches ahead of its writer.
AHEAD_BYTES = 64 * 1024 * 1024


@dataclass
class FirstRead:
    source: SourceCollection
    mark: StreamMark
    read: RangeRead  # owns its client: closing it closes the client
    begun_at: float

    def close(self) -> None:
        self.read.close()


class _Beginning:
    """One `begin`: its thread, and the read it began, until taken or closed."""

    def __init__(self, uri: str, lake: LakeSpec, sources: list[SourceCollection]) -> None:
        self.reads: dict[str, FirstRead] = {}  # by collection label
        self.closed = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(
            target=self._begin, args=(uri, lake, sources), name="aries read-ahead", daemon=True
        )
        self.thread.start()

    def _begin(self, uri: str, lake_spec: LakeSpec, sources: list[SourceCollection]) -> None:
        try:
            lake = lake_spec.open()
            for source in sources:
                ledger = LedgerStore(lake, source.database, source.collection).load()
                if ledger.loaded or ledger.ranges or ledger.position is not None:
                    continue  # loaded, split, or a first load begun: nothing to read ahead
                holder = Lease(lake, source.database, source.collection, "read-ahead").current()
                if holder is not None and not holder.expired and holder.released_at is None:
                    continue  # another writer is loading it now
                client = open_client(uri)
                try:
                    check_collection(client, source, synced_before=False)
                except UnsupportedCollection:
                    client.close()
                    continue  # its run says why; the next collection's first load may begin
                try:
                    mark = mark_stream(client, source)
                    read = RangeRead(
                        client,
                        source,
                        MinKey(),
                        MaxKey(),
                        mark.start,
                        owns_client=True,
                        ahead_bytes=AHEAD_BYTES,
                    )
                except BaseException:
                    client.close()
                    raise
                with self.lock:
                    if not self.closed:
                        self.reads[source.label] = FirstRead(source, mark, read, time.monotonic())
                        return
                read.close()  # closed meanwhile: nobody will take it
                return
        except Exception:  # noqa: BLE001 - only a head start: the run reads as usual and reports any error
            return

    def take(self, source: SourceCollection) -> FirstRead | None:
        self.thread.join(BEGIN_WAIT_SECONDS)
        with self.lock:
            first = self.reads.pop(source.label, None)
        if first is None:
            return None
        if first.source != source or time.monotonic() - first.begun_at > MAX_AGE_SECONDS:
            first.close()  # another filter than the run's, or too old to trust its cursor
            return None
        first.read.fetch_ahead(PREFETCH_BYTES)  # a run's read now, beside its writers' buckets
        return first

    def close(self) -> None:
        with self.lock:
            self.closed = True
            left = list(self.reads.values())
            self.reads.clear()
        for first in left:
            first.close()


_current: _Beginning | None = None


def begin(uri: str, lake: LakeSpec, sources: list[SourceCollection]) -> None:
    """In the background: begin the read of the first of `sources` whose ledger asks for a first load."""
    global _current
    if _current is not None:
        _current.close()
    _current = _Beginning(uri, lake, sources)
    # Beginning takes milliseconds with the process otherwise idle, several times that beside the
    # imports that follow: wait a moment for it, not for a server that does not answer.
    _current.thread.join(HEAD_START_SECONDS)


def begun(source: SourceCollection) -> FirstRead | None:
    """The read begun for `source`, once beginning is over, left to be taken."""
    if _current is None:
        return None
    _current.thread.join(BEGIN_WAIT_SECONDS)
    with _current.lock:
        first = _current.reads.get(source.label)
    return first if first is not None and first.source == source else None


def checked(source: SourceCollection) -> bool:
    """Whether a read begun for `source`, not yet taken, checked the collection moments ago (a run
    adopting it need not ask a server busy with that read to check again)."""
    first = begun(source)
    return first is not None and time.monotonic() - first.begun_at <= MAX_AGE_SECONDS


def take(source: SourceCollection) -> FirstRead | None:
    """The read begun for `source` (collection and filter), now the caller's to use and close."""
    return _current.take(source) if _current is not None else None


def close_all() -> None:
    """Close the reads nobody took, and one still being begun once it is (nothing waits for it)."""
    if _current is not None:
        _current.close()
