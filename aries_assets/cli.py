"""The `aries` command: `aries sync` (one-shot catch-up), `aries status`, `aries split` and `aries demo`."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
from pathlib import Path

from aries_assets.config import ConfigError, expand_url, lake_spec, load_config
from aries_assets.core.extract import MongoUnreachable


def ensure_dagster_home() -> str:
    """DAGSTER_HOME, defaulting to ./.dagster seeded with this directory's dagster.yaml if any.

    Two `aries` commands started together on a fresh home would both create the
    instance's SQLite storage and leave it corrupt: the first creates it under a
    lock, the other waits and finds it made.
    """
    import fcntl

    import dagster as dg

    home = Path(os.environ.get("DAGSTER_HOME") or ".dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    with open(home / ".aries-init.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        instance_yaml = home / "dagster.yaml"
        if not instance_yaml.exists():
            template = Path("dagster.yaml")
            text = template.read_text() if template.is_file() else "telemetry:\n  enabled: false\n"
            tmp = home / ".dagster.yaml.tmp"
            tmp.write_text(text)
            os.replace(tmp, instance_yaml)
        marker = home / ".aries-instance-ready"
        if not marker.exists():
            with dg.DagsterInstance.get():  # creates and migrates the storage, once
                pass
            marker.touch()
    return str(home)


def check_mongo(config) -> None:
    from aries_assets.resources import MongoResource

    MongoResource(uri=config.mongo_uri).client().close()


class TargetUnreachable(RuntimeError):
    """The lake or the warehouse did not answer; the message names which and what to check."""


def check_targets(config) -> None:
    """Reach the lake and the warehouse before anything is written, as MongoDB is."""
    from botocore.exceptions import BotoCoreError, ClientError

    from aries_assets.config import expand_url, redact_uri, scrub, url_password
    from aries_assets.definitions import build_definitions

    defs = build_definitions(config)
    lake = defs.resources["lake"]
    store = lake.open()

    def probe(verb: str, action, hint: str) -> None:
        try:
            action()
        except (BotoCoreError, ClientError, OSError) as error:
            raise TargetUnreachable(
                f"cannot {verb} the lake at {lake.spec().url}: {type(error).__name__}: {str(error)[:200]}; "
                f"check {hint}"
            ) from None

    probe(
        "read",
        lambda: store.read_versioned("_aries/streams/.reachable"),
        "lake.url, lake.endpoint_url, lake.region and the AWS credentials",
    )
    warehouse = defs.resources.get("warehouse")
    if warehouse is not None:
        try:
            with warehouse.loader().transaction(publish=False) as cursor:
                cursor.execute("SELECT 1")
        except Exception as error:  # noqa: BLE001 - any driver's failure, said in one line
            text = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            url = expand_url(config.warehouse_url, "warehouse.url")
            text = scrub(text, url_password(url))
            if "the warehouse at" not in text:  # the loader's own errors already name it
                text = f"cannot reach the warehouse at {redact_uri(url)}: {text}"
            raise TargetUnreachable(f"{text}; check warehouse.url and that the server is running") from None
    # Last, once everything else answered: written and removed (a read-only mount or a bucket
    # policy would fail every run), so a mistake found above leaves nothing behind.
    probe(
        "write to",
        lambda: (store.write_text("_aries/streams/.writable", ""), store.delete("_aries/streams/.writable")),
        "lake.url and that it can be written (permissions, a read-only mount, the bucket policy)",
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_sync(args: argparse.Namespace) -> int:
    from aries_assets.core import read_ahead

    config = load_config(args.config)
    _begin_first_read(config)  # before Dagster is imported: that is what it overlaps
    try:
        from aries_assets.sync import default_workers, print_summary, sync

        check_mongo(config)  # before anything is written, DAGSTER_HOME included
        check_targets(config)
        ensure_dagster_home()
        workers = args.workers or config.sync.workers or default_workers()
        live = sys.stderr.isatty() and not args.plain
        reports = sync(config, workers=workers, progress=_progress, full=args.full, live=live)
    except KeyboardInterrupt:
        print(
            "aries: interrupted; nothing is lost: the files already written stay, and the next "
            "`aries sync` finishes the work",
            file=sys.stderr,
        )
        return 130
    finally:
        read_ahead.close_all()
    print_summary(reports)
    return 1 if any(r.failures for r in reports) else 0


def _begin_first_read(config) -> None:
    """A collection's first load begins reading now, while Dagster is imported (see `core.read_ahead`)."""
    from aries_assets.core import read_ahead

    try:
        uri = expand_url(config.mongo_uri, "mongo.uri")
        lake = lake_spec(config.lake_url, config.lake_endpoint_url, config.lake_region)
    except ConfigError:
        return  # said in one line by the checks that follow
    read_ahead.begin(uri, lake, [c.source for c in config.collections])


