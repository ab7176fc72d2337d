"""Per collection: its bucket partitions, the `mongo/`, `lake/` and `warehouse/` assets, and its sync job.

The sync job is one run per collection: its op calls the engine, which writes
every dirty bucket, and records a materialization (with its checks) for each
bucket partition it wrote or loaded, so the partitions view, lineage and
history show exactly what changed. The partitioned assets stay materializable
one bucket at a time from the UI; they go through the same engine.

The load job (`load__<db>__<coll>`) materializes lake partitions one run each:
backfilled over the ranges of a split first load (`aries split`), its runs read
their ranges at the same time, on as many machines as the run launcher offers.
"""

import contextlib
import dataclasses
import datetime
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg
from pymongo.errors import ConnectionFailure, OperationFailure

from aries_assets import terminal
from aries_assets.config import CollectionConfig, SyncOptions, dagster_name
from aries_assets.core import engine, snapshot
from aries_assets.core.changes import StreamScope, follow_changes, waiting_collections
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import collection_prefix
from aries_assets.core.ledger import RunHeartbeat
from aries_assets.core.schema import InferredSchema
from aries_assets.core.warehouse import TableRef
from aries_assets.core.warehouse.loader import LoadedBucket
from aries_assets.resources import LakeResource, MongoResource, WarehouseResource

CONFORMANCE_ERROR_SHARE = 0.01


@dataclass(frozen=True)
class CollectionDefinitions:
    partitions: dg.DynamicPartitionsDefinition
    mongo: dg.AssetSpec
    lake: dg.AssetsDefinition
    job: dg.JobDefinition
    load_job: Any  # an asset job, as dg.define_asset_job makes it (resolved by Definitions)
    warehouse: dg.AssetsDefinition | None = None


def mongo_key(coll: CollectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["mongo", dagster_name(coll.database), dagster_name(coll.collection)])


def lake_key(coll: CollectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["lake", dagster_name(coll.database), dagster_name(coll.collection)])


def warehouse_key(coll: CollectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["warehouse", dagster_name(coll.database), dagster_name(coll.collection)])


def job_name(coll: CollectionConfig) -> str:
    return f"sync__{coll.name}"


def load_job_name(coll: CollectionConfig) -> str:
    return f"load__{coll.name}"


def op_name(coll: CollectionConfig) -> str:
    return f"sync_{coll.name}"


def table_of(coll: CollectionConfig) -> TableRef:
    return TableRef(*coll.table)


def source_of(coll: CollectionConfig) -> SourceCollection:
    return coll.source


def spec_of(coll: CollectionConfig, with_table: bool) -> engine.CollectionSpec:
    return engine.CollectionSpec(
        source_of(coll),
        coll.bucket_size,
        coll.schema,
        coll.bucket_bytes,
        table_of(coll) if with_table else None,
    )


class SyncRunConfig(dg.Config):
    """Options of one collection sync run (the sensor's runs use the defaults)."""

    full: bool = False  # re-read the whole collection, rewriting buckets whose content changed
    buckets: list[str] = []  # also rewrite these buckets (partition keys)
    linger_seconds: float = -1.0  # keep following changes this long; -1: the config's sync.linger_seconds
    workers: int = 0  # parallel bucket writers; 0: the config's sync.workers


@contextlib.contextmanager
def _said_plainly(mongo: MongoResource, source: SourceCollection) -> Iterator[None]:
    """MongoDB lost or refusing mid-run fails the run with one line (the driver's messages hold a
    topology dump, or the server's whole reply in raw BSON)."""
    try:
        yield
    except ConnectionFailure as error:
        raise mongo.lost(error) from error
    except OperationFailure as error:
        raise mongo.refused(error, source) from error


def _client(mongo: MongoResource, lake: LakeResource, collections: list[CollectionConfig]):
    try:
        return mongo.client()
    except Exception as error:
        for coll in collections:
            with contextlib.suppress(Exception):
                engine.note_failure(lake.open(), source_of(coll), error)
        raise


def _targets(lake: LakeResource, warehouse: WarehouseResource | None) -> engine.Targets:
    return engine.Targets(
        lake.open(),
        lake.spec(),
        warehouse.loader() if warehouse is not None else None,
        lake.glue() if lake.kind == "s3" else None,
    )


