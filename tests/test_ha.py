"""Active/standby: two ``antifraud run`` on one PostgreSQL store, killed and frozen at random.

The recording of tests/test_crash.py (two cases, compressed 50 times, each unit's reply sent
once it has the offer it answers) is published onto a private Mosquitto while two real
dispatcher processes share a PostgreSQL database of the test's own, with a 2-second lease.
At random moments one of them, the serving one more often than not, is killed with SIGKILL
(and started again) or frozen with SIGSTOP past the lease (and woken). Then: the final report
says what the uninterrupted replay says, every offer and notice reached its unit, no unit saw
an offer that does not exist, and none saw one dispatch under two event ids.

A second test freezes the serving instance with a message in its socket, lets the standby
take over, and wakes the old one: it handles what it read, is fenced, commits nothing,
publishes nothing and never takes the broker session back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from test_crash import publish_causally, recording, statuses

from adapters.broker import Mosquitto, mosquitto_binary
from adapters.mqtt import BrokerURL, open_client
from adapters.replay import replay
from adapters.report import live_report
from dispatcher.settings import Settings, load_settings
from tools.dispatcher_process import DispatcherProcess

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]

DISRUPTIONS = int(os.environ.get("ANTIFRAUD_HA_DISRUPTIONS", "10"))
TTL = 2.0


def with_lease(ttl: float) -> Callable[[str], str]:
    def edit(toml: str) -> str:
        return toml.replace("[service]\n", f"[service]\nlease_ttl_s = {ttl}\n", 1)

    return edit


STARTED: list[asyncio.subprocess.Process] = []  # every process a test started, until it ends


@pytest.fixture(autouse=True)
def no_process_outlives_its_test() -> Iterator[None]:
    """A test that fails half-way leaves no dispatcher behind (it would go on retrying a
    database and a broker that are gone, on a machine other tests share)."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGKILL)


class Instance(DispatcherProcess):
    """``antifraud run`` on the PostgreSQL store, its log kept in ``logs``; every start is
    registered, for no process to outlive its test."""

    def __init__(self, name: str, config: Path, broker: str, store: str, logs: Path) -> None:
        super().__init__(config, broker, store, name=name, log=logs / f"{name}.log")

    async def start(self) -> None:
        await super().start()
        assert self.process is not None
        STARTED.append(self.process)


def lease(store: str) -> tuple[str, int] | None:
    with psycopg.connect(store) as db:
        try:
            row = db.execute("SELECT holder, epoch FROM lease WHERE name = 'dispatcher'").fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    return (str(row[0]), int(row[1])) if row and row[0] else None


def serving(instances: list[Instance], store: str) -> Instance | None:
    held = lease(store)
    if held is None:
        return None
    pid = int(held[0].split(":")[1])
    return next((i for i in instances if i.process and i.pid == pid), None)


