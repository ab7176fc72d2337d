"""Dagster definitions built from the Aries config (ARIES_CONFIG, default ./aries.yaml)."""

from __future__ import annotations

import dagster as dg
from dagster_aws.athena import AthenaClientResource
from dagster_aws.s3 import S3Resource

from aries_assets.config import AriesConfig, load_config
from aries_assets.factory import build_collection
from aries_assets.resources import LakeResource, MongoResource, WarehouseResource
from aries_assets.sensors import build_change_sensor


def build_definitions(config: AriesConfig) -> dg.Definitions:
    lake_kind = "s3" if config.lake_on_s3 else "file"
    resources = {
        "mongo": MongoResource(uri=config.mongo_uri),
        "lake": LakeResource(
            url=config.lake_url,
            s3=S3Resource(endpoint_url=config.lake_endpoint_url, region_name=config.lake_region),
        ),
    }
    if config.lake_on_s3:
        # For users who query the lake where it is registered: Athena over the Glue tables.
        resources["athena"] = AthenaClientResource()
    warehouse_kind = None
    if config.warehouse_url:
        resources["warehouse"] = WarehouseResource(
            url=config.warehouse_url, iam_role=config.warehouse_iam_role
        )
        warehouse_kind = resources["warehouse"].kind
    collections = [build_collection(coll, lake_kind, warehouse_kind) for coll in config.collections]
    return dg.Definitions(
        assets=[c.mongo for c in collections]
        + [c.lake for c in collections]
        + [c.warehouse for c in collections if c.warehouse],
        jobs=[c.job for c in collections] + [c.load_job for c in collections if c.load_job],
        sensors=[
            build_change_sensor(coll, c) for coll, c in zip(config.collections, collections, strict=True)
        ],
        resources=resources,
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_config())
