"""`aries demo`: embedded MongoDB with sample data, a live trickle of changes, and `dagster dev`.

Every process the demo starts runs in a session of its own, under a keeper that stops the
whole session with it, and is recorded in `<demo dir>/pids.json`. Ctrl-C, SIGTERM or SIGHUP
stop those sessions whole (SIGTERM, then SIGKILL after a grace period), so no webserver,
daemon, code server or run worker outlives the demo. On Linux the keepers also stop their
sessions when the demo itself is killed, and the next `aries demo` stops whatever the
record still names before it starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import NoReturn

import psutil
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from aries_assets.demo.data import load_apps_and_events, load_samples, make_app, make_event
from aries_assets.demo.mongo_server import mongo_uri, start_mongo, wait_until_up

DEMO_DIR = Path(".aries/demo")
MONGO_PORT = 27117
# Settings `aries demo` has no flag for, mostly for tests.
MONGO_PORT_VARIABLE = "ARIES_DEMO_MONGO_PORT"  # another port for SecantusDB
FIRST_SYNC_VARIABLE = "ARIES_DEMO_FIRST_SYNC"  # "0": no `aries sync` before the UI starts

# On a stop, Dagster gets SIGTERM first (its run workers then mark their runs failed) and
# SecantusDB a moment later; whatever still runs after the grace period gets SIGKILL. Well
# under the 10 s service managers usually allow before they SIGKILL.
STOP_GRACE_SECONDS = 5.0
HEAD_START_SECONDS = 1.0

SEED_DATABASES = ["app", "sample_analytics", "sample_mflix"]
SEED_MARKER = ("aries_demo", "seed")  # written last: its absence means the seed is incomplete

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


class DemoStopped(BaseException):
    """Raised in the main thread by the first SIGINT, SIGTERM or SIGHUP."""


class AnotherDemoRunning(RuntimeError):
    pass


@dataclass(frozen=True)
class ProcessRecord:
    """A process the demo started, identified beyond its pid: pids are reused, start times are not."""

    name: str
    pid: int
    create_time: float

    @classmethod
    def of(cls, name: str, pid: int) -> ProcessRecord:
        return cls(name, pid, psutil.Process(pid).create_time())

    def is_running(self) -> bool:
        """Whether this very process still runs (not a later one with the same pid)."""
        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.create_time and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def session_members(leader: ProcessRecord) -> list[psutil.Process]:
    """Living processes of the session `leader` opened, the leader included if it still runs,
    the calling process never.

    Linux never hands out a pid while a living process uses it as its session id, so
    a match on the session id is one of ours; the start time check covers other systems.
    """
    members = []
    for process in psutil.process_iter(["create_time", "status"]):
        try:
            if (
                process.pid != os.getpid()
                and os.getsid(process.pid) == leader.pid
                and process.info["create_time"] >= leader.create_time
                and process.info["status"] != psutil.STATUS_ZOMBIE
            ):
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return members


def stop_sessions(
    first: list[ProcessRecord],
    then: list[ProcessRecord],
    grace: float = STOP_GRACE_SECONDS,
    head_start: float = HEAD_START_SECONDS,
) -> None:
    """SIGTERM every process of the sessions `first`, those of `then` once `first` are gone or
    `head_start` seconds passed, and SIGKILL whatever still runs `grace` seconds after the start.
    """
    deadline = time.monotonic() + grace
    _signal_sessions(first, signal.SIGTERM)
    _wait_until_stopped(first, head_start)
    _signal_sessions(then, signal.SIGTERM)
    _wait_until_stopped(first + then, deadline - time.monotonic())
    # Also whatever was forked after the SIGTERM went out.
    _signal_sessions(first + then, signal.SIGKILL)
    _wait_until_stopped(first + then, 2.0)


def _signal_sessions(leaders: list[ProcessRecord], number: signal.Signals) -> None:
    for process in (p for leader in leaders for p in session_members(leader)):
        with contextlib.suppress(psutil.Error):
            process.send_signal(number)


def _wait_until_stopped(leaders: list[ProcessRecord], timeout: float) -> None:
    """Wait until no process of these sessions runs; zombies count as stopped, since whether
    they are reaped is up to their parent (or a container's init), not to them."""
    deadline = time.monotonic() + timeout
    while any(session_members(leader) for leader in leaders) and time.monotonic() < deadline:
        time.sleep(0.1)


_PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None = None
if sys.platform == "linux":
    with contextlib.suppress(OSError, AttributeError):
        # Resolved here, not in the forked child, where loading a library could deadlock.
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with(parent_pid: int) -> Callable[[], None]:
    """A preexec_fn: the child gets SIGTERM when the demo dies, even by SIGKILL (Linux only)."""

    def preexec() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:  # the demo died before prctl took effect
                os._exit(1)

    return preexec


def in_own_session(command: list[str]) -> list[str]:
    """`command` under a keeper (see `keep_session`) that stops the whole session with it."""
    return [sys.executable, "-m", "aries_assets.demo.run", *command]


def keep_session(command: list[str]) -> int:
    """Run `command` and, when it ends or this process gets SIGTERM, SIGINT or SIGHUP, stop
    every other process of this session: `dagster dev` stops its webserver, daemon and code
    servers only when it gets the chance, and not at all once it is killed.

    Started by the demo as a session leader that gets SIGTERM when the demo dies, so even
    a demo killed with SIGKILL leaves nothing running for longer than the grace period.
    """
    received: list[int] = []

    def note(number: int, frame: FrameType | None) -> None:
        received.append(number)

    for number in StopSignals.SIGNALS:
        signal.signal(number, note)
    child = subprocess.Popen(command)
    while child.poll() is None and not received:
        time.sleep(0.2)
    stop_sessions([ProcessRecord.of("session", os.getsid(0))], [])
    child.wait()
    return 0 if received else child.returncode


class DemoProcesses:
    """The processes a demo started, each in its own session, recorded in a pid file.

    The record is written before anything depends on the process, so a demo killed at any
    point leaves a record the next one can act on.
    """

    def __init__(self, record_path: Path, signals: StopSignals) -> None:
        self.record_path = record_path
        self.signals = signals
        self.demo = ProcessRecord.of("aries demo", os.getpid())
        self.children: dict[str, ProcessRecord] = {}
        self.popens: dict[str, subprocess.Popen] = {}

    def stop_leftovers(self) -> ProcessRecord | None:
        """Stop what a previous demo left running; returns that demo's record, if there was one.

        Raises AnotherDemoRunning if that demo is still alive: two demos in one directory
        would share the MongoDB port and the Dagster instance.
        """
        try:
            recorded = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            return None
        previous = ProcessRecord(**recorded["demo"])
        if previous.is_running():
            raise AnotherDemoRunning(
                f"another aries demo (pid {previous.pid}) is running from this directory: stop it first"
            )
        leftovers = [ProcessRecord(**child) for child in recorded["children"]]
        if any(session_members(leader) for leader in leftovers):
            print("aries demo: stopping processes left by a previous demo", file=sys.stderr)
            stop_sessions(*_users_then_mongo(leftovers))
        self.record_path.unlink(missing_ok=True)
        return previous

    def start(self, name: str, launch: Callable[..., subprocess.Popen]) -> subprocess.Popen:
        """Start a child by `launch(**popen_options)` in a new session, and record it.

        A stop signal arriving meanwhile takes effect once the child is on record.
        """
        with self.signals.deferred():
            process = launch(
                start_new_session=True, stdin=subprocess.DEVNULL, preexec_fn=_die_with(os.getpid())
            )
            self.popens[name] = process
            self.children[name] = ProcessRecord.of(name, process.pid)
            self._write()
        return process

    def stop_all(self) -> None:
        """Stop every session, Dagster and the first sync before the MongoDB they use."""
        stop_sessions(*_users_then_mongo(list(self.children.values())))
        for process in self.popens.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1)  # reap, so nothing is left as a zombie
        self.record_path.unlink(missing_ok=True)

    def _write(self) -> None:
        body = {"demo": asdict(self.demo), "children": [asdict(c) for c in self.children.values()]}
        temporary = self.record_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(body, indent=2))
        temporary.replace(self.record_path)