async def eventually(check: Callable[[], bool], within: float) -> None:
    """Wait until ``check()`` holds (polled: it asks the database), at most ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        if check() or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.2)


async def settled(store: str, within: float = 40.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        with psycopg.connect(store) as db:
            open_ = db.execute("SELECT count(*) FROM incidents WHERE status != 'closed'")
            unsent = db.execute("SELECT count(*) FROM outbox WHERE sent = 0")
            if open_.fetchone() == (0,) and unsent.fetchone() == (0,):
                return


async def test_two_dispatchers_killed_and_frozen_at_random_lose_nothing(
    broker: Mosquitto, deployment: Callable[..., Path], pg_url: str, tmp_path: Path
) -> None:
    rng = random.Random(20261201)
    config = deployment(edit_toml=with_lease(TTL))
    settings = load_settings(config)
    path = recording(tmp_path)
    expected = await replay(path, settings)
    url = BrokerURL.parse(broker.url)
    units = sorted({d["unit"] for i in expected["incidents"] for d in i["dispatches"]})
    received: dict[str, list[dict[str, Any]]] = {u: [] for u in units}
    arrived = asyncio.Event()
    instances = [Instance(n, config, broker.url, pg_url, tmp_path) for n in ("a", "b")]
    done: list[str] = []

    async with contextlib.AsyncExitStack() as stack:
        for unit in units:  # each handset keeps a persistent session
            client = await stack.enter_async_context(open_client(url, unit, persistent=True))
            await client.subscribe(f"antifraud/v1/units/{unit}/dispatches", qos=1)

            async def collect(client: Any = client, unit: str = unit) -> None:
                async for message in client.messages:
                    received[unit].append(json.loads(bytes(message.payload)))
                    arrived.set()

            stack.push_async_callback(_cancel, asyncio.create_task(collect()))

        for instance in instances:
            await instance.start()
            await asyncio.sleep(0.3)
        await eventually(lambda: serving(instances, pg_url) is not None, 30)
        await asyncio.sleep(1.0)  # its persistent sessions exist before anything is published
        publishing = asyncio.create_task(publish_causally(path, url, received, arrived))
        while len(done) < DISRUPTIONS or not publishing.done():
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            active = serving(instances, pg_url)
            target = active if active is not None and rng.random() < 0.75 else rng.choice(instances)
            role = "active" if target is active else "standby"
            if rng.random() < 0.5:
                await target.kill()
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                await target.start()
                done.append(f"kill {role}")
            else:
                target.freeze()
                await asyncio.sleep(TTL + rng.uniform(0.5, 1.5))
                target.wake()
                done.append(f"freeze {role}")
        await publishing
        await settled(pg_url)
        await asyncio.sleep(0.5)
        for instance in instances:
            await instance.stop()

    assert len(done) >= DISRUPTIONS, done
    assert any(d.endswith("active") for d in done), done
    live = await live_report(pg_url, settings)
    assert statuses(live) == statuses(expected), done
    assert live["rejected"] == []  # a message handled twice would be refused as out of order
    for incident in live["incidents"]:
        for d in incident["dispatches"]:
            kind = "notice" if d["status"] == "notified" else "offered"
            got = [
                m
                for m in received[d["unit"]]
                if m["type"] == f"cn.antifraud.dispatch.{kind}"
                and m["data"]["dispatch_id"] == f"{incident['id']}:{d['unit']}"
            ]
            assert got, f"the {kind} for {d['unit']} in {incident['id']} never arrived ({done})"
    real = {f"{i['id']}:{d['unit']}" for i in live["incidents"] for d in i["dispatches"]}
    for unit, messages in received.items():
        for message in messages:
            assert message["data"]["dispatch_id"] in real, (unit, message)
        offers = [m for m in messages if m["type"] == "cn.antifraud.dispatch.offered"]
        assert len({m["data"]["dispatch_id"] for m in offers}) == len({m["id"] for m in offers}), (
            f"{unit} saw one dispatch under different event ids"
        )
    epochs = {e.get("epoch") for i in instances for e in i.events() if e.get("event") == "serving"}
    assert len(epochs) >= 2, "the lease never changed hands"


async def test_a_frozen_leader_woken_after_a_takeover_commits_and_publishes_nothing(
    broker: Mosquitto,
    deployment: Callable[..., Path],
    pg_url: str,
    tmp_path: Path,
    settings: Settings,
) -> None:
    config = deployment(edit_toml=with_lease(TTL))
    url = BrokerURL.parse(broker.url)
    a = Instance("a", config, broker.url, pg_url, tmp_path)
    b = Instance("b", config, broker.url, pg_url, tmp_path)
    await a.start()
    await eventually(lambda: serving([a], pg_url) is not None, 30)
    assert serving([a], pg_url) is a
    await asyncio.sleep(1.0)
    await b.start()
    await asyncio.sleep(1.5)  # b stands by
    assert serving([a, b], pg_url) is a
    statuses_seen: list[dict[str, Any]] = []

    async with open_client(url, "observer") as observer:
        await observer.subscribe("antifraud/v1/dispatcher/status", qos=1)

        async def watch() -> None:
            async for message in observer.messages:
                statuses_seen.append(json.loads(bytes(message.payload)))

        watcher = asyncio.create_task(watch())
        a.freeze()
        # a flagged call that opens an incident, sent while a is frozen: the broker hands it
        # to a's connection, where it waits in the socket until a wakes
        lines = [
            json.loads(text)
            for text in (Path(__file__).parent / "data" / "chen_case.jsonl")
            .read_text(encoding="utf-8")
            .splitlines()[:2]  # the call starts, and 30 s on: the rule opens an incident
        ]
        async with open_client(url) as source:
            for line in lines:
                await source.publish(line["topic"], json.dumps(line["payload"]).encode(), qos=1)
        await eventually(lambda: serving([a, b], pg_url) is b, 20)
        assert serving([a, b], pg_url) is b
        await asyncio.sleep(3.0)  # b handles the redelivered call and publishes its outputs
        with psycopg.connect(pg_url) as db:
            before = db.execute("SELECT count(*), max(seq) FROM outbox").fetchone()
            handled = db.execute("SELECT count(*) FROM incidents").fetchone()
        assert handled == (1,), "the standby did not handle the call the frozen leader held"
        statuses_before = len(statuses_seen)
        a.wake()
        await asyncio.sleep(3.0)
        with psycopg.connect(pg_url) as db:
            after = db.execute("SELECT count(*), max(seq) FROM outbox").fetchone()
            assert db.execute("SELECT count(*) FROM incidents").fetchone() == handled
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    assert after == before, "the woken old leader committed"
    assert statuses_seen[statuses_before:] == [], "the woken old leader published its status"
    assert serving([a, b], pg_url) is b
    a_events = [e.get("event") for e in a.events()]
    assert "lease_ended" in a_events, a_events[-10:]
    # its sessions, taken over, are no broker outage: nothing to alarm whoever reads the log
    assert "broker_unavailable" not in a_events, a_events[-20:]
    b_connected = [e for e in b.events() if e.get("event") == "broker_connected"]
    assert len(b_connected) == 1, "the old leader took the broker session back"
    online = [s for s in statuses_seen if s["data"]["state"] == "online"]
    assert online and online[-1]["data"]["instance"].split(":")[1] == str(b.pid)
    await a.stop()
    await b.stop()


async def test_a_dispatcher_started_before_its_database_serves_once_it_answers(
    broker: Mosquitto, deployment: Callable[..., Path], pg_url: str, tmp_path: Path
) -> None:
    from adapters.broker import free_port
    from tools.relay import Relay

    config = deployment(edit_toml=with_lease(TTL))
    port = free_port()
    through = pg_url.replace(":5432/", f":{port}/", 1)
    a = Instance("a", config, broker.url, through, tmp_path)
    await a.start()

    def said(event: str) -> bool:
        return any(e.get("event") == event for e in a.events())

    await eventually(lambda: said("store_unavailable"), 30)  # nothing listens on the port yet
    events = [e.get("event") for e in a.events()]
    assert "store_unavailable" in events and "serving" not in events, events
    assert a.process is not None and a.process.returncode is None  # it waits, it does not exit
    relay = Relay(("127.0.0.1", 5432))
    await relay.start(port)
    try:
        await eventually(lambda: serving([a], pg_url) is a, 20)
        assert serving([a], pg_url) is a
        await eventually(lambda: said("broker_connected"), 20)
        events = [e.get("event") for e in a.events()]
        assert "store_available" in events and "broker_connected" in events, events
    finally:
        await a.stop()
        await relay.close()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
