"""Crash safety: the live dispatcher killed with SIGKILL at random moments, again and again.

Two cases are published onto a private Mosquitto (the seed case, and a case whose guards
decline so the quick-police platforms take it), their pace compressed 50 times; the timers
keep their real lengths, so a restart's downtime never changes what happens; each unit's
reply goes once the unit has the offer it answers, as a real radio's does. A real
``antifraud run`` process is killed at random moments at least 20 times and restarted on the
same store each time. Then: the final report says what the uninterrupted replay says, every
offer and notice reached its unit, no unit saw an offer that does not exist, and the store
passes ``PRAGMA integrity_check`` after every kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from scenario import LI, Script

from adapters.broker import Mosquitto, mosquitto_binary
from adapters.mqtt import BrokerURL, open_client
from adapters.recording import read_lines
from adapters.replay import replay
from adapters.report import live_report
from dispatcher.settings import Settings
from tools.dispatcher_process import DispatcherProcess

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]

SEED = Path(__file__).parent / "data" / "chen_case.jsonl"
KILLS = int(os.environ.get("ANTIFRAUD_CRASH_KILLS", "20"))
COMPRESS = 50.0


def recording(tmp: Path) -> Path:
    """The seed case and a second case at another station, merged and compressed."""
    second = Script()
    incident = second.escalated(60, "C-ST-1", sub=LI, other="+85251230001")
    second.reply(320, "G-ST-XH-01", "declined", incident)
    second.reply(322, "G-ST-XH-02", "declined", incident)  # now the quick-police platform
    second.reply(340, "Q-ST-XH", "accepted", incident)
    second.reply(345, "P-ST-01", "accepted", incident)
    second.reply(600, "Q-ST-XH", "reported", incident, outcome="dissuaded")
    second.reply(900, "P-ST-01", "reported", incident, outcome="not_home")
    lines = [json.loads(line) for line in SEED.read_text(encoding="utf-8").splitlines()]
    lines += second.lines
    lines.sort(key=lambda line: line["at"])
    path = tmp / "two-cases.jsonl"
    path.write_text(
        "".join(
            json.dumps(line | {"at": round(line["at"] / COMPRESS, 3)}, ensure_ascii=False) + "\n"
            for line in lines
        ),
        encoding="utf-8",
    )
    return path


def integrity(store: Path) -> str:
    # mode=rw never creates the file: a 0-byte file where the store should be is refused
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=rw", uri=True)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def statuses(report: dict[str, Any]) -> list[Any]:
    return [
        (
            i["id"],
            i["status"],
            i["outcome"],
            sorted((d["unit"], d["status"], d["outcome"]) for d in i["dispatches"]),
        )
        for i in report["incidents"]
    ]


async def test_sigkill_at_random_moments_loses_nothing(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    rng = random.Random(20261129)
    path = recording(tmp_path)
    expected = await replay(path, settings)
    url = BrokerURL.parse(broker.url)
    store = tmp_path / "crash.sqlite3"
    units = sorted({d["unit"] for i in expected["incidents"] for d in i["dispatches"]})
    received: dict[str, list[dict[str, Any]]] = {u: [] for u in units}
    arrived = asyncio.Event()  # a unit received something

    async with contextlib.AsyncExitStack() as stack:
        for unit in units:  # each handset keeps a persistent session
            client = await stack.enter_async_context(open_client(url, unit, persistent=True))
            await client.subscribe(f"antifraud/v1/units/{unit}/dispatches", qos=1)

            async def collect(client: Any = client, unit: str = unit) -> None:
                async for message in client.messages:
                    received[unit].append(json.loads(bytes(message.payload)))
                    arrived.set()

            stack.push_async_callback(_cancel, asyncio.create_task(collect()))

        # each start says online (retained) once its sessions are subscribed
        online = asyncio.Event()
        watcher = await stack.enter_async_context(open_client(url))
        await watcher.subscribe("antifraud/v1/dispatcher/status", qos=1)

        async def watch() -> None:
            async for message in watcher.messages:
                if json.loads(bytes(message.payload))["data"]["state"] == "online":
                    online.set()

        stack.push_async_callback(_cancel, asyncio.create_task(watch()))
        dispatcher = DispatcherProcess(settings.path, broker.url, store, level="warning")
        await dispatcher.start()
        # its persistent sessions exist before anything is published: what is published to
        # a session that does not exist yet is not queued for anyone
        await asyncio.wait_for(online.wait(), 60)
        publishing = asyncio.create_task(publish_causally(path, url, received, arrived))
        kills = 0
        made = False  # a kill before the first process made the store leaves none to check
        while kills < KILLS or not publishing.done():
            # a moment at random, mostly once the process serves: on a slow, shared machine
            # a start can take longer than the pause, and kills that always land before it
            # serves would leave nothing to test (one kill in four may still land earlier)
            if kills % 4:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(online.wait(), 10)
            online.clear()
            await asyncio.sleep(rng.uniform(0.2, 1.2))
            await dispatcher.kill()
            kills += 1
            made = made or store.exists()
            if made:
                assert integrity(store) == "ok", f"store damaged after kill {kills}"
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await dispatcher.start()
        await publishing
        deadline = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
            with contextlib.closing(sqlite3.connect(store)) as db:
                open_ = db.execute("SELECT count(*) FROM incidents WHERE status != 'closed'")
                unsent = db.execute("SELECT count(*) FROM outbox WHERE sent = 0")
                if open_.fetchone()[0] == 0 and unsent.fetchone()[0] == 0:
                    break
        await asyncio.sleep(0.5)
        await dispatcher.stop()

    assert kills >= KILLS
    assert integrity(store) == "ok"
    live = await live_report(store, settings)
    assert statuses(live) == statuses(expected)
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
            assert got, f"the {kind} for {d['unit']} in {incident['id']} never arrived"
    real = {f"{i['id']}:{d['unit']}" for i in live["incidents"] for d in i["dispatches"]}
    for unit, messages in received.items():
        for message in messages:
            assert message["data"]["dispatch_id"] in real, (unit, message)
        offers = [m for m in messages if m["type"] == "cn.antifraud.dispatch.offered"]
        assert len({m["data"]["dispatch_id"] for m in offers}) == len({m["id"] for m in offers}), (
            f"{unit} saw one dispatch under different event ids"
        )


async def publish_causally(
    path: Path, url: BrokerURL, received: dict[str, list[dict[str, Any]]], arrived: asyncio.Event
) -> None:
    """Publish the recording at its pace, each unit's reply once that unit has the offer it
    answers, as a real radio can only answer what it was sent. The broker keeps no order
    between the dispatcher's sessions (a session per unit, decisions.md 61), so replies sent
    blind, before their offers, could be read before the replies that caused those offers."""
    loop = asyncio.get_running_loop()
    async with open_client(url) as client:
        start = loop.time()
        for line in read_lines(path):
            delay = start + line.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            parts = line.topic.split("/")
            if parts[-1] == "replies" and isinstance(line.payload, dict):
                unit, dispatch = parts[-2], line.payload["data"]["dispatch_id"]
                deadline = loop.time() + 60

                def offered(unit: str = unit, dispatch: str = dispatch) -> bool:
                    return any(
                        m["type"] == "cn.antifraud.dispatch.offered"
                        and m["data"].get("dispatch_id") == dispatch
                        for m in received.get(unit, [])
                    )

                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        while not offered():
                            arrived.clear()
                            await arrived.wait()
            payload = json.dumps(line.payload, ensure_ascii=False).encode()
            await client.publish(line.topic, payload, qos=1)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
