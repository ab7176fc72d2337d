"""Run the Dagster daemon on an Aries config, as a deployment does: for the tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Daemon:
    home: Path  # DAGSTER_HOME
    pid: int

    def run_processes(self) -> list[psutil.Process]:
        """The processes executing runs of this instance: the code server (`dagster api grpc`, its
        arguments carrying this DAGSTER_HOME) starts each run as a child process."""
        found = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                command = " ".join(process.cmdline())
                if "api grpc" in command and str(self.home) in command:
                    found += process.children()
        return found


@contextlib.contextmanager
def running_daemon(
    work: Path, config: Path, instance_yaml: Path | None = None, extra_env=None
) -> Iterator[Daemon]:
    """`dagster-daemon run` on `config`, in its own process group; stops it and its runs on exit."""
    home = work / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(instance_yaml or ROOT / "dagster.yaml", home / "dagster.yaml")
    workspace = work / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: aries_assets.definitions\n      location_name: aries\n"
    )
    env = {**os.environ, "ARIES_CONFIG": str(config), "DAGSTER_HOME": str(home), **(extra_env or {})}
    log = open(work / "daemon.log", "ab")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(workspace)],
        env=env,
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield Daemon(home, daemon.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.wait(timeout=15)
        # Runs launched by the daemon live in the same session: stop any that outlived it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait()
        log.close()
