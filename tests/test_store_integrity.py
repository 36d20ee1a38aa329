"""The store on disk: a damaged, truncated or foreign file is refused, never replaced.

Every command that opens a store (``run``, ``report``, ``replay --store``, ``backup``,
``console --store``) is run as a process of its own, with a timeout, on real damaged files:
each must exit non-zero at once with a message naming the file and what is wrong, and leave
the file as it was. Also here: a full disk (a real, small tmpfs), one writer per store
whatever the path's spelling, and the pruning of rejected input and its dead letters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.replay import replay
from adapters.report import dump_report
from adapters.store import SCHEMA_VERSION, Store
from dispatcher.errors import StoreError
from dispatcher.model import Publish
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
SEED = DATA / "chen_case.jsonl"
EXPECTED = json.loads((DATA / "chen_case.expected.json").read_text(encoding="utf-8"))
DEAD_LETTER = "cn.antifraud.input.rejected"
EMPTY = hashlib.sha256(b"").hexdigest()
TIMEOUT_S = 30.0  # a refusal takes about a second; a hang is a failure, not a wait


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _command(name: str, store: Path) -> list[str]:
    """The command line of ``name`` on ``store``; what it writes goes beside the store."""
    out = store.parent
    return {
        "run": ["run", "--store", str(store), "--broker", "mqtt://127.0.0.1:9"],
        "report": ["report", "--store", str(store), "--report", str(out / "report.json")],
        "replay": ["replay", str(SEED), "--store", str(store), "--report", str(out / "r.json")],
        "backup": ["backup", "--store", str(store), "--out", str(out / "copy.sqlite3")],
        "console": ["console", "--store", str(store), "--port", "0"],
    }[name]


COMMANDS = ["run", "report", "replay", "backup", "console"]


def _start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "antifraud.cli", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen[str], timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """The exit code and standard error of ``process``; a process still alive after
    ``timeout`` is killed and fails the test (a hang is what must never happen)."""
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, err = process.communicate()
        pytest.fail(f"{process.args} still running after {timeout:g} s; stderr:\n{err}")
    return process.returncode, err


@contextlib.contextmanager
def _ended(started: list[Any]) -> Iterator[None]:
    """Whatever happens, no process of ``started`` (each row's last item) outlives the test."""
    try:
        yield
    finally:
        for *_, process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()


def _antifraud(*args: str, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    return _finish(_start(list(args)), timeout)


@pytest.fixture(scope="module")
def good_store(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Path:
    """A real store: the seed case replayed, closed (its log copied back and removed)."""
    import asyncio

    path = tmp_path_factory.mktemp("good") / "store.sqlite3"
    asyncio.run(replay(SEED, settings, path))
    assert not Path(f"{path}-wal").exists()
    return path


@pytest.fixture(scope="module")
def good_live_store(good_store: Path) -> Path:
    """The same store, as a live service's (``run`` refuses a replay's store otherwise)."""
    path = good_store.with_name("live.sqlite3")
    shutil.copyfile(good_store, path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE meta SET value = 'live' WHERE key = 'mode'")
        assert db.total_changes == 1
        db.commit()
    return path


def _quick_check(path: Path) -> str:
    """What SQLite's own ``PRAGMA quick_check`` says of a copy of ``path`` (and its log)."""
    copy = path.with_name("checked-" + path.name)
    shutil.copyfile(path, copy)
    if Path(f"{path}-wal").exists():
        shutil.copyfile(f"{path}-wal", f"{copy}-wal")
    try:
        with contextlib.closing(sqlite3.connect(copy)) as db:
            return str(db.execute("PRAGMA quick_check").fetchall())
    except sqlite3.DatabaseError as exc:
        return f"error: {exc}"
    finally:
        for name in (copy, Path(f"{copy}-wal"), Path(f"{copy}-shm")):
            name.unlink(missing_ok=True)


def _table_leaf_page(path: Path) -> tuple[int, int]:
    """The page size and the number (0-based) of a table b-tree leaf page past the middle."""
    data = path.read_bytes()
    page_size = int.from_bytes(data[16:18], "big")
    pages = len(data) // page_size
    for number in range(pages // 2, pages):
        if data[number * page_size] == 0x0D:  # a table b-tree leaf
            return page_size, number
    raise AssertionError("no table leaf page in the second half of the store")


def damage(kind: str, good: Path, target: Path) -> tuple[Path, str]:
    """A damaged copy of ``good`` at ``target``; returns the file the message must name and
    a phrase it must hold."""
    shutil.copyfile(good, target)
    data = bytearray(target.read_bytes())
    rng = random.Random(kind)
    if kind == "truncated to half":
        target.write_bytes(data[: len(data) // 2])
        return target, "truncated"
    if kind == "garbage header":
        data[:100] = rng.randbytes(100)
        target.write_bytes(bytes(data))
        return target, "not an SQLite database"
    if kind == "random bytes mid-file":
        page_size, number = _table_leaf_page(target)
        start = number * page_size
        data[start : start + 512] = rng.randbytes(512)
        target.write_bytes(bytes(data))
        assert _quick_check(target) != "[('ok',)]"  # SQLite itself sees the damage
        return target, "quick_check"
    if kind == "garbage log":
        wal = Path(f"{target}-wal")
        wal.write_bytes(rng.randbytes(8 * 4096 + 32))
        return wal, "write-ahead log"
    raise AssertionError(kind)


DAMAGE = ["truncated to half", "garbage header", "random bytes mid-file", "garbage log"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_command_refuses_a_damaged_store_at_once_and_leaves_it_as_it_was(
    good_store: Path, good_live_store: Path, tmp_path: Path, kind: str
) -> None:
    """Each of the five commands on its own damaged copy, all at once: each exits 1 within
    the timeout (no hang, no service left running with the writer lock), names the file and
    what is wrong, and neither the store nor its log is changed or replaced (where there was
    no log, a reader's read-only connection may leave SQLite's empty one)."""
    started = []
    with _ended(started):
        for name in COMMANDS:
            folder = tmp_path / name
            folder.mkdir()
            store = folder / "store.sqlite3"
            named, phrase = damage(kind, good_live_store if name == "run" else good_store, store)
            before = (_sha(store), _sha(Path(f"{store}-wal")))
            started.append((name, store, named, phrase, before, _start(_command(name, store))))
        finished = [(*rest, _finish(process)) for *rest, process in started]
    for name, store, named, phrase, before, (code, err) in finished:
        assert code == 1, f"{name}: exit {code}; stderr:\n{err}"
        assert str(named) in err and phrase in err, f"{name}: {err}"
        assert "Traceback" not in err, f"{name}: {err}"
        log_after = _sha(Path(f"{store}-wal"))
        if before[1] is None and log_after == EMPTY:  # SQLite's own empty log, holding nothing
            log_after = None
        assert (_sha(store), log_after) == before, f"{name} changed the store"
        assert not (store.parent / "copy.sqlite3").exists()


@pytest.mark.parametrize("command", ["run", "report", "replay", "backup"])
def test_an_empty_file_where_the_store_should_be_is_refused_not_started_afresh(
    tmp_path: Path, command: str
) -> None:
    """A 0-byte store (a file system that lost its content, a truncating copy) would start
    as a new, empty store: every open incident gone without a word. It is refused."""
    store = tmp_path / "store.sqlite3"
    store.touch()
    code, err = _antifraud(*_command(command, store))
    assert code == 1, err
    assert f"{store}: " in err and "empty" in err and "backup" in err, err
    assert store.read_bytes() == b""


def _foreign(path: Path, script: str, version: int = 0) -> Path:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(script)
        db.execute(f"PRAGMA user_version={version}")
        db.commit()
    return path


async def test_an_sqlite_database_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    """Another application's database, one with no schema version, and one at a known
    version without the store's tables: each is refused, named, and left as it was."""
    cases = [
        (_foreign(tmp_path / "other-app.db", "CREATE TABLE users (name TEXT);"), "tables"),
        (_foreign(tmp_path / "blank.db", "VACUUM;"), "no schema version"),
        (
            _foreign(tmp_path / "no-meta.db", "CREATE TABLE incidents (id TEXT);", 2),
            "meta",
        ),
    ]
    for path, phrase in cases:
        before = _sha(path)
        with pytest.raises(StoreError, match=phrase) as refused:
            async with Store(path, writer=True):
                pass
        assert str(path) in str(refused.value) and "not a store" in str(refused.value)
        assert _sha(path) == before


async def test_a_log_without_its_database_is_refused(tmp_path: Path) -> None:
    """A ``-wal`` file whose database is gone holds committed transactions: starting a new
    store over it would drop them, or worse, apply them to the wrong file."""
    path = tmp_path / "store.sqlite3"
    _write(Path(f"{path}-wal"), b"\x37\x7f\x06\x82" + bytes(60))
    with pytest.raises(StoreError, match="write-ahead log without its database"):
        async with Store(path):
            pass
    assert not path.exists()


async def test_only_a_path_that_does_not_exist_makes_a_new_store(tmp_path: Path) -> None:
    path = tmp_path / "new" / "store.sqlite3"
    async with Store(path, writer=True) as store:
        assert await store.integrity_check() == "ok"
        store.set_meta("k", "v")
        await store.commit()
    async with Store(path) as store:  # and it is recognised as one from then on
        assert await store.fetchall("SELECT value FROM meta WHERE key = 'k'") == [("v",)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.sqlite3", "store.sqlite3.lock"]


# ---- a full disk -------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB file system (tmpfs), for a disk that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up, then give back ``leave`` bytes."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, bytes(4096))
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_disk_is_named_as_such_and_the_store_survives_it(small_disk: Path) -> None:
    """The replay of the seed case runs out of disk half-way: it stops with a message saying
    the disk is full and naming the store, exits 1; the store passes its integrity check,
    and once there is room again the same replay resumes to the expected report."""
    store = small_disk / "store.sqlite3"
    code, err = _antifraud("replay", str(SEED), "--store", str(store), "--until", "30")
    assert code == 0, err
    filler = _fill(small_disk, 64 * 1024)  # room to open the store, not for what follows
    code, err = _antifraud("replay", str(SEED), "--store", str(store), "--report", os.devnull)
    assert code == 1, err
    assert f"{store}: the disk is full: commit failed" in err, err
    assert "cannot rollback" not in err and "Traceback" not in err, err
    filler.unlink()
    with contextlib.closing(sqlite3.connect(store)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    report = small_disk / "r.json"
    code, err = _antifraud("replay", str(SEED), "--store", str(store), "--report", str(report))
    assert code == 0, err
    assert json.loads(report.read_text(encoding="utf-8"))["incidents"] == EXPECTED["incidents"]


def test_a_new_store_on_a_full_disk_is_refused_and_leaves_nothing_behind(
    small_disk: Path,
) -> None:
    """A service started on a full disk stops at once saying so; no half-made store is left
    at the path (it would be refused as not a store on the next start)."""
    store = small_disk / "store.sqlite3"
    filler = _fill(small_disk, 0)
    code, err = _antifraud("run", "--store", str(store), "--broker", "mqtt://127.0.0.1:9")
    assert code == 1, err
    assert f"{store}" in err and "the disk is full" in err, err
    assert not store.exists()
    filler.unlink()
    code, err = _antifraud("replay", str(SEED), "--store", str(store), "--report", os.devnull)
    assert code == 0, err


# ---- one writer, whatever the path's spelling ----------------------------------------------


async def test_the_writer_lock_holds_through_a_symlink_and_another_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tmp_path / "data" / "store.sqlite3"
    real.parent.mkdir()
    link = tmp_path / "link.sqlite3"
    link.symlink_to(real)
    folder_link = tmp_path / "var"
    folder_link.symlink_to(real.parent)
    monkeypatch.chdir(tmp_path)
    async with Store(real, writer=True):
        for other in (link, folder_link / "store.sqlite3", Path("./data/../data/store.sqlite3")):
            with pytest.raises(StoreError, match="already in use by pid"):
                async with Store(other, writer=True):
                    pass
    async with Store(link, writer=True):  # free again once the first writer closed it
        with pytest.raises(StoreError, match="already in use by pid"):
            async with Store(real, writer=True):
                pass


async def test_a_store_with_a_second_hard_link_is_refused(tmp_path: Path) -> None:
    """Two names for one file: SQLite keys its log on the name, so two processes opening the
    two names would write two logs of the one database. Refused, whichever name is used."""
    path = tmp_path / "store.sqlite3"
    async with Store(path):
        pass
    other = tmp_path / "other.sqlite3"
    os.link(path, other)
    for name in (path, other):
        with pytest.raises(StoreError, match="hard link"):
            async with Store(name, writer=True):
                pass
        with pytest.raises(StoreError, match="hard link"):
            async with Store(name):
                pass


def test_a_second_process_on_the_same_store_through_a_symlink_is_refused(tmp_path: Path) -> None:
    """Two real ``antifraud run`` processes: the second, given a symlink to the first one's
    store, stops at once naming the first; the first goes on."""
    real = tmp_path / "store.sqlite3"
    link = tmp_path / "link.sqlite3"
    link.symlink_to(real)
    first = _start(["run", "--store", str(real), "--broker", "mqtt://127.0.0.1:9"])
    try:
        lock = tmp_path / "store.sqlite3.lock"
        deadline = time.monotonic() + TIMEOUT_S
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "the first service never took the store"
            time.sleep(0.05)
        code, err = _antifraud("run", "--store", str(link), "--broker", "mqtt://127.0.0.1:9")
        assert code == 1, err
        assert f"already in use by pid {first.pid} " in err, err
        assert first.poll() is None
    finally:
        with _ended([(first,)]):
            first.send_signal(signal.SIGTERM)
            code, err = _finish(first)
    assert code == 0, err


# ---- pruning what refused input leaves -----------------------------------------------------


async def test_prune_forgets_old_rejected_input_and_sent_dead_letters_only(
    tmp_path: Path,
) -> None:
    async with Store(tmp_path / "s.sqlite3") as store:
        for at in (100.0, 5_000.0):
            store.add_rejected(at, "t", f"at {at:g}", "p")
        messages = [
            (100.0, "deadletter", DEAD_LETTER, True),  # old, sent: pruned
            (100.0, "deadletter", DEAD_LETTER, False),  # old, never sent: kept
            (100.0, "incidents/I", "cn.antifraud.incident.updated", True),  # not a dead letter
            (5_000.0, "deadletter", DEAD_LETTER, True),  # within the window
        ]
        for at, topic, type_, sent in messages:
            store.add_outbox(at, Publish(topic, type_, {"at": at}), sent=sent)
        await store.commit()
        await store.prune(1_000.0, 1_000.0)
        assert await store.fetchall("SELECT reason FROM rejected") == [("at 5000",)]
        assert await store.fetchall("SELECT seq, sent FROM outbox ORDER BY seq") == [
            (2, 0),
            (3, 1),
            (4, 1),
        ]


async def test_a_replay_keeps_every_rejection_for_its_report(tmp_path: Path) -> None:
    """A replay's report lists every rejected line of the recording (SPEC §6), however long
    the recording: its store is not pruned of them."""
    async with Store(tmp_path / "s.sqlite3") as store:
        store.set_meta("mode", "replay")
        store.add_rejected(100.0, "t", "old", "p")
        store.add_outbox(100.0, Publish("deadletter", DEAD_LETTER, {}), sent=True)
        store.add_outbox(200.0, Publish("deadletter", DEAD_LETTER, {}), sent=True)
        await store.commit()
        await store.prune(1_000.0, 1_000.0)
        assert await store.fetchall("SELECT COUNT(*) FROM rejected") == [(1,)]
        assert await store.fetchall("SELECT COUNT(*) FROM outbox") == [(2,)]


async def test_the_live_runtime_prunes_refused_input_a_day_later(
    settings: Settings, tmp_path: Path
) -> None:
    """Through the runtime's own hourly prune: a flood of refused input a day ago leaves
    nothing behind but what is younger than the dedupe window."""
    topic = f"{settings.service.prefix}/events/{settings.service.region}/calls"
    day = settings.limits.dedupe_window_s
    start = 1_700_000_000.0
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store, outbox=True)
        await runtime.start()
        store.set_meta("mode", "live")
        for n in range(50):  # 3 s apart: within the channel's refusal budget, each stored
            runtime.advance(start + 3 * n)
            runtime.handle(topic, b"not json %d" % n, start + 3 * n)
        await runtime.commit()
        await store.mark_sent([seq for (seq,) in await store.fetchall("SELECT seq FROM outbox")])
        assert await store.fetchall("SELECT COUNT(*) FROM rejected") == [(50,)]
        later = start + day + 3_600.0
        runtime.advance(later)
        runtime.handle(topic, b"not json either", later)
        await runtime.commit()
        assert await store.fetchall("SELECT COUNT(*) FROM rejected") == [(1,)]
        assert await store.fetchall("SELECT type, at FROM outbox") == [(DEAD_LETTER, later)]


async def test_an_old_store_is_migrated_to_the_current_version(
    settings: Settings, tmp_path: Path
) -> None:
    """A store written at schema 2 is taken forward, its rows kept; an open incident whose
    document still repeats its timeline (before schema 5) goes on from its timeline rows."""
    path = tmp_path / "s.sqlite3"
    await replay(SEED, settings, path, until=300.0)  # Chen's incident open, escalated
    with contextlib.closing(sqlite3.connect(path)) as db:
        (doc,) = db.execute("SELECT doc FROM incidents").fetchone()
        rows = db.execute(
            "SELECT at, kind, by, text, dispatch_id FROM timeline ORDER BY seq"
        ).fetchall()
        legacy = json.loads(doc) | {
            "timeline": [
                dict(zip(("at", "kind", "by", "text", "dispatch_id"), r, strict=True)) for r in rows
            ]
        }
        db.execute("UPDATE incidents SET doc = ?", (json.dumps(legacy),))
        db.execute("ALTER TABLE timeline DROP COLUMN action_id")
        db.execute("DROP INDEX rejected_at")
        db.execute("DROP INDEX outbox_dead_letters")
        db.execute("DROP INDEX outbox_receipts")
        db.execute("DROP TABLE incident_inbound")
        _unreference_outbox(db)
        db.execute("PRAGMA user_version=2")
        db.commit()
    async with Store(path) as store:
        assert store.migrated_from == 2
        indexes = {name for (name,) in await store.fetchall("SELECT name FROM sqlite_master")}
        assert {"rejected_at", "outbox_dead_letters", "outbox_receipts"} <= indexes
        assert {"incident_inbound", "incident_inbound_incident"} <= indexes
        assert len(await store.fetchall("SELECT action_id FROM timeline")) == len(rows)
    assert SCHEMA_VERSION == 7
    resumed = await replay(SEED, settings, path)  # the rest of the case, on the old store
    golden = (DATA / "golden" / "seed.report.json").read_text(encoding="utf-8")
    assert dump_report(resumed) == golden


def _unreference_outbox(db: sqlite3.Connection) -> None:
    """Turn the outbox back into what a store before schema 7 held: every payload in full."""
    db.execute(
        "UPDATE outbox SET payload = (SELECT p.payload FROM outbox AS p "
        "WHERE p.seq = outbox.same_as) WHERE same_as IS NOT NULL"
    )
    db.execute("ALTER TABLE outbox DROP COLUMN same_as")


async def test_a_retained_copy_is_stored_once_and_sent_whole_also_from_a_schema_6_store(
    tmp_path: Path,
) -> None:
    """An incident's state goes to the operators and to its retained topic: one payload,
    written once (schema 7: the retained row names the first). A store written at schema 6,
    with messages still unsent, is taken forward; its rows and the new ones all go out
    whole, in order, and a cleared retained topic stays a message without payload."""
    path = tmp_path / "s.sqlite3"
    state = {"data": {"incident_id": "I", "n": 1}}
    async with Store(path) as store:
        store.add_outbox(1.0, Publish("operators", "t", state), sent=False)
        store.add_outbox(1.0, Publish("incidents/I", "t", state, retain=True), sent=False)
        await store.commit()
    with contextlib.closing(sqlite3.connect(path)) as db:
        _unreference_outbox(db)
        db.execute("PRAGMA user_version=6")
        db.commit()
    later = {"data": {"incident_id": "I", "n": 2}}
    async with Store(path) as store:
        assert store.migrated_from == 6
        store.add_outbox(2.0, Publish("operators", "t", later), sent=False)
        store.add_outbox(2.0, Publish("incidents/I", "t", later, retain=True), sent=False)
        store.add_outbox(3.0, Publish("incidents/I", None, None, retain=True), sent=False)
        pending = await store.commit()
        assert await store.fetchall(
            "SELECT seq, payload IS NULL, same_as FROM outbox ORDER BY seq"
        ) == [(1, 0, None), (2, 0, None), (3, 0, None), (4, 1, 3), (5, 1, None)]
        unsent = await store.unsent(10)
    whole = [json.dumps(state, separators=(",", ":")).encode()] * 2 + [
        json.dumps(later, separators=(",", ":")).encode()
    ] * 2
    assert [row[4] for row in unsent] == [*whole, None]
    assert [(row[0], row[1], row[3]) for row in unsent] == [
        (1, "operators", False),
        (2, "incidents/I", True),
        (3, "operators", False),
        (4, "incidents/I", True),
        (5, "incidents/I", True),
    ]
    assert pending == unsent[2:]  # handed to the publisher as the store will send them again


async def test_a_check_that_runs_out_of_time_opens_the_store_and_says_so(
    good_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PRAGMA quick_check`` reads every page; on a store too large to finish within
    ``CHECK_BUDGET_S`` the store is used all the same, with a warning naming it."""
    import structlog

    from adapters import store as store_module

    path = tmp_path / "store.sqlite3"
    shutil.copyfile(good_store, path)
    monkeypatch.setattr(store_module, "CHECK_BUDGET_S", 0.0)
    with structlog.testing.capture_logs() as lines:
        async with Store(path) as store:
            assert await store.fetchall("SELECT value FROM meta WHERE key = 'mode'") == [
                ("replay",)
            ]
    [warning] = [line for line in lines if line["event"] == "store_check_incomplete"]
    assert warning["store"] == str(path) and warning["log_level"] == "warning"


@pytest.mark.parametrize(("rows", "nul"), [(5, True), (200, False), (2000, True)])
async def test_every_value_reads_back_as_it_was_queued(
    tmp_path: Path, rows: int, nul: bool
) -> None:
    """What a commit writes reads back exactly, whatever its size: each double, and each
    string (control characters, a NUL, characters beyond the BMP, escapes)."""
    rng = random.Random(rows)
    alphabet = [chr(c) for c in (*range(1, 0x80), 0x2028, 0x4E8B, 0x1F600, 0x10FFFF)]
    queued = []
    for i in range(rows):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        if nul and i == rows // 2:
            text += "\x00 after a NUL"
        at = rng.choice([rng.uniform(0, 1e7), float(i), 0.1 * i, 5e-324])
        queued.append((at, f"topic/{i}", text, rng.choice(["", "\\u0000", '"\\']) + text))
    path = tmp_path / "s.sqlite3"
    async with Store(path) as store:
        for at, topic, reason, payload in queued:
            store.add_rejected(at, topic, reason, payload)
        for i in range(rows):
            store.add_contact(f"+86{i}", float(i) / 3, "+852" + "9" * (i % 7))
        await store.commit()
        got = await store.fetchall("SELECT at, topic, reason, payload FROM rejected ORDER BY seq")
        assert got == queued
        assert [(type(r[0]), len(r[3])) for r in got] == [(float, len(q[3])) for q in queued]
        contacts = await store.fetchall("SELECT subscriber, at, counterpart FROM contacts")
        assert contacts == [(f"+86{i}", float(i) / 3, "+852" + "9" * (i % 7)) for i in range(rows)]
