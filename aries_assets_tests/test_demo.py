"""`aries demo` leaves nothing running: on SIGTERM, on Ctrl-C, and after a kill -9 the next one starts.

Each test starts the real demo (SecantusDB, `dagster dev` with its webserver, daemon and code
servers) in a scratch directory and checks the processes themselves with psutil: every
process of the sessions the demo recorded, and the recorded pids.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from aries_assets.demo.mongo_server import free_port

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 240  # SecantusDB, the seed and `dagster dev` on a busy two-core machine
STOP_SECONDS = 10


@dataclass
class Demo:
    process: subprocess.Popen
    directory: Path
    port: int
    log: Path

    @property
    def record_path(self) -> Path:
        return self.directory / ".aries/demo/pids.json"

    def record(self) -> dict:
        return json.loads(self.record_path.read_text())

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project directory as `make demo` sees it, shared so the sample data is seeded once."""
    directory = tmp_path_factory.mktemp("demo")
    for name in ("workspace.yaml", "dagster.yaml"):
        shutil.copy(REPO / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def mongo_port() -> int:
    return free_port()


def start_demo(directory: Path, mongo_port: int, port: int | None = None, first_sync: bool = False) -> Demo:
    port = port or free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(directory / ".dagster"),
        "ARIES_DEMO_MONGO_PORT": str(mongo_port),
        "ARIES_DEMO_FIRST_SYNC": "1" if first_sync else "0",
    }
    env.pop("ARIES_CONFIG", None)
    aries = Path(sys.executable).with_name("aries")
    log = directory / f"demo-{port}.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [str(aries), "demo", "--port", str(port), "--trickle-seconds", "0.5"],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
    return Demo(process, directory, port, log)


def wait_for_ui(demo: Demo) -> None:
    """Wait until this demo's own webserver answers, not one a killed demo left on the port."""
    wait_for_child(demo, "dagster dev")
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert demo.process.poll() is None, f"aries demo exited early:\n{demo.log_tail()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{demo.port}/server_info", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the Dagster UI did not answer within {STARTUP_SECONDS}s:\n{demo.log_tail()}")


def wait_for_child(demo: Demo, name: str, timeout: float = STARTUP_SECONDS) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert demo.process.poll() is None, f"aries demo exited early:\n{demo.log_tail()}"
        try:
            record = demo.record()
            ours = record["demo"]["pid"] == demo.process.pid  # not the record of a killed demo
            if ours and any(child["name"] == name for child in record["children"]):
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"aries demo did not start {name!r} within {timeout:.0f}s:\n{demo.log_tail()}")


