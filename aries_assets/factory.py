"""Per collection: its bucket partitions, the `mongo/`, `lake/` and `warehouse/` assets, and its jobs."""

import datetime
from dataclasses import dataclass
from typing import Any

import dagster as dg

from aries_assets.config import CollectionConfig, dagster_name
from aries_assets.core import snapshot
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import bucket_file, collection_prefix, load_bucket_map
from aries_assets.core.schema import InferredSchema
from aries_assets.core.warehouse import TableRef
from aries_assets.core.warehouse.loader import oversize_documents
from aries_assets.resources import LakeResource, MongoResource, WarehouseResource


@dataclass(frozen=True)
class CollectionDefinitions:
    partitions: dg.DynamicPartitionsDefinition
    mongo: dg.AssetSpec
    lake: dg.AssetsDefinition
    job: Any  # unresolved asset jobs, resolved by Definitions
    warehouse: dg.AssetsDefinition | None = None
    load_job: Any = None


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


def table_of(coll: CollectionConfig) -> TableRef:
    return TableRef(*coll.table)


def source_of(coll: CollectionConfig) -> SourceCollection:
    return SourceCollection(coll.database, coll.collection, coll.query)


def build_collection(
    coll: CollectionConfig, lake_kind: str, warehouse_kind: str | None = None
) -> CollectionDefinitions:
    partitions = dg.DynamicPartitionsDefinition(name=coll.name)
    group = dagster_name(coll.database)
    filter_note = f" matching `{coll.query}`" if coll.query else ""
    mongo = dg.AssetSpec(
        key=mongo_key(coll),
        description=(
            f"MongoDB collection `{coll.label}`{filter_note}. Partitions are buckets: contiguous "
            f"`_id` ranges of at most {coll.bucket_size:,} documents. Observed by `aries sync` "
            "(documents per bucket)."
        ),
        partitions_def=partitions,
        group_name=group,
        kinds={"mongodb"},
        owners=list(coll.owners) or None,
        metadata={"collection": coll.label, "bucket_size": coll.bucket_size},
    )
    source = source_of(coll)

    checks = [
        dg.AssetCheckSpec(
            "type_conformance",
            asset=lake_key(coll),
            description="Share of values that do not fit their column's type (kept only in `_doc`). "
            f"Warns above 0, fails above {CONFORMANCE_ERROR_SHARE:.0%}.",
        ),
        dg.AssetCheckSpec(
            "schema_drift",
            asset=lake_key(coll),
            description="Columns added, dropped or retyped since this bucket was last written. Fails on a type change.",
        ),
        dg.AssetCheckSpec(
            "id_coverage",
            asset=lake_key(coll),
            description="Every `_id` of the bucket's range in MongoDB is in the file, and none extra. A write "
            "racing the check shows up here and is repaired by the next sync.",
        ),
    ]

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
            "Columns: `_id` (string), `_doc` (the whole document as canonical Extended JSON) and the "
            "inferred columns of the collection schema."
        ),
        metadata={"collection": coll.label},
    )
    def lake_asset(context: dg.AssetExecutionContext, mongo: MongoResource, lake: LakeResource):
        store = lake.open()
        bucket_map = load_bucket_map(store, coll.database, coll.collection)
        if bucket_map is None or context.partition_key not in bucket_map.keys:
            raise dg.Failure(
                f"{coll.label}: bucket {context.partition_key!r} is not in the bucket map at "
                f"{store.uri(collection_prefix(coll.database, coll.collection))}; run `aries sync` to plan buckets"
            )
        bucket = bucket_map.get(context.partition_key)
        client = mongo.client()
        try:
            written = snapshot.write_bucket(source, source.open(client), store, bucket, coll.schema)
            coverage = snapshot.check_id_coverage(source, source.open(client), store, bucket)
        finally:
            client.close()
        context.log.info(
            f"{coll.label} bucket {bucket.key}: {written.documents} documents, "
            f"{written.bytes_out / 1e6:.2f} MB in {written.seconds:.1f}s, schema v{written.schema.version}"
        )
        yield dg.MaterializeResult(
            metadata=materialization_metadata(written, bucket.describe()),
            data_version=dg.DataVersion(written.digest),
        )
        yield conformance_check(written)
        yield drift_check(written)
        yield dg.AssetCheckResult(
            check_name="id_coverage",
            passed=not coverage.missing and not coverage.extra,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "ids_in_mongodb": coverage.expected,
                "missing_from_file": len(coverage.missing),
                "extra_in_file": len(coverage.extra),
                "examples": ", ".join(coverage.missing[:3] + coverage.extra[:3]) or "none",
            },
        )

    if warehouse_kind is None:
        job = dg.define_asset_job(
            job_name(coll),
            selection=[lake_key(coll)],
            description=f"Write one bucket of {coll.label} to the lake.",
        )
        return CollectionDefinitions(partitions, mongo, lake_asset, job)
    warehouse_asset = build_warehouse_asset(coll, lake_asset, partitions, group, warehouse_kind)
    job = dg.define_asset_job(
        job_name(coll),
        selection=[lake_key(coll), warehouse_key(coll)],
        description=f"Write one bucket of {coll.label} to the lake, then replace it in the warehouse.",
    )
    load_job = dg.define_asset_job(
        load_job_name(coll),
        selection=[warehouse_key(coll)],
        description=f"Load one bucket of {coll.label} from the lake into the warehouse.",
    )
    return CollectionDefinitions(partitions, mongo, lake_asset, job, warehouse_asset, load_job)


