"""deploy/: every file parses, and the instance config it ships runs on a real PostgreSQL.

Docker and Kubernetes do not run here, so the compose file and the Helm values are checked
by parsing, and `deploy/dagster.yaml` itself is loaded as a Dagster instance against the
embedded PostgreSQL, where the per-collection run limit is put to work.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
import yaml
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.remote_origin import GrpcServerCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from pymongo import MongoClient

from aries_assets.demo.mongo_server import free_port
from aries_assets_tests.support import (
    assert_same_documents,
    lake_documents,
    mongo_documents,
    unique_name,
    write_config,
)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COLLECTION_TAG = "aries/collection"


def load_yaml(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def test_every_yaml_file_parses() -> None:
    files = sorted(p.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("*.y*ml"))
    assert {"dagster.yaml", "docker-compose.yaml", "helm/values.yaml", "workspace.yaml"} <= set(files)
    for name in files:
        assert isinstance(load_yaml(name), dict), name


def test_compose_services_share_the_instance_and_keep_secrets_in_the_environment() -> None:
    compose = load_yaml("docker-compose.yaml")
    services = compose["services"]
    assert {"postgres", "code", "webserver", "daemon"} <= set(services)
    code = " ".join(services["code"]["command"])
    assert "aries_assets.definitions" in code and ("code-server start" in code or "api grpc" in code)
    for name in ("code", "webserver", "daemon"):
        service = services[name]
        assert any(v.endswith(":/opt/dagster/dagster_home/dagster.yaml:ro") for v in service["volumes"]), name
        environment = service["environment"]
        for variable in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
            assert variable in environment, (name, variable)
        assert environment["DAGSTER_PG_PASSWORD"].startswith("${"), "passwords come from the environment"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "[dev]" not in dockerfile


def test_dockerfile_copies_what_exists_and_is_not_ignored() -> None:
    """The image builds from the repository root with deploy/Dockerfile.dockerignore."""
    root = DEPLOY.parent
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:] for line in ignored if line.startswith("!")}
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (root / source).exists(), source
                assert source.rstrip("/") in kept, f"{source} is excluded from the build context"


def test_helm_values_use_the_chart_keys() -> None:
    values = load_yaml("helm/values.yaml")
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["codeServerArgs"] == ["-m", "aries_assets.definitions"]
    assert deployment["envSecrets"] == [{"name": "aries-env"}]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"] == [{"name": "aries-env"}]
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    limits = coordinator["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    assert limits == load_yaml("dagster.yaml")["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert values["telemetry"]["enabled"] is False
    assert "postgresqlPassword" not in values["postgresql"], "the password lives in a Kubernetes secret"


@contextlib.contextmanager
def tcp_to_unix_socket(path: str) -> Iterator[int]:
    """A 127.0.0.1 port relaying to a Unix socket: the embedded PostgreSQL listens on a socket
    only, while deployments (and so deploy/dagster.yaml) reach PostgreSQL over TCP."""

    def pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    class Relay(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with socket.socket(socket.AF_UNIX) as upstream:
                upstream.connect(path)
                back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
                back.start()
                pump(self.request, upstream)
                back.join()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Relay)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def deploy_home(postgres_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A DAGSTER_HOME holding `deploy/dagster.yaml` as it ships, its DAGSTER_PG_* variables set
    for a fresh database of the embedded PostgreSQL."""
    name = unique_name("dagster")
    admin = psycopg2.connect(postgres_server.get_uri())
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    info = postgres_server.get_postmaster_info()
    uri = urlsplit(postgres_server.get_uri(name))
    with tcp_to_unix_socket(os.path.join(info.socket_dir, f".s.PGSQL.{info.port}")) as port:
        monkeypatch.setenv("DAGSTER_PG_HOST", "127.0.0.1")
        monkeypatch.setenv("DAGSTER_PG_PORT", str(port))
        monkeypatch.setenv("DAGSTER_PG_USER", uri.username or "postgres")
        monkeypatch.setenv("DAGSTER_PG_PASSWORD", uri.password or "")
        monkeypatch.setenv("DAGSTER_PG_DB", name)
        home = tmp_path / "dagster_home"
        home.mkdir()
        shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        yield home
    admin.cursor().execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def deploy_instance(deploy_home: Path) -> Iterator[DagsterInstance]:
    with DagsterInstance.from_config(str(deploy_home)) as instance:
        yield instance