def running(record: dict) -> list[str]:
    """What still runs of a demo: its recorded processes and every process of their sessions."""
    recorded = [record["demo"], *record["children"]]
    found = []
    for process in psutil.process_iter(["pid", "create_time", "status", "cmdline"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            session = os.getsid(process.pid)
        except OSError:
            continue
        for entry in recorded:
            same_process = entry["pid"] == process.pid and entry["create_time"] == process.info["create_time"]
            in_session = entry is not record["demo"] and session == entry["pid"]
            if same_process or in_session:
                found.append(
                    f"{process.pid} ({entry['name']}): {' '.join(process.info['cmdline'] or [])[:160]}"
                )
                break
    return found


def assert_stops(record: dict, signalled_at: float) -> None:
    deadline = signalled_at + STOP_SECONDS
    while time.monotonic() < deadline:
        if not running(record):
            return
        time.sleep(0.2)
    left = "\n".join(running(record))
    assert not left, f"still running {STOP_SECONDS}s after the signal:\n{left}"


def kill_everything(demo: Demo, record: dict | None) -> None:
    """Cleanup after a failed test: nothing of the demo may outlive it."""
    if demo.process.poll() is None:
        demo.process.kill()
        demo.process.wait()
    if record:
        for child in record["children"]:
            with contextlib.suppress(OSError):
                os.killpg(child["pid"], signal.SIGKILL)


def test_ctrl_c_and_kill_9_during_first_sync_stop_everything(demo_dir: Path, mongo_port: int) -> None:
    """Ctrl-C (SIGINT to the foreground process group) while the first `aries sync` runs stops it,
    its workers and SecantusDB; so does `kill -9` of the demo itself."""
    for stop in ("ctrl-c", "kill -9"):
        demo = start_demo(demo_dir, mongo_port, first_sync=True)
        record = None
        try:
            record = wait_for_child(demo, "first sync")
            time.sleep(3)  # let it start its worker processes
            if stop == "ctrl-c":
                os.killpg(demo.process.pid, signal.SIGINT)
            else:
                demo.process.kill()
            signalled_at = time.monotonic()
            code = demo.process.wait(timeout=STOP_SECONDS)
            assert code == (0 if stop == "ctrl-c" else -signal.SIGKILL), demo.log_tail()
            assert_stops(record, signalled_at)
        finally:
            kill_everything(demo, record)


def test_restart_after_kill_9_then_sigterm(demo_dir: Path, mongo_port: int) -> None:
    """A demo killed with SIGKILL, together with what would stop its Dagster processes, leaves
    them running and its record behind; the next demo stops them and starts on the same ports.
    SIGTERM (a service manager, `kill`) then stops every process it started."""
    killed = start_demo(demo_dir, mongo_port)
    first = second = None
    try:
        wait_for_ui(killed)
        first = killed.record()
        keeper = next(c["pid"] for c in first["children"] if c["name"] == "dagster dev")
        os.kill(keeper, signal.SIGKILL)
        killed.process.kill()
        killed.process.wait()
        assert killed.record_path.exists()
        assert running(first), "expected leftovers: the webserver, daemon and code servers"

        demo = start_demo(demo_dir, mongo_port, port=killed.port)
        try:
            wait_for_ui(demo)
            assert not running(first), "the previous demo's processes are still running"
            second = demo.record()
            assert {c["name"] for c in second["children"]} == {"mongo", "dagster dev"}
            assert len(running(second)) >= 6, "expected the demo, SecantusDB, dagster dev, webserver, daemon"
            os.kill(demo.process.pid, signal.SIGTERM)
            signalled_at = time.monotonic()
            assert demo.process.wait(timeout=STOP_SECONDS) == 0, demo.log_tail()
            assert_stops(second, signalled_at)
            assert not demo.record_path.exists()
        finally:
            kill_everything(demo, second)
    finally:
        kill_everything(killed, first)


def test_ctrl_c_cancels_the_runs_in_progress_rather_than_failing_them(
    demo_dir: Path, mongo_port: int
) -> None:
    """Stopping the demo stops the runs it has in progress (a serving run lingers on the stream):
    the UI shows them canceled, as a stop asked for, not red as failures to look into."""
    import dagster as dg

    demo = start_demo(demo_dir, mongo_port)
    record = None
    home = demo_dir / ".dagster"
    try:
        wait_for_ui(demo)
        record = demo.record()
        deadline = time.monotonic() + STARTUP_SECONDS
        in_progress: list = []
        while not in_progress:
            assert time.monotonic() < deadline, f"no run started:\n{demo.log_tail()}"
            time.sleep(1)
            with dg.DagsterInstance.from_config(str(home)) as instance:
                in_progress = instance.get_run_ids(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        os.killpg(demo.process.pid, signal.SIGINT)
        signalled_at = time.monotonic()
        assert demo.process.wait(timeout=STOP_SECONDS) == 0, demo.log_tail()
        assert_stops(record, signalled_at)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            stopped = {run_id: instance.get_run_by_id(run_id).status for run_id in in_progress}
        # The runs in progress when the stop began. (One the daemon starts in the moment before
        # it stops can still end failed: see the README.)
        assert set(stopped.values()) == {dg.DagsterRunStatus.CANCELED}, stopped
    finally:
        kill_everything(demo, record)
