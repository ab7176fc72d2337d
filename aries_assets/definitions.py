"""Dagster definitions built from the Aries config (ARIES_CONFIG, default ./aries.yaml)."""

from __future__ import annotations

import warnings

import dagster as dg

from aries_assets.config import AriesConfig, load_config
from aries_assets.core.changes import scopes_of
from aries_assets.factory import build_collection, build_serve_job, source_of
from aries_assets.resources import LakeResource, MongoResource, WarehouseResource
from aries_assets.sensors import build_change_sensor

# Dagster hands a sensor's owners (we set none) on when it binds the sensor's resources, and then
# warns that the parameter is in beta, at every command: nothing a user can act on.
warnings.filterwarnings(
    "ignore", message="Parameter `owners` of initializer `SensorDefinition", category=dg.BetaWarning
)


def build_definitions(config: AriesConfig) -> dg.Definitions:
    lake_kind = "s3" if config.lake_on_s3 else "file"
    resources = {
        "mongo": MongoResource(uri=config.mongo_uri),
        "lake": LakeResource(
            url=config.lake_url,
            endpoint_url=config.lake_endpoint_url,
            region_name=config.lake_region,
        ),
    }
    if config.lake_on_s3:
        # For users who query the lake where it is registered: Athena over the Glue tables.
        from dagster_aws.athena import AthenaClientResource

        resources["athena"] = AthenaClientResource()
    warehouse_kind = None
    if config.warehouse_url:
        resources["warehouse"] = WarehouseResource(
            url=config.warehouse_url, iam_role=config.warehouse_iam_role
        )
        warehouse_kind = resources["warehouse"].kind
    built = {c.label: build_collection(c, lake_kind, warehouse_kind, config.sync) for c in config.collections}
    by_label = {c.label: c for c in config.collections}
    sensors, serve_jobs = [], []
    for scope in scopes_of([source_of(c) for c in config.collections], config.sync.change_streams):
        members = [by_label[m.label] for m in scope.members]
        serve = build_serve_job(scope, members, config.sync, warehouse_kind is not None)
        serve_jobs.append(serve)
        jobs = [built[c.label].job for c in members] + [serve]
        sensors.append(build_change_sensor(scope, members, jobs, config.sync.lease_seconds))
    collections = list(built.values())
    return dg.Definitions(
        assets=[c.mongo for c in collections]
        + [c.lake for c in collections]
        + [c.warehouse for c in collections if c.warehouse],
        jobs=[c.job for c in collections] + [c.load_job for c in collections] + serve_jobs,
        sensors=sensors,
        resources=resources,
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_config())
