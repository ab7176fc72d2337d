"""The lake on S3 as an Athena table: one Glue table per collection, updated only when its schema changes.

Glue charges per call and Athena reads the table definition, not the files, to
know the columns; so the table carries the Aries schema version and is
rewritten only when that version moves (the second seed: "call Glue only when
the schema changes").
"""

from __future__ import annotations

import contextlib
from typing import Any

from aries_assets.core import schema as s

SCHEMA_VERSION_PARAMETER = "aries_schema_version"
_HIVE = {
    s.T_BOOL: "boolean", s.T_INT32: "int", s.T_INT64: "bigint", s.T_DOUBLE: "double",
    s.T_STRING: "string", s.T_JSON: "string", s.T_TIMESTAMP: "timestamp", s.T_BINARY: "binary",
}  # fmt: skip


def hive_type(type_name: str) -> str:
    if type_name.startswith("list<"):
        return f"array<{hive_type(type_name[5:-1])}>"
    decimal = s.parse_decimal(type_name)
    return f"decimal({decimal[0]},{decimal[1]})" if decimal else _HIVE[type_name]


def glue_name(name: str) -> str:
    """Athena wants lowercase letters, digits and underscores."""
    return s.base_name((name,)).rstrip("_") or "x"


def table_input(table: str, schema: s.InferredSchema, location: str, label: str) -> dict[str, Any]:
    columns = [
        {"Name": "_id", "Type": "string"},
        {"Name": "_doc", "Type": "string", "Comment": "canonical Extended JSON"},
        {
            "Name": "_id_key",
            "Type": "string",
            "Comment": "_id as canonical Extended JSON: distinct ids never share it",
        },
    ]
    columns += [
        {"Name": c.name, "Type": hive_type(c.type), "Comment": f"from {c.dotted}"[:255]}
        for c in schema.columns
    ]
    return {
        "Name": table,
        "Description": f"MongoDB collection {label}, synced by Aries",
        "TableType": "EXTERNAL_TABLE",
        "Parameters": {
            "classification": "parquet",
            "EXTERNAL": "TRUE",
            SCHEMA_VERSION_PARAMETER: str(schema.version),
        },
        "StorageDescriptor": {
            "Columns": columns,
            "Location": location.rstrip("/") + "/",
            "InputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat",
            "OutputFormat": "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat",
            "SerdeInfo": {
                "SerializationLibrary": "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
            },
        },
    }


def register_table(glue: Any, database: str, collection: str, schema: s.InferredSchema, location: str) -> str:
    """Create or update the Glue table of a collection; returns what was done ("unchanged" costs one call)."""
    glue_database, table = glue_name(database), glue_name(collection)
    wanted = table_input(table, schema, location, f"{database}.{collection}")
    try:
        current = glue.get_table(DatabaseName=glue_database, Name=table)["Table"]
    except glue.exceptions.EntityNotFoundException:
        current = None
    if current is None:
        with contextlib.suppress(glue.exceptions.AlreadyExistsException):
            glue.create_database(DatabaseInput={"Name": glue_database})
        glue.create_table(DatabaseName=glue_database, TableInput=wanted)
        return f"created {glue_database}.{table}"
    columns = current.get("StorageDescriptor", {}).get("Columns", [])
    if current.get("Parameters", {}).get(SCHEMA_VERSION_PARAMETER) == str(schema.version) and [
        (c["Name"], c["Type"]) for c in columns
    ] == [(c["Name"], c["Type"]) for c in wanted["StorageDescriptor"]["Columns"]]:
        return "unchanged"  # (compared by columns too: a table registered before `_id_key` gains it)
    glue.update_table(DatabaseName=glue_database, TableInput=wanted)
    return f"updated {glue_database}.{table} to schema v{schema.version}"
