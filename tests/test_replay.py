"""SPEC §6: the seed case, duplicates, and stop-and-resume give the same report."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from scenario import CHEN, INVESTMENT, Player, Script

from adapters import store as store_module
from adapters.replay import replay
from adapters.store import INLINE_MAX_WRITES, SCHEMA_VERSION, Store
from dispatcher.errors import FlushError, RecordingError, StoreError
from dispatcher.model import Incident, Publish, TimerFired
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from dispatcher.workflow import Workflow

DATA = Path(__file__).parent / "data"
SEED = DATA / "chen_case.jsonl"
EXPECTED = json.loads((DATA / "chen_case.expected.json").read_text(encoding="utf-8"))
SEED_LINES = SEED.read_text(encoding="utf-8").splitlines()
SEED_TIMES = sorted({json.loads(line)["at"] for line in SEED_LINES})


def _subset(expected: Any, actual: Any) -> bool:
    """True when every key the expected report names has the same value in ``actual``."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and _subset(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(_subset(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual) and type(expected) is type(actual)


async def _replay_lines(
    lines: list[str], settings: Settings, tmp_path: Path, name: str
) -> dict[str, Any]:
    recording = tmp_path / f"{name}.jsonl"
    recording.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return await replay(recording, settings, tmp_path / f"{name}.sqlite3")