def _settings(options: SyncOptions, workers: int, linger_seconds: float) -> engine.SyncSettings:
    return engine.SyncSettings(
        workers=workers or options.workers,
        lease_seconds=options.lease_seconds,
        lease_wait_seconds=2 * options.lease_seconds,
        linger_seconds=options.linger_seconds if linger_seconds < 0 else linger_seconds,
    )


def run_sync(
    context: dg.OpExecutionContext,
    coll: CollectionConfig,
    options: SyncOptions,
    config: SyncRunConfig,
    mongo: MongoResource,
    lake: LakeResource,
    warehouse: WarehouseResource | None,
    keys: list[str] | None = None,
    reporter: "DagsterReporter | None" = None,
) -> engine.SyncOutcome:
    """The engine, run inside a Dagster step, its progress turned into Dagster events."""
    client = _client(mongo, lake, [coll])
    reporter = reporter or DagsterReporter(context, coll)
    try:
        with _said_plainly(mongo, source_of(coll)):
            return engine.sync_collection(
                spec_of(coll, warehouse is not None),
                client,
                _targets(lake, warehouse),
                _settings(options, config.workers, config.linger_seconds),
                reporter,
                holder=f"run {context.run.run_id[:8]}",
                run_id=context.run.run_id,
                keys=(keys or []) + list(config.buckets) or None,
                full=config.full,
            )
    finally:
        client.close()
        reporter.close()


class ServeRunConfig(dg.Config):
    """Options of a run serving several collections of one change stream."""

    collections: list[str] = []  # collection names (`<db>__<coll>`); empty: all of the stream's
    linger_seconds: float = -1.0  # keep serving this long after the last change; -1: sync.linger_seconds
    # `aries sync`: each collection synced once, as its own sync job would (waiting for its lease,
    # catching up on its own stream), `workers` at a time; its outcome told to the terminal.
    once: bool = False
    full: bool = False  # with `once`: re-read each collection whole
    workers: int = 0  # with `once`: collections at a time, and bucket writers of each; 0: sync.workers


def serve_collections(
    context: dg.OpExecutionContext,
    scope: StreamScope,
    collections: list[CollectionConfig],
    options: SyncOptions,
    config: ServeRunConfig,
    mongo: MongoResource,
    lake: LakeResource,
    warehouse: WarehouseResource | None,
) -> dict[str, Any]:
    """Sync each chosen collection that has work, each under its own lease, until quiet; with
    `once` (`aries sync`), each chosen collection once."""
    chosen = [c for c in collections if not config.collections or c.name in config.collections]
    unknown = set(config.collections) - {c.name for c in collections}
    if unknown:
        raise dg.Failure(f"no collection {sorted(unknown)[0]!r} in this change stream's config")
    client = _client(mongo, lake, chosen)
    specs = [spec_of(c, warehouse is not None) for c in chosen]
    try:
        targets = _targets(lake, warehouse)
        if config.once:
            # `aries sync`: each collection once, as its own sync job would (waiting for its lease,
            # catching up on its own stream), `workers` at a time.
            settings = _settings(options, config.workers, 0)
            sync_one = _syncer(context, chosen, mongo, client, targets, settings, config.full)
            results = engine.sync_each(specs, sync_one, settings.workers)
        else:
            results = _serve(context, scope, chosen, specs, options, config, mongo, client, targets)
    finally:
        client.close()
    failed = {label: r for label, r in results.items() if isinstance(r, Exception)}
    for label, error in failed.items():
        context.log.error(f"{label}: {type(error).__name__}: {error}")
    if failed:
        raise dg.Failure(
            f"{len(failed)} of {len(chosen)} collections failed: "
            + "; ".join(f"{label}: {type(e).__name__}: {e}" for label, e in failed.items())[:2000]
            + ". Their buckets stay in the ledger; the sensor, or the next `aries sync`, asks again."
        )
    outcomes = [r for r in results.values() if isinstance(r, engine.SyncOutcome)]
    return {
        "collections_synced": len(outcomes),
        "buckets_written": sum(o.written for o in outcomes),
        "buckets_loaded": sum(o.loaded for o in outcomes),
        "documents_read": sum(o.documents_read for o in outcomes),
    }


