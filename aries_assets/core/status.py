"""Is everything in step? One collection's sync state, gathered from the lake, MongoDB and the warehouse."""

from __future__ import annotations

import datetime
from dataclasses import asdict, dataclass, field
from typing import Any

from bson import Timestamp

from aries_assets.core import snapshot
from aries_assets.core.engine import CollectionSpec
from aries_assets.core.lake import Lake
from aries_assets.core.ledger import Lease, LedgerStore
from aries_assets.core.warehouse.loader import Loader

# A sensor moves a quiet collection's position every few seconds: a position older than this means
# nothing is reading its changes (`aries sync` from cron, between runs), and the lake may be behind.
UNREAD_AFTER_SECONDS = 60.0


@dataclass
class CollectionStatus:
    collection: str
    documents: int = 0
    buckets: int = 0
    lag_seconds: float | None = None  # MongoDB's cluster time now less the recorded stream position
    stream_position: str | None = None
    dirty_buckets: int = 0
    dirty_since: str | None = None  # when the oldest waiting bucket became dirty
    waiting_for: str | None = None  # what the next run will do, if anything
    last_run: dict[str, Any] = field(default_factory=dict)
    last_success: str | None = None
    lease: str | None = None  # who writes the collection now
    schema_version: int = 0
    warehouse_rows: int | None = None
    warehouse_buckets_behind: int | None = None  # buckets whose lake file the table does not hold
    problems: list[str] = field(default_factory=list)

    @property
    def in_step(self) -> bool:
        return (
            not self.problems
            and not self.dirty_buckets
            and self.waiting_for is None
            and not self.warehouse_buckets_behind
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"in_step": self.in_step}


def collection_status(
    spec: CollectionSpec, lake: Lake, loader: Loader | None, cluster_time: Timestamp | None
) -> CollectionStatus:
    source = spec.source
    status = CollectionStatus(source.label)
    ledger = LedgerStore(lake, source.database, source.collection).load()
    status.waiting_for = ledger.needs_work()
    status.dirty_buckets = len(ledger.dirty)
    if ledger.dirty:
        status.dirty_since = min(m.since for m in ledger.dirty.values())
    status.last_run = ledger.last_run
    status.last_success = ledger.last_run.get("last_success")
    if ledger.last_run.get("status") == "failed":
        status.problems.append(f"last run failed: {ledger.last_run.get('error', 'see the run in Dagster')}")
    if ledger.position is not None:
        status.stream_position = ledger.position.as_datetime().isoformat(timespec="seconds")
        if cluster_time is not None:
            status.lag_seconds = max(0.0, float(cluster_time.time - ledger.position.time))
            if status.waiting_for is None and status.lag_seconds > UNREAD_AFTER_SECONDS:
                status.waiting_for = (
                    f"changes since {status.stream_position} not read yet: no sensor is following the "
                    "stream (is the daemon running?); `aries sync` reads them"
                )
    lease = Lease(lake, source.database, source.collection, "status")
    holder = lease.current()
    if holder is not None and not holder.expired:
        status.lease = holder.describe()
    ranges = lease.range_holders()
    if ranges:
        status.lease = f"{len(ranges)} range runs: " + "; ".join(r.describe() for r in ranges.values())
    if not ledger.loaded:
        return status
    keys = ledger.bucket_map().keys
    files = snapshot.inspect_files(source, lake, keys)
    status.buckets = len(keys)
    status.documents = sum(f.documents for f in files.values() if f is not None)
    missing = [k for k, f in files.items() if f is None]
    if missing and not ledger.dirty:
        status.problems.append(f"{len(missing)} buckets have no current file, e.g. {missing[0]}")
    schema = snapshot.load_schema(lake, source)
    status.schema_version = schema.version if schema else 0
    if loader is not None and spec.table is not None:
        try:
            loaded = loader.loaded(spec.table)
            status.warehouse_buckets_behind = sum(
                1 for k, f in files.items() if f is not None and loaded.get(k) != snapshot.load_digest(f)
            )
            status.warehouse_rows = loader.row_count(spec.table)
        except Exception as error:  # noqa: BLE001 - status reports any warehouse failure as a problem
            status.problems.append(f"warehouse: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        else:
            settled = not ledger.dirty and not status.warehouse_buckets_behind
            if settled and status.warehouse_rows is not None and status.warehouse_rows != status.documents:
                status.problems.append(
                    f"warehouse holds {status.warehouse_rows:,} rows for {status.documents:,} documents in the lake"
                )
    return status


def ago(iso: str | None) -> str:
    if not iso:
        return "never"
    seconds = (datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(iso)).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"
