"""`aries sync`: record what changed, then sync each collection in this process.

One run per change stream, of the job the sensor requests for it, executed in-process
and recorded in the instance at DAGSTER_HOME, so the UI shows exactly what a one-shot
sync did: each collection synced once, as its own sync job would, a materialization
per bucket on its own asset.
"""

from __future__ import annotations

import os
import sys
import time

import dagster as dg
from botocore.exceptions import BotoCoreError, ClientError
from pymongo.errors import PyMongoError

from aries_assets import terminal
from aries_assets.config import AriesConfig
from aries_assets.core.changes import record_changes, scopes_of
from aries_assets.core.engine import SyncOutcome
from aries_assets.core.ledger import LedgerConflict
from aries_assets.definitions import build_definitions
from aries_assets.factory import serve_job_name, serve_op_name, source_of

MAX_STREAM_PASSES = 100


def sync(
    config: AriesConfig, workers: int, progress=print, full: bool = False, live: bool = False
) -> list[SyncOutcome]:
    """Catch every configured collection up; one collection failing does not stop the others."""
    defs = build_definitions(config)
    lake = defs.resources["lake"].open()
    client = defs.resources["mongo"].client()
    scopes = scopes_of([source_of(c) for c in config.collections], config.sync.change_streams)
    try:
        for scope in scopes:
            for _ in range(MAX_STREAM_PASSES):  # a long backlog: read until caught up
                _, changes = record_changes(client, lake, scope, 100_000, 30.0, idle_persist_seconds=0)
                if changes is None or changes.caught_up or changes.history_lost:
                    break
    except (PyMongoError, OSError, ClientError, BotoCoreError, LedgerConflict) as error:
        progress(f"reading the change streams FAILED: {type(error).__name__}: {error}")
    finally:
        client.close()

    outcomes: dict[str, SyncOutcome] = {}
    display = LiveProgress() if live else None
    shown = display.listen if display else _listener(progress)

    def listen(label: str, event: str, details: dict) -> None:
        if event == "outcome":
            outcomes[label] = details["outcome"]
        elif event == "failed":
            outcomes[label] = SyncOutcome(label, mode="failed", failures=[details["error"]])
        else:
            shown(label, event, details)

    previous, terminal.listener = terminal.listener, listen
    if display:
        display.start()
    try:
        with _instance() as instance:
            for scope in scopes:
                # One run per change stream: its collections `workers` at a time, each as its own
                # sync job would (a run start costs Dagster tenths of a second).
                members = {m.label for m in scope.members}
                result = defs.resolve_job_def(serve_job_name(scope.name)).execute_in_process(
                    instance=instance,
                    raise_on_error=False,
                    tags={"aries/trigger": "aries sync"},
                    run_config={
                        "ops": {
                            serve_op_name(scope.name): {
                                "config": {"once": True, "full": full, "workers": workers}
                            }
                        },
                        # The run's full log, tracebacks included, is in the instance; the terminal
                        # gets sync's own lines and one line per failure.
                        "loggers": {"console": {"config": {"log_level": "CRITICAL"}}},
                    },
                )
                if not result.success and _first_error(result).startswith(_INTERRUPTED):
                    raise KeyboardInterrupt  # Ctrl-C: said once by the command, not as a failure per collection
                for coll in config.collections:
                    if coll.label not in members:
                        continue
                    if coll.label not in outcomes:  # the run failed before this collection's sync
                        error = _first_error(result) if not result.success else "run ended without it"
                        outcomes[coll.label] = SyncOutcome(coll.label, mode="failed", failures=[error])
                    for error in outcomes[coll.label].failures:
                        progress(
                            f"[{coll.label}] FAILED: {error} (the full log: run {result.run_id[:8]} "
                            "in the Dagster UI)"
                        )
    finally:
        terminal.listener = previous
        if display:
            display.stop()
    return [outcomes[c.label] for c in config.collections if c.label in outcomes]


# What Dagster turns a Ctrl-C inside a run into.
_INTERRUPTED = "DagsterExecutionInterruptedError"