def build_warehouse_asset(coll, lake_asset, partitions, group, warehouse_kind) -> dg.AssetsDefinition:
    source = source_of(coll)
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
            "16 MB SUPER). They are named here; the load fails rather than drop them.",
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
            f"Table `{table.label}` in the warehouse: `_id`, `_doc` (the whole document as JSON), `_bucket` and "
            f"the inferred columns of `{coll.label}`. Each partition replaces its bucket's rows in one transaction."
        ),
        metadata={"dagster/table_name": table.label},
    )
    def warehouse_asset(context: dg.AssetExecutionContext, lake: LakeResource, warehouse: WarehouseResource):
        store = lake.open()
        key = context.partition_key
        path = bucket_file(coll.database, coll.collection, key)
        metadata = store.parquet_metadata(path)
        found = snapshot.BucketFile.from_metadata(key, metadata) if metadata else None
        collection_schema = snapshot.load_schema(store, source)
        if found is None or collection_schema is None:
            raise dg.Failure(
                f"{coll.label}: bucket {key} has no lake file at {store.uri(path)}; run `aries sync`"
            )
        # A file written just now may have widened a column the collection schema has not caught up with.
        schema = snapshot.file_schema(collection_schema, found)
        data = store.read_table(path)
        loader = warehouse.loader()
        oversize = oversize_documents(data, loader.dialect.max_document_bytes)
        if oversize:
            yield dg.AssetCheckResult(
                check_name="document_size",
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={"oversize_documents": len(oversize), "examples": ", ".join(oversize[:5])},
            )
            raise dg.Failure(
                f"{coll.label}: bucket {key} has {len(oversize)} documents over "
                f"{loader.dialect.max_document_bytes:,} bytes, more than {table.label} can hold in `_doc` "
                f"(e.g. _id {oversize[0]}); exclude their large fields (schema.exclude) or use another warehouse"
            )
        loaded = loader.replace_bucket(
            table, schema, coll.schema.evolution, key, found.digest, data, store.uri(path)
        )
        in_table = loader.bucket_ids(table, key)
        in_file = data.column("_id").to_pylist()
        context.log.info(f"{table.label} bucket {key}: {loaded.rows} rows in {loaded.seconds:.1f}s")
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": loaded.rows,
                "dagster/table_name": table.label,
                "schema_version": schema.version,
                "table_changes": "; ".join(loaded.actions) or "none",
                "seconds": round(loaded.seconds, 3),
            }
        )
        yield dg.AssetCheckResult(
            check_name="row_count_parity",
            passed=len(in_table) == len(in_file),
            metadata={"rows_in_table": len(in_table), "rows_in_file": len(in_file)},
        )
        missing, extra = set(in_file) - set(in_table), set(in_table) - set(in_file)
        yield dg.AssetCheckResult(
            check_name="id_parity",
            passed=not missing and not extra,
            metadata={"missing_from_table": len(missing), "extra_in_table": len(extra)},
        )
        yield dg.AssetCheckResult(check_name="document_size", passed=True, metadata={"oversize_documents": 0})

    return warehouse_asset


CONFORMANCE_ERROR_SHARE = 0.01


def column_schema(schema: InferredSchema) -> dg.TableSchema:
    columns = [
        dg.TableColumn(
            "_id", "string", "`_id` as text", dg.TableColumnConstraints(nullable=False, unique=True)
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


def materialization_metadata(written: snapshot.WrittenBucket, id_range: str) -> dict:
    schema = written.schema
    return {
        "dagster/row_count": written.documents,
        "dagster/uri": written.uri,
        "dagster/column_schema": column_schema(schema),
        "schema_version": schema.version,
        "schema_changes": "; ".join(schema.actions) or "none",
        "column_mapping": dg.MetadataValue.json({c.dotted: c.name for c in schema.columns}),
        "nonconforming_values": sum(written.outliers.values()),
        "id_range": id_range,
        "bytes_read": written.bytes_in,
        "file_bytes": written.bytes_out,
        "content_sha256": written.digest,
        "seconds": round(written.seconds, 3),
        "rewritten": written.rewritten,
    }


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