def _users_then_mongo(
    children: list[ProcessRecord],
) -> tuple[list[ProcessRecord], list[ProcessRecord]]:
    return [c for c in children if c.name != "mongo"], [c for c in children if c.name == "mongo"]


class StopSignals:
    """Turns the first SIGINT, SIGTERM or SIGHUP into DemoStopped; later ones are only noted.

    Inside `deferred()` the exception waits until the block ends, so a child is never
    started without being recorded.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = 0
        self._stopping = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            self._stopping = True
            for number, handler in previous.items():
                signal.signal(number, handler)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        self._raise_if_received()

    def stopping(self) -> None:
        """From here on signals are noted, never raised: the demo is already stopping."""
        self._stopping = True

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = number
            self._raise_if_received()

    def _raise_if_received(self) -> None:
        if self.received is not None and not self._deferring and not self._stopping:
            self._stopping = True
            raise DemoStopped(signal.Signals(self.received).name)


def seed(client: MongoClient) -> None:
    """Load the sample data once; a seed cut short (the demo was stopped) starts over."""
    marker_db, marker_coll = SEED_MARKER
    if client[marker_db][marker_coll].find_one({"_id": "complete"}):
        return
    print("aries demo: loading sample data", file=sys.stderr)
    for database in SEED_DATABASES:
        client.drop_database(database)
    load_samples(client)
    load_apps_and_events(client)
    client[marker_db][marker_coll].insert_one({"_id": "complete"})


@contextlib.contextmanager
def trickling(client: MongoClient, every: float) -> Iterator[None]:
    """Writes changes in a background thread while the block runs."""
    stop = threading.Event()
    threading.Thread(target=trickle, args=(client, every, stop), daemon=True).start()
    try:
        yield
    finally:
        stop.set()  # before the client closes under the writer


def trickle(client: MongoClient, every: float, stop: threading.Event) -> None:
    """A light, steady mix of inserts, updates and deletes, like a live product database."""
    rng = random.Random()
    try:
        while not stop.wait(every):
            _write_one_change(client, rng)
    except PyMongoError:
        if not stop.is_set():
            raise


def _write_one_change(client: MongoClient, rng: random.Random) -> None:
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


_IN_PROGRESS = ("STARTING", "STARTED", "CANCELING")


def cancel_runs_in_progress(since: float, message: str, *, stopped: bool) -> None:
    """Mark the runs in progress that the demo's processes started as stopped on purpose.

    Before their workers are stopped (`stopped=False`), as canceling: interrupted, a
    worker then ends its run as canceled, not as an unexpected failure. Queued runs are
    canceled then too, or the daemon could start one in the moment before it stops,
    to fail. After (`stopped=True`), whatever is still in progress (its worker gone,
    or a previous demo's, killed) as canceled: left started, it would hold the run
    queue's concurrency slots forever. A run counts as the demo's if it started, or
    changed status, after `since` (a run queued by an earlier demo may start in this
    one). What the canceled runs would have written is still in the ledgers: the next
    sensor tick or `aries sync` asks for it again.
    """
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    with DagsterInstance.get() as instance:
        statuses = [DagsterRunStatus(status) for status in _IN_PROGRESS]
        if not stopped:
            statuses.append(DagsterRunStatus.QUEUED)
        for record in instance.get_run_records(RunsFilter(statuses=statuses)):
            run = record.dagster_run
            if run.status == DagsterRunStatus.QUEUED:
                instance.report_run_canceled(run, message=message)  # any demo's: none will run it now
                continue
            touched = max(record.start_time or 0.0, record.update_timestamp.timestamp())
            if touched < since:
                continue  # not this demo's: another process's run on the same instance
            if stopped:
                instance.report_run_canceled(run, message=message)
            elif run.status != DagsterRunStatus.CANCELING:
                instance.report_run_canceling(run, message=message)


def _cancel_or_say(since: float, message: str, *, stopped: bool) -> None:
    """`cancel_runs_in_progress`, or a line saying why not: the demo starts or stops all the same,
    and the UI shows those runs as they end."""
    try:
        cancel_runs_in_progress(since, message, stopped=stopped)
    except Exception as error:
        print(f"aries demo: could not mark the runs in progress canceled: {error}", file=sys.stderr)


def _refuse_busy_port(port: int, what: str, variable: str) -> None:
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            owner = _listener(port)
            raise RuntimeError(
                f"port {port} for {what} is taken{owner}: stop that process, or use another port ({variable})"
            ) from None


def _listener(port: int) -> str:
    """ " by pid N (command)" for the process listening on `port`, where the system tells."""
    with contextlib.suppress(psutil.Error, OSError):
        for connection in psutil.net_connections("tcp"):
            listening = connection.status == psutil.CONN_LISTEN and connection.laddr
            if listening and connection.laddr.port == port and connection.pid:
                command = " ".join(psutil.Process(connection.pid).cmdline()[:3])
                return f" by pid {connection.pid} ({command})"
    return ""


def _exit_at_once(code: int) -> NoReturn:
    """Exit without Python's teardown, which takes seconds for Dagster's, gRPC's and Arrow's
    modules on a busy machine: everything is stopped and nothing is left to flush but the
    standard streams, and whoever stopped the demo waits for this process too."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait_while_running(process: subprocess.Popen) -> int:
    while process.poll() is None:
        time.sleep(0.2)
    return process.returncode


def run_demo(
    port: int = 3000,
    trickle_seconds: float = 2.0,
    mongo_port: int | None = None,
    demo_dir: Path | None = None,
    first_sync: bool | None = None,
) -> int:
    """Run the demo until a signal or Dagster's exit; returns the exit code."""
    demo_dir = Path(demo_dir or DEMO_DIR)
    mongo_port = mongo_port or int(os.environ.get(MONGO_PORT_VARIABLE) or MONGO_PORT)
    if first_sync is None:
        first_sync = os.environ.get(FIRST_SYNC_VARIABLE, "1") != "0"
    demo_dir.mkdir(parents=True, exist_ok=True)
    signals = StopSignals()
    with signals.installed():
        try:
            return _run(demo_dir, port, trickle_seconds, mongo_port, first_sync, signals)
        except DemoStopped as stopped:
            print(f"aries demo: stopped ({stopped})", file=sys.stderr)
            _exit_at_once(0)
        except RuntimeError as error:  # AnotherDemoRunning, a busy port, SecantusDB not starting
            print(f"aries demo: {error}", file=sys.stderr)
            return 1


def _run(
    demo_dir: Path, port: int, trickle_seconds: float, mongo_port: int, first_sync: bool, signals: StopSignals
) -> int:
    from aries_assets.cli import ensure_dagster_home

    home = ensure_dagster_home()
    processes = DemoProcesses(demo_dir / "pids.json", signals)
    with signals.deferred():
        previous = processes.stop_leftovers()
    if previous is not None:
        _cancel_or_say(previous.create_time, "the aries demo running it was killed", stopped=True)
    _refuse_busy_port(mongo_port, "MongoDB (SecantusDB)", MONGO_PORT_VARIABLE)
    _refuse_busy_port(port, "the Dagster UI", "--port")
    try:
        mongo = processes.start(
            "mongo",
            partial(
                start_mongo, demo_dir / "mongo", mongo_port, demo_dir / "mongo.log", wrapper=in_own_session
            ),
        )
        uri = mongo_uri(mongo_port)
        wait_until_up(uri, mongo)
        config = demo_dir / "aries.yaml"
        lake, warehouse = (demo_dir / "lake").resolve(), (demo_dir / "warehouse.duckdb").resolve()
        config.write_text(DEMO_CONFIG.format(uri=uri, lake=lake, warehouse=warehouse))
        env = {**os.environ, "ARIES_CONFIG": str(config.resolve()), "DAGSTER_HOME": home}
        with MongoClient(uri) as client:
            seed(client)
            if first_sync:
                print(
                    "aries demo: first sync (later changes are picked up by `aries sync` or the UI)",
                    file=sys.stderr,
                )
                sync_command = in_own_session([sys.executable, "-m", "aries_assets.cli", "sync"])
                _wait_while_running(
                    processes.start("first sync", partial(subprocess.Popen, sync_command, env=env))
                )
            with trickling(client, trickle_seconds):
                print(
                    f"aries demo: Dagster UI on http://127.0.0.1:{port} (Ctrl-C stops everything)",
                    file=sys.stderr,
                )
                dagster_command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml"]
                dagster_command += ["-p", str(port), "-h", "127.0.0.1"]
                dagster = processes.start(
                    "dagster dev", partial(subprocess.Popen, in_own_session(dagster_command), env=env)
                )
                return _wait_while_running(dagster)
    finally:
        signals.stopping()
        print("aries demo: stopping Dagster and SecantusDB", file=sys.stderr)
        _cancel_or_say(processes.demo.create_time, "aries demo stopped", stopped=False)
        processes.stop_all()
        _cancel_or_say(processes.demo.create_time, "aries demo stopped", stopped=True)


if __name__ == "__main__":
    sys.exit(keep_session(sys.argv[1:]))
