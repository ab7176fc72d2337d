"""Dagster definitions built from the Aries config (ARIES_CONFIG, default ./aries.yaml)."""

from __future__ import annotations

import dagster as dg
from dagster_aws.s3 import S3Resource

from aries_assets.config import AriesConfig, load_config
from aries_assets.factory import build_collection
from aries_assets.resources import LakeResource, MongoResource
from aries_assets.sensors import build_change_sensor


def build_definitions(config: AriesConfig) -> dg.Definitions:
    lake_kind = "s3" if config.lake_on_s3 else "file"
    collections = [build_collection(coll, lake_kind) for coll in config.collections]
    s3 = S3Resource(endpoint_url=config.lake_endpoint_url, region_name=config.lake_region)
    return dg.Definitions(
        assets=[c.mongo for c in collections] + [c.lake for c in collections],
        jobs=[c.job for c in collections],
        sensors=[build_change_sensor(coll) for coll in config.collections],
        resources={
            "mongo": MongoResource(uri=config.mongo_uri),
            "lake": LakeResource(url=config.lake_url, s3=s3),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_config())
