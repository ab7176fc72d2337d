"""Change-stream sensors: one per collection, refreshing only the buckets that changed.

Each tick reads the collection's change stream from the resume token in the
sensor's cursor (for at most MAX_SECONDS and MAX_EVENTS, well under Dagster's
60 s limit), maps the changed `_id`s to buckets, and returns one SensorResult:
a run request per changed bucket, partitions for new buckets, an observation
with the replication lag, and the new token. The token moves only as far as the
changes whose buckets it requested.
"""

import datetime
import hashlib
import json
import time

import dagster as dg

from aries_assets.config import CollectionConfig
from aries_assets.core import catalog, changes, snapshot
from aries_assets.core.lake import collection_prefix, load_bucket_map
from aries_assets.factory import (
    CollectionDefinitions,
    job_name,
    load_job_name,
    mongo_key,
    source_of,
    table_of,
)
from aries_assets.resources import LakeResource, MongoResource, WarehouseResource

MAX_SECONDS = 20.0
MAX_EVENTS = 20_000
RECONCILE_WINDOW_SECONDS = 300  # after requesting runs, check the schema for this long
SENSOR_INTERVAL = 2  # seconds between ticks; a quiet tick is one short change-stream read


def sensor_name(coll: CollectionConfig) -> str:
    return f"changes__{coll.name}"


def build_change_sensor(
    coll: CollectionConfig, definitions: CollectionDefinitions, interval_seconds: int = SENSOR_INTERVAL
) -> dg.SensorDefinition:
    source = source_of(coll)
    settings = {
        "name": sensor_name(coll),
        "jobs": [j for j in (definitions.job, definitions.load_job) if j is not None],
        "minimum_interval_seconds": interval_seconds,
        "default_status": dg.DefaultSensorStatus.RUNNING,
        "description": (
            f"Watches the change stream of `{coll.label}` and requests a rewrite of every bucket with a "
            "changed document. Cursor: the MongoDB resume token."
        ),
    }
    if definitions.load_job is None:

        @dg.sensor(**settings)
        def change_sensor(context: dg.SensorEvaluationContext, mongo: MongoResource, lake: LakeResource):
            return evaluate(context, coll, source, mongo, lake, None)

        return change_sensor

    @dg.sensor(**settings)
    def change_sensor_with_warehouse(
        context: dg.SensorEvaluationContext,
        mongo: MongoResource,
        lake: LakeResource,
        warehouse: WarehouseResource,
    ):
        return evaluate(context, coll, source, mongo, lake, warehouse)

    return change_sensor_with_warehouse


def evaluate(
    context, coll: CollectionConfig, source, mongo: MongoResource, lake: LakeResource, warehouse
) -> dg.SensorResult:
    cursor = json.loads(context.cursor) if context.cursor else {}
    store = lake.open()
    # A new sensor starts where `aries sync` left off, if it ran.
    token = changes.token_from_text(cursor.get("token")) if cursor else changes.load_token(store, source)
    client = mongo.client()
    try:
        collection = source.open(client)
        plan = changes.plan_sync(
            source, collection, store, coll.bucket_size, token, False, MAX_EVENTS, MAX_SECONDS
        )
        bucket_map = load_bucket_map(store, coll.database, coll.collection)
        keys = bucket_map.keys if bucket_map else []
        now = time.time()
        requested = set(plan.buckets)
        loads: set[str] = set()
        if cursor.get("reconcile_until", 0) > now:
            # Runs requested lately may have widened the schema: rewrite files that disagree,
            # and load buckets the warehouse does not hold as they are in the lake.
            files = snapshot.inspect_files(source, store, keys)
            state = snapshot.reconcile_schema(source, store, files, coll.schema)
            requested |= set(state.mismatched)
            if lake.kind == "s3" and state.schema.columns:
                location = store.uri(collection_prefix(coll.database, coll.collection))
                catalog.register_table(lake.glue(), coll.database, coll.collection, state.schema, location)
            if warehouse is not None:
                loaded = warehouse.loader().loaded(table_of(coll))
                loads = {
                    k for k, f in files.items() if f is not None and loaded.get(k) != f.digest
                } - requested
    finally:
        client.close()
    if plan.mode != "stream":
        context.log.warning(f"{coll.label}: {plan.mode}; {len(requested)} buckets differ from the lake")
    # A run that has not started yet reads its bucket after these changes: it covers them.
    waiting = context.instance.get_runs(
        filters=dg.RunsFilter(
            job_name=job_name(coll), statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]
        )
    )
    coalesced = requested & {run.tags.get("dagster/partition") for run in waiting}
    requested -= coalesced
    if loads:
        # A bucket with any run under way will be loaded by it: the lake write and its load are one run.
        in_flight = context.instance.get_runs(
            filters=dg.RunsFilter(
                tags={"aries/trigger": "change stream"},
                statuses=[
                    dg.DagsterRunStatus.QUEUED,
                    dg.DagsterRunStatus.NOT_STARTED,
                    dg.DagsterRunStatus.STARTING,
                    dg.DagsterRunStatus.STARTED,
                ],
            )
        )
        loads -= {
            r.tags.get("dagster/partition")
            for r in in_flight
            if r.job_name in (job_name(coll), load_job_name(coll))
        }
        loads -= requested | coalesced
    known = set(context.instance.get_dynamic_partitions(coll.name))
    new_partitions = [k for k in keys if k not in known]
    tick = hashlib.sha1((changes.token_to_text(plan.token) or str(now)).encode()).hexdigest()[:12]
    tags = {"aries/trigger": "change stream", "aries/mode": plan.mode}
    run_requests = [
        dg.RunRequest(run_key=f"{key}:{tick}", partition_key=key, job_name=job_name(coll), tags=tags)
        for key in sorted(requested, key=keys.index)
    ] + [
        dg.RunRequest(
            run_key=f"load:{key}:{tick}", partition_key=key, job_name=load_job_name(coll), tags=tags
        )
        for key in sorted(loads, key=keys.index)
    ]
    next_cursor = {
        "token": changes.token_to_text(plan.token),
        "reconcile_until": now + RECONCILE_WINDOW_SECONDS
        if run_requests
        else cursor.get("reconcile_until", 0),
    }
    observation = dg.AssetObservation(
        mongo_key(coll),
        metadata={
            "replication_lag_seconds": plan.lag_seconds,
            "change_events": plan.events,
            "buckets_requested": len(requested),
            "buckets_already_queued": len(coalesced),
            "sync_mode": plan.mode,
            "observed_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    )
    return dg.SensorResult(
        run_requests=run_requests,
        cursor=json.dumps(next_cursor),
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(coll.name, new_partitions)]
        if new_partitions
        else None,
        asset_events=[observation],
    )
