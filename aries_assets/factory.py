"""Per collection: its bucket partitions, the `mongo/...` and `lake/...` assets, and its sync job."""

from dataclasses import dataclass
from typing import Any

import dagster as dg

from aries_assets.config import CollectionConfig, dagster_name
from aries_assets.core import snapshot
from aries_assets.core.extract import SourceCollection
from aries_assets.core.lake import bucket_file, collection_prefix, load_bucket_map
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

    @dg.asset(
        key=lake_key(coll),
        deps=[mongo],
        partitions_def=partitions,
        group_name=group,
        kinds={"parquet", lake_kind},
        owners=list(coll.owners) or None,
        code_version=snapshot.FORMAT_VERSION,
        description=(
            f"Parquet bucket files of `{coll.label}` under `{collection_prefix(coll.database, coll.collection)}/` "
            "in the lake, one per partition, rewritten whole when any document in the bucket changes. "
            "Columns: `_id` (string), `_doc` (the whole document as canonical Extended JSON) and the "
            "flattened fields."
        ),
        metadata={"collection": coll.label},
    )
    def lake_asset(
        context: dg.AssetExecutionContext, mongo: MongoResource, lake: LakeResource
    ) -> dg.MaterializeResult:
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
            written = snapshot.write_bucket(source, source.open(client), store, bucket)
        finally:
            client.close()
        context.log.info(
            f"{coll.label} bucket {bucket.key}: {written.documents} documents, "
            f"{written.bytes_out / 1e6:.2f} MB in {written.seconds:.1f}s"
        )
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": written.documents,
                "dagster/uri": written.uri,
                "dagster/column_schema": dg.TableSchema(
                    columns=[
                        dg.TableColumn(
                            "_id",
                            "string",
                            description="`_id` as text",
                            constraints=dg.TableColumnConstraints(nullable=False, unique=True),
                        ),
                        dg.TableColumn(
                            "_doc", "string", description="whole document, canonical Extended JSON"
                        ),
                    ]
                    + [dg.TableColumn(c.name, str(c.arrow_type)) for c in written.columns]
                ),
                "id_range": bucket.describe(),
                "bytes_read": written.bytes_in,
                "file_bytes": written.bytes_out,
                "content_sha256": written.digest,
                "seconds": round(written.seconds, 3),
            },
            data_version=dg.DataVersion(written.digest),
        )

    job = dg.define_asset_job(
        job_name(coll),
        selection=[lake_key(coll)],
        description=f"Write the Parquet file of one bucket of {coll.label}.",
    )
    return CollectionDefinitions(partitions, mongo, lake_asset, job)


def bucket_path(coll: CollectionConfig, key: str) -> str:
    return bucket_file(coll.database, coll.collection, key)
