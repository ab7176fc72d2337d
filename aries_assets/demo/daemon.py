"""Run the Dagster daemon on an Aries config, as a deployment does: for the tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


@contextlib.contextmanager
def running_daemon(
    work: Path, config: Path, instance_yaml: Path | None = None, extra_env=None
) -> Iterator[Path]:
    """`dagster-daemon run` on `config`, in its own process group; yields DAGSTER_HOME; stops it all on exit."""
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
        yield home
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
