"""The sync engine's guarantees: one writer per collection, one read for a first load, cheap ticks."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
from bson import ObjectId
from pymongo import monitoring

from aries_assets.cli import ensure_dagster_home
from aries_assets.config import load_config
from aries_assets.core import engine, read_ahead
from aries_assets.core.changes import record_changes, scopes_of, stream_start
from aries_assets.core.extract import PREFETCH_BYTES, SourceCollection, raw_id
from aries_assets.core.lake import LAKE_CONCURRENCY, LakeSpec, LocalLake
from aries_assets.core.ledger import Lease, LeaseHeld, Ledger, LedgerStore
from aries_assets.definitions import build_definitions
from aries_assets.sync import sync
from aries_assets_tests.support import (
    assert_same_documents,
    events_config,
    lake_documents,
    mongo_documents,
    run_cli,
    write_config,
)
from aries_assets_tests.test_sensor import tick


class FindCounter(monitoring.CommandListener):
    def __init__(self, database: str) -> None:
        self.database = database
        self.finds: list[dict] = []
        self.commands: list[str] = []  # every command on the database, in order ("find": a read)

    def started(self, event):
        if event.database_name != self.database:
            return
        command = event.command.to_dict() if hasattr(event.command, "to_dict") else dict(event.command)
        lookup = event.command_name == "find" and command.get("filter") == {"_id": None}
        self.commands.append("cluster time" if lookup else event.command_name)
        if event.command_name == "find":
            self.finds.append(command)

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass

    def __enter__(self) -> FindCounter:
        monitoring.register(self)  # every client made from now on reports to it
        return self

    def __exit__(self, *exc) -> None:
        monitoring._LISTENERS.command_listeners.remove(self)


def first_batch_arrived(first: read_ahead.FirstRead) -> None:
    """Wait until the read begun ahead holds its first batch: its view of the collection is taken."""
    deadline = time.monotonic() + 30
    while not first.read.prefetch.waiting and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_first_load_reads_the_collection_once(client, mongo_uri, database, workdir):
    client[database].events.insert_many(
        [{"_id": ObjectId(), "n": i, "s": "x" * (i % 50)} for i in range(2_500)]
    )
    events_config(workdir, mongo_uri, database)
    with FindCounter(database) as counter:
        code, _, err = run_cli("sync", "--workers", "2")
    assert code == 0, err
    folder = workdir / "lake" / database / "events"
    assert len(list(folder.glob("*.parquet"))) == 25
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))
    # Besides the one ordered read, only point look-ups that fetch a cluster time (`_id: null`).
    reads = [f for f in counter.finds if f.get("filter") != {"_id": None}]
    assert len(reads) == 1, reads


def test_a_read_begun_before_its_run_misses_no_change_made_before_the_run(
    client, mongo_uri, database, workdir
):
    """`aries sync` begins a first load's read while Dagster starts: changes in between are not lost."""
    events = client[database].events
    events.insert_many([{"_id": i, "v": i} for i in range(1_000)])
    events_config(workdir, mongo_uri, database)
    source = SourceCollection(database, "events")
    with FindCounter(database) as counter:
        try:
            read_ahead.begin(mongo_uri, LakeSpec(str(workdir / "lake")), [source])
            # The read's first batch (the whole collection) has arrived: what follows reaches the lake
            # only through the stream, from the mark made before the read began.
            first_batch_arrived(read_ahead.begun(source))
            # After the read began, before the run that adopts it: every kind of change, in every range.
            events.update_many({"_id": {"$in": [0, 450, 999]}}, {"$set": {"v": "changed"}})
            events.delete_many({"_id": {"$in": [1, 500, 998]}})
            events.insert_many(
                [{"_id": -5, "v": "before"}, {"_id": 505.5, "v": "middle"}, {"_id": 5_000, "v": "after"}]
            )
            ensure_dagster_home()
            reports = sync(load_config(str(workdir / "aries.yaml")), workers=2, progress=lambda _: None)
        finally:
            read_ahead.close_all()
    assert not reports[0].failures, reports[0].failures
    assert reports[0].mode == "first load"
    # The run adopted the read begun for it: one read of the whole collection, then range reads of
    # the buckets the changes made dirty.
    whole = [
        f for f in counter.finds if f.get("filter") != {"_id": None} and "min" not in f and "max" not in f
    ]
    assert len(whole) == 1, whole
    folder = workdir / "lake" / database / "events"
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))


