"""`aries demo`: embedded MongoDB with sample data, a live trickle of changes, and `dagster dev`."""

from __future__ import annotations

import datetime
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

from pymongo import MongoClient

from aries_assets.demo.data import load_apps_and_events, load_samples, make_app, make_event
from aries_assets.demo.mongo_server import embedded_mongo

DEMO_DIR = Path(".aries/demo")
MONGO_PORT = 27117

DEMO_CONFIG = """\
# Written by `aries demo`. Copy it as a starting point for your own aries.yaml.
mongo:
  uri: "{uri}"
lake:
  url: "{lake}"
warehouse:
  url: "duckdb:///{warehouse}"
collections:
  - {{database: app, collection: apps, bucket_size: 20}}
  - {{database: app, collection: events, bucket_size: 5000}}
  - {{database: sample_analytics, collection: accounts, bucket_size: 500}}
  - {{database: sample_analytics, collection: customers, bucket_size: 200}}
  - {{database: sample_mflix, collection: theaters, bucket_size: 500}}
  - {{database: sample_mflix, collection: users, bucket_size: 100}}
"""


def seed(client: MongoClient) -> None:
    if "app" in client.list_database_names():
        return
    print("aries demo: loading sample data", file=sys.stderr)
    load_samples(client)
    load_apps_and_events(client)


def trickle(client: MongoClient, every: float, stop: threading.Event) -> None:
    """A light, steady mix of inserts, updates and deletes, like a live product database."""
    rng = random.Random()
    while not stop.wait(every):
        app_ids = [a["_id"] for a in client.app.apps.find({}, {"_id": 1})]
        roll = rng.random()
        now = datetime.datetime.now(datetime.UTC)
        if roll < 0.75:
            client.app.events.insert_one(make_event(rng, app_ids, now))
        elif roll < 0.85:
            client.app.apps.update_one(
                {"_id": rng.choice(app_ids)}, {"$set": {"plan": rng.choice(["free", "team"])}}
            )
        elif roll < 0.92:
            client.app.apps.insert_one(make_app(rng, now))
        else:
            oldest = client.app.events.find_one(sort=[("_id", 1)])
            if oldest:
                client.app.events.delete_one({"_id": oldest["_id"]})


def run_demo(port: int = 3000, trickle_seconds: float = 2.0) -> int:
    from aries_assets.cli import ensure_dagster_home

    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    home = ensure_dagster_home()
    with embedded_mongo(DEMO_DIR / "mongo", port=MONGO_PORT, log=DEMO_DIR / "mongo.log") as uri:
        config = DEMO_DIR / "aries.yaml"
        config.write_text(
            DEMO_CONFIG.format(
                uri=uri,
                lake=(DEMO_DIR / "lake").resolve(),
                warehouse=(DEMO_DIR / "warehouse.duckdb").resolve(),
            )
        )
        env = {**os.environ, "ARIES_CONFIG": str(config.resolve()), "DAGSTER_HOME": home}
        with MongoClient(uri) as client:
            seed(client)
            print(
                "aries demo: first sync (later changes are picked up by `aries sync` or the UI)",
                file=sys.stderr,
            )
            subprocess.run([sys.executable, "-m", "aries_assets.cli", "sync"], env=env, check=False)
            stop = threading.Event()
            writer = threading.Thread(target=trickle, args=(client, trickle_seconds, stop), daemon=True)
            writer.start()
            print(
                f"aries demo: Dagster UI on http://127.0.0.1:{port} (Ctrl-C stops everything)",
                file=sys.stderr,
            )
            dagster = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dagster",
                    "dev",
                    "-w",
                    "workspace.yaml",
                    "-p",
                    str(port),
                    "-h",
                    "127.0.0.1",
                ],
                env=env,
            )
            try:
                return dagster.wait()
            except KeyboardInterrupt:
                dagster.terminate()
                dagster.wait(timeout=30)
                return 0
            finally:
                stop.set()
