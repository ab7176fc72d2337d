"""Change-stream sensors: triggers only. One per stream scope (a database, by default).

A tick reads the scope's change stream (bounded), records the changed buckets
in each collection's ledger, and requests at most one run per collection whose
ledger asks for work and that has no run under way. A failed, killed or
cancelled run leaves its buckets in the ledger, so the next tick asks again,
after a backoff, with no new change needed. Everything that reads a bucket,
a footer or the warehouse happens in the run.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import time
import uuid

import dagster as dg

from aries_assets.config import CollectionConfig
from aries_assets.core.changes import StreamScope, record_changes
from aries_assets.core.engine import OPTIONS_CHANGED
from aries_assets.core.lake import each_at_once
from aries_assets.core.ledger import Lease, LeaseInfo, Ledger, LedgerStore, RunHeartbeat, now_iso
from aries_assets.factory import job_name, mongo_key, serve_job_name, spec_of
from aries_assets.resources import LakeResource, MongoResource

# Seconds between ticks asked for; Dagster's sensor daemon ticks every 5 s at the most (its loop's
# floor), which is why a serving run follows the stream itself while it lingers.
SENSOR_INTERVAL = 1
MAX_SECONDS = 3.0  # stream reading per tick, well under Dagster's 60 s limit
MAX_EVENTS = 20_000
OBSERVE_EVERY = 60.0  # seconds between lag observations of a quiet collection
ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def sensor_name(scope: StreamScope) -> str:
    return "changes__" + "".join(c if c.isalnum() or c == "_" else "_" for c in scope.name)


def build_change_sensor(
    scope: StreamScope,
    collections: list[CollectionConfig],
    jobs: list[dg.JobDefinition],
    lease_seconds: float,
    interval_seconds: int = SENSOR_INTERVAL,
) -> dg.SensorDefinition:
    labels = ", ".join(f"`{c.label}`" for c in collections)

    @dg.sensor(
        name=sensor_name(scope),
        jobs=jobs,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            f"Watches one change stream ({scope.kind} `{scope.name}`) for {labels}, records changed buckets "
            "in each collection's ledger, and requests a sync run for each collection with work waiting."
        ),
    )
    def change_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource, lake: LakeResource):
        return evaluate(context, scope, collections, mongo, lake, lease_seconds)

    return change_sensor


def evaluate(
    context: dg.SensorEvaluationContext,
    scope: StreamScope,
    collections: list[CollectionConfig],
    mongo: MongoResource,
    lake: LakeResource,
    lease_seconds: float,
) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    observed: dict[str, float] = cursor.get("observed", {})
    store = lake.open()
    client = mongo.client()
    try:
        recorded, changes = record_changes(client, store, scope, MAX_EVENTS, MAX_SECONDS)
    finally:
        client.close()
    if changes is not None and changes.history_lost:
        context.log.warning(
            f"{scope.name}: {changes.history_lost}; the collections are re-read by their runs"
        )

    now = time.time()
    by_name = {c.name: c for c in collections}
    active = context.instance.get_run_records(
        filters=dg.RunsFilter(tags={"aries/scope": scope.name}, statuses=ACTIVE), limit=len(collections) + 50
    )
    covered: set[str] = set()  # collections an active run is serving
    for record in active:
        names = _served_by(record.dagster_run, by_name)
        if not _repair_dead_run(context, record, store, [by_name[n] for n in names], lease_seconds, now):
            covered |= names

    own, shared, to_observe = [], [], []
    for coll in collections:
        ledger = recorded[coll.label].ledger
        written_with = spec_of(coll, False).written_with
        if (
            ledger.position is not None
            and ledger.written_with not in (None, written_with)
            and not ledger.reread
            and not ledger.ranges
        ):
            # The config changed what shapes the files (an exclude added, a query): a re-read rewrites
            # them, with no document changing. (A lake older than the fingerprint: its next run checks.)
            ledger, _ = LedgerStore(store, coll.database, coll.collection).update(
                functools.partial(Ledger.ask_reread, reason=OPTIONS_CHANGED, now=ledger.position)
            )
        why = ledger.needs_work()
        # A split first load's ranges are written by their range runs (a backfill); one run settles after.
        if why and coll.name not in covered and not ledger.ranges:
            wait = ledger.retry_wait(now)
            if wait > 0:
                context.log.info(f"{coll.label}: {why}; the last runs failed, next try in {wait:.0f}s")
            elif not ledger.loaded or ledger.reread:
                own.append((coll, why))  # a whole-collection read: a run of its own
            else:
                shared.append((coll, why))
        seen = recorded[coll.label]
        if seen.events or now - observed.get(coll.name, 0) >= OBSERVE_EVERY:
            observed[coll.name] = now
            to_observe.append((coll, ledger, seen, why))
    holders = each_at_once(
        lambda item: Lease(store, item[0].database, item[0].collection, "sensor").current(), to_observe
    )
    observations = [
        _observation(coll, ledger, seen, why, holder)
        for (coll, ledger, seen, why), holder in zip(to_observe, holders, strict=True)
    ]
    requests = [_collection_request(scope, coll, why) for coll, why in own]
    if shared:
        requests.append(_serve_request(scope, [coll for coll, _ in shared]))
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps({"observed": observed}),
        asset_events=observations,
    )


def _served_by(run: dg.DagsterRun, by_name: dict[str, CollectionConfig]) -> set[str]:
    """The collections an active run of this scope is writing or will write."""
    if run.job_name.startswith("serve__"):
        ops = (run.run_config or {}).get("ops", {})
        names = next(iter(ops.values()), {}).get("config", {}).get("collections", []) if ops else []
        return {n for n in names if n in by_name} if names else set(by_name)
    name = run.tags.get("aries/collection", "")
    return {name} if name in by_name else set()


def _collection_request(scope: StreamScope, coll: CollectionConfig, why: str) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"{coll.name}:{uuid.uuid4().hex[:12]}",
        job_name=job_name(coll),
        tags={
            "aries/collection": coll.name,
            "aries/scope": scope.name,
            "aries/trigger": "change stream",
            "aries/reason": why[:200],
        },
    )


def _serve_request(scope: StreamScope, waiting: list[CollectionConfig]) -> dg.RunRequest:
    """One run serves every collection of the stream: it follows their ledgers until they are quiet."""
    listed = ", ".join(c.name for c in waiting)
    return dg.RunRequest(
        run_key=f"serve:{uuid.uuid4().hex[:12]}",
        job_name=serve_job_name(scope.name),
        tags={
            "aries/scope": scope.name,
            "aries/trigger": "change stream",
            "aries/reason": f"changes in {listed if len(listed) <= 180 else f'{len(waiting)} collections'}",
        },
    )


def _observation(coll: CollectionConfig, ledger, seen, why: str | None, holder) -> dg.AssetObservation:
    return dg.AssetObservation(
        mongo_key(coll),
        metadata={
            "replication_lag_seconds": seen.lag_seconds,
            "change_events": seen.events,
            "dirty_buckets": len(ledger.dirty),
            "waiting_for": why or "nothing: in step",
            "stream_position": ledger.position.as_datetime().isoformat() if ledger.position else "none",
            "last_run": dg.MetadataValue.json(ledger.last_run or {}),
            "lease": holder.describe() if holder and not holder.expired else "free",
            "observed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    )


def _repair_dead_run(
    context, record: dg.RunRecord, lake, collections: list[CollectionConfig], lease_seconds: float, now: float
) -> bool:
    """A run killed with its process never reports its end (the default run launcher cannot watch
    it). Once its lease, or its heartbeat for a run serving several collections, has expired well
    past the time a live run would have renewed it, mark it failed so its collections run again."""
    run = record.dagster_run
    if run.status not in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING):
        return False
    started = record.start_time or record.create_timestamp.timestamp()
    if now - started < 3 * lease_seconds:
        return False
    if run.job_name.startswith("serve__"):
        lease = RunHeartbeat.info(lake, run.run_id)
    else:
        coll = collections[0] if collections else None
        lease = Lease(lake, coll.database, coll.collection, "sensor").current() if coll else None
    if not run_looks_dead(run.run_id, lease, lease_seconds, now):
        return False
    # Its status may have moved on while the lease was read: a run that just finished is left alone.
    current = context.instance.get_run_by_id(run.run_id)
    if current is None or current.status not in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING):
        return False
    labels = ", ".join(c.label for c in collections) or "its collections"
    message = (
        f"{labels}: run {run.run_id} stopped renewing its lease (its process died); "
        "marked failed so the buckets are retried"
    )
    context.log.warning(message)
    context.instance.report_run_failed(run, message)
    for coll in collections:
        with contextlib.suppress(Exception):
            LedgerStore(lake, coll.database, coll.collection).update(
                lambda led: led.note_run("failed", now_iso(), {"error": message})
            )
    return True


def run_looks_dead(run_id: str, lease: LeaseInfo | None, lease_seconds: float, now: float) -> bool:
    """Whether a run that started over `3 * lease_seconds` ago and still shows as in progress
    has died, judged by the collection's lease.

    A run that released its lease finished its work and is about to report its end: it is
    dead only if that report is still missing `lease_seconds` later. A run whose lease
    expired is dead once it has been expired for `lease_seconds`.
    """
    if lease is None or lease.run_id != run_id:
        return True  # it never took the lease, or another writer has it since
    if lease.released_at is not None:
        return now - lease.released_at >= lease_seconds
    return now - lease.expires_at >= lease_seconds