def _serve(
    context: dg.OpExecutionContext,
    scope: StreamScope,
    chosen: list[CollectionConfig],
    specs: list[engine.CollectionSpec],
    options: SyncOptions,
    config: ServeRunConfig,
    mongo: MongoResource,
    client: Any,
    targets: engine.Targets,
) -> dict[str, engine.SyncOutcome | Exception]:
    """The sensor's run: each collection with work, until every one has been quiet for linger_seconds."""
    settings = _settings(options, 0, config.linger_seconds)
    # Each collection once per pass: no lingering, no waiting for a lease, no stream reading
    # (the sensor records the changes; this run follows its ledgers).
    one_pass = dataclasses.replace(settings, linger_seconds=0, lease_wait_seconds=0, catch_up=False)
    lingering = DagsterReporter(context, chosen[0]) if chosen else None
    # Tells the sensor this run is alive while it holds no collection's lease.
    heartbeat = RunHeartbeat(
        targets.lake, context.run.run_id, f"run {context.run.run_id[:8]}", options.lease_seconds
    )
    heartbeat.acquire(0)
    with contextlib.suppress(Exception):
        RunHeartbeat.sweep(targets.lake)
    try:
        return engine.serve_collections(
            specs,
            targets.lake,
            _syncer(context, chosen, mongo, client, targets, one_pass),
            settings,
            lingering.keep_lingering if lingering else lambda: False,
            lambda: waiting_collections(targets.lake, scope),
            lambda: follow_changes(client, targets.lake, scope),
        )
    finally:
        heartbeat.release()


def _syncer(
    context: dg.OpExecutionContext,
    chosen: list[CollectionConfig],
    mongo: MongoResource,
    client: Any,
    targets: engine.Targets,
    settings: engine.SyncSettings,
    full: bool = False,
) -> Callable[[engine.CollectionSpec], engine.SyncOutcome]:
    """A run's sync of one of its collections, as its own sync job would sync it; the outcome, or
    the error, is told to a terminal listening (`aries sync`) as soon as it is known."""
    by_label = {c.label: c for c in chosen}

    def sync_one(spec: engine.CollectionSpec) -> engine.SyncOutcome:
        label = spec.source.label
        reporter = DagsterReporter(context, by_label[label])
        try:
            with _said_plainly(mongo, spec.source):
                outcome = engine.sync_collection(
                    spec,
                    client,
                    targets,
                    settings,
                    reporter,
                    f"run {context.run.run_id[:8]}",
                    context.run.run_id,
                    full=full,
                )
        except Exception as error:
            terminal.tell(label, "failed", error=f"{type(error).__name__}: {error}")
            raise
        finally:
            reporter.close()
        terminal.tell(label, "outcome", outcome=outcome)
        return outcome

    return sync_one


def serve_job_name(scope_name: str) -> str:
    return "serve__" + dagster_name(scope_name)


def serve_op_name(scope_name: str) -> str:
    return "serve_" + dagster_name(scope_name)


def build_serve_job(
    scope: StreamScope, collections: list[CollectionConfig], options: SyncOptions, with_table: bool
) -> dg.JobDefinition:
    """A job serving many of one stream's collections in one run: one run start for all of them."""
    scope_name = scope.name
    description = (
        f"Bring the collections of change stream `{scope_name}` up to date (all of them, or those named in "
        "the run config), `sync.workers` at a time, each under its own lease as its own sync job would, and "
        "keep following their ledgers until they have been quiet for sync.linger_seconds. The sensor "
        "requests it whenever changes wait: one run start serves every collection of the stream. "
        "`aries sync` runs it with `once`: each collection synced once, then the run ends."
    )
    name = serve_job_name(scope_name)
    tags = {"aries/scope": scope_name}
    if with_table:

        @dg.op(name=serve_op_name(scope_name), description=description)
        def serve_op(
            context: dg.OpExecutionContext,
            config: ServeRunConfig,
            mongo: MongoResource,
            lake: LakeResource,
            warehouse: WarehouseResource,
        ) -> dg.Output:
            summary = serve_collections(context, scope, collections, options, config, mongo, lake, warehouse)
            return dg.Output(summary, metadata=summary)

    else:

        @dg.op(name=serve_op_name(scope_name), description=description)
        def serve_op(
            context: dg.OpExecutionContext, config: ServeRunConfig, mongo: MongoResource, lake: LakeResource
        ) -> dg.Output:
            summary = serve_collections(context, scope, collections, options, config, mongo, lake, None)
            return dg.Output(summary, metadata=summary)

    @dg.job(name=name, description=description, tags=tags, executor_def=dg.in_process_executor)
    def serve_job():
        serve_op()

    return serve_job


