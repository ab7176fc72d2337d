"""The README's reporting query, run once a second while the demo runs, never fails.

The real demo (SecantusDB, its trickle of changes every half second, `dagster dev` with the
sensors on) loads the DuckDB warehouse bucket by bucket while the query, as the README prints
it, runs in a process of its own every second for a minute.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from aries_assets.demo.mongo_server import free_port
from aries_assets_tests.test_demo import STARTUP_SECONDS, demo_dir, kill_everything, start_demo, wait_for_ui  # noqa: F401

README = Path(__file__).resolve().parent.parent / "README.md"
QUERY_SECONDS = 60


def readme_reporting_command() -> list[str]:
    """The shell command exactly as the README prints it, from `.venv/bin/python` to its closing quote."""
    text = README.read_text()
    start = text.index('.venv/bin/python -c "import duckdb; print(duckdb.connect(')
    end = text.index("'''))\"", start) + len("'''))\"")
    argv = shlex.split(text[start:end])
    argv[0] = sys.executable
    return argv


def counts(stdout: str) -> dict[str, int]:
    """Events per app from DuckDB's printed table: the rows are `│ name │ count │`."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 2 and re.fullmatch(r"\d+", cells[1]):
            rows[cells[0]] = int(cells[1])
    return rows


def wait_for_warehouse(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            try:
                with duckdb.connect(str(path), read_only=True) as connection:
                    tables = {t for (t,) in connection.execute("select table_schema || '.' || table_name "
                                                               "from information_schema.tables").fetchall()}  # fmt: skip
                if {"app.apps", "app.events"} <= tables:
                    return
            except duckdb.Error:
                pass
        time.sleep(1)
    raise AssertionError(f"the demo did not load {path} within {timeout:.0f}s")


def test_readme_reporting_query_never_fails_while_the_demo_loads(demo_dir: Path) -> None:  # noqa: F811
    demo = start_demo(demo_dir, free_port(), first_sync=True)
    record = None
    try:
        wait_for_ui(demo)
        record = demo.record()
        warehouse = demo_dir / ".aries/demo/warehouse.duckdb"
        wait_for_warehouse(warehouse, STARTUP_SECONDS)
        published = set()  # the versions of the file the queries met: each load publishes a new one

        command = readme_reporting_command()
        answers, failures = [], []
        deadline = time.monotonic() + QUERY_SECONDS
        while time.monotonic() < deadline:
            started = time.monotonic()
            published.add(warehouse.stat().st_ino)
            result = subprocess.run(command, cwd=demo_dir, capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                failures.append(
                    result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no output"
                )
            else:
                answers.append(counts(result.stdout))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    finally:
        kill_everything(demo, record)

    assert not failures, (
        f"{len(failures)} of {len(failures) + len(answers)} queries failed, e.g. {failures[:3]}"
    )
    assert len(answers) >= QUERY_SECONDS // 4, "the query ran throughout"
    assert len(published) > 1, "the demo loaded buckets while the query ran"
    assert all(answer for answer in answers), "every answer has apps with events today"
    # Events are only added today (the trickle deletes the oldest, seeded days ago) and apps
    # never go, so no app's count and not the top ten's total ever go down.
    for before, after in zip(answers, answers[1:], strict=False):
        assert sum(after.values()) >= sum(before.values()), (before, after)
        for app in before.keys() & after.keys():
            assert after[app] >= before[app], (app, before, after)
