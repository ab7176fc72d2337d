"""The `aries` command: `aries sync` (one-shot catch-up) and `aries demo`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from aries_assets.config import ConfigError, load_config
from aries_assets.resources import MongoUnreachable


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


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_sync(args: argparse.Namespace) -> int:
    from aries_assets.sync import default_workers, print_summary, sync

    config = load_config(args.config)
    check_mongo(config)  # before anything is written, DAGSTER_HOME included
    ensure_dagster_home()
    workers = args.workers or config.sync.workers or default_workers()
    reports = sync(config, workers=workers, progress=_progress, full=args.full)
    print_summary(reports)
    return 1 if any(r.failures for r in reports) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from aries_assets.demo.run import run_demo

    return run_demo(port=args.port, trickle_seconds=args.trickle_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aries", description="Keep analytics stores in step with MongoDB.")
    sub = parser.add_subparsers(dest="command", required=True)
    sync_parser = sub.add_parser("sync", help="plan buckets and write every missing or stale bucket")
    sync_parser.add_argument("--config", help="config file (default: $ARIES_CONFIG or ./aries.yaml)")
    sync_parser.add_argument(
        "--workers", type=int, default=0, help="parallel bucket writers (default: sync.workers in the config)"
    )
    sync_parser.add_argument(
        "--full",
        action="store_true",
        help="re-read every collection and rewrite buckets whose content changed",
    )
    sync_parser.set_defaults(func=cmd_sync)
    demo_parser = sub.add_parser(
        "demo", help="embedded MongoDB with sample data, a trickle of changes, dagster dev"
    )
    demo_parser.add_argument("--port", type=int, default=3000, help="Dagster UI port")
    demo_parser.add_argument("--trickle-seconds", type=float, default=2.0, help="seconds between demo writes")
    demo_parser.set_defaults(func=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, MongoUnreachable) as error:
        print(f"aries: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