class _EventLog:
    """Dagster events, and the run's log lines, written by a thread of their own, in order.

    Each event is a write to the instance's storage (on SQLite a connection and a commit,
    about 10 ms of CPU): written inline, a first load's events would hold up the read. A log
    line goes the same way: written inline, it would wait for the event being stored (the
    two share the log handler's lock). `close` waits until everything is stored, so the run
    ends with all of it recorded.
    """

    def __init__(self, context: dg.OpExecutionContext) -> None:
        self.context = context
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # `log` and `close` may come from different threads: one writer thread at a time, each
        # with its own queue, so a close always ends the thread it sends its sentinel to.
        self._lock = threading.Lock()

    def log(self, event: Any) -> None:
        with self._lock:
            if self._thread is None:
                self._queue = queue.Queue()
                self._thread = threading.Thread(
                    target=self._write, args=(self._queue,), name="aries dagster events", daemon=True
                )
                self._thread.start()
            self._queue.put(event)

    def _write(self, events: queue.Queue) -> None:
        while (event := events.get()) is not None:
            if self._error is None:
                try:
                    if isinstance(event, str):
                        self.context.log.info(event)
                    else:
                        self.context.log_event(event)
                except BaseException as error:  # raised by close, in the run's own thread
                    self._error = error

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def run_range(
    context: dg.AssetExecutionContext,
    coll: CollectionConfig,
    options: SyncOptions,
    mongo: MongoResource,
    lake: LakeResource,
    reporter: "DagsterReporter",
) -> engine.SyncOutcome | None:
    """The run's partition as a range of a split first load, beside the other ranges' runs;
    None if the partition is no unfinished range."""
    client = mongo.client()
    try:
        with _said_plainly(mongo, source_of(coll)):
            return engine.sync_range(
                spec_of(coll, False),
                client,
                engine.Targets(lake.open(), lake.spec()),  # Glue and the warehouse: the settling run's
                _settings(options, 0, 0),
                reporter,
                holder=f"run {context.run.run_id[:8]}",
                run_id=context.run.run_id,
                key=context.partition_key,
            )
    finally:
        client.close()
        reporter.close()


class _CheckSummary:
    """Per-bucket check evaluations, and a summary per check once a run has checked many buckets.

    Each evaluation is a write to the instance's storage (three per bucket): a first load of
    hundreds of buckets would spend more time recording checks than writing files. The first
    PER_BUCKET buckets of a run, and every failing bucket, get their own evaluation on their
    partition; the others are counted into one evaluation per check when the run ends, whose
    metadata says how many buckets it covers.
    """

    PER_BUCKET = 2

    def __init__(self) -> None:
        self._seen: dict[tuple[dg.AssetKey, str], int] = {}
        self._held: dict[tuple[dg.AssetKey, str], list[dg.AssetCheckEvaluation]] = {}

    def record(self, evaluation: dg.AssetCheckEvaluation) -> bool:
        """Whether to record this evaluation now (else it goes into the summary)."""
        check = (evaluation.asset_key, evaluation.check_name)
        self._seen[check] = self._seen.get(check, 0) + 1
        if self._seen[check] <= self.PER_BUCKET or not evaluation.passed:
            return True
        self._held.setdefault(check, []).append(evaluation)
        return False

    def summaries(self) -> list[dg.AssetCheckEvaluation]:
        done = []
        for (key, name), held in self._held.items():
            done.append(
                dg.AssetCheckEvaluation(
                    asset_key=key,
                    check_name=name,
                    passed=True,  # a failing bucket was recorded on its own partition
                    metadata={
                        "buckets_checked": len(held),
                        "buckets": dg.MetadataValue.text(
                            ", ".join(e.partition or "" for e in held[:50])
                            + (" ..." if len(held) > 50 else "")
                        ),
                        "note": "passed for every one of these buckets of the run; "
                        "each bucket's own numbers are on its materialization",
                    },
                )
            )
        self._held.clear()
        return done


