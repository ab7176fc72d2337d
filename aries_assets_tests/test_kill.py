"""kill -9 anywhere: `aries sync` killed at random moments, then a plain `aries sync` repairs.

Each trial prints its seed; replay one with `ARIES_KILL_SEEDS=<seed> pytest -k kill`.
`ARIES_KILL_TRIALS=N` runs N trials per phase (default 7: 21 in all).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bson import ObjectId

from aries_assets_tests.support import (
    assert_same_documents,
    lake_documents,
    mongo_documents,
    write_config,
)
from aries_assets_tests.test_warehouse import assert_table_equals_mongo

PHASES = ("first load", "catch-up", "warehouse load")
TRIALS = int(os.environ.get("ARIES_KILL_TRIALS", "7"))
SEEDS = [int(s) for s in os.environ.get("ARIES_KILL_SEEDS", "").split(",") if s]


def aries(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "aries_assets.cli", *args, "--config", str(workdir / "aries.yaml")]


def killed_sync(workdir: Path, env: dict, delay: float) -> bool:
    """Start `aries sync`, kill -9 it after `delay` seconds; True if it was still running then."""
    process = subprocess.Popen(
        aries(workdir, "sync", "--workers", "2"),
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its writer processes die with it, as on a host crash
    )
    time.sleep(delay)
    alive = process.poll() is None
    with contextlib.suppress(ProcessLookupError):  # it finished, and no process of its group is left
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return alive


def events_with_a_warehouse(workdir: Path, mongo_uri: str, database: str, bucket_size: int, **extra):
    """`aries.yaml` for `<database>.events` into a DuckDB warehouse; the warehouse file and the
    environment a sync runs with."""
    warehouse = workdir / "warehouse.duckdb"
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        str(workdir / "lake"),
        [{"database": database, "collection": "events", "bucket_size": bucket_size}],
        warehouse={"url": f"duckdb:///{warehouse}"},
        **extra,
    )
    return warehouse, {**os.environ, "DAGSTER_HOME": str(workdir / "dagster_home")}


def repair(workdir: Path, env: dict) -> None:
    done = subprocess.run(
        aries(workdir, "sync", "--plain"), cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


def change_some(coll, rng: random.Random) -> None:
    ids = [d["_id"] for d in coll.find({}, {"_id": 1})]
    for _id in rng.sample(ids, 40):
        coll.update_one({"_id": _id}, {"$set": {"v": rng.random(), "note": "changed"}})
    for _id in rng.sample(ids, 10):
        coll.delete_one({"_id": _id})
    coll.insert_many([{"_id": ObjectId(), "v": rng.random(), "n": i} for i in range(200)])


@pytest.mark.parametrize("phase", PHASES)
def test_kill_9_at_random_moments_then_a_plain_sync_repairs(client, mongo_uri, database, workdir, phase):
    seeds = SEEDS or [hash((phase, i)) % 10_000 for i in range(TRIALS)]
    coll = client[database].events
    coll.insert_many([{"_id": ObjectId(), "v": i, "s": "x" * (i % 300)} for i in range(3_000)])
    warehouse, env = events_with_a_warehouse(workdir, mongo_uri, database, 300, sync={"lease_seconds": 5})
    folder = workdir / "lake" / database / "events"
    if phase != "first load":
        repair(workdir, env)
    outcomes = []
    for seed in seeds:
        rng = random.Random(seed)
        print(f"kill trial: phase={phase} seed={seed}", flush=True)
        if phase == "first load":
            subprocess.run(["rm", "-rf", str(workdir / "lake"), str(warehouse)], check=True)
        elif phase == "catch-up":
            change_some(coll, rng)
        else:  # the lake is written; the warehouse must load every bucket again
            change_some(coll, rng)
            warehouse.unlink(missing_ok=True)
        delay = rng.uniform(0.5, 6.0)
        outcomes.append(killed_sync(workdir, env, delay))
        repair(workdir, env)
        leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
        assert not leftovers, f"seed {seed}: temporary files left: {leftovers}"
        assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))
        assert_table_equals_mongo(f"duckdb:///{warehouse}", database, coll)
    assert any(outcomes), "at least one kill landed while the sync was running"


def test_a_first_load_killed_before_its_schema_was_saved_is_loaded_by_a_plain_sync(
    client, mongo_uri, database, workdir
):
    """The state a kill between saving the bucket map and settling the schema left (CI found it with
    seed 7089): files and a loaded ledger, no schema file, nothing dirty, an empty warehouse. The next
    plain sync must settle the schema from the footers and load the table."""
    from aries_assets.core.lake import LocalLake, schema_file
    from aries_assets.core.ledger import LedgerStore

    coll = client[database].events
    coll.insert_many([{"_id": i, "v": i} for i in range(40)])
    warehouse, env = events_with_a_warehouse(workdir, mongo_uri, database, 10)
    repair(workdir, env)
    lake = LocalLake(workdir / "lake")
    lake.delete(schema_file(database, "events"))
    warehouse.unlink()
    assert LedgerStore(lake, database, "events").load().needs_work() is None
    repair(workdir, env)
    assert_table_equals_mongo(f"duckdb:///{warehouse}", database, coll)


def test_ctrl_c_stops_a_sync_with_one_line_and_the_next_sync_repairs(client, mongo_uri, database, workdir):
    """Ctrl-C (SIGINT to the foreground process group) mid first load: exit 130 with one line that
    says nothing is lost, no traceback from any process of the group; the next sync ends exact."""
    coll = client[database].events
    coll.insert_many([{"_id": ObjectId(), "v": i, "s": "x" * (i % 300)} for i in range(20_000)])
    warehouse, env = events_with_a_warehouse(workdir, mongo_uri, database, 500)
    process = subprocess.Popen(
        aries(workdir, "sync", "--plain", "--workers", "2"),
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    assert process.stdout is not None
    lines = []
    for line in process.stdout:  # until the first bucket is written: mid first load
        lines.append(line)
        if " bucket " in line:
            break
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert "Traceback" not in output and "DagsterExecutionInterruptedError" not in output, output
    assert "interrupted" in rest and "next `aries sync`" in rest, output
    repair(workdir, env)
    folder = workdir / "lake" / database / "events"
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))
    assert_table_equals_mongo(f"duckdb:///{warehouse}", database, coll)
