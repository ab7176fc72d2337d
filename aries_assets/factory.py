"""Per collection: its bucket partitions, the `mongo/`, `lake/` and `warehouse/` assets, and its sync job.

The sync job is one run per collection: its op calls the engine, which writes
every dirty bucket, and records a materialization (with its checks) for each
bucket partition it wrote or loaded, so the partitions view, lineage and
history show exactly what changed. The partitioned assets stay materializable
one bucket at a time from the UI; they go through the same engine.
"""

import datetime
import time
from dataclasses import dataclass
from typing import Any

import dagster as dg

from aries_assets import terminal
from aries_assets.config import CollectionConfig, SyncOptions, dagster_name
from aries_assets.core import engine, snapshot
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import collection_prefix
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
    warehouse: dg.AssetsDefinition | None = None


def mongo_key(coll: CollectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["mongo", dagster_name(coll.database), dagster_name(coll.collection)])


def lake_key(coll: CollectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["lake", dagster_name(coll.database), dagster_name(coll.collection)])


def warehouse_key(coll: CollectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["warehouse", dagster_name(coll.database), dagster_name(coll.collection)])


def job_name(coll: CollectionConfig) -> str:
    return f"sync__{coll.name}"


def op_name(coll: CollectionConfig) -> str:
    return f"sync_{coll.name}"


def table_of(coll: CollectionConfig) -> TableRef:
    return TableRef(*coll.table)


def source_of(coll: CollectionConfig) -> SourceCollection:
    return SourceCollection(coll.database, coll.collection, coll.query)


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
    client = mongo.client()
    try:
        targets = engine.Targets(
            lake.open(),
            lake.spec(),
            warehouse.loader() if warehouse is not None else None,
            lake.glue() if lake.kind == "s3" else None,
        )
        settings = engine.SyncSettings(
            workers=config.workers or options.workers,
            lease_seconds=options.lease_seconds,
            lease_wait_seconds=2 * options.lease_seconds,
            linger_seconds=options.linger_seconds if config.linger_seconds < 0 else config.linger_seconds,
        )
        return engine.sync_collection(
            spec_of(coll, warehouse is not None),
            client,
            targets,
            settings,
            reporter or DagsterReporter(context, coll),
            holder=f"run {context.run_id[:8]}",
            run_id=context.run_id,
            keys=(keys or []) + list(config.buckets) or None,
            full=config.full,
        )
    finally:
        client.close()


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

    def message(self, text: str) -> None:
        self.context.log.info(text)
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
        self.context.log_event(
            dg.AssetMaterialization(key, partition=written.key, metadata=materialization_metadata(written))
        )
        for check in (conformance_check(written), drift_check(written), coverage_check(written)):
            self.context.log_event(
                dg.AssetCheckEvaluation(
                    asset_key=key,
                    check_name=check.check_name,
                    passed=check.passed,
                    metadata=check.metadata,
                    severity=check.severity,
                    partition=written.key,
                )
            )

    def bucket_loaded(
        self, loaded: LoadedBucket, in_file: int, in_table: int, missing: int, extra: int
    ) -> None:
        key = warehouse_key(self.coll)
        if self._is_own(key, loaded.bucket):
            self.own_loaded = (loaded, in_file, in_table, missing, extra)
            return
        self.context.log_event(
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
            self.context.log_event(
                dg.AssetCheckEvaluation(
                    asset_key=key, check_name=name, passed=passed, metadata=metadata, partition=loaded.bucket
                )
            )

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
            "the collection's sync (with any other dirty bucket)."
        ),
        metadata={"collection": coll.label},
    )
    def lake_asset(context: dg.AssetExecutionContext, mongo: MongoResource, lake: LakeResource):
        # The engine writes this bucket (and any other dirty one, recorded as their own events).
        reporter = DagsterReporter(context, coll, own=lake_key(coll))
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
    return CollectionDefinitions(partitions, mongo, lake_asset, job, warehouse_asset)


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