def test_instance_keeps_everything_in_postgres(deploy_instance: DagsterInstance) -> None:
    assert isinstance(deploy_instance.run_storage, PostgresRunStorage)
    assert isinstance(deploy_instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(deploy_instance.schedule_storage, PostgresScheduleStorage)
    assert deploy_instance.run_monitoring_enabled
    assert deploy_instance.get_settings("sensors")["use_threads"] is True
    assert deploy_instance.get_settings("telemetry")["enabled"] is False


def test_one_run_at_a_time_per_collection(deploy_instance: DagsterInstance) -> None:
    """Two runs of one collection: the second waits in the queue while the first is in progress;
    another collection's run goes ahead."""
    coordinator = deploy_instance.run_coordinator
    assert isinstance(coordinator, QueuedRunCoordinator)
    queue = coordinator.get_run_queue_config()
    assert queue.max_concurrent_runs > 1
    assert [(limit["key"], limit["value"], limit["limit"]) for limit in queue.tag_concurrency_limits] == [
        (COLLECTION_TAG, {"applyLimitPerUniqueValue": True}, 1),
        ("aries/split", {"applyLimitPerUniqueValue": True}, 10),
    ]

    code_server = GrpcServerCodeLocationOrigin(host="code", port=4000, location_name="aries")
    repository = RemoteRepositoryOrigin(code_server, "__repository__")

    def submit(collection: str) -> DagsterRun:
        run = deploy_instance.add_run(
            DagsterRun(
                job_name=f"sync__{collection}",
                run_id=str(uuid.uuid4()),
                tags={COLLECTION_TAG: collection},
                status=DagsterRunStatus.NOT_STARTED,
                remote_job_origin=RemoteJobOrigin(repository, f"sync__{collection}"),
            )
        )
        return coordinator.submit_run(SubmitRunContext(run, workspace=None))

    def runs_to_launch() -> list[str]:
        daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
        runs = daemon._get_runs_to_dequeue(  # the daemon's own decision, without launching
            deploy_instance, deploy_instance.get_concurrency_config(), fixed_iteration_time=None
        )
        return [run.run_id for run in runs]

    first = submit("app__events")
    second = submit("app__events")
    assert first.status == second.status == DagsterRunStatus.QUEUED
    assert runs_to_launch() == [first.run_id], "only one run of a collection leaves the queue"

    started = DagsterEvent(event_type_value=DagsterEventType.RUN_START.value, job_name=first.job_name)
    deploy_instance.report_dagster_event(started, run_id=first.run_id)
    assert deploy_instance.get_run_by_id(first.run_id).status == DagsterRunStatus.STARTED
    other = submit("app__apps")
    assert runs_to_launch() == [other.run_id], "the second run waits while the first is in progress"

    deploy_instance.report_run_failed(deploy_instance.get_run_by_id(first.run_id))
    assert second.run_id in runs_to_launch(), "the second run goes once the first is done"


def test_daemon_on_postgres(
    deploy_home: Path, client: MongoClient, mongo_uri: str, database: str, tmp_path: Path
) -> None:
    """A deployment in miniature: Aries' code server and `dagster-daemon` as separate processes on
    the shipped instance config (PostgreSQL), the sensors as they start (RUNNING by default),
    and documents written before and while they run: the lake ends up holding every document."""
    items = client[database]["items"]
    items.insert_many([{"_id": i, "name": f"item {i}", "n": i} for i in range(120)])
    lake = tmp_path / "lake"
    config = write_config(
        tmp_path / "aries.yaml",
        mongo_uri,
        str(lake),
        [{"database": database, "collection": "items", "bucket_size": 50}],
    )
    port = free_port()
    workspace = tmp_path / "workspace.yaml"
    server = {"host": "127.0.0.1", "port": port, "location_name": "aries"}
    workspace.write_text(yaml.safe_dump({"load_from": [{"grpc_server": server}]}))
    env = {**os.environ, "ARIES_CONFIG": str(config)}  # DAGSTER_HOME and DAGSTER_PG_* from the fixture
    bin_dir = Path(sys.executable).parent
    code_command = [str(bin_dir / "dagster"), "code-server", "start", "-h", "127.0.0.1", "-p", str(port)]
    code_command += ["-m", "aries_assets.definitions", "--location-name", "aries"]
    daemon_command = [str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)]
    with contextlib.ExitStack() as stack:
        for name, command in (("code", code_command), ("daemon", daemon_command)):
            log = stack.enter_context(open(tmp_path / f"{name}.log", "wb"))
            process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            stack.callback(_stop_session, process)

        with DagsterInstance.from_config(str(deploy_home)) as instance:
            # Start-up and the first load take what the machine gives them; the changes then
            # reach the lake within 90 s.
            initial = mongo_documents(client, database, "items")
            _wait(lambda: _lake_matches(lake / database / "items", initial), 300, "the first load", tmp_path)
            # Changes while the sensors run: updates, a delete, a replace, new documents.
            items.update_many({"_id": {"$lt": 10}}, {"$set": {"name": "renamed"}})
            items.delete_one({"_id": 20})
            items.replace_one({"_id": 30}, {"name": "replaced", "tags": ["a", "b"]})
            items.insert_many([{"_id": i, "name": f"item {i}", "n": i} for i in range(120, 180)])
            expected = mongo_documents(client, database, "items")
            _wait(lambda: _lake_matches(lake / database / "items", expected), 90, "the lake", tmp_path)
            assert_same_documents(expected, lake_documents(lake / database / "items"))

            runs = instance.get_runs()
            assert runs, "the lake was written without a run recorded in PostgreSQL"
            _assert_one_run_at_a_time_per_collection(instance)


def _stop_session(process: subprocess.Popen) -> None:
    """SIGTERM the process and everything it started (runs included), then SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _wait(condition, seconds: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    tails = {p.name: p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*.log"))}
    raise AssertionError(f"waited {seconds}s for {what}; logs:\n{tails}")


def _lake_matches(folder: Path, expected: dict[str, bytes]) -> bool:
    try:
        return lake_documents(folder) == expected
    except (OSError, AssertionError, ValueError):  # a file replaced while read, a half-done rewrite
        return False


def _assert_one_run_at_a_time_per_collection(instance: DagsterInstance) -> None:
    spans: dict[str, list[tuple[float, float]]] = {}
    for record in instance.get_run_records():
        collection = record.dagster_run.tags.get(COLLECTION_TAG)
        if collection and record.start_time:
            spans.setdefault(collection, []).append((record.start_time, record.end_time or time.time()))
    for collection, intervals in spans.items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, f"two runs of {collection} overlapped"
