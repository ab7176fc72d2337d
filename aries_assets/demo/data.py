"""Demo and test data: MongoDB's public sample datasets, and a generated apps/events pair.

The apps/events pair is the first seed's story: events carry only an app's id,
while reports need the app's name, which lives in MongoDB.
"""

from __future__ import annotations

import datetime
import random
from pathlib import Path
from typing import Any

from bson import Decimal128, ObjectId, json_util
from pymongo import MongoClient

DATA_DIR = Path(__file__).parent / "data"
SAMPLE_NAMESPACES = [path.stem for path in sorted(DATA_DIR.glob("*.jsonl"))]  # "db.collection"

EVENT_TYPES = ["page_view", "track", "identify", "error", "batch_processed"]
INTEGRATIONS = ["redshift", "s3", "mixpanel", "google-analytics", "salesforce", "webhooks"]


def sample_documents(namespace: str) -> list[dict[str, Any]]:
    """The documents of one sample dataset file, types intact (Extended JSON)."""
    lines = (DATA_DIR / f"{namespace}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json_util.loads(line) for line in lines if line.strip()]


def load_samples(client: MongoClient, database_prefix: str = "") -> dict[str, int]:
    """Insert every sample dataset into `<prefix><db>.<collection>`; returns counts by namespace."""
    counts = {}
    for namespace in SAMPLE_NAMESPACES:
        database, collection = namespace.split(".", 1)
        documents = sample_documents(namespace)
        client[database_prefix + database][collection].insert_many(documents, ordered=False)
        counts[namespace] = len(documents)
    return counts


def make_app(rng: random.Random, created: datetime.datetime) -> dict[str, Any]:
    adjective = rng.choice(["Blue", "Rapid", "Quiet", "Bright", "Lucky", "Solar", "Nimble", "Brave"])
    noun = rng.choice(["Falcon", "Harbor", "Ledger", "Orbit", "Canvas", "Signal", "Meadow", "Forge"])
    return {
        "_id": ObjectId(),
        "name": f"{adjective} {noun} {rng.randint(1, 999)}",
        "plan": rng.choice(["free", "team", "enterprise"]),
        "created_at": created,
        "owner": {
            "email": f"owner{rng.randint(1, 500)}@example.com",
            "country": rng.choice(["US", "DE", "IN", "BR"]),
        },
        "integrations": rng.sample(INTEGRATIONS, rng.randint(0, 3)),
        "monthly_price": Decimal128(f"{rng.choice([0, 49, 199, 999])}.00"),
    }


def make_event(rng: random.Random, app_ids: list[ObjectId], at: datetime.datetime) -> dict[str, Any]:
    event_type = rng.choice(EVENT_TYPES)
    event: dict[str, Any] = {
        "app_id": rng.choice(app_ids),
        "type": event_type,
        "occurred_at": at,
        "integration": rng.choice(INTEGRATIONS),
        "bytes": rng.randint(100, 5_000_000),
    }
    if event_type == "error":
        event["error"] = {
            "code": rng.choice([400, 401, 429, 500, 503]),
            "message": "upstream rejected the batch",
        }
    return event


def load_apps_and_events(
    client: MongoClient, apps: int = 40, events: int = 20_000, seed: int = 7, database: str = "app"
) -> None:
    """`<database>.apps` and `<database>.events`: events reference apps by id only."""
    rng = random.Random(seed)
    now = datetime.datetime.now(datetime.UTC)
    app_docs = [make_app(rng, now - datetime.timedelta(days=rng.randint(1, 400))) for _ in range(apps)]
    client[database].apps.insert_many(app_docs)
    app_ids = [a["_id"] for a in app_docs]
    batch = []
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today = events // 5  # a fifth happened today, so "events per app today" has an answer at any hour
    for i in range(events):
        # Oldest first, so young documents sit in the newest bucket.
        if i < events - today:
            at = midnight - datetime.timedelta(seconds=(events - today - i) * 604_800 / (events - today))
        else:
            at = midnight + (now - midnight) * ((i - (events - today) + 1) / (today + 1))
        batch.append(make_event(rng, app_ids, at))
        if len(batch) == 5000:
            client[database].events.insert_many(batch)
            batch = []
    if batch:
        client[database].events.insert_many(batch)
