"""`aries sync`: plan every collection's buckets, then materialize the missing or stale ones.

Each bucket is one Dagster run of the collection's job, recorded in the instance
at DAGSTER_HOME, so the UI shows exactly what a one-shot sync did.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import dagster as dg
from botocore.exceptions import ClientError
from pymongo.errors import PyMongoError

from aries_assets.config import AriesConfig, CollectionConfig, load_config
from aries_assets.core import catalog, changes, snapshot
from aries_assets.core.lake import collection_prefix, load_bucket_map
from aries_assets.core.snapshot import BucketWriteError
from aries_assets.core.warehouse.loader import WarehouseError
from aries_assets.definitions import build_definitions
from aries_assets.factory import job_name, load_job_name, mongo_key, source_of, table_of


@dataclass
class CollectionReport:
    label: str
    documents: int = 0
    buckets: int = 0
    written: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    schema_version: int = 0
    mode: str = ""

    def line(self) -> str:
        status = "FAILED" if self.failures else "ok"
        return (
            f"{self.label:<32} {self.documents:>10,} docs {self.buckets:>5} buckets "
            f"{self.written:>5} written {self.bytes_out / 1e6:>9.1f} MB {self.seconds:>7.1f}s "
            f"schema v{self.schema_version:<3} {status:<6} ({self.mode})"
        )


@dataclass(frozen=True)
class BucketRun:
    key: str
    success: bool
    documents: int
    bytes_out: int
    error: str | None


def _definitions(config_path: str) -> tuple[AriesConfig, dg.Definitions]:
    """Built once per config file version and process: a worker runs many buckets."""
    path = os.path.abspath(config_path)
    return _definitions_of(path, os.stat(path).st_mtime_ns)


@functools.cache
def _definitions_of(path: str, mtime_ns: int) -> tuple[AriesConfig, dg.Definitions]:
    config = load_config(path)
    return config, build_definitions(config)


def run_bucket(
    config_path: str, coll_name: str, key: str, mode: str = "", load_only: bool = False
) -> BucketRun:
    """Materialize one bucket as a Dagster run in the instance at DAGSTER_HOME."""
    config, defs = _definitions(config_path)
    coll = next(c for c in config.collections if c.name == coll_name)
    job = defs.resolve_job_def(load_job_name(coll) if load_only else job_name(coll))
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(
            partition_key=key,
            instance=instance,
            raise_on_error=False,
            tags={"aries/trigger": "aries sync", "aries/mode": mode},
            # The run's full log is in the instance; the terminal gets sync's own progress lines.
            run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
        )
    if result.success:
        metadata = result.asset_materializations_for_node(job.nodes[0].name)[0].metadata
        file_bytes = metadata["file_bytes"].value if "file_bytes" in metadata else 0
        return BucketRun(key, True, metadata["dagster/row_count"].value, file_bytes, None)
    failures = [e for e in result.all_events if e.is_step_failure]
    error = failures[0].step_failure_data.error if failures else None
    message = (
        error.cause.message
        if error is not None and error.cause
        else (error.message if error else "run failed")
    )
    return BucketRun(key, False, 0, 0, message.strip().splitlines()[-1])


def sync(config: AriesConfig, workers: int, progress=print, full: bool = False) -> list[CollectionReport]:
    """Sync every configured collection; MongoDB is reached before anything is written."""
    defs = build_definitions(config)
    client = defs.resources["mongo"].client()
    lake = defs.resources["lake"].open()
    warehouse = defs.resources.get("warehouse")
    glue = defs.resources["lake"].glue() if config.lake_on_s3 else None
    reports = []
    try:
        with dg.DagsterInstance.get() as instance:
            for coll in config.collections:
                try:
                    report = _sync_collection(
                        config, coll, client, lake, instance, workers, progress, full, glue
                    )
                    if warehouse is not None and not report.failures:
                        _load_warehouse(config, coll, lake, warehouse.loader(), workers, progress, report)
                    reports.append(report)
                except (PyMongoError, OSError, BucketWriteError, ClientError, WarehouseError) as error:
                    # One collection failing must not stop the others; the exit code says it failed.
                    progress(f"[{coll.label}] FAILED: {error}")
                    reports.append(
                        CollectionReport(coll.label, failures=[f"{type(error).__name__}: {error}"])
                    )
    finally:
        client.close()
    return reports


MAX_SCHEMA_ROUNDS = 3
MAX_STREAM_PASSES = 100


def _sync_collection(
    config, coll: CollectionConfig, client, lake, instance, workers, progress, full, glue=None
) -> CollectionReport:
    started = time.monotonic()
    report = CollectionReport(coll.label)
    source = source_of(coll)
    collection = source.open(client)
    token = changes.load_token(lake, source)
    progress(f"[{coll.label}] {'reading changes' if token and not full else 'planning buckets'}")
    plan = changes.plan_sync(source, collection, lake, coll.bucket_size, token, full, 100_000, 60.0)
    todo, new_keys = list(plan.buckets), list(plan.new_buckets)
    for _ in range(MAX_STREAM_PASSES):  # a long backlog: keep reading until caught up
        if plan.caught_up:
            break
        plan = changes.plan_sync(source, collection, lake, coll.bucket_size, plan.token, False, 100_000, 60.0)
        todo += [k for k in plan.buckets if k not in todo]
        new_keys += plan.new_buckets
    report.mode = plan.mode
    keys = load_bucket_map(lake, coll.database, coll.collection).keys
    known = set(instance.get_dynamic_partitions(coll.name))
    if missing := [k for k in keys if k not in known]:
        instance.add_dynamic_partitions(coll.name, missing)
    if plan.counts is not None:
        for key in keys:
            instance.report_runless_asset_event(
                dg.AssetObservation(mongo_key(coll), partition=key, metadata={"documents": plan.counts[key]})
            )
    for orphan in snapshot.remove_orphans(source, lake, keys):
        progress(f"[{coll.label}] removed {orphan}: no bucket of that name in the bucket map")
    files = snapshot.inspect_files(source, lake, keys)
    state = snapshot.reconcile_schema(source, lake, files, coll.schema)
    todo = sorted(set(todo) | set(state.mismatched), key=keys.index)
    progress(f"[{coll.label}] {plan.mode}: {len(keys)} buckets, {len(todo)} to write")
    for round_number in range(1, MAX_SCHEMA_ROUNDS + 1):
        if not todo:
            break
        written = []
        for done, run in enumerate(_run_buckets(config.path, coll, todo, workers, plan.mode), start=1):
            if run.success:
                written.append(run.key)
                report.written += 1
                report.bytes_out += run.bytes_out
                progress(f"[{coll.label}] {done}/{len(todo)} bucket {run.key}: {run.documents:,} docs")
            else:
                report.failures.append(f"bucket {run.key}: {run.error}")
                progress(f"[{coll.label}] {done}/{len(todo)} bucket {run.key} FAILED: {run.error}")
        # New statistics may widen the collection schema; files written before then are redone.
        files.update(snapshot.inspect_files(source, lake, written))
        state = snapshot.reconcile_schema(source, lake, files, coll.schema)
        if state.changed:
            progress(f"[{coll.label}] schema v{state.schema.version}: {'; '.join(state.schema.actions)}")
        todo = state.mismatched
        if todo and round_number < MAX_SCHEMA_ROUNDS:
            progress(f"[{coll.label}] rewriting {len(todo)} buckets to follow schema v{state.schema.version}")
    if todo:
        report.failures.append(
            f"buckets {', '.join(todo)} still disagree with schema v{state.schema.version}"
        )
    if glue is not None and state.schema.columns:
        location = lake.uri(collection_prefix(coll.database, coll.collection))
        action = catalog.register_table(glue, coll.database, coll.collection, state.schema, location)
        if action != "unchanged":
            progress(f"[{coll.label}] Glue: {action}")
    if not report.failures and plan.token is not None:
        # Only now: the token never moves past a change whose bucket was not written.
        changes.save_token(lake, source, plan.token)
    instance.report_runless_asset_event(
        dg.AssetObservation(
            mongo_key(coll),
            metadata={
                "sync_mode": plan.mode,
                "change_events": plan.events,
                "replication_lag_seconds": plan.lag_seconds,
            },
        )
    )
    report.buckets = len(keys)
    report.documents = sum(f.stats.documents for f in files.values() if f is not None)
    report.schema_version = state.schema.version
    report.seconds = time.monotonic() - started
    return report


def _load_warehouse(config, coll: CollectionConfig, lake, loader, workers, progress, report) -> None:
    """Load every bucket whose lake file the warehouse does not hold yet (new table, rebuild, failures)."""
    source = source_of(coll)
    table = table_of(coll)
    for _ in range(MAX_SCHEMA_ROUNDS):
        keys = load_bucket_map(lake, coll.database, coll.collection).keys
        files = snapshot.inspect_files(source, lake, keys)
        loaded = loader.loaded(table)
        stale = [k for k in keys if files[k] is not None and loaded.get(k) != files[k].digest]
        if not stale:
            return
        progress(f"[{coll.label}] loading {len(stale)} buckets into {table.label}")
        for run in _run_buckets(config.path, coll, stale, workers, report.mode, load_only=True):
            if not run.success:
                report.failures.append(f"warehouse bucket {run.key}: {run.error}")
        if report.failures:
            return


def _run_buckets(
    config_path: str,
    coll: CollectionConfig,
    keys: list[str],
    workers: int,
    mode: str,
    load_only: bool = False,
):
    if workers <= 1 or len(keys) <= 1:
        for key in keys:
            yield run_bucket(config_path, coll.name, key, mode, load_only)
        return
    # Separate processes: conversion is CPU-bound Python, and each run is its own Dagster run.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(keys)), mp_context=context) as pool:
        futures = [pool.submit(run_bucket, config_path, coll.name, key, mode, load_only) for key in keys]
        for future in as_completed(futures):
            yield future.result()


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def print_summary(reports: list[CollectionReport], out=None) -> None:
    out = out or sys.stdout
    for report in reports:
        print(report.line(), file=out)
        for failure in report.failures:
            print(f"  {report.label}: {failure}", file=out)
