"""Per collection: its bucket partitions, the `mongo/...` and `lake/...` assets, and its sync job."""

import datetime
from dataclasses import dataclass
from typing import Any

import dagster as dg

from aries_assets.config import CollectionConfig, dagster_name
from aries_assets.core import snapshot
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import collection_prefix, load_bucket_map
from aries_assets.core.schema import InferredSchema
from aries_assets.resources import LakeResource, MongoResource


@dataclass(frozen=True)
class CollectionDefinitions:
    partitions: dg.DynamicPartitionsDefinition
    mongo: dg.AssetSpec
    lake: dg.AssetsDefinition
    job: Any  # an unresolved asset job; resolved by Definitions


def mongo_key(coll: CollectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["mongo", dagster_name(coll.database), dagster_name(coll.collection)])


def lake_key(coll: CollectionConfig) -> dg.AssetKey:
    return dg.AssetKey(["lake", dagster_name(coll.database), dagster_name(coll.collection)])


def job_name(coll: CollectionConfig) -> str:
    return f"sync__{coll.name}"


def source_of(coll: CollectionConfig) -> SourceCollection:
    return SourceCollection(coll.database, coll.collection, coll.query)


def build_collection(coll: CollectionConfig, lake_kind: str) -> CollectionDefinitions:
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

    job = dg.define_asset_job(
        job_name(coll),
        selection=[lake_key(coll)],
        description=f"Write the Parquet file of one bucket of {coll.label}.",
    )
    return CollectionDefinitions(partitions, mongo, lake_asset, job)


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