def test_a_read_begun_ahead_fetches_a_buckets_worth_and_a_runs_share_once_taken(
    client, mongo_uri, database, workdir
):
    client[database].events.insert_many([{"_id": i} for i in range(100)])
    source = SourceCollection(database, "events")
    try:
        read_ahead.begin(mongo_uri, LakeSpec(str(workdir / "lake")), [source])
        assert read_ahead.begun(source).read.prefetch.ahead_bytes == read_ahead.AHEAD_BYTES
        taken = read_ahead.take(source)
        assert taken.read.prefetch.ahead_bytes == PREFETCH_BYTES < read_ahead.AHEAD_BYTES
        assert [raw_id(raw) for batch in taken.read.batches() for raw in batch] == list(range(100))
    finally:
        read_ahead.close_all()


def test_a_read_begun_ahead_checks_its_collection_first_and_its_run_does_not_check_again(
    client, mongo_uri, database, workdir
):
    """The check is one round trip before the read, while the server is idle: the run that adopts
    the read does not wait behind the server's reading to ask again (a second on SecantusDB)."""
    client[database].events.insert_many([{"_id": i} for i in range(1_000)])
    events_config(workdir, mongo_uri, database)
    with FindCounter(database) as counter:
        code, _, err = run_cli("sync", "--workers", "2")
    assert code == 0, err
    checks_and_reads = [c for c in counter.commands if c in ("listCollections", "find")]
    assert checks_and_reads[:2] == ["listCollections", "find"], checks_and_reads
    assert checks_and_reads.count("listCollections") == 1, checks_and_reads
    assert_same_documents(
        mongo_documents(client, database, "events"), lake_documents(workdir / "lake" / database / "events")
    )


def test_no_read_is_begun_for_a_collection_that_is_not_there(client, mongo_uri, database, workdir):
    """Nothing to adopt: the run checks the collection itself and says what is wrong. The next
    collection needing a first load is read ahead instead."""
    events_config(workdir, mongo_uri, database)
    client[database].other.insert_one({"_id": 1})
    source, other = SourceCollection(database, "events"), SourceCollection(database, "other")
    try:
        read_ahead.begin(mongo_uri, LakeSpec(str(workdir / "lake")), [source, other])
        assert read_ahead.begun(source) is None
        assert read_ahead.begun(other) is not None
    finally:
        read_ahead.close_all()
    code, _, err = run_cli("sync")
    assert code == 1 and "no such collection in database" in err, err


def test_a_read_begun_before_another_writer_marked_the_stream_is_not_adopted(
    client, mongo_uri, database, workdir
):
    """A writer that began the first load (and died) marked the stream after the read began: the
    read may miss changes the ledger's position already counts as seen, so it is read again."""
    events = client[database].events
    events.insert_many([{"_id": i, "v": i} for i in range(500)])
    events_config(workdir, mongo_uri, database)
    source = SourceCollection(database, "events")
    lake = LocalLake(workdir / "lake")
    try:
        read_ahead.begin(mongo_uri, LakeSpec(str(workdir / "lake")), [source])
        first_batch_arrived(read_ahead.begun(source))
        events.update_one({"_id": 250}, {"$set": {"v": "changed after the read began"}})
        # Another writer's first load: it marks the stream after that change, then dies.
        start = stream_start(client, lake, source)
        LedgerStore(lake, database, "events").update(lambda led: led.advance(start))
        ensure_dagster_home()
        reports = sync(load_config(str(workdir / "aries.yaml")), workers=2, progress=lambda _: None)
    finally:
        read_ahead.close_all()
    assert not reports[0].failures, reports[0].failures
    folder = workdir / "lake" / database / "events"
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))


