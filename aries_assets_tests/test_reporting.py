"""The README's reporting query, run as printed against a warehouse built from the demo's data."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from aries_assets.demo.data import load_apps_and_events
from aries_assets_tests.support import run_cli, write_config

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_reporting_query_answers_the_seed_question(client, mongo_uri, database, workdir, monkeypatch):
    # The demo's apps and events, under a fresh database name mapped back to `app` in the warehouse.
    load_apps_and_events(client, apps=5, events=300, database=database)
    collections = [
        {"database": database, "collection": name, "bucket_size": 100, "warehouse_schema": "app"}
        for name in ("apps", "events")
    ]
    write_config(
        workdir / "aries.yaml", mongo_uri, "./lake", collections,
        warehouse={"url": f"duckdb:///{workdir / '.aries/demo/warehouse.duckdb'}"},
    )  # fmt: skip
    code, _, err = run_cli("sync", "--workers", "1")
    assert code == 0, err

    # The shell command exactly as the README prints it, from `.venv/bin/python` to its closing quote.
    start = README.read_text().index('.venv/bin/python -c "import duckdb; print(duckdb.connect(')
    end = README.read_text().index("'''))\"", start) + len("'''))\"")
    argv = shlex.split(README.read_text()[start:end])
    argv[0] = sys.executable
    result = subprocess.run(argv, cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = {a["name"] for a in client[database].apps.find()}
    rows = [line for line in result.stdout.splitlines() if any(name in line for name in names)]
    assert rows, result.stdout
    # The counts agree with MongoDB's own answer (the top 10 apps; there are 5).
    today = client[database].events.count_documents({"occurred_at": {"$gte": _midnight()}})
    counted = sum(int(re.findall(r"│\s*(\d+)\s*│", line)[-1]) for line in rows)
    assert counted == today == 60


def _midnight():
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)