class DagsterReporter:
    """Engine events as Dagster events: a materialization and checks per bucket partition."""

    def __init__(
        self, context: dg.OpExecutionContext, coll: CollectionConfig, own: dg.AssetKey | None = None
    ) -> None:
        self.context = context
        self.coll = coll
        # In a partitioned asset's own run, its partition's result is returned by the asset itself.
        self.own = own
        self.own_written: snapshot.WrittenBucket | None = None
        self.own_loaded: tuple | None = None
        self._checked_queue = 0.0
        self._events = _EventLog(context)
        self._checks = _CheckSummary()
        self._nonconforming = 0  # buckets whose type_conformance check failed: said at the terminal too

    def close(self) -> None:
        """Every event recorded; called when the engine is done."""
        if self._nonconforming > 1:
            self.message(
                f"{self.coll.label}: type_conformance failed for {self._nonconforming} buckets in all"
            )
        for evaluation in self._checks.summaries():
            self._events.log(evaluation)
        self._events.close()

    def message(self, text: str) -> None:
        self._events.log(text)
        terminal.tell(self.coll.label, "message", text=text)

    def progress(self, documents: int, nbytes: int, total: int | None) -> None:
        terminal.tell(self.coll.label, "progress", documents=documents, bytes=nbytes, total=total)

    def buckets_added(self, keys: list[str]) -> None:
        self.context.instance.add_dynamic_partitions(self.coll.name, keys)

    def _is_own(self, key: dg.AssetKey, partition: str) -> bool:
        return self.own == key and self.context.has_partition_key and self.context.partition_key == partition

    def bucket_written(self, written: snapshot.WrittenBucket, bucket_range: str) -> None:
        key = lake_key(self.coll)
        terminal.tell(self.coll.label, "written", key=written.key, documents=written.documents)
        if self._is_own(key, written.key):
            self.own_written = written
            return
        self._events.log(
            dg.AssetMaterialization(key, partition=written.key, metadata=materialization_metadata(written))
        )
        conformance = conformance_check(written)
        if not conformance.passed:
            self._nonconforming += 1
            if self._nonconforming == 1:
                columns = ", ".join(f"{c}: {n}" for c, n in sorted(written.outliers.items())[:5])
                self.message(
                    f"{self.coll.label}: bucket {written.key}: type_conformance failed, values their "
                    f"column types cannot hold ({columns}) are null in the columns and whole in `_doc`; "
                    "check the schema overrides, or let inference type them"
                )
        for check in (conformance, drift_check(written), coverage_check(written)):
            evaluation = dg.AssetCheckEvaluation(
                asset_key=key,
                check_name=check.check_name,
                passed=check.passed,
                metadata=check.metadata,
                severity=check.severity,
                partition=written.key,
            )
            if self._checks.record(evaluation):
                self._events.log(evaluation)

    def bucket_loaded(
        self, loaded: LoadedBucket, in_file: int, in_table: int, missing: int, extra: int
    ) -> None:
        key = warehouse_key(self.coll)
        if self._is_own(key, loaded.bucket):
            self.own_loaded = (loaded, in_file, in_table, missing, extra)
            return
        self._events.log(
            dg.AssetMaterialization(
                key,
                partition=loaded.bucket,
                metadata={
                    "dagster/row_count": loaded.rows,
                    "dagster/table_name": loaded.table,
                    "table_changes": "; ".join(loaded.actions) or "none",
                    "seconds": round(loaded.seconds, 3),
                },
            )
        )
        checks = [
            ("row_count_parity", in_file == in_table, {"rows_in_table": in_table, "rows_in_file": in_file}),
            (
                "id_parity",
                not missing and not extra,
                {"missing_from_table": missing, "extra_in_table": extra},
            ),
            ("document_size", True, {"oversize_documents": 0}),
        ]
        for name, passed, metadata in checks:
            evaluation = dg.AssetCheckEvaluation(
                asset_key=key, check_name=name, passed=passed, metadata=metadata, partition=loaded.bucket
            )
            if self._checks.record(evaluation):
                self._events.log(evaluation)

    def wants_total(self) -> bool:
        """Only a live display on a terminal shows an ETA; the run's log needs no total."""
        return terminal.shows_totals

    def keep_lingering(self) -> bool:
        """Linger only while no other run waits for a slot."""
        if time.monotonic() - self._checked_queue < 5:
            return True
        self._checked_queue = time.monotonic()
        queued = self.context.instance.get_runs_count(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
        return queued == 0


def build_collection(
    coll: CollectionConfig, lake_kind: str, warehouse_kind: str | None, options: SyncOptions
) -> CollectionDefinitions:
    partitions = dg.DynamicPartitionsDefinition(name=coll.name)
    group = dagster_name(coll.database)
    filter_note = f" matching `{coll.query}`" if coll.query else ""
    mongo = dg.AssetSpec(
        key=mongo_key(coll),
        description=(
            f"MongoDB collection `{coll.label}`{filter_note}. Partitions are buckets: contiguous "
            f"`_id` ranges of at most {coll.bucket_size:,} documents or {coll.bucket_bytes / 2**20:,.0f} MB. "
            "Observed by the change-stream sensor (lag, dirty buckets)."
        ),
        partitions_def=partitions,
        group_name=group,
        kinds={"mongodb"},
        owners=list(coll.owners) or None,
        metadata={"collection": coll.label, "bucket_size": coll.bucket_size},
    )
    checks = [
        dg.AssetCheckSpec(
            "type_conformance",
            asset=lake_key(coll),
            description="Share of values that do not fit their column's type (kept only in `_doc`). "
            f"Passes with a warning up to {CONFORMANCE_ERROR_SHARE:.0%}, fails above.",
        ),
        dg.AssetCheckSpec(
            "schema_drift",
            asset=lake_key(coll),
            description="Columns added, dropped or retyped since this bucket was last written. Warns on a type change.",
        ),
        dg.AssetCheckSpec(
            "id_coverage",
            asset=lake_key(coll),
            description="The file holds every document the bucket's read returned, counted from the read itself.",
        ),
    ]
    with_table = warehouse_kind is not None

    @dg.asset(
        key=lake_key(coll),
        deps=[mongo],
        partitions_def=partitions,
        group_name=group,
        kinds={"parquet", lake_kind},
        owners=list(coll.owners) or None,
        code_version=snapshot.FORMAT_VERSION,
        check_specs=checks,
        # Buckets are rewritten only when their documents change, so a quiet collection's lake
        # ages without being behind: warn after an hour, fail after a day without any write.
        freshness_policy=dg.FreshnessPolicy.time_window(
            fail_window=datetime.timedelta(hours=24), warn_window=datetime.timedelta(hours=1)
        ),
        description=(
            f"Parquet bucket files of `{coll.label}` under `{collection_prefix(coll.database, coll.collection)}/` "
            "in the lake, one per partition, rewritten whole when any document in the bucket changes. "
            "Columns: `_id` (string), `_id_key` (the exact `_id`), `_doc` (the whole document as canonical "
            "Extended JSON) and the "
            "inferred columns of the collection schema. Materializing a bucket here rewrites it through "
            "the collection's sync (with any other dirty bucket); a range of a split first load is read "
            "by its own run, beside the other ranges."
        ),
        metadata={"collection": coll.label},
    )
    def lake_asset(context: dg.AssetExecutionContext, mongo: MongoResource, lake: LakeResource):
        # The engine writes this bucket (and any other dirty one, recorded as their own events).
        reporter = DagsterReporter(context, coll, own=lake_key(coll))
        if run_range(context, coll, options, mongo, lake, reporter) is None:
            config = SyncRunConfig(linger_seconds=0)
            run_sync(context, coll, options, config, mongo, lake, None, [context.partition_key], reporter)
        written = reporter.own_written
        if written is None:
            raise dg.Failure(
                f"{coll.label}: bucket {context.partition_key} was not written; see the run's log"
            )
        yield dg.MaterializeResult(
            metadata=materialization_metadata(written), data_version=dg.DataVersion(written.digest)
        )
        yield conformance_check(written)
        yield drift_check(written)
        yield coverage_check(written)

    job = build_sync_job(coll, options, with_table, lake_asset)
    warehouse_asset = (
        build_warehouse_asset(coll, options, lake_asset, partitions, group, warehouse_kind)
        if with_table
        else None
    )
    return CollectionDefinitions(partitions, mongo, lake_asset, job, build_load_job(coll), warehouse_asset)


def build_load_job(coll: CollectionConfig) -> Any:
    """Lake partitions one run each: the job a split first load's backfill runs, once per range.

    Its runs carry `aries/split`, not `aries/collection`: the one-run-per-collection limit must
    not queue the ranges one behind the other (the ranges share the collection's lease).
    """
    return dg.define_asset_job(
        name=load_job_name(coll),
        selection=dg.AssetSelection.assets(lake_key(coll)),
        tags={"aries/split": coll.name},
        executor_def=dg.in_process_executor,
        description=(
            f"Write `{coll.label}`'s lake bucket partitions, one run each. Backfill it over the ranges "
            "`aries split` planned to spread a very large first load over machines; the sensor's sync "
            "run then settles the schema, Glue and the warehouse."
        ),
    )


def build_sync_job(
    coll: CollectionConfig, options: SyncOptions, with_table: bool, lake_asset
) -> dg.JobDefinition:
    tags = {"aries/collection": coll.name}
    description = (
        f"Bring `{coll.label}` up to date: write every dirty bucket to the lake"
        + (", load the warehouse" if with_table else "")
        + ", then clear the ledger. One run per collection at a time (a lease in the lake)."
    )
    if with_table:

        @dg.op(name=op_name(coll), description=description, tags=tags)
        def sync_op(
            context: dg.OpExecutionContext,
            config: SyncRunConfig,
            mongo: MongoResource,
            lake: LakeResource,
            warehouse: WarehouseResource,
        ) -> dg.Output:
            outcome = run_sync(context, coll, options, config, mongo, lake, warehouse)
            return dg.Output(outcome, metadata=outcome_metadata(outcome))

    else:

        @dg.op(name=op_name(coll), description=description, tags=tags)
        def sync_op(
            context: dg.OpExecutionContext, config: SyncRunConfig, mongo: MongoResource, lake: LakeResource
        ) -> dg.Output:
            outcome = run_sync(context, coll, options, config, mongo, lake, None)
            return dg.Output(outcome, metadata=outcome_metadata(outcome))

    # One step: run it in the run's own process rather than start another for it.
    @dg.job(name=job_name(coll), description=description, tags=tags, executor_def=dg.in_process_executor)
    def sync_job():
        sync_op()

    return sync_job


def outcome_metadata(outcome: engine.SyncOutcome) -> dict[str, Any]:
    return {
        "mode": outcome.mode,
        "buckets_written": outcome.written,
        "buckets_loaded": outcome.loaded,
        "documents_read": outcome.documents_read,
        "documents": outcome.documents,
        "buckets": outcome.buckets,
        "schema_version": outcome.schema_version,
        "rounds": outcome.rounds,
    }


def build_warehouse_asset(
    coll, options, lake_asset, partitions, group, warehouse_kind
) -> dg.AssetsDefinition:
    table = table_of(coll)
    checks = [
        dg.AssetCheckSpec(
            "row_count_parity",
            asset=warehouse_key(coll),
            description="Rows of the bucket in the table = rows in its lake file.",
        ),
        dg.AssetCheckSpec(
            "id_parity",
            asset=warehouse_key(coll),
            description="The bucket's `_id`s in the table = those in its lake file.",
        ),
        dg.AssetCheckSpec(
            "document_size",
            asset=warehouse_key(coll),
            description="Documents too large for the warehouse's JSON column (Redshift: 64 KB staged, "
            "16 MB SUPER). They are named in the run's error; the load fails rather than drop them.",
        ),
    ]

    @dg.asset(
        key=warehouse_key(coll),
        deps=[lake_asset],
        partitions_def=partitions,
        group_name=group,
        kinds={warehouse_kind, "table"},
        owners=list(coll.owners) or None,
        check_specs=checks,
        description=(
            f"Table `{table.label}` in the warehouse: `_id`, `_id_key` (the exact `_id`), `_doc` (the whole "
            "document as JSON), `_bucket` and "
            f"the inferred columns of `{coll.label}`. Each partition replaces its bucket's rows in one transaction; "
            "the collection's sync loads every bucket whose lake file the table does not hold."
        ),
        metadata={"dagster/table_name": table.label},
    )
    def warehouse_asset(
        context: dg.AssetExecutionContext,
        mongo: MongoResource,
        lake: LakeResource,
        warehouse: WarehouseResource,
    ):
        reporter = DagsterReporter(context, coll, own=warehouse_key(coll))
        config = SyncRunConfig(linger_seconds=0)
        run_sync(context, coll, options, config, mongo, lake, warehouse, [context.partition_key], reporter)
        if reporter.own_loaded is None:
            loaded, in_file, in_table, missing, extra = None, 0, 0, 0, 0
            metadata = {"dagster/table_name": table.label, "table_changes": "already loaded"}
        else:
            loaded, in_file, in_table, missing, extra = reporter.own_loaded
            metadata = {
                "dagster/row_count": loaded.rows,
                "dagster/table_name": table.label,
                "table_changes": "; ".join(loaded.actions) or "none",
                "seconds": round(loaded.seconds, 3),
            }
        yield dg.MaterializeResult(metadata=metadata)
        yield dg.AssetCheckResult(
            check_name="row_count_parity",
            passed=in_file == in_table,
            metadata={"rows_in_table": in_table, "rows_in_file": in_file},
        )
        yield dg.AssetCheckResult(
            check_name="id_parity",
            passed=not missing and not extra,
            metadata={"missing_from_table": missing, "extra_in_table": extra},
        )
        yield dg.AssetCheckResult(check_name="document_size", passed=True, metadata={"oversize_documents": 0})

    return warehouse_asset


def column_schema(schema: InferredSchema) -> dg.TableSchema:
    columns = [
        dg.TableColumn(
            "_id", "string", "`_id` as text, friendly for joins", dg.TableColumnConstraints(nullable=False)
        ),
        dg.TableColumn(
            "_id_key",
            "string",
            '`_id` as canonical Extended JSON: distinct for every distinct `_id` (5 and "5" differ)',
            dg.TableColumnConstraints(nullable=False, unique=True),
        ),
        dg.TableColumn(
            "_doc",
            "json",
            "the whole document, canonical Extended JSON",
            dg.TableColumnConstraints(nullable=False),
        ),
    ]
    for c in schema.columns:
        nullable = c.nulls > 0 or c.present < schema.stats.documents
        description = f"from `{c.dotted}`; observed: {c.shares_text()}"
        if c.nulls:
            description += f"; null in {c.nulls:,}"
        columns.append(
            dg.TableColumn(c.name, c.type, description, dg.TableColumnConstraints(nullable=nullable))
        )
    return dg.TableSchema(columns=columns)


def materialization_metadata(written: snapshot.WrittenBucket) -> dict:
    schema = written.schema
    return {
        "dagster/row_count": written.documents,
        "dagster/uri": written.uri,
        "dagster/column_schema": column_schema(schema),
        "schema_version": schema.version,
        "schema_changes": schema_changes_text(written),
        "column_mapping": dg.MetadataValue.json({c.dotted: c.name for c in schema.columns}),
        "nonconforming_values": sum(written.outliers.values()),
        "bytes_read": written.bytes_in,
        "file_bytes": written.bytes_out,
        "content_sha256": written.digest,
        "seconds": round(written.seconds, 3),
        "rewritten": written.rewritten,
    }


def schema_changes_text(written: snapshot.WrittenBucket) -> str:
    """What the collection schema's last version changed, if this write is the bucket's first under it;
    a rewrite under the version it was last written with changed nothing."""
    schema = written.schema
    if written.previous and written.previous.schema_version == schema.version:
        return f"none (schema v{schema.version} unchanged)"
    return f"v{schema.version}: " + ("; ".join(schema.actions) or "none")


def conformance_check(written: snapshot.WrittenBucket) -> dg.AssetCheckResult:
    values = sum(sum(f.kinds.values()) for f in written.stats.fields.values())
    outliers = sum(written.outliers.values())
    share = outliers / values if values else 0.0
    return dg.AssetCheckResult(
        check_name="type_conformance",
        passed=share <= CONFORMANCE_ERROR_SHARE,
        severity=dg.AssetCheckSeverity.ERROR
        if share > CONFORMANCE_ERROR_SHARE
        else dg.AssetCheckSeverity.WARN,
        metadata={
            "nonconforming_share": share,
            "nonconforming_values": outliers,
            "by_column": dg.MetadataValue.json(written.outliers),
        },
    )


def drift_check(written: snapshot.WrittenBucket) -> dg.AssetCheckResult:
    before = written.previous.columns if written.previous else {}
    after = {c.name: c.type for c in written.schema.columns}
    retyped = sorted(f"{n}: {before[n]} -> {t}" for n, t in after.items() if n in before and before[n] != t)
    added = sorted(n for n in after if n not in before) if written.previous else []
    dropped = sorted(n for n in before if n not in after)
    return dg.AssetCheckResult(
        check_name="schema_drift",
        passed=not retyped,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "previous_schema_version": written.previous.schema_version if written.previous else 0,
            "schema_version": written.schema.version,
            "added": ", ".join(added) or "none",
            "dropped": ", ".join(dropped) or "none",
            "retyped": ", ".join(retyped) or "none",
        },
    )


def coverage_check(written: snapshot.WrittenBucket) -> dg.AssetCheckResult:
    # write_bucket refuses to publish a file whose row count differs from the documents read.
    return dg.AssetCheckResult(
        check_name="id_coverage",
        passed=True,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"documents_read": written.documents, "rows_in_file": written.documents},
    )