class TestSeedCase:
    async def test_replays_to_the_expected_report(self, settings: Settings, tmp_path: Path) -> None:
        report = await replay(SEED, settings, tmp_path / "store.sqlite3")
        assert report["incidents"] == EXPECTED["incidents"]
        assert _subset(EXPECTED, report)

    async def test_report_lists_what_was_published_and_rejected(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        report = await replay(SEED, settings)
        assert report["rejected"] == []
        offers = [p for p in report["published"] if p["type"] == "cn.antifraud.dispatch.offered"]
        assert [(p["at"], p["topic"]) for p in offers] == [
            (255.0, "antifraud/v1/units/G-YJ-CH-01/dispatches"),
            (255.0, "antifraud/v1/units/G-YJ-CH-02/dispatches"),
            (255.0, "antifraud/v1/units/P-YJ-01/dispatches"),
        ]
        closed = [p for p in report["published"] if p["type"] == "cn.antifraud.incident.closed"]
        assert {p["topic"] for p in closed} == {
            "antifraud/v1/operators/incidents",
            "antifraud/v1/incidents/INC-C-20211015-0001",
        }
        assert {p["at"] for p in closed} == {1500.0}

    async def test_same_recording_gives_the_same_report_twice(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        first = await replay(SEED, settings, tmp_path / "a.sqlite3")
        second = await replay(SEED, settings, tmp_path / "b.sqlite3")
        assert first == second


@pytest.mark.parametrize("index", range(len(SEED_LINES)))
async def test_a_duplicated_line_changes_nothing(
    settings: Settings, tmp_path: Path, index: int
) -> None:
    """A repeated (source, id) pair is processed once, wherever the repeat lands."""
    baseline = await _replay_lines(SEED_LINES, settings, tmp_path, "baseline")
    lines = list(SEED_LINES)
    lines.insert(index + 1, SEED_LINES[index])
    assert await _replay_lines(lines, settings, tmp_path, "duplicated") == baseline


async def test_a_duplicated_malformed_line_is_rejected_once(
    settings: Settings, tmp_path: Path
) -> None:
    garbage = json.dumps(
        {"at": 125.0, "topic": "antifraud/v1/units/G-YJ-CH-01/replies", "payload_raw": "{not json"}
    )
    lines = [*SEED_LINES[:5], garbage, garbage, *SEED_LINES[5:]]
    report = await _replay_lines(lines, settings, tmp_path, "garbage")
    assert len(report["rejected"]) == 1
    assert report["incidents"] == EXPECTED["incidents"]


async def test_a_copy_after_the_dedupe_window_is_new_and_one_within_it_is_not(
    settings: Settings, tmp_path: Path
) -> None:
    """Pairs are remembered for the dedupe window exactly, whenever memory is next swept: a
    copy two days later is handled again (here: refused again), its own copy a moment later
    is a duplicate, and a replay stopped between them decides as one straight through."""
    window = settings.limits.dedupe_window_s
    s = Script()
    topic = "antifraud/v1/operators/op-01/actions"
    event = s.event(
        10, topic, "console/op-01", "cn.antifraud.operator.escalate", {"incident_id": "INC-NOPE"}
    )
    s.line(10 + window / 2, topic, event)  # within the window: a duplicate
    s.line(10 + 2 * window, topic, event)  # past it: new again
    s.line(15 + 2 * window, topic, event)  # and its copy a moment later: a duplicate
    recording = s.write(tmp_path / "copies.jsonl")
    whole = await replay(recording, settings, tmp_path / "whole.sqlite3")
    assert [r["at"] for r in whole["rejected"]] == [10.0, 10 + 2 * window]
    store = tmp_path / "resumed.sqlite3"
    await replay(recording, settings, store, until=10 + window)
    assert await replay(recording, settings, store) == whole


@pytest.mark.parametrize("until", [0.0, 30.0, 195.0, 254.0, 255.0, 262.0, 450.0, 1155.0])
async def test_stopping_and_resuming_gives_the_same_report(
    settings: Settings, tmp_path: Path, until: float
) -> None:
    store = tmp_path / "resumed.sqlite3"
    partial = await replay(SEED, settings, store, until=until)
    assert all(p["at"] <= until for p in partial["published"])
    resumed = await replay(SEED, settings, store)
    assert resumed == await replay(SEED, settings, tmp_path / "whole.sqlite3")


async def test_stopping_twice_and_resuming_gives_the_same_report(
    settings: Settings, tmp_path: Path
) -> None:
    store = tmp_path / "resumed.sqlite3"
    for until in (60.0, 225.0, 420.0):
        await replay(SEED, settings, store, until=until)
    assert await replay(SEED, settings, store) == await replay(SEED, settings)


async def test_a_timer_pending_at_the_stop_fires_after_the_resume(
    play: Player, tmp_path: Path
) -> None:
    s = Script()
    s.escalated(0, "C1")
    s.progress(300, "C1", CHEN, INVESTMENT, 300)  # guards' offers expired at 285 meanwhile
    store = tmp_path / "stopped.sqlite3"
    stopped = await play(s, until=260, store=store)
    assert {d["status"] for d in stopped.incident("INC-C1")["dispatches"]} == {
        "offered",
        "notified",
    }
    resumed = await play(s, store=store)
    whole = await play(s)
    assert resumed.report == whole.report
    assert resumed.units("INC-C1")["G-YJ-CH-01"] == "expired"


async def test_resuming_a_store_on_another_recording_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    store = tmp_path / "store.sqlite3"
    await replay(SEED, settings, store, until=30)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(SEED_LINES[1:]) + "\n", encoding="utf-8")
    with pytest.raises(StoreError, match="another recording"):
        await replay(other, settings, store)


async def test_resuming_on_a_recording_that_differs_before_the_stop_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    """The same first line is not the same recording: every line replayed so far must be."""
    store = tmp_path / "store.sqlite3"
    await replay(SEED, settings, store, until=262)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join([*SEED_LINES[:3], *SEED_LINES[4:]]) + "\n", encoding="utf-8")
    with pytest.raises(StoreError, match="another recording"):
        await replay(other, settings, store)
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_text("\n".join(SEED_LINES[:3]) + "\n", encoding="utf-8")
    with pytest.raises(StoreError, match="another recording"):
        await replay(shorter, settings, store)


@pytest.mark.parametrize("skip_bad_lines", [False, True])
async def test_a_line_going_back_in_time_right_after_the_stop_is_refused_on_resume(
    settings: Settings, tmp_path: Path, skip_bad_lines: bool
) -> None:
    """As it is when read straight through: the stop must not change what the file says."""
    cut = next(i for i, line in enumerate(SEED_LINES) if json.loads(line)["at"] == 262.0)
    back = json.loads(SEED_LINES[cut])
    back["at"] = 250.0
    recording = tmp_path / "back.jsonl"
    lines = [*SEED_LINES[: cut + 1], json.dumps(back, ensure_ascii=False), *SEED_LINES[cut + 1 :]]
    recording.write_text("\n".join(lines) + "\n", encoding="utf-8")

    async def run(store: Path, until: float | None = None) -> dict[str, Any] | str:
        try:
            skipped: list[RecordingError] | None = [] if skip_bad_lines else None
            report = await replay(recording, settings, store, until=until, skipped=skipped)
        except RecordingError as exc:
            return str(exc)
        return {**report, "skipped": [str(e) for e in skipped or []]}

    whole = await run(tmp_path / "whole.sqlite3")
    stopped = tmp_path / "stopped.sqlite3"
    await run(stopped, until=262.0)
    resumed = await run(stopped)
    if skip_bad_lines:
        assert isinstance(whole, dict) and isinstance(resumed, dict)
        assert whole["skipped"] == resumed["skipped"] != []
    else:
        assert isinstance(whole, str) and "goes back in time" in whole
    assert resumed == whole


