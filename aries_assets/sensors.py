"""Change-stream sensors: triggers only. One per stream scope (a database, by default).

A tick reads the scope's change stream (bounded), records the changed buckets
in each collection's ledger, and requests at most one run per collection whose
ledger asks for work and that has no run under way. A failed, killed or
cancelled run leaves its buckets in the ledger, so the next tick asks again,
after a backoff, with no new change needed. Everything that reads a bucket,
a footer or the warehouse happens in the run.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid

import dagster as dg

from aries_assets.config import CollectionConfig
from aries_assets.core.changes import StreamScope, record_changes
from aries_assets.core.ledger import Lease, LeaseInfo
from aries_assets.factory import job_name, mongo_key
from aries_assets.resources import LakeResource, MongoResource

SENSOR_INTERVAL = 2  # seconds between ticks; a quiet tick is one short change-stream read
MAX_SECONDS = 3.0  # stream reading per tick, well under Dagster's 60 s limit
MAX_EVENTS = 20_000
OBSERVE_EVERY = 60.0  # seconds between lag observations of a quiet collection
BACKOFF_SECONDS = (5, 15, 30, 60, 120, 300)  # after 1, 2, ... consecutive failed runs
ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
FAILED = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


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

    records = context.instance.get_run_records(
        filters=dg.RunsFilter(tags={"aries/scope": scope.name}), limit=20 * len(collections) + 50
    )
    by_collection: dict[str, list[dg.RunRecord]] = {}
    for record in records:  # newest first
        by_collection.setdefault(record.dagster_run.tags.get("aries/collection", ""), []).append(record)

    now = time.time()
    requests, observations = [], []
    for coll in collections:
        ledger = recorded[coll.label].ledger
        runs = by_collection.get(coll.name, [])
        active = [r for r in runs if r.dagster_run.status in ACTIVE]
        active = [r for r in active if not _repair_dead_run(context, r, store, coll, lease_seconds, now)]
        why = ledger.needs_work()
        if why and not active:
            wait = _backoff(runs, now)
            if wait > 0:
                context.log.info(f"{coll.label}: {why}; last runs failed, next try in {wait:.0f}s")
            else:
                requests.append(
                    dg.RunRequest(
                        run_key=f"{coll.name}:{uuid.uuid4().hex[:12]}",
                        job_name=job_name(coll),
                        tags={
                            "aries/collection": coll.name,
                            "aries/scope": scope.name,
                            "aries/trigger": "change stream",
                            "aries/reason": why[:200],
                        },
                    )
                )
        seen = recorded[coll.label]
        if seen.events or now - observed.get(coll.name, 0) >= OBSERVE_EVERY:
            observed[coll.name] = now
            holder = Lease(store, coll.database, coll.collection, "sensor").current()
            observations.append(
                dg.AssetObservation(
                    mongo_key(coll),
                    metadata={
                        "replication_lag_seconds": seen.lag_seconds,
                        "change_events": seen.events,
                        "dirty_buckets": len(ledger.dirty),
                        "waiting_for": why or "nothing: in step",
                        "stream_position": ledger.position.as_datetime().isoformat()
                        if ledger.position
                        else "none",
                        "last_run": dg.MetadataValue.json(ledger.last_run or {}),
                        "lease": holder.describe() if holder and not holder.expired else "free",
                        "observed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    },
                )
            )
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps({"observed": observed}),
        asset_events=observations,
    )


def _backoff(runs: list[dg.RunRecord], now: float) -> float:
    """Seconds to wait before another try: longer after each consecutive failure."""
    failures = 0
    for record in runs:
        if record.dagster_run.status not in FAILED:
            break
        failures += 1
    if not failures:
        return 0.0
    ended = runs[0].end_time or runs[0].update_timestamp.timestamp()
    delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS)) - 1]
    return max(0.0, ended + delay - now)


def _repair_dead_run(
    context, record: dg.RunRecord, lake, coll: CollectionConfig, lease_seconds: float, now: float
) -> bool:
    """A run killed with its process never reports its end; once its lease has expired well past
    the time a live run would have renewed it, mark it failed so the collection can run again."""
    run = record.dagster_run
    if run.status not in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING):
        return False
    started = record.start_time or record.create_timestamp.timestamp()
    if now - started < 3 * lease_seconds:
        return False
    lease = Lease(lake, coll.database, coll.collection, "sensor").current()
    if not run_looks_dead(run.run_id, lease, lease_seconds, now):
        return False
    message = (
        f"{coll.label}: run {run.run_id} stopped renewing its lease (its process died); "
        "marked failed so the collection's buckets are retried"
    )
    context.log.warning(message)
    context.instance.report_run_failed(run, message)
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