def _instance() -> dg.DagsterInstance:
    """The instance at DAGSTER_HOME, as its dagster.yaml configures it, but for its compute logs.

    A run executed in this process would otherwise have its stdout and stderr captured into
    files and copied back to the terminal by a `tail` process, watched by a Python process of
    Dagster's: two processes per run, output that reaches the terminal through a file, and, on
    Ctrl-C, a traceback from the watcher (it shares the terminal's process group). `aries
    sync` prints to the terminal itself; the run's log is in the instance's event log.
    """
    from dagster._core.instance.ref import InstanceRef

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        return dg.DagsterInstance.get()  # which says what to set
    no_capture = {
        "compute_logs": {
            "module": "dagster._core.storage.noop_compute_log_manager",
            "class": "NoOpComputeLogManager",
        }
    }
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(home, overrides=no_capture))


def _first_error(result) -> str:
    failures = [e for e in result.all_events if e.is_step_failure or e.is_failure]
    for event in failures:
        data = event.step_failure_data if event.is_step_failure else None
        error = data.error if data else None
        if error is not None:
            while error.cause is not None and error.cls_name in ("DagsterExecutionStepExecutionError",):
                error = error.cause
            text = error.message.strip().splitlines()[-1] if error.message else ""
            named, _, rest = text.partition(": ")
            if rest and named.rsplit(".", 1)[-1] == error.cls_name:
                text = rest  # Dagster's message repeats the class, with its module
            return f"{error.cls_name}: {text}"
    return "run failed"


def _listener(progress):
    shown = {"at": 0.0}

    def listen(label: str, event: str, details: dict) -> None:
        if event == "message":
            progress(f"[{label}] {details['text'].removeprefix(label + ': ')}")
        elif event == "progress" and details["documents"] and time.monotonic() - shown["at"] >= 5:
            shown["at"] = time.monotonic()
            total = f" of ~{details['total']:,}" if details.get("total") else ""
            progress(
                f"[{label}] {details['documents']:,}{total} documents read, {details['bytes'] / 1e6:,.1f} MB"
            )
        elif event == "written":
            progress(f"[{label}] bucket {details['key']}: {details['documents']:,} docs")

    return listen


class LiveProgress:
    """A live display on a terminal: per collection, documents and MB read, rate and time left."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("docs {task.fields[mb]:>8.1f} MB {task.fields[rate]:>8,.0f} docs/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.tasks: dict[str, int] = {}

    def start(self) -> None:
        self.progress.start()
        terminal.shows_totals = True

    def stop(self) -> None:
        terminal.shows_totals = False
        self.progress.stop()

    def listen(self, label: str, event: str, details: dict) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=None, mb=0.0, rate=0.0)
        task = self.tasks[label]
        if event == "progress":
            elapsed = self.progress.tasks[task].elapsed or 0.0
            rate = details["documents"] / elapsed if elapsed else 0.0
            total = details.get("total")
            self.progress.update(
                task,
                completed=details["documents"],
                total=max(total, details["documents"]) if total else None,
                mb=details["bytes"] / 1e6,
                rate=rate,
            )
        elif event == "message":
            self.console.log(f"[{label}] {details['text'].removeprefix(label + ': ')}")


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def summary_line(outcome: SyncOutcome) -> str:
    if outcome.failures:  # what the failed run did is in its log, not in counts of zero
        return f"{outcome.label:<32} FAILED"
    status = "ok"
    return (
        f"{outcome.label:<32} {outcome.documents:>10,} docs {outcome.buckets:>5} buckets "
        f"{outcome.written:>5} written {outcome.bytes_out / 1e6:>9.1f} MB out {outcome.seconds:>7.1f}s "
        f"schema v{outcome.schema_version:<3} {status:<6} ({outcome.mode})"
    )


def print_summary(reports: list[SyncOutcome], out=None) -> None:
    out = out or sys.stdout
    for report in reports:
        print(summary_line(report), file=out)
        for failure in report.failures:
            print(f"  {report.label}: {failure}", file=out)
