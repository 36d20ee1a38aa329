"""The PostgreSQL store on this machine's server, each test on a database of its own.

Every committed recording replays to the same report as on SQLite (the golden reports);
a replay resumes; the lease fences a writer whose term is over, in the database itself;
bad URLs, foreign databases and newer schemas are refused; text PostgreSQL cannot hold is
written all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import psycopg
import pytest
from postgres import database
from test_golden import CONFIG, GOLDEN, recordings

from adapters.journal import open_store
from adapters.pgstore import SCHEMA_VERSION, Lease, PgStore, Term, conninfo
from adapters.replay import replay
from adapters.report import dump_report, live_report
from dispatcher.errors import LeaseLost, StoreError
from dispatcher.model import Publish
from dispatcher.settings import load_settings


@pytest.mark.parametrize("recording", recordings(), ids=lambda p: p.stem)
async def test_a_recording_replays_to_its_golden_report_on_postgresql(
    recording: Path, pg_url: str
) -> None:
    expected = recording.with_suffix(".report.json").read_text(encoding="utf-8")
    assert dump_report(await replay(recording, load_settings(CONFIG), pg_url)) == expected


async def test_a_replay_stopped_midway_resumes_on_postgresql(pg_url: str) -> None:
    settings = load_settings(CONFIG)
    seed = GOLDEN / "seed.jsonl"
    await replay(seed, settings, pg_url, until=400.0)
    report = await replay(seed, settings, pg_url)
    assert dump_report(report) == seed.with_suffix(".report.json").read_text(encoding="utf-8")
    # and the report command reads the same store
    assert (await live_report(pg_url, settings))["incidents"]


async def test_a_second_writer_is_refused_while_the_lease_is_held(pg_url: str) -> None:
    async with open_store(pg_url, writer=True):
        with pytest.raises(StoreError, match="in use: its lease is held by"):
            async with open_store(pg_url, writer=True):
                pass
    async with open_store(pg_url, writer=True):  # released on close: taken at once
        pass


async def test_a_writer_whose_lease_was_taken_commits_nothing(pg_url: str) -> None:
    """The fence is in the database: a writer that believes its term goes on (its own
    deadline far ahead, as after a pause its clock did not see) is refused all the same."""
    old_lease = Lease(pg_url, holder="old", ttl_s=1.0)
    fence = await old_lease.take()
    assert fence is not None and fence.epoch == 1
    believes = Term(fence, 3600.0, time.monotonic())
    async with PgStore(pg_url, writer=True, term=believes) as old:
        old.set_meta("k", "before")
        await old.commit()
        await asyncio.sleep(1.2)  # past the TTL, without a renewal
        new_lease = Lease(pg_url, holder="new", ttl_s=5.0)
        taken = await new_lease.take()
        assert taken is not None and taken.epoch == 2
        assert await old_lease.renew(fence) is False
        old.set_meta("k", "after")
        old.add_outbox(0.0, Publish("t", "x", {"x": 1}), sent=False)
        with pytest.raises(LeaseLost, match="no longer held by old"):
            await old.commit()
        assert believes.lost.is_set()  # the store ended the term it found fenced
        with pytest.raises(LeaseLost):
            await old.mark_sent([1])
        with pytest.raises(LeaseLost):
            await old.prune(0.0, 0.0)
        await new_lease.close()
    await old_lease.close()
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'k'").fetchall() == [("before",)]
        assert db.execute("SELECT count(*) FROM outbox").fetchone() == (0,)


async def test_a_lease_is_taken_only_once_it_expired_and_each_take_raises_the_epoch(
    pg_url: str,
) -> None:
    a, b = Lease(pg_url, holder="a", ttl_s=1.0), Lease(pg_url, holder="b", ttl_s=1.0)
    first = await a.take()
    assert first is not None
    assert await b.take() is None
    assert await a.renew(first)
    current = await b.current()
    assert current is not None and current.holder == "a" and current.expires_in_s > 0
    await a.release(first)
    second = await b.take()  # released: at once, no TTL to wait out
    assert second is not None and second.epoch == first.epoch + 1
    assert await a.renew(first) is False
    await a.close()
    await b.close()


async def test_a_password_in_the_url_is_refused_and_never_shown(pg_url: str) -> None:
    with pytest.raises(StoreError, match="PGPASSWORD") as caught:
        conninfo("postgresql://postgres:s3cret@127.0.0.1:5432/x")
    assert "s3cret" not in str(caught.value)
    with pytest.raises(StoreError, match="names no database"):
        conninfo("postgresql://postgres@127.0.0.1:5432")


async def test_a_database_holding_other_tables_is_refused_untouched(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE TABLE payroll (id INT)")
    with pytest.raises(StoreError, match="holds 1 tables but no dispatcher store"):
        await replay(GOLDEN / "seed.jsonl", load_settings(CONFIG), pg_url)
    with psycopg.connect(pg_url) as db:
        tables = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchall() == [("payroll",)]


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    async with open_store(pg_url, writer=True):
        pass
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE store_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this dispatcher's"):
        async with open_store(pg_url):
            pass


async def test_a_reader_never_creates_a_store(pg_url: str) -> None:
    with pytest.raises(StoreError, match="no dispatcher store in this database"):
        await live_report(pg_url, load_settings(CONFIG))
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
        assert db.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone() == (0,)


async def test_text_postgresql_cannot_hold_is_written_escaped(pg_url: str) -> None:
    async with open_store(pg_url, writer=True) as store:
        store.add_rejected(1.0, "antifraud/v1/x", "bad \x00 reason", "a\x00b")
        await store.commit()
        assert await store.fetchall("SELECT reason, payload FROM rejected") == [
            ("bad \\u0000 reason", "a\\u0000b")
        ]


async def test_two_writers_starting_together_make_the_schema_once() -> None:
    with database() as url:
        results = await asyncio.gather(
            *(Lease(url, holder=f"p{i}").take() for i in range(4)), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        assert sum(r is not None for r in results) == 1  # one of them holds the lease
        with psycopg.connect(url) as db:
            assert db.execute("SELECT version FROM store_schema").fetchall() == [(SCHEMA_VERSION,)]


async def test_the_console_stats_and_export_read_a_postgresql_store_as_a_sqlite_one(
    pg_url: str, tmp_path: Path
) -> None:
    """The same recording replayed into both stores reads back the same everywhere."""
    from adapters.console import Console, Users
    from adapters.export import export
    from adapters.mqtt import BrokerURL
    from adapters.stats import read_store

    settings = load_settings(CONFIG)
    seed = GOLDEN / "seed.jsonl"
    sqlite = tmp_path / "seed.sqlite3"
    await replay(seed, settings, sqlite)
    await replay(seed, settings, pg_url)
    assert read_store(pg_url) == read_store(sqlite)
    incident = read_store(sqlite)[0][0]["id"]
    for name, store in (("sqlite", sqlite), ("pg", pg_url)):
        export(store, tmp_path / f"{name}.jsonl", incident=incident, horizon_s=3600)
    assert (tmp_path / "pg.jsonl").read_text() == (tmp_path / "sqlite.jsonl").read_text()
    views = []
    for store in (sqlite, pg_url):
        console = Console(
            settings, BrokerURL.parse("mqtt://127.0.0.1:1"), store, Users(tmp_path / "u.json")
        )
        views.append(
            (
                await asyncio.to_thread(console._stored_incident, incident),
                await asyncio.to_thread(console._stored_presence),
                await asyncio.to_thread(console._search, {}),
            )
        )
    assert views[0] == views[1]
    assert views[0][0] is not None and views[0][0]["timeline"]


async def test_a_writer_frozen_mid_commit_cannot_hold_a_takeover_up(pg_url: str) -> None:
    """A process that stops between its commit's first statement and its COMMIT (frozen,
    cut off) leaves its transaction open, holding the lease row: the server ends it, and a
    standby takes the expired lease."""
    from adapters.pgstore import WRITER_IDLE_IN_TRANSACTION_MS, connect

    old = Lease(pg_url, holder="old", ttl_s=1.0)
    fence = await old.take()
    assert fence is not None
    writer = await connect(pg_url, role="writer")
    await writer.execute("BEGIN")
    await writer.execute(
        "SELECT antifraud_fence(%s, %s, %s)", (fence.name, fence.holder, fence.epoch)
    )
    # the writer now idles in its transaction, as a frozen process would
    await asyncio.sleep(1.1)  # the lease expires
    new = Lease(pg_url, holder="new", ttl_s=5.0)
    started = time.monotonic()
    taken = None
    while taken is None and time.monotonic() - started < 10:
        with contextlib.suppress(StoreError):  # a take waiting for the row times out
            taken = await new.take()
        if taken is None:
            await asyncio.sleep(0.1)
    assert taken is not None and taken.epoch == 2
    assert time.monotonic() - started < WRITER_IDLE_IN_TRANSACTION_MS / 1000 + 2.0
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):  # the server ended it
        await writer.execute("SELECT 1")
    await writer.close()
    await old.close()
    await new.close()


async def test_regions_as_schemas_of_one_database_keep_their_stores_apart(pg_url: str) -> None:
    """docs/scale.md: a region's store may be a schema, named by the URL's search_path."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE SCHEMA region_a; CREATE SCHEMA region_b")
    settings = load_settings(CONFIG)
    cases = {"region_a": GOLDEN / "seed.jsonl", "region_b": GOLDEN / "spec-01.jsonl"}
    for schema, recording in cases.items():
        url = f"{pg_url}?options=-csearch_path%3D{schema}"
        expected = recording.with_suffix(".report.json").read_text(encoding="utf-8")
        assert dump_report(await replay(recording, settings, url)) == expected
        async with open_store(url, writer=True):  # each schema its own lease
            pass
    with psycopg.connect(pg_url) as db:
        counts = db.execute(
            "SELECT schemaname, count(*) FROM pg_tables WHERE schemaname LIKE 'region_%' "
            "GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert counts == [("region_a", 12), ("region_b", 12)]
        ids = [db.execute(f"SELECT id FROM {schema}.incidents").fetchall() for schema in cases]
        assert ids[0] and ids[1] and not set(ids[0]) & set(ids[1])


def test_run_on_a_postgresql_store_holding_a_replay_exits_with_why(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from antifraud.cli import main

    asyncio.run(replay(GOLDEN / "spec-01.jsonl", load_settings(CONFIG), pg_url))
    assert main(["run", "--store", pg_url, "--broker", "mqtt://127.0.0.1:9"]) == 1
    assert "this store holds a replay, not a live dispatcher's state" in capsys.readouterr().err
    with psycopg.connect(pg_url) as db:  # the lease is let go: nobody waits out its TTL
        row = db.execute("SELECT expires_at <= clock_timestamp() FROM lease").fetchone()
        assert row == (True,)


async def test_a_store_of_an_earlier_version_is_migrated_forward(pg_url: str) -> None:
    """A PostgreSQL store made at version 6 (before an incident's retained copy named the row
    it repeats) is migrated in place; its unsent messages go out whole, and its report is
    the same."""
    settings = load_settings(CONFIG)
    seed = GOLDEN / "seed.jsonl"
    await replay(seed, settings, pg_url, until=400.0)
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(
            "UPDATE outbox SET payload = COALESCE(payload, (SELECT p.payload FROM outbox "
            "p WHERE p.seq = outbox.same_as))"
        )
        db.execute("ALTER TABLE outbox DROP COLUMN same_as")
        db.execute("UPDATE store_schema SET version = 6")
        db.execute("UPDATE outbox SET sent = 0 WHERE seq IN (SELECT max(seq) FROM outbox)")
    async with open_store(pg_url, writer=True) as store:
        unsent = await store.unsent(10)
        assert len(unsent) == 1 and unsent[0][4]  # its payload, whole
    report = await replay(seed, settings, pg_url)
    assert dump_report(report) == seed.with_suffix(".report.json").read_text(encoding="utf-8")
    with psycopg.connect(pg_url) as db:
        assert db.execute("SELECT version FROM store_schema").fetchone() == (SCHEMA_VERSION,)
        copies = db.execute("SELECT count(*) FROM outbox WHERE same_as IS NOT NULL").fetchone()
        assert copies is not None and copies[0] > 0  # written since as references


@pytest.mark.parametrize(
    ("store", "said"),
    [
        ("postgresql://postgres:s3cretPW@127.0.0.1:5432/x", "holds a password"),
        ("postgresql://postgres@127.0.0.1:5432/x?password=s3cretPW", "holds a password"),
        ("postgresql://postgres:s3cretPW@127.0.0.1:abc/x", "not a PostgreSQL URL"),
        ("postgresql://postgres@127.0.0.1:5432", "names no database"),
    ],
)
def test_run_refuses_a_store_url_that_can_never_work_at_once_and_never_shows_a_password(
    store: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from antifraud.cli import main

    for args in (["run", "--broker", "mqtt://127.0.0.1:9"], ["report", "--report", "-"]):
        assert main([*args, "--store", store]) == 1
        err = capsys.readouterr().err
        assert said in err and "s3cretPW" not in err, err


def test_run_on_a_database_that_holds_other_tables_exits_with_why(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from antifraud.cli import main

    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE TABLE payroll (id INT)")
    assert main(["run", "--store", pg_url, "--broker", "mqtt://127.0.0.1:9"]) == 1
    assert "holds 1 tables but no dispatcher store" in capsys.readouterr().err


def test_a_search_path_naming_no_schema_is_said_so(pg_url: str) -> None:
    url = f"{pg_url}?options=-csearch_path%3Dnot_made"
    with pytest.raises(StoreError, match="names no schema that exists; create it first"):
        await_replay = replay(GOLDEN / "spec-01.jsonl", load_settings(CONFIG), url)
        asyncio.run(await_replay)


def test_the_readers_say_on_one_line_why_a_database_cannot_be_read(pg_url: str) -> None:
    from adapters.export import export
    from adapters.stats import read_store

    with pytest.raises(StoreError, match="no dispatcher store in this database") as caught:
        read_store(pg_url)
    assert "\n" not in str(caught.value)
    unreachable = pg_url.replace(":5432/", ":1/", 1)
    for read in (lambda: read_store(unreachable), lambda: export(unreachable, Path("/x"))):
        with pytest.raises(StoreError, match="cannot read the store") as caught:
            read()
        assert "\n" not in str(caught.value)
