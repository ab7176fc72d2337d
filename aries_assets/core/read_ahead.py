"""A first load's ordered read, begun while the process that will write it is still starting.

`aries sync` spends a second or two importing Dagster and opening its instance
before its run asks MongoDB for anything, and a server preparing the first batch
of a large collection in `_id` order can take as long again (SecantusDB sorts the
whole collection; a busy mongod may page the index in). Begun here, the two
overlap.

Only reading is begun, and nothing is written: the collection's stream is marked
(`changes.mark_stream`), then the read starts at that cluster time. The run that
takes the lease adopts both (`take`), saving the mark as the first load's start,
as if it had made them itself. A read nobody adopts (the ledger no longer asks for
a first load, the run failed first) is closed by `close_all`. One collection at a
time: memory stays the few batches the read fetches ahead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from bson.max_key import MaxKey
from bson.min_key import MinKey
from pymongo import MongoClient

from aries_assets.core.changes import StreamMark, mark_stream
from aries_assets.core.extract import RangeRead, SourceCollection, open_client
from aries_assets.core.lake import LakeSpec
from aries_assets.core.ledger import Lease, LedgerStore

# How long a run waits for the read being begun before it reads on its own: beginning is a
# ledger read, two round trips and the query sent, far less than this.
BEGIN_WAIT_SECONDS = 15.0
HEAD_START_SECONDS = 0.5


@dataclass
class FirstRead:
    source: SourceCollection
    client: MongoClient
    mark: StreamMark
    read: RangeRead

    def close(self) -> None:
        try:
            self.read.close()
        finally:
            self.client.close()


_reads: dict[str, FirstRead] = {}
_lock = threading.Lock()
_beginning: threading.Thread | None = None
_closed = threading.Event()  # set by `close_all`: a read begun after it is closed at once


def begin(uri: str, lake: LakeSpec, sources: list[SourceCollection]) -> None:
    """In the background: begin the read of the first of `sources` whose ledger asks for a first load."""
    global _beginning
    _closed.clear()
    _beginning = threading.Thread(
        target=_begin, args=(uri, lake, sources), name="aries read-ahead", daemon=True
    )
    _beginning.start()
    # Beginning takes milliseconds with the process otherwise idle, several times that beside the
    # imports that follow: wait a moment for it, not for a server that does not answer.
    _beginning.join(HEAD_START_SECONDS)


def _begin(uri: str, lake_spec: LakeSpec, sources: list[SourceCollection]) -> None:
    try:
        lake = lake_spec.open()
        for source in sources:
            ledger = LedgerStore(lake, source.database, source.collection).load()
            if ledger.loaded or ledger.ranges:
                continue
            holder = Lease(lake, source.database, source.collection, "read-ahead").current()
            if holder is not None and not holder.expired and holder.released_at is None:
                return  # another writer is loading it now: this run will find it loaded
            client = open_client(uri)
            try:
                mark = mark_stream(client, source)
                first = FirstRead(
                    source, client, mark, RangeRead(client, source, MinKey(), MaxKey(), mark.start)
                )
            except BaseException:
                client.close()
                raise
            with _lock:
                unused = [_reads.pop(source.label, None)]  # begun twice in one process: the newer stands
                if _closed.is_set():
                    unused.append(first)  # begun after `close_all`: nobody will take it
                else:
                    _reads[source.label] = first
            for read in unused:
                if read is not None:
                    read.close()
            return
    except Exception:  # noqa: BLE001 - only a head start: the run reads as usual and reports any error
        return


def begun(source: SourceCollection) -> FirstRead | None:
    """The read begun for `source`, if any, once beginning is over; it stays to be taken."""
    if _beginning is not None:
        _beginning.join(BEGIN_WAIT_SECONDS)
    with _lock:
        return _reads.get(source.label)


def take(source: SourceCollection) -> FirstRead | None:
    """The read begun for `source`, now the caller's to use and close; None if there is none."""
    if begun(source) is None:
        return None
    with _lock:
        return _reads.pop(source.label, None)


def close_all() -> None:
    """Close the reads nobody took, and one still being begun once it is (nothing waits for it)."""
    with _lock:
        _closed.set()
        left = list(_reads.values())
        _reads.clear()
    for first in left:
        first.close()