async def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this dispatcher"):
        async with Store(path):
            pass


async def test_the_store_passes_an_integrity_check_after_a_replay(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "store.sqlite3"
    await replay(SEED, settings, path, until=400)
    async with Store(path) as store:
        assert await store.integrity_check() == "ok"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"topic": "t", "payload": {}}', "'at' must be a number"),
        ('{"at": -1, "topic": "t", "payload": {}}', "must not be negative"),
        ('{"at": 5, "payload": {}}', "'topic' must be a non-empty string"),
        ('{"at": 5, "topic": "t"}', "exactly one of 'payload' and 'payload_raw'"),
        ('{"at": 5, "topic": "t", "payload": {}, "payload_raw": "x"}', "exactly one"),
        ('{"at": 5, "topic": "t", "payload_raw": 7}', "'payload_raw' must be a string"),
    ],
)
async def test_a_malformed_recording_line_is_an_error_naming_file_and_line(
    settings: Settings, tmp_path: Path, line: str, message: str
) -> None:
    recording = tmp_path / "bad.jsonl"
    recording.write_text(SEED_LINES[0] + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(RecordingError, match=message) as info:
        await replay(recording, settings)
    assert f"{recording}:2" in str(info.value)


async def test_time_going_backwards_in_a_recording_is_an_error(
    settings: Settings, tmp_path: Path
) -> None:
    recording = tmp_path / "backwards.jsonl"
    recording.write_text(SEED_LINES[2] + "\n" + SEED_LINES[1] + "\n", encoding="utf-8")
    with pytest.raises(RecordingError, match="goes back in time"):
        await replay(recording, settings)


async def test_work_before_a_malformed_line_is_kept_and_resumable(
    settings: Settings, tmp_path: Path
) -> None:
    recording = tmp_path / "half.jsonl"
    recording.write_text("\n".join(SEED_LINES[:3]) + "\nnot json\n", encoding="utf-8")
    store = tmp_path / "half.sqlite3"
    with pytest.raises(RecordingError):
        await replay(recording, settings, store)
    with sqlite3.connect(store) as db:
        cursor = db.execute("SELECT value FROM meta WHERE key='replay.cursor'").fetchone()
    assert cursor == ("3",)


async def test_a_failed_commit_keeps_its_writes_for_the_next_one(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "store.sqlite3"
    async with Store(path) as store:
        store.set_meta("first", "1")
        store.add_rejected(1.0, "t", "r1", "p")
        real = store._in_thread

        async def broken(*args: object) -> None:
            raise OSError("disk full")

        store._in_thread = broken  # type: ignore[method-assign,assignment]
        with pytest.raises(OSError, match="disk full"):
            await store.commit()
        store._in_thread = real  # type: ignore[method-assign]
        store.add_rejected(2.0, "t", "r2", "p")
        await store.commit()
        assert await store.fetchall("SELECT reason FROM rejected ORDER BY seq") == [
            ("r1",),
            ("r2",),
        ]
        assert await store.fetchall("SELECT value FROM meta WHERE key='first'") == [("1",)]


DISPATCH_ROW = (
    "id",
    "unit",
    "role",
    "status",
    "offered_at",
    "accepted_at",
    "arrived_at",
    "reported_at",
    "outcome",
)


def _dispatch_rows(db: sqlite3.Connection) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The dispatches table, and the same rows made from the incidents' documents."""
    table = db.execute(
        "SELECT id, incident_id, unit, role, status, offered_at, accepted_at, arrived_at, "
        "reported_at, outcome FROM dispatches ORDER BY id"
    ).fetchall()
    from_docs = sorted(
        (d["id"], incident_id, *(d[name] for name in DISPATCH_ROW[1:]))
        for incident_id, doc in db.execute("SELECT id, doc FROM incidents")
        for d in json.loads(doc)["dispatches"].values()
    )
    return table, from_docs


async def test_the_dispatch_rows_follow_every_change_though_unchanged_ones_are_not_rewritten(
    settings: Settings, tmp_path: Path
) -> None:
    """A save writes only the dispatch rows that changed since the last commit; the table
    still ends as the incidents' documents say, also when a commit failed in between (its
    rows are all written by the next)."""
    day = DATA / "golden" / "day.jsonl"
    await replay(day, settings, tmp_path / "day.sqlite3")
    with sqlite3.connect(tmp_path / "day.sqlite3") as db:
        table, from_docs = _dispatch_rows(db)
    assert table == from_docs and len(table) > 10

    await replay(SEED, settings, tmp_path / "seed.sqlite3")
    with sqlite3.connect(tmp_path / "seed.sqlite3") as db:
        (doc,) = db.execute("SELECT doc FROM incidents").fetchone()
    path = tmp_path / "store.sqlite3"
    async with Store(path) as store:
        inc = Incident.from_doc(json.loads(doc))
        inc.status = "escalated"
        first, second = list(inc.dispatches.values())[:2]
        first.status, second.status = "offered", "offered"
        store.save_incident(inc)
        await store.commit()
        first.status = "accepted"
        store.save_incident(inc)
        real = store._in_thread

        async def broken(*args: object) -> None:
            raise OSError("disk full")

        store._in_thread = broken  # type: ignore[method-assign,assignment]
        with pytest.raises(OSError, match="disk full"):
            await store.commit()
        store._in_thread = real  # type: ignore[method-assign]
        second.status = "declined"
        store.save_incident(inc)
        await store.commit()
        statuses = dict(await store.fetchall("SELECT id, status FROM dispatches"))
        assert (statuses[first.id], statuses[second.id]) == ("accepted", "declined")
        first.status = "arrived"
        store.save_incident(inc)
        await store.commit()
    with sqlite3.connect(path) as db:
        table, from_docs = _dispatch_rows(db)
    assert table == from_docs
    statuses = {row[0]: row[4] for row in table}
    assert (statuses[first.id], statuses[second.id]) == ("arrived", "declined")


async def test_an_inline_write_that_fails_keeps_its_writes_for_the_next_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.sqlite3"
    async with Store(path, inline_writes=True) as store:
        store.add_rejected(1.0, "t", "r1", "p")
        writer, store._writer = store._writer, sqlite3.connect(path, isolation_level=None)
        assert writer is not None
        store._writer.close()  # a connection that can no longer write
        with pytest.raises(StoreError, match="commit failed"):
            await store.commit()
        store._writer = writer
        store.add_rejected(2.0, "t", "r2", "p")
        await store.commit()
        assert await store.fetchall("SELECT reason FROM rejected ORDER BY seq") == [
            ("r1",),
            ("r2",),
        ]


async def test_inline_writes_hand_the_messages_over_on_the_event_loop_before_commit_returns(
    tmp_path: Path,
) -> None:
    """The live service's store writes on the event loop's own thread: the outbound messages
    are handed over synchronously, with no thread in between, and every reader sees them."""
    async with Store(tmp_path / "s.sqlite3", inline_writes=True) as store:
        handed: list[tuple[int, list[Any]]] = []
        store.add_outbox(1.0, Publish("t/1", "cn.antifraud.x", {"n": 1}), sent=False)
        commit = asyncio.ensure_future(
            store.commit(lambda rows: handed.append((threading.get_ident(), rows)), flush=False)
        )
        await asyncio.sleep(0)  # one pass of the loop: no round trip to another thread
        assert commit.done()
        assert [(ident, [r[1] for r in rows]) for ident, rows in handed] == [
            (threading.get_ident(), ["t/1"])
        ]
        await store.flush()
        assert await store.fetchall("SELECT topic, sent FROM outbox") == [("t/1", 0)]
        # a few messages marked sent: on the loop too, within the same pass
        marking = asyncio.ensure_future(store.mark_sent([1]))
        await asyncio.sleep(0)
        assert marking.done()
        assert await store.fetchall("SELECT topic, sent FROM outbox") == [("t/1", 1)]
        # a commit its caller asks not to write inline (a backlog is being drained) and a
        # large one go to aiosqlite's thread, so the loop receives the next messages meanwhile
        store.add_outbox(2.0, Publish("t/2", "cn.antifraud.x", {"n": 2}), sent=False)
        commit = asyncio.ensure_future(store.commit(flush=False, inline=False))
        await asyncio.sleep(0)
        assert not commit.done()
        await commit
        for n in range(INLINE_MAX_WRITES + 1):
            store.add_rejected(2.0, "t", f"r{n}", "p")
        store.add_outbox(2.0, Publish("t/3", "cn.antifraud.x", {"n": 3}), sent=False)
        handed.clear()
        commit = asyncio.ensure_future(
            store.commit(lambda rows: handed.append((threading.get_ident(), rows)), flush=False)
        )
        await asyncio.sleep(0)
        assert not commit.done()
        await commit
        assert [[r[1] for r in rows] for _, rows in handed] == [["t/3"]]
        assert await store.fetchall("SELECT COUNT(*) FROM rejected") == [(INLINE_MAX_WRITES + 1,)]
        # so do many messages marked sent at once
        marking = asyncio.ensure_future(store.mark_sent([2, 3, *range(4, INLINE_MAX_WRITES + 3)]))
        await asyncio.sleep(0)
        assert not marking.done()
        await marking
        assert await store.fetchall("SELECT seq, sent FROM outbox ORDER BY seq") == [
            (1, 1),
            (2, 1),
            (3, 1),
        ]


@pytest.mark.parametrize("inline", [True, False])
async def test_a_commit_written_on_the_loop_is_written_before_the_loop_turns(
    settings: Settings, tmp_path: Path, inline: bool
) -> None:
    """The runtime writes an inline commit from the call itself (an escalation's offers wait
    for no other callback); a commit for the store's thread is a task of its own, and only
    returns after the loop has turned."""
    async with Store(tmp_path / "s.sqlite3", inline_writes=True) as store:
        runtime = Runtime(settings, store, outbox=True)
        await runtime.start()
        order: list[str] = []
        runtime.on_written = lambda rows: order.append(f"written {[r[1] for r in rows]}")
        store.add_outbox(1.0, Publish("t/1", "cn.antifraud.x", {"n": 1}), sent=False)
        asyncio.get_running_loop().call_soon(order.append, "the loop turned")
        await runtime.commit(flush=False, inline=inline)
        if inline:
            assert order == ["written ['t/1']"]
        else:
            assert order == ["the loop turned", "written ['t/1']"]
        assert await store.fetchall("SELECT topic, sent FROM outbox") == [("t/1", 0)]


async def test_an_inline_commit_cancelled_while_it_waits_for_the_write_lock_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    """Cancelled before it could write (the lock was held by a write on the store's thread),
    an inline commit puts its batch back; the next commit writes it, once."""
    async with Store(tmp_path / "s.sqlite3", inline_writes=True) as store:
        runtime = Runtime(settings, store, outbox=True)
        await runtime.start()
        store.add_outbox(1.0, Publish("t/1", "cn.antifraud.x", {"n": 1}), sent=False)
        async with store._writing:  # as while a large commit is written on the thread
            waiting = asyncio.ensure_future(runtime.commit(flush=False))
            await asyncio.sleep(0)
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert await store.fetchall("SELECT topic FROM outbox") == []
        await runtime.commit()
        assert await store.fetchall("SELECT topic FROM outbox") == [("t/1",)]


@pytest.mark.parametrize("sync", ["full", "normal"])
@pytest.mark.parametrize("inline", [False, True])
async def test_a_commit_hands_its_messages_over_when_written_and_returns_when_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str, inline: bool
) -> None:
    """With sync="full" the log is flushed after the messages are handed to the publisher and
    before commit() returns (only then may inbound messages be acknowledged); "normal" never
    flushes. SQLite itself never flushes on commit. The same wherever the write runs."""
    flushes: list[str] = []
    handed = threading.Event()
    real = os.fdatasync

    def flush(fd: int) -> None:  # on the store's thread
        flushes.append("handed over first" if handed.wait(5) else "flushed before hand-over")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", flush)
    async with Store(tmp_path / "s.sqlite3", sync, inline_writes=inline) as store:
        assert await store.fetchall("PRAGMA synchronous") == [(1,)]
        store.add_outbox(1.0, Publish("t/1", "cn.antifraud.x", {"n": 1}), sent=False)
        got: list[Any] = []
        rows = await store.commit(lambda pending: (got.extend(pending), handed.set()))
        assert got == rows and [r[1] for r in rows] == ["t/1"]
        assert flushes == (["handed over first"] if sync == "full" else [])
        # a flush that fails: the transaction is written, so it is not queued again, and the
        # store refuses every later flush (a second fdatasync could succeed over lost data)
        monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
        store.add_outbox(2.0, Publish("t/2", "cn.antifraud.x", {"n": 2}), sent=False)
        if sync == "full":
            with pytest.raises(FlushError, match="flushing the store to the disk failed"):
                await store.commit()
            monkeypatch.setattr(os, "fdatasync", real)
            store.add_outbox(3.0, Publish("t/3", "cn.antifraud.x", {"n": 3}), sent=False)
            with pytest.raises(FlushError):
                await store.commit()
        else:
            await store.commit()
            store.add_outbox(3.0, Publish("t/3", "cn.antifraud.x", {"n": 3}), sent=False)
            await store.commit()
        assert await store.fetchall("SELECT topic FROM outbox ORDER BY seq") == [
            ("t/1",),
            ("t/2",),
            ("t/3",),
        ]


async def test_the_log_is_checkpointed_in_the_background_not_by_commits(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    async with Store(path) as store:
        assert await store.fetchall("PRAGMA wal_autocheckpoint") == [(0,)]
        before = path.stat().st_size
        store.add_rejected(1.0, "t", "r", "x" * 300_000)
        await store.commit(flush=False)  # returns before the checkpoint task has had a turn
        assert path.stat().st_size == before  # the commit only wrote the log
        assert store._checkpointing is not None  # it started a checkpoint in the background
        await store._checkpointing
        assert path.stat().st_size >= before + 300_000  # which copied the log into the file


def _size(path: Path) -> int:
    return path.stat().st_size


async def test_the_log_starts_over_under_a_steady_stream_of_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite starts the log over only at a commit after a checkpoint that copied all of it;
    when a commit lands while each checkpoint runs, the log grew by all that was written
    (a gigabyte in a wave's replay)."""
    monkeypatch.setattr(store_module, "CHECKPOINT_EVERY_S", 0.05)
    monkeypatch.setattr(store_module, "LOG_LIMIT_FRAMES", 64)
    path = tmp_path / "s.sqlite3"
    async with Store(path) as store:
        written = 0
        # enough that the log's file, which keeps the longest it grew between two starts
        # over, stays far below all of it even when a loaded machine stalls a checkpoint
        while written < 64_000_000:
            store.add_rejected(1.0, "t", "r", "x" * 40_000)  # about ten pages
            await store.commit(flush=False)
            written += 40_000
            await asyncio.sleep(0.001)
        # without starting over, the log held all of it (85 MB with SQLite's frame headers)
        assert _size(Path(f"{path}-wal")) < written / 4


V1_SCHEMA_STORE_TABLES = (
    "meta",
    "incidents",
    "dispatches",
    "timeline",
    "outbox",
    "inbound",
    "rejected",
    "contacts",
    "presence",
)


async def test_a_version_1_store_is_migrated_forward_and_keeps_its_data(
    settings: Settings, tmp_path: Path
) -> None:
    from adapters import store as store_module

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # a store as version 1 of the dispatcher wrote it
        db.executescript(store_module.SCHEMA)
        db.execute("PRAGMA user_version=1")
    await replay(SEED, settings, path, until=300)
    async with Store(path) as store:
        assert store.migrated_from == SCHEMA_VERSION  # already migrated by the replay
        indexes = {
            n
            for (n,) in await store.fetchall("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"dispatches_unit", "timeline_incident"} <= indexes
        assert await store.fetchall("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert (await replay(SEED, settings, path))["incidents"] == EXPECTED["incidents"]


async def test_backup_makes_a_consistent_copy_while_the_store_is_written(
    settings: Settings, tmp_path: Path
) -> None:
    path, copy = tmp_path / "live.sqlite3", tmp_path / "copy.sqlite3"
    await replay(SEED, settings, path, until=262)
    async with Store(path) as store:
        store.add_rejected(1.0, "t", "written while the backup runs", "p")
        writing = asyncio.create_task(store.commit())
        await store.backup(copy)
        await writing
    async with Store(copy) as backup:
        assert await backup.integrity_check() == "ok"
    report = await replay(SEED, settings, copy)  # the copy resumes like the original
    assert report["incidents"] == EXPECTED["incidents"]


def test_the_backup_command_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from antifraud.cli import main

    store, out = tmp_path / "s.sqlite3", tmp_path / "b.sqlite3"
    assert (
        main(["replay", str(SEED), "--store", str(store), "--report", str(tmp_path / "r.json")])
        == 0
    )
    assert main(["backup", "--store", str(store), "--out", str(out)]) == 0
    assert main(["backup", "--store", str(store), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["backup", "--store", str(store), "--out", str(out), "--force"]) == 0


async def test_an_incident_document_is_exactly_its_dataclass_fields(
    settings: Settings, tmp_path: Path
) -> None:
    """``Incident.to_json`` is hand-written for speed: it must say what ``asdict`` says, but
    for the timeline, which the store keeps row by row."""
    store_path = tmp_path / "s.sqlite3"
    script = Script()
    incident = script.escalated(0, "C1")
    script.reply(260, "P-YJ-01", "accepted", incident).reply(
        300, "G-YJ-CH-01", "accepted", incident
    )
    script.reply(400, "G-YJ-CH-01", "arrived", incident)
    await replay(SEED, settings, store_path)
    await replay(script.write(tmp_path / "c1.jsonl"), settings, tmp_path / "c1.sqlite3")
    docs = []
    for path in (store_path, tmp_path / "c1.sqlite3"):
        async with Store(path) as store:
            for i, d in await store.fetchall("SELECT id, doc FROM incidents"):
                docs.append((json.loads(d), await store.timeline(i)))
    assert len(docs) >= 2
    for doc, timeline in docs:
        incident_ = Incident.from_doc(doc, timeline)
        assert incident_.dispatches and incident_.timeline and incident_.calls
        whole = dataclasses.asdict(incident_)
        assert whole.pop("timeline") == [dataclasses.asdict(e) for e in timeline]
        assert json.loads(incident_.to_json()) == whole == doc


def test_a_document_from_before_each_lateness_was_its_units_announces_none_again() -> None:
    """A store written when one lateness was announced an incident (``arrival_overdue`` in
    its alerts, no ``overdue_at`` on its dispatches): every unit accepted by then counts as
    announced, so no restart announces one of them again."""
    incident = Incident(
        id="INC-X", subscriber=CHEN, counterpart=INVESTMENT, category=None, rule="r",
        severity="critical", status="escalated", opened_at=0.0, known=True, station="PS-YJ",
    )  # fmt: skip
    doc = json.loads(incident.to_json())
    doc["alerts"] = ["arrival_overdue"]
    base = {"role": "guard", "slot": "door", "offered_at": 255.0}
    doc["dispatches"] = {
        "INC-X:G1": {"id": "INC-X:G1", "unit": "G1", "status": "accepted", "accepted_at": 260.0}
        | base,
        "INC-X:G2": {"id": "INC-X:G2", "unit": "G2", "status": "offered"} | base,
    }
    loaded = Incident.from_doc(doc)
    assert loaded.dispatches["INC-X:G1"].overdue_at == 260.0
    assert loaded.dispatches["INC-X:G2"].overdue_at is None
    doc["alerts"] = []
    assert Incident.from_doc(doc).dispatches["INC-X:G1"].overdue_at is None


async def test_one_writer_at_a_time_per_store_while_readers_come_and_go(
    settings: Settings, tmp_path: Path
) -> None:
    """A second writer (a replay, a live service) is refused with who holds the store; a
    reader is not; the store is free again once the first writer has closed it."""
    store = tmp_path / "s.sqlite3"
    async with Store(store, writer=True):
        with pytest.raises(StoreError, match=rf"s\.sqlite3: already in use by pid {os.getpid()}"):
            await replay(SEED, settings, store)
        async with Store(store) as reader:  # report, backup and the console read it meanwhile
            await reader.fetchall("SELECT key FROM meta")
    report = await replay(SEED, settings, store)
    assert report["incidents"][0]["status"] == "closed"


async def test_a_unit_taken_out_of_the_deployment_mid_incident_does_not_stall_it(
    settings: Settings, tmp_path: Path, deployment: Any
) -> None:
    """units.csv edited and the dispatcher restarted while an incident holds dispatches of a
    unit no longer listed: the incident goes on (shown with a placeholder name). A unit whose
    dispatch still waits for its reply is named in a warning at start-up."""
    import io

    from dispatcher import logs
    from dispatcher.settings import load_settings

    units = settings.path.parent / "hengnan" / "units.csv"
    lines = units.read_text(encoding="utf-8").splitlines(keepends=True)

    async def resumed_without(unit: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Replayed to 300 s (G-YJ-CH-02 stood down, -01 accepted), then resumed with
        ``unit`` taken out of units.csv: the report and the log lines of the resumption."""
        store = tmp_path / f"without-{unit}.sqlite3"
        await replay(SEED, settings, store, until=300)
        edited = "".join(x for x in lines if not x.startswith(f"{unit},"))
        without = load_settings(deployment(units=edited))
        stream = io.StringIO()
        logs.configure("info", stream)
        try:
            report = await replay(SEED, without, store)
        finally:
            logs.configure("warning")
        return report, [json.loads(line) for line in stream.getvalue().splitlines()]

    report, logged = await resumed_without("G-YJ-CH-02")
    assert report["rejected"] == []
    incident = report["incidents"][0]
    assert (incident["status"], incident["outcome"]) == ("closed", "prevented")
    events = [line["event"] for line in logged]
    assert "internal_error" not in events and "unit_not_configured" not in events

    # the guard on his way is the one taken out: said at start-up, by incident and dispatch
    report, logged = await resumed_without("G-YJ-CH-01")
    warned = [line for line in logged if line["event"] == "unit_not_configured"]
    assert [(w["dispatch_id"], w["status"]) for w in warned] == [
        ("INC-C-20211015-0001:G-YJ-CH-01", "accepted")
    ]
    assert all("internal error" not in r["reason"] for r in report["rejected"])
    assert {r["topic"] for r in report["rejected"]} == {"antifraud/v1/units/G-YJ-CH-01/replies"}


async def test_a_step_that_fails_half_way_is_undone_and_the_service_goes_on(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect while handling the guard's arrival, after the dispatch was already marked
    arrived but before anything was announced: the message is dead-lettered, and the state is
    what was announced and stored, not half a step. A defect in a timer does not stop the
    replay either. The rest of the case then runs as it would have."""
    from dispatcher.outbound import Messages

    real = Messages.incident_changed
    failed: list[str] = []

    def incident_changed(self: Messages, incident: Any, change: Any, at: float, o: float) -> Any:
        arrived = incident.dispatches.get("INC-C-20211015-0001:G-YJ-CH-01")
        if arrived is not None and arrived.status == "arrived" and "arrival" not in failed:
            failed.append("arrival")
            raise RuntimeError("a defect")
        return real(self, incident, change, at, o)

    monkeypatch.setattr(Messages, "incident_changed", incident_changed)
    real_step = Workflow.step

    def step(self: Workflow, event: Any, now: float) -> Any:
        # a dispatch slot's deadline: its incident is changed, then the step fails
        if isinstance(event, TimerFired) and event.key[1] == "slot" and "timer" not in failed:
            failed.append("timer")
            self.state.incidents[event.key[0]].alerts.append("half-way")
            raise RuntimeError("a defect in a timer")
        return real_step(self, event, now)

    monkeypatch.setattr(Workflow, "step", step)
    report = await replay(SEED, settings, tmp_path / "s.sqlite3")
    assert failed == ["timer", "arrival"]
    assert [(r["at"], r["reason"]) for r in report["rejected"]] == [
        (420.0, "internal error: RuntimeError: a defect")
    ]
    incident = report["incidents"][0]
    guard = next(d for d in incident["dispatches"] if d["unit"] == "G-YJ-CH-01")
    # the arrival never happened as far as anyone was told; the report that followed did
    assert (guard["status"], guard["arrived_at"], guard["outcome"]) == (
        "reported",
        None,
        "dissuaded",
    )
    assert (incident["status"], incident["outcome"]) == ("closed", "prevented")
    async with Store(tmp_path / "s.sqlite3") as store:
        (doc,) = (await store.fetchall("SELECT doc FROM incidents"))[0]
    assert "half-way" not in json.loads(doc)["alerts"]
