"""An embedded MongoDB for the demo, tests and benchmarks: SecantusDB in a child process.

SecantusDB speaks the MongoDB wire protocol on WiredTiger and supports change
streams. It is GPL and installed only with the `dev` extra; Aries never needs it
at run time against a real deployment.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import PyMongoError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mongo_command(storage: str | Path, port: int, extra_args: tuple[str, ...] = ()) -> list[str]:
    """The command line of a SecantusDB serving `storage` (a directory, or ":memory:") on `port`."""
    executable = shutil.which("secantusd-py") or str(Path(sys.executable).with_name("secantusd-py"))
    if not Path(executable).exists():
        raise RuntimeError("secantusd-py not found: install the dev extra (make install)")
    return [
        executable,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--storage-path",
        str(storage),
        "--log-level",
        "WARNING",
        "--noop-heartbeat-seconds",
        "10",
        *extra_args,
    ]


def start_mongo(
    storage: str | Path,
    port: int,
    log: Path | None = None,
    extra_args: tuple[str, ...] = (),
    wrapper: Callable[[list[str]], list[str]] | None = None,
    **popen_options: Any,
) -> subprocess.Popen:
    """Start SecantusDB on `port` without waiting for it to answer (see `mongo_uri`, `wait_until_up`).

    `wrapper` turns the command into the one to run (the demo runs it under a keeper);
    `popen_options` go to `subprocess.Popen`.
    """
    command = mongo_command(storage, port, extra_args)
    if storage != ":memory:":
        Path(storage).mkdir(parents=True, exist_ok=True)
    output = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            wrapper(command) if wrapper else command, stdout=output, stderr=subprocess.STDOUT, **popen_options
        )
    finally:
        if log:
            output.close()  # the child holds its own copy


def mongo_uri(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


@contextlib.contextmanager
def embedded_mongo(
    storage: str | Path = ":memory:",
    port: int | None = None,
    log: Path | None = None,
    extra_args: tuple[str, ...] = (),
) -> Iterator[str]:
    """Start SecantusDB, wait until it answers, yield its URI, stop it on exit."""
    port = port or free_port()
    process = start_mongo(storage, port, log, extra_args)
    uri = mongo_uri(port)
    try:
        wait_until_up(uri, process)
        yield uri
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_up(uri: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"SecantusDB exited with code {process.returncode} before accepting connections"
            )
        try:
            with MongoClient(uri, serverSelectionTimeoutMS=500) as client:
                client.admin.command("ping")
                return
        except PyMongoError:
            time.sleep(0.2)
    raise RuntimeError(f"SecantusDB did not answer within {timeout:.0f}s")