def cmd_status(args: argparse.Namespace) -> int:
    """A table per collection (or JSON): is everything in step, and if not, what is waiting or failing."""
    import json

    from aries_assets.core.changes import majority_time
    from aries_assets.core.status import CollectionStatus, ago, collection_status
    from aries_assets.definitions import build_definitions
    from aries_assets.factory import source_of, spec_of

    config = load_config(args.config)
    defs = build_definitions(config)
    lake = defs.resources["lake"].open()
    warehouse = defs.resources.get("warehouse")
    loader = warehouse.loader() if warehouse is not None else None
    cluster_time, unreachable = None, None
    try:
        client = defs.resources["mongo"].client()
        try:
            cluster_time = majority_time(client, source_of(config.collections[0]))
        finally:
            client.close()
    except MongoUnreachable as error:
        unreachable = str(error)
    statuses = []
    for coll in config.collections:
        try:
            status = collection_status(spec_of(coll, loader is not None), lake, loader, cluster_time)
        except Exception as error:  # noqa: BLE001 - the lake failing is a status too, said in one line
            status = CollectionStatus(coll.label)
            status.problems.append(f"lake: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
        if unreachable:
            status.problems.append(unreachable)
        statuses.append(status)
    if args.json:
        print(json.dumps([s.to_dict() for s in statuses], indent=1, default=str))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Aries status", title_justify="left")
        columns = [
            "collection",
            "docs",
            "buckets",
            "lag",
            "dirty",
            "last success",
            "lease",
            "schema",
            "warehouse",
            "state",
        ]
        for name in columns:
            table.add_column(name, overflow="fold")
        for s in statuses:
            warehouse_text = "-"
            if s.warehouse_rows is not None or s.warehouse_buckets_behind is not None:
                behind = f", {s.warehouse_buckets_behind} behind" if s.warehouse_buckets_behind else ""
                warehouse_text = f"{s.warehouse_rows or 0:,} rows{behind}"
            state = "in step" if s.in_step else "; ".join(s.problems) or f"waiting: {s.waiting_for}"
            table.add_row(
                s.collection,
                f"{s.documents:,}",
                str(s.buckets),
                "-" if s.lag_seconds is None else f"{s.lag_seconds:.0f}s",
                str(s.dirty_buckets),
                ago(s.last_success),
                s.lease or "free",
                f"v{s.schema_version}",
                warehouse_text,
                state,
            )
        Console(width=200 if not sys.stdout.isatty() else None).print(table)
    return 1 if any(s.problems for s in statuses) else 0


def cmd_split(args: argparse.Namespace) -> int:
    """Plan a very large collection's first load as `_id`-range runs, and say how to launch them."""
    import dagster as dg

    from aries_assets.core.changes import mark_stream
    from aries_assets.core.extract import check_collection
    from aries_assets.core.ledger import LeaseHeld, ledger_file
    from aries_assets.core.split import plan_ranges, record_split
    from aries_assets.definitions import build_definitions
    from aries_assets.factory import load_job_name, source_of

    config = load_config(args.config)
    coll = next((c for c in config.collections if c.label == args.collection), None)
    if coll is None:
        known = ", ".join(c.label for c in config.collections)
        raise ConfigError(f"{args.collection}: not a collection of the config; pick one of {known}")
    check_mongo(config)
    check_targets(config)
    ensure_dagster_home()
    defs = build_definitions(config)
    lake = defs.resources["lake"].open()
    source = source_of(coll)
    client = defs.resources["mongo"].client()
    try:
        check_collection(client, source, False)
        lowers = plan_ranges(client, source, args.runs)
        # The collection's own stream is marked before its ranges are read, as a first load's is: the
        # sensor joins it to the shared stream from that token, not from a time.
        mark = mark_stream(client, source)
    finally:
        client.close()
    try:
        buckets = record_split(lake, source, lowers, coll.bucket_size, mark, holder="aries split")
    except (ValueError, LeaseHeld) as error:
        print(f"aries: {error}", file=sys.stderr)
        return 2
    keys = [b.key for b in buckets]
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(coll.name, keys)
    job = load_job_name(coll)
    print(f"{coll.label}: first load split into {len(buckets)} `_id` ranges, recorded in "
          f"{lake.uri(ledger_file(coll.database, coll.collection))}:")  # fmt: skip
    for bucket in buckets:
        print(f"  {bucket.key:<32} {bucket.describe()}")
    print(
        "Launch one run per range (a backfill; the run queue and launcher spread them over machines):\n"
        f"  dagster job backfill -w workspace.yaml -j {job} --partitions {','.join(keys)} --noprompt\n"
        f"or in the UI: Jobs > {job} > Partitions > select these {len(keys)} > Launch backfill.\n"
        "Once every range is written, the sensor requests one sync run that settles the schema, Glue and "
        "the warehouse; `aries status` shows the ranges still waiting."
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aries_assets.demo.run import run_demo

    return run_demo(port=args.port, trickle_seconds=args.trickle_seconds)


def _workers(text: str) -> int:
    """`--workers`: a whole number from 1 to 64, as `sync.workers` in the config."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 64, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aries", description="Keep analytics stores in step with MongoDB.")
    sub = parser.add_subparsers(dest="command", required=True)
    sync_parser = sub.add_parser("sync", help="plan buckets and write every missing or stale bucket")
    sync_parser.add_argument("--config", help="config file (default: $ARIES_CONFIG or ./aries.yaml)")
    sync_parser.add_argument(
        "--workers",
        type=_workers,
        default=0,
        help="parallel bucket writers, 1 to 64 (default: sync.workers in the config)",
    )
    sync_parser.add_argument(
        "--full",
        action="store_true",
        help="re-read every collection and rewrite buckets whose content changed",
    )
    sync_parser.add_argument(
        "--plain",
        action="store_true",
        help="plain progress lines even on a terminal (they are the default otherwise)",
    )
    sync_parser.set_defaults(func=cmd_sync)
    status_parser = sub.add_parser(
        "status", help="is every collection in step: lag, dirty buckets, leases, failures"
    )
    status_parser.add_argument("--config", help="config file (default: $ARIES_CONFIG or ./aries.yaml)")
    status_parser.add_argument("--json", action="store_true", help="machine-readable output")
    status_parser.set_defaults(func=cmd_status)
    split_parser = sub.add_parser(
        "split", help="plan a very large collection's first load as `_id`-range runs (a backfill)"
    )
    split_parser.add_argument("collection", help="<database>.<collection>, as in the config")
    split_parser.add_argument(
        "--runs", type=int, required=True, help="how many ranges (runs) to split it into"
    )
    split_parser.add_argument("--config", help="config file (default: $ARIES_CONFIG or ./aries.yaml)")
    split_parser.set_defaults(func=cmd_split)
    demo_parser = sub.add_parser(
        "demo", help="embedded MongoDB with sample data, a trickle of changes, dagster dev"
    )
    demo_parser.add_argument("--port", type=int, default=3000, help="Dagster UI port")
    demo_parser.add_argument("--trickle-seconds", type=float, default=2.0, help="seconds between demo writes")
    demo_parser.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, MongoUnreachable, TargetUnreachable) as error:
        print(f"aries: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def console() -> None:
    """The `aries` command: `main`, then a prompt exit.

    By the time `main` returns, what the command wrote is durable: files renamed into
    place, ledgers swapped, the instance's run records committed, writer processes
    and leases ended. The exit handlers still run (multiprocessing removes the fork
    server's socket directory from the temporary directory); what the interpreter
    would do after them (collect and tear down Dagster's objects) takes most of a
    second and changes nothing.
    """
    try:
        code = main()
    except BrokenPipeError:  # a reader that went away (`aries status --json | head`) read what it wanted
        code = 0
    with contextlib.suppress(ImportError, AttributeError):
        # pymongo's exit handler joins its monitor threads, each asleep for up to half a second
        # between checks of whether it was stopped: time for nothing, as `os._exit` ends them.
        from pymongo.synchronous import monitor

        atexit.unregister(monitor._shutdown_resources)
    atexit._run_exitfuncs()  # what `sys.exit` runs first (logging's shutdown among them)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away (`| head`)
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    console()