def test_no_read_is_begun_for_a_collection_already_loaded(client, mongo_uri, database, workdir):
    client[database].events.insert_many([{"_id": i} for i in range(300)])
    events_config(workdir, mongo_uri, database)
    code, _, err = run_cli("sync")
    assert code == 0, err
    source = SourceCollection(database, "events")
    with FindCounter(database) as counter:
        try:
            read_ahead.begin(mongo_uri, LakeSpec(str(workdir / "lake")), [source])
            assert read_ahead.take(source) is None
        finally:
            read_ahead.close_all()
    assert counter.finds == []


def test_the_aries_command_leaves_nothing_in_the_temporary_directory(client, mongo_uri, database, workdir):
    """`aries` ends without the interpreter's teardown: what multiprocessing cleans up at exit (the
    writers' fork server's socket directory) is still cleaned up. Left, every sync in a cron job
    would leave one more directory in /tmp."""
    client[database].events.insert_many([{"_id": i, "v": i} for i in range(3_000)])
    events_config(workdir, mongo_uri, database)
    # Of its own, and short: the fork server's socket path within it must fit AF_UNIX's 108 bytes.
    temporary = Path(tempfile.mkdtemp())
    try:
        env = {**os.environ, "TMPDIR": str(temporary), "DAGSTER_HOME": str(workdir / "dagster_home")}
        aries = [sys.executable, "-m", "aries_assets.cli", "sync", "--workers", "2"]
        done = subprocess.run(aries, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "first load" in done.stderr, done.stderr  # the writers ran in processes of their own
        deadline = time.monotonic() + 10  # the fork server goes once it sees this process gone
        while list(temporary.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(temporary.iterdir()) == []
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def test_a_temporary_directory_too_deep_for_a_socket_still_gets_writer_processes(
    client, mongo_uri, database, workdir
):
    """The writers' fork server listens on a Unix socket in the temporary directory, whose path
    may be at most 107 bytes: under a deeper TMPDIR, writers are spawned instead of forked from it."""
    client[database].events.insert_many([{"_id": i, "v": i} for i in range(3_000)])
    events_config(workdir, mongo_uri, database)
    deep = workdir / ("t" * 100)
    deep.mkdir()
    env = {**os.environ, "TMPDIR": str(deep), "DAGSTER_HOME": str(workdir / "dagster_home")}
    aries = [sys.executable, "-m", "aries_assets.cli", "sync", "--workers", "2"]
    done = subprocess.run(aries, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    folder = workdir / "lake" / database / "events"
    assert len(list(folder.glob("*.parquet"))) == 30  # 100 documents a bucket: many, for the writers
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))


def test_two_syncs_at_once_on_a_fresh_dagster_home_give_one_exact_lake(client, mongo_uri, database, workdir):
    client[database].events.insert_many([{"_id": i, "v": i} for i in range(3_000)])
    write_config(
        workdir / "aries.yaml",
        mongo_uri,
        "./lake",
        [{"database": database, "collection": "events", "bucket_size": 500}],
    )
    env = {**os.environ, "DAGSTER_HOME": str(workdir / "fresh_home")}
    aries = [sys.executable, "-m", "aries_assets.cli", "sync", "--config", str(workdir / "aries.yaml")]
    first = subprocess.Popen(
        aries, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    second = subprocess.Popen(
        aries, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    folder = workdir / "lake" / database / "events"
    assert_same_documents(mongo_documents(client, database, "events"), lake_documents(folder))
    # The instance is whole: a third sync runs and finds nothing to do.
    third = subprocess.run(aries, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert " 0 written" in third.stdout


HOLD_LEASE = textwrap.dedent(
    """
    import sys, time
    from aries_assets.core.lake import LocalLake
    from aries_assets.core.ledger import Lease
    lease = Lease(LocalLake(sys.argv[1]), "db", "coll", "holder-process", ttl=float(sys.argv[2]))
    lease.acquire(wait=0)
    print("held", flush=True)
    time.sleep(600)
    """
)


WRITERS_OF_A_RUN = textwrap.dedent(
    """
    import sys, time
    from aries_assets.core import engine
    from aries_assets.core.lake import LakeSpec
    writers = engine._Writers(2, LakeSpec(sys.argv[1]))
    writers.start()
    while len(writers._pool._processes) < 2:
        time.sleep(0.05)
    print(*writers._pool._processes, flush=True)
    time.sleep(600)
    """
)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped between the open and the read
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_bucket_writers_die_with_their_run(tmp_path):
    """Orphaned by a kill -9, a writer would publish its bucket after the lease passed on, over a
    newer file: the writers of a run that dies exit too."""
    # A temporary directory of its own (short enough for the fork server's socket): the killed run
    # cannot remove its fork server's directory, so the test does.
    temporary = tempfile.mkdtemp(prefix="aries-t")
    run = subprocess.Popen(
        [sys.executable, "-c", WRITERS_OF_A_RUN, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": temporary},
    )
    try:
        writers = [int(pid) for pid in run.stdout.readline().split()]
        assert len(writers) == 2 and all(_running(pid) for pid in writers)
        run.kill()
        run.wait()
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in writers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in writers if _running(pid)], "a writer outlived its run"
    finally:
        run.kill()
        shutil.rmtree(temporary, ignore_errors=True)


WRITER_ALLOCATORS = textwrap.dedent(
    """
    import json, sys
    from aries_assets.core import engine
    from aries_assets.core.lake import LakeSpec
    with engine._Writers(2, LakeSpec(sys.argv[1])) as writers:
        writers.start()
        backend = writers._pool.submit(eval, "__import__('pyarrow').default_memory_pool().backend_name")
        backend = backend.result()
        frozen = writers._pool.submit(eval, "__import__('gc').get_freeze_count()").result()
        arenas = []  # as glibc read it when the process started
        for pid in writers._pool._processes:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                variables = dict(v.split(b"=", 1) for v in environ.read().split(b"\\0") if b"=" in v)
            arenas.append(variables.get(b"MALLOC_ARENA_MAX", b"").decode())
        print(json.dumps([backend, arenas, frozen]), flush=True)
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the writers' environment from /proc")
@pytest.mark.parametrize("chosen", [None, "mimalloc"])
def test_bucket_writers_give_memory_back_between_chunks(tmp_path, chosen):
    """Arrow's mimalloc pool and glibc's arena per thread keep what a chunk freed: a writer's RSS
    grew to 5x a bucket's BSON. Writers start with Arrow's jemalloc pool (where the wheel has it;
    else the system's) and one glibc arena, unless the user chose otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in engine.WRITER_MEMORY_ENV}
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    out = subprocess.run(
        [sys.executable, "-c", WRITER_ALLOCATORS, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    backend, arenas, frozen = json.loads(out)
    assert backend == (chosen or ("jemalloc" if "jemalloc" in pa.supported_memory_backends() else "system"))
    assert arenas == [engine.WRITER_MEMORY_ENV["MALLOC_ARENA_MAX"]] * 2
    # What a writer imported (pyarrow, pandas) is out of the collector's way: 5% of a bucket's time.
    assert frozen > 20_000


def test_a_lease_whose_holder_died_expires_and_the_next_writer_takes_it(tmp_path):
    """A holder on another machine (here: another process identity) is known dead only by its lease
    expiring; one on this machine whose process is gone, at once (a rerun after a kill -9 does not
    wait out the lease)."""
    lake = LocalLake(tmp_path)
    for where in ("elsewhere", "here"):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LEASE, str(tmp_path), "3" if where == "elsewhere" else "30"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(LeaseHeld, match=rf"holder-process \(pid {holder.pid}"):
                Lease(lake, "db", "coll", "second").acquire(wait=0)
            if where == "elsewhere":
                # While the holder lives, its heartbeat keeps the lease past its ttl.
                time.sleep(4)
                with pytest.raises(LeaseHeld):
                    Lease(lake, "db", "coll", "second").acquire(wait=0)
                _as_if_on_another_machine(tmp_path)
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
            waited = []
            started = time.monotonic()
            lease = Lease(lake, "db", "coll", "second")
            lease.acquire(wait=10, on_wait=waited.append)
            took = time.monotonic() - started
            if where == "elsewhere":
                assert waited and waited[0].holder == "holder-process" and took < 5, "expired within its ttl"
            else:
                assert not waited and took < 1, (
                    f"a holder whose process is gone is not waited for ({took:.1f}s)"
                )
            assert lease.current().holder == "second"
            lease.release()
            assert lease.current().expired
        finally:
            holder.kill()


def test_a_holder_is_known_exited_only_by_what_the_kernel_proves():
    from aries_assets.core.ledger import LeaseInfo, process_identity

    me = process_identity(os.getpid())
    assert me is not None

    def lease(pid: int, process: str | None) -> LeaseInfo:
        return LeaseInfo("h", "host", pid, None, time.time() + 60, process=process)

    assert not lease(os.getpid(), me).holder_exited, "alive"
    assert lease(os.getpid(), me.rsplit("/", 1)[0] + "/1").holder_exited, "the pid now names a later process"
    assert not lease(os.getpid(), "another-boot/1/" + me.rsplit("/", 1)[1]).holder_exited, (
        "not this machine's"
    )
    assert not lease(os.getpid(), None).holder_exited, "a lease of an older Aries: expiry only"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    identity = process_identity(child.pid)
    assert identity is not None and not lease(child.pid, identity).holder_exited
    deadline = time.time() + 10
    while process_identity(child.pid) is not None and time.time() < deadline:
        time.sleep(0.02)  # it exits, and stays a zombie: not reaped yet
    assert lease(child.pid, identity).holder_exited, "a zombie's files are closed: exited"
    child.wait()
    assert lease(child.pid, identity).holder_exited, "reaped"


def _as_if_on_another_machine(lake_dir) -> None:
    path = lake_dir / "db" / "coll" / "_aries" / "lease.json"
    body = json.loads(path.read_text())
    body["process"] = "another-boot/4026531836/" + body["process"].rsplit("/", 1)[-1]
    path.write_text(json.dumps(body))


def test_the_ledger_never_loses_a_concurrent_mark(tmp_path):
    """Writers racing on the ledger: every update lands (compare-and-swap)."""
    from concurrent.futures import ThreadPoolExecutor

    from bson import Timestamp
    from bson.min_key import MinKey

    from aries_assets.core.ledger import DirtyBucket

    lake = LocalLake(tmp_path)
    store = LedgerStore(lake, "db", "coll")

    def mark(i: int) -> None:
        store.update(lambda led: led.mark(f"b{i}", DirtyBucket(MinKey(), i, Timestamp(1, i))))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(mark, range(64)))
    assert sorted(store.load().dirty) == sorted(f"b{i}" for i in range(64))


def test_one_tick_over_150_collections_stays_well_under_5_seconds(client, mongo_uri, database, workdir):
    names = [f"c{i:03d}" for i in range(150)]
    lake = LocalLake(workdir / "lake")
    for name in names:
        client[database][name].insert_one({"_id": 0, "v": 0})
        # As a first load leaves it: its own stream's token, a bucket map and a position.
        start = stream_start(client, lake, SourceCollection(database, name))
        LedgerStore(lake, database, name).update(lambda led, start=start: _loaded(led, start))
    write_config(
        workdir / "aries.yaml", mongo_uri, "./lake", [{"database": database, "collection": n} for n in names]
    )
    defs = build_definitions(load_config())
    (workdir / "dagster_home").mkdir()
    for name in names[::2]:
        client[database][name].insert_one({"_id": 1, "v": 1})
    with dg.DagsterInstance.get() as instance:
        started = time.monotonic()
        # The stream's first read: every collection joins it through its own stream, all at once.
        tick(defs, instance, f"changes__{database}")
        joining = time.monotonic() - started
        assert joining < 5, f"the first tick, joining 150 collections, took {joining:.1f}s"
        for name in names[1::2]:
            client[database][name].insert_one({"_id": 1, "v": 1})
        started = time.monotonic()
        result = tick(defs, instance, f"changes__{database}")
        seconds = time.monotonic() - started
    assert seconds < 5, f"a tick over 150 collections took {seconds:.1f}s"
    (request,) = result.run_requests  # the warm tick's run was never launched: one run serves all
    assert request.job_name == f"serve__{database}"
    assert all(LedgerStore(lake, database, n).load().dirty for n in names)


class RemoteLake(LocalLake):
    """A local lake answering as slowly as S3 does: tens of milliseconds a request. Counts the
    requests and the most of them in flight at once."""

    DELAY = 0.03

    def __init__(self, root) -> None:
        super().__init__(root)
        self.requests, self.in_flight, self.most_in_flight = 0, 0, 0
        self._counting = threading.Lock()
        self._inside = threading.local()  # a request made by another (write_if reads): one round trip

    def _request(self, method, *args):
        if getattr(self._inside, "busy", False):
            return method(*args)
        with self._counting:
            self.requests += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self._inside.busy = True
        try:
            time.sleep(self.DELAY)
            return method(*args)
        finally:
            self._inside.busy = False
            with self._counting:
                self.in_flight -= 1

    def read_text(self, path):
        return self._request(super().read_text, path)

    def write_text(self, path, text):
        return self._request(super().write_text, path, text)

    def list(self, prefix):
        return self._request(super().list, prefix)

    def delete(self, path):
        return self._request(super().delete, path)

    def read_versioned(self, path):
        return self._request(super().read_versioned, path)

    def write_if(self, path, text, version):
        return self._request(super().write_if, path, text, version)


def test_recording_150_collections_on_a_slow_lake_reads_their_ledgers_at_once(client, database, workdir):
    """One after another, 150 collections' lake requests at 30 ms each would take far longer
    than a tick's 5 s: they go out at once."""
    names = [f"c{i:03d}" for i in range(150)]
    lake = RemoteLake(workdir / "lake")
    local = LocalLake(workdir / "lake")
    for name in names:
        client[database][name].insert_one({"_id": 0, "v": 0})
        start = stream_start(client, local, SourceCollection(database, name))  # as a first load leaves it
        LedgerStore(local, database, name).update(lambda led, start=start: _loaded(led, start))
    scope = scopes_of([SourceCollection(database, n) for n in names], "database")[0]
    for name in names[::2]:
        client[database][name].insert_one({"_id": 1, "v": 1})
    started = time.monotonic()
    recorded, changes = record_changes(client, lake, scope, idle_persist_seconds=3600)
    seconds = time.monotonic() - started
    one_after_another = lake.requests * lake.DELAY
    assert changes is not None and changes.caught_up
    assert [n for n in names if recorded[f"{database}.{n}"].events] == names[::2]
    assert all(local.read_text(LedgerStore(local, database, n).path) for n in names)
    assert all(LedgerStore(local, database, n).load().dirty for n in names[::2])
    assert not any(LedgerStore(local, database, n).load().dirty for n in names[1::2])
    # Every collection's ledger, and its own stream's token, at least: read and written.
    assert lake.requests >= 3 * len(names), lake.requests
    assert one_after_another > 10, f"{lake.requests} requests; one after another {one_after_another:.1f}s"
    assert lake.most_in_flight >= LAKE_CONCURRENCY // 2, f"at most {lake.most_in_flight} requests at once"
    assert seconds < 5, f"recording 150 collections on a slow lake took {seconds:.1f}s"


def _loaded(ledger: Ledger, now) -> None:
    from bson.min_key import MinKey

    ledger.lowers, ledger.bucket_size, ledger.position = [MinKey()], 50_000, now


def test_a_pass_keeps_the_heap_frozen_while_another_pass_ends():
    """Freezing the heap is process-wide; a serving run reads several collections in threads. A short
    pass ending must not give back the heap under a long one, nor an inner pass under an outer."""
    seen = {}
    long_began, short_ended = threading.Event(), threading.Event()

    def long_pass():
        with engine._heap_frozen():
            long_began.set()
            short_ended.wait(10)
            seen["long, after the short one ended"] = gc.get_freeze_count()

    def short_pass():
        long_began.wait(10)
        with engine._heap_frozen():
            seen["short"] = gc.get_freeze_count()
        short_ended.set()

    threads = [threading.Thread(target=long_pass), threading.Thread(target=short_pass)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen["short"] > 0 and seen["long, after the short one ended"] > 0
    with engine._heap_frozen():
        with engine._heap_frozen():
            pass
        assert gc.get_freeze_count() > 0, "the outer pass is still frozen"
    assert gc.get_freeze_count() == 0, "the last pass to end gives the heap back"
