"""The live service on a real broker: a private Mosquitto on a free port for each test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import selectors
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from scenario import CHEN, CLEAN, INVESTMENT, ZHAO, Script

from adapters.broker import Mosquitto, local_broker, mosquitto_binary
from adapters.live import Clock, LiveService, Publisher, Rate
from adapters.live import acker as acker_stage
from adapters.live import processor as processor_stage
from adapters.live import publisher as publisher_stage
from adapters.mqtt import (
    BrokerURL,
    acknowledged,
    disconnected,
    messages_until,
    open_client,
    protocol_of,
    publish_now,
)
from adapters.recorder import publish_recording, record
from adapters.replay import replay
from adapters.report import live_report
from adapters.store import Store
from dispatcher.errors import BrokerError, FlushError
from dispatcher.inbound import cloudevent
from dispatcher.settings import Settings
from tools.handset import Handset, Step
from tools.relay import PUBACK, PUBLISH, Relay, kind_of

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]

SEED = Path(__file__).parent / "data" / "chen_case.jsonl"
SPEED = 100.0  # clock speed of these tests: the 25-minute seed case plays in 15 s
P = "antifraud/v1"
CHEN_DOOR = "陈女士 春晖小区3栋2单元502"  # who and which door C1's offers name on a guard's radio


class Running:
    """A live dispatcher in the background of a test."""

    def __init__(
        self,
        settings: Settings,
        broker: Mosquitto,
        store: Path,
        speed: float = SPEED,
        via: str | None = None,
    ) -> None:
        self.stop = asyncio.Event()
        self.service = LiveService(
            settings,
            BrokerURL.parse(via or broker.url),  # through a relay's URL if given
            store,
            Clock(speed=speed),
            client_id="dispatcher-under-test",
        )
        self.task = asyncio.create_task(self.service.run(self.stop))

    async def ready(self) -> None:
        await asyncio.wait_for(self.service.ready.wait(), 10)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


@contextlib.asynccontextmanager
async def dispatcher(
    settings: Settings,
    broker: Mosquitto,
    store: Path,
    speed: float = SPEED,
    via: str | None = None,
) -> AsyncIterator[Running]:
    running = Running(settings, broker, store, speed, via)
    await running.ready()
    try:
        yield running
    finally:
        if not running.task.done():
            await running.finish()


@contextlib.asynccontextmanager
async def handset_running(handset: Handset) -> AsyncIterator[Handset]:
    """``handset`` connected (and reconnecting) in the background; stopped cleanly after."""
    stop = asyncio.Event()
    task = asyncio.create_task(handset.run(stop))
    try:
        yield handset
    finally:
        stop.set()
        await task


def escalation(incident_id: str, event_id: str, operator: str = "op-01") -> dict[str, Any]:
    """An operator's ``operator.escalate`` as his console sends it."""
    return cloudevent(
        event_id, f"console/{operator}", "cn.antifraud.operator.escalate",
        {"incident_id": incident_id},
    )  # fmt: skip


async def wait_until(predicate: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def statuses(report: dict[str, Any]) -> list[Any]:
    return [
        (
            i["id"],
            i["status"],
            i["outcome"],
            i["severity"],
            i["rule"],
            [(d["unit"], d["status"], d["outcome"]) for d in i["dispatches"]],
        )
        for i in report["incidents"]
    ]


def test_commits_move_to_the_store_thread_while_messages_arrive_faster_than_the_limit() -> None:
    """Below the limit each commit is written on the event loop (latency); above it, on the
    store's thread while the next messages are received (throughput); measured per window."""
    rate = Rate(limit=1000, window=0.25)
    rate.add(1, 0.0)
    for tick in range(1, 25):  # 500 a second
        rate.add(5, tick / 100)
    assert not rate.busy
    for tick in range(25, 56):  # a backlog drained at 4,000 a second (a window and a bit)
        rate.add(40, tick / 100)
    assert rate.busy
    for tick in range(56, 101):  # back to 500 a second (the window after the mixed one)
        rate.add(5, tick / 100)
    assert not rate.busy


async def test_the_seed_case_published_live_ends_as_its_replay(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    store = tmp_path / "live.sqlite3"
    async with dispatcher(settings, broker, store):
        await publish_recording(SEED, BrokerURL.parse(broker.url), speed=SPEED)
        await asyncio.sleep(0.5)
    live = await live_report(store, settings)
    expected = await replay(SEED, settings)
    assert statuses(live) == statuses(expected)
    for key in ("opened_at", "critical_at", "escalated_at", "closed_at"):
        assert live["incidents"][0][key] == pytest.approx(expected["incidents"][0][key], abs=3)
    async with Store(store) as opened:
        assert await opened.unsent(10) == []  # everything reached the broker


async def test_outbound_messages_reach_subscribers_with_qos_1_and_retained_state(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    async with dispatcher(settings, broker, tmp_path / "live.sqlite3"):
        await publish_recording(SEED, BrokerURL.parse(broker.url), speed=SPEED)
        await asyncio.sleep(0.5)
    # a console connecting afterwards still finds the incident's state, retained
    async with open_client(BrokerURL.parse(broker.url)) as late:
        await late.subscribe(f"{P}/incidents/+", qos=1)
        message = await asyncio.wait_for(anext(late.messages.__aiter__()), 5)
    assert message.retain
    state = json.loads(bytes(message.payload))  # type: ignore[arg-type]
    assert (state["type"], state["data"]["outcome"]) == (
        "cn.antifraud.incident.closed",
        "prevented",
    )


async def test_a_handset_offline_during_the_offer_receives_it_when_it_returns(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    url = BrokerURL.parse(broker.url)
    # the radio registers its session once, then goes out of coverage without a will
    async with open_client(url, "G-YJ-CH-01", persistent=True) as radio:
        await radio.subscribe(f"{P}/units/G-YJ-CH-01/dispatches", qos=1)
    script = Script()
    script.escalated(0, "C1")
    recording = script.write(tmp_path / "escalate.jsonl")
    async with dispatcher(settings, broker, tmp_path / "live.sqlite3") as running:
        await publish_recording(recording, url, speed=SPEED)
        await wait_until(lambda: running.service.stats["published"] >= 10)
        shown: list[str] = []
        handset = Handset(settings, "G-YJ-CH-01", url, show=shown.append)
        async with handset_running(handset):
            await wait_until(
                lambda: any(e["type"] == "cn.antifraud.dispatch.offered" for e in handset.received)
            )
    offer = next(e for e in handset.received if e["type"] == "cn.antifraud.dispatch.offered")
    assert offer["data"]["dispatch_id"] == "INC-C1:G-YJ-CH-01"
    assert any("陈女士" in line for line in shown)


async def test_a_unit_whose_handset_dropped_out_is_skipped(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    url = BrokerURL.parse(broker.url)
    async with dispatcher(settings, broker, tmp_path / "live.sqlite3") as running:
        runtime = running.service.runtime
        assert runtime is not None
        # a real handset process announces itself online, then dies without a goodbye:
        # the broker publishes its will, a retained offline
        radio = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "antifraud.cli",
            "handset",
            "--unit",
            "G-YJ-CH-01",
            "--broker",
            broker.url,
            "--auto",
            stdout=asyncio.subprocess.DEVNULL,
        )
        try:
            await wait_until(lambda: runtime.state.presence.get("G-YJ-CH-01") == "online")
        finally:
            radio.kill()
            await radio.wait()
        await wait_until(lambda: runtime.state.presence.get("G-YJ-CH-01") == "offline")
        script = Script()
        script.escalated(0, "C1")
        await publish_recording(script.write(tmp_path / "e.jsonl"), url, speed=SPEED)
        await wait_until(
            lambda: (
                "INC-C1" in runtime.state.incidents
                and runtime.state.incidents["INC-C1"].status == "escalated"
            )
        )
    report = await live_report(tmp_path / "live.sqlite3", settings)
    units = {d["unit"]: d["status"] for d in report["incidents"][0]["dispatches"]}
    assert "G-YJ-CH-01" not in units, units
    assert units["G-YJ-CH-02"] == "offered", units


async def test_a_broker_restart_mid_incident_loses_nothing(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    url = BrokerURL.parse(broker.url)
    lines = SEED.read_text(encoding="utf-8").splitlines()
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("\n".join(lines[:14]) + "\n", encoding="utf-8")  # up to P-YJ-01 accepting
    rest = [json.loads(line) for line in lines[14:]]
    offset = rest[0]["at"] - 1
    second.write_text(
        "\n".join(json.dumps(r | {"at": r["at"] - offset}) for r in rest) + "\n", encoding="utf-8"
    )
    store = tmp_path / "live.sqlite3"
    async with dispatcher(settings, broker, store, speed=1.0) as running:
        await publish_recording(first, url, speed=1000)
        await wait_until(lambda: running.service.stats["published"] >= 30)
        broker.stop()
        await wait_until(lambda: not running.service.connected.is_set())
        await asyncio.sleep(1.0)
        broker.start()
        await wait_until(lambda: running.service.connected.is_set(), within=20)
        await publish_recording(second, url, speed=1000)
        await wait_until(
            lambda: (
                running.service.runtime is not None
                and running.service.runtime.state.incidents["INC-C-20211015-0001"].status
                == "closed"
            )
        )
        await asyncio.sleep(0.3)
    assert running.service.stats["connects"] >= 2
    live = await live_report(store, settings)
    assert statuses(live) == statuses(await replay(SEED, settings))
    async with Store(store) as opened:
        assert await opened.unsent(10) == []


def dispatch_status(running: Running, dispatch_id: str) -> str | None:
    runtime = running.service.runtime
    incident = (
        None if runtime is None else runtime.state.incidents.get(dispatch_id.split(":", 1)[0])
    )
    dispatch = None if incident is None else incident.dispatches.get(dispatch_id)
    return None if dispatch is None else dispatch.status


@contextlib.asynccontextmanager
async def offer_across_a_broker_restart(
    settings: Settings, broker: Mosquitto, running: Running, tmp_path: Path
) -> AsyncIterator[Handset]:
    """Escalate C1 (the patrol accepts), stop the broker until the guards' offers expire and
    the quick-police platform's offer is produced, start it again, and yield the platform's
    handset once that offer has reached it."""
    url = BrokerURL.parse(broker.url)
    script = Script()
    incident = script.escalated(0, "C1")
    script.reply(260, "P-YJ-01", "accepted", incident)
    await publish_recording(script.write(tmp_path / "e.jsonl"), url, speed=SPEED)
    await wait_until(lambda: dispatch_status(running, "INC-C1:P-YJ-01") == "accepted")
    broker.stop()
    # the guards' 30 s run out (0.3 s at this speed) with the broker away
    await wait_until(lambda: dispatch_status(running, "INC-C1:Q-YJ-YL") is not None)
    broker.start()
    handset = Handset(settings, "Q-YJ-YL", url, show=lambda _: None)
    async with handset_running(handset):
        await wait_until(
            lambda: any(e["type"] == "cn.antifraud.dispatch.offered" for e in handset.received),
            within=20,
        )
        yield handset


async def test_timers_fire_while_the_broker_is_away_and_their_offers_go_out_after(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    url = BrokerURL.parse(broker.url)
    async with open_client(url, "Q-YJ-YL", persistent=True) as platform:
        await platform.subscribe(f"{P}/units/Q-YJ-YL/dispatches", qos=1)  # a session to fill
    async with (
        dispatcher(settings, broker, tmp_path / "live.sqlite3") as running,
        offer_across_a_broker_restart(settings, broker, running, tmp_path) as handset,
    ):
        offer = next(e for e in handset.received if e["type"] == "cn.antifraud.dispatch.offered")
    assert offer["data"]["dispatch_id"] == "INC-C1:Q-YJ-YL"


async def test_a_message_is_handled_once_even_when_the_process_dies_before_committing(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """No PUBACK before the commit: the broker redelivers to the persistent session."""
    url = BrokerURL.parse(broker.url)
    store = tmp_path / "live.sqlite3"
    script = Script()
    script.call(0, "C1", CHEN, INVESTMENT, until_s=60)
    recording = script.write(tmp_path / "call.jsonl")

    running = Running(settings, broker, store)
    await running.ready()
    runtime = running.service.runtime
    assert runtime is not None

    async def dies(*_: object) -> None:
        raise RuntimeError("killed before committing")

    runtime.store.commit = dies  # type: ignore[method-assign]
    await publish_recording(recording, url, speed=SPEED)
    with pytest.raises(RuntimeError, match="killed before committing"):
        await asyncio.wait_for(running.task, 10)

    async with dispatcher(settings, broker, store) as again:
        await wait_until(
            lambda: (
                again.service.runtime is not None
                and "INC-C1" in again.service.runtime.state.incidents
            )
        )
        await asyncio.sleep(0.3)
    report = await live_report(store, settings)
    assert [i["id"] for i in report["incidents"]] == ["INC-C1"]
    assert report["incidents"][0]["opened_at"] is not None


async def test_clean_calls_are_not_flushed_one_by_one_but_reach_the_store_within_a_second(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """Messages that change nothing but bookkeeping (a call with a clean number) are
    acknowledged without a commit of their own; their processed pairs follow within a second."""
    store = tmp_path / "live.sqlite3"
    script = Script()
    for i in range(40):
        script.started(i * 0.02, f"CLEAN-{i}", CHEN, CLEAN)
    events = [line["payload"] for line in script.lines]
    async with dispatcher(settings, broker, store, speed=1.0) as running:
        runtime = running.service.runtime
        assert runtime is not None
        commits = 0
        real_commit = runtime.store.commit

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal commits
            commits += 1
            return await real_commit(*args, **kwargs)

        runtime.store.commit = counted  # type: ignore[method-assign]
        async with open_client(BrokerURL.parse(broker.url)) as source:
            for event in events:  # 40 messages over about 0.8 s, each handled on its own
                await source.publish(f"{P}/events/hengnan/calls", json.dumps(event), qos=1)
                await asyncio.sleep(0.02)
        await wait_until(lambda: runtime.counts["handled"] == 40)
        assert commits <= 3  # at most one a second, not one per message
        async with Store(store) as reader:

            async def stored() -> int:
                rows = await reader.fetchall("SELECT pairs FROM inbound")
                return sum(len(json.loads(pairs)) for (pairs,) in rows)

            deadline = asyncio.get_running_loop().time() + 3
            while await stored() < 40:
                assert asyncio.get_running_loop().time() < deadline, "pairs never stored"
                await asyncio.sleep(0.05)


async def test_a_flood_counted_unread_leaves_the_commits_on_the_event_loop(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """Commits move to the store's thread while messages arrive faster than the limit: a
    backlog to drain. A handset's flood over its channel's budget is counted unread, no
    backlog: a call warning during it is committed on the loop, as without it. (On the
    thread, its commit waited for the interpreter while the loop read the flood: escalate →
    offer went from 2 to 10 ms at the median during a flood, 50 ms at the p99.)"""
    from tools.bench_live import FLAGGED, call_bytes

    async with dispatcher(settings, broker, tmp_path / "live.sqlite3", speed=1.0) as running:
        service, runtime = running.service, running.service.runtime
        assert runtime is not None
        inline: list[bool] = []
        real_commit = runtime.store.commit

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            inline.append(kwargs.get("inline", args[2] if len(args) > 2 else True))
            return await real_commit(*args, **kwargs)

        runtime.store.commit = recorded  # type: ignore[method-assign]
        topic, sent = f"{P}/units/G-YJ-CH-01/replies", 0

        async def flood(seconds: float) -> None:
            """25,000 garbage messages a second, as the unit's session receives them."""
            nonlocal sent
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for _ in range(250):
                    message = aiomqtt.Message(topic, b"garbage %d \xff{" % sent, 0, False, 0, None)
                    service.inbox.receive_unit(None, message)  # type: ignore[arg-type]
                    sent += 1
                await asyncio.sleep(0.01)

        await flood(0.6)  # more than a window of the rate: the flood alone
        async with open_client(BrokerURL.parse(broker.url)) as source:
            call = call_bytes("progress", "FLOODED-1", "+8613900000001", FLAGGED, 200)
            await source.publish(f"{P}/events/hengnan/calls", call, qos=1)
            while "INC-FLOODED-1" not in runtime.state.incidents:
                await flood(0.05)
        await flood(0.3)
        await wait_until(lambda: not service.inbox.units)
        assert runtime.counts["suppressed"] > sent / 2  # a flood, counted unread
        assert inline and all(inline), inline


def recorded_acks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ids of the messages the live service acknowledges from now on, in order."""
    acked: list[int] = []
    real_ack = acker_stage.ack

    def ack(client: Any, message: Any) -> None:
        acked.append(message.mid)
        real_ack(client, message)

    monkeypatch.setattr(acker_stage, "ack", ack)
    return acked


async def test_outputs_leave_once_written_and_the_input_is_acknowledged_once_flushed(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Incidents opened while the disk is slow to flush: the operators see each at once (the
    next message is handled while the last commit is flushed), but the call events that
    opened them are acknowledged only when the flush is done, in order."""
    acked = recorded_acks(monkeypatch)
    script = Script()
    script.progress(0, "C1", CHEN, INVESTMENT, 30).progress(0, "C2", ZHAO, INVESTMENT, 30)
    events = [line["payload"] for line in script.lines]
    async with (
        dispatcher(settings, broker, tmp_path / "live.sqlite3", speed=1.0),
        open_client(BrokerURL.parse(broker.url)) as client,
    ):
        release = threading.Event()
        real_fdatasync = os.fdatasync

        def slow_fdatasync(fd: int) -> None:  # on the store's flush thread
            release.wait(10)
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
        await client.subscribe(f"{P}/operators/incidents", qos=1)
        received = client.messages.__aiter__()
        for event in events:
            await client.publish(f"{P}/events/hengnan/calls", json.dumps(event), qos=1)
            opened = await asyncio.wait_for(anext(received), 5)
            assert json.loads(bytes(opened.payload))["subject"] == f"INC-{event['data']['call_id']}"  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        assert acked == []  # written and published, not yet on the disk
        release.set()
        await wait_until(lambda: len(acked) == 2, within=5)
        assert acked == sorted(acked)  # in the order received


async def test_the_disk_flush_comes_after_the_commits_messages_have_left(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush of a commit written on the loop starts FLUSH_AFTER_S after it (two seconds
    here), so the disk's work stays off its messages' way to the subscribers; the call event
    that opened the incident is acknowledged only after that flush."""
    monkeypatch.setattr(processor_stage, "FLUSH_AFTER_S", 2.0)
    acked = recorded_acks(monkeypatch)
    event = Script().progress(0, "C1", CHEN, INVESTMENT, 30).lines[0]["payload"]
    async with (
        dispatcher(settings, broker, tmp_path / "live.sqlite3", speed=1.0),
        open_client(BrokerURL.parse(broker.url)) as client,
    ):
        flushes: list[float] = []
        real_fdatasync = os.fdatasync

        def recorded_fdatasync(fd: int) -> None:  # on the store's flush thread
            flushes.append(time.monotonic())
            real_fdatasync(fd)

        monkeypatch.setattr(os, "fdatasync", recorded_fdatasync)
        await client.subscribe(f"{P}/operators/incidents", qos=1)
        received = client.messages.__aiter__()
        published = time.monotonic()
        await client.publish(f"{P}/events/hengnan/calls", json.dumps(event), qos=1)
        opened = await asyncio.wait_for(anext(received), 5)
        seen = time.monotonic()
        assert json.loads(bytes(opened.payload))["subject"] == "INC-C1"  # type: ignore[arg-type]
        assert not [at for at in flushes if at > published] and acked == []
        await wait_until(lambda: len(acked) == 1, within=5)
        flushed = min(at for at in flushes if at > published)
        assert flushed > seen and flushed - published >= 2.0


async def stopped_by_a_refused_flush(running: Running) -> None:
    """The service stops by itself, soon, and with the flush's error (not stopped by a test
    timeout, whose shutdown commit would fail the same way)."""
    await asyncio.wait({running.task}, timeout=5)
    assert running.task.done(), "the service went on after a refused flush"
    error = running.task.exception()
    assert isinstance(error, FlushError) and "flushing the store to the disk failed" in str(error)


async def test_a_flush_the_disk_refuses_stops_the_service_without_acknowledging(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acked = recorded_acks(monkeypatch)
    script = Script()
    script.progress(0, "C1", CHEN, INVESTMENT, 30)
    running = Running(settings, broker, tmp_path / "live.sqlite3", speed=1.0)
    await running.ready()

    def refused(fd: int) -> None:  # the disk refuses the log's flush
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", refused)
    async with open_client(BrokerURL.parse(broker.url)) as client:
        await client.publish(
            f"{P}/events/hengnan/calls", json.dumps(script.lines[0]["payload"]), qos=1
        )
        await stopped_by_a_refused_flush(running)
    assert acked == []


async def test_a_refused_flush_of_a_commit_made_by_a_timer_stops_the_service_too(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acked = recorded_acks(monkeypatch)
    script = Script()
    script.call(0, "C1", CHEN, INVESTMENT, until_s=180)  # critical: the callback window runs
    running = Running(settings, broker, tmp_path / "live.sqlite3")
    await running.ready()
    runtime = running.service.runtime
    assert runtime is not None
    await publish_recording(
        script.write(tmp_path / "c1.jsonl"), BrokerURL.parse(broker.url), speed=SPEED
    )
    await wait_until(
        lambda: (
            "INC-C1" in runtime.state.incidents
            and runtime.state.incidents["INC-C1"].critical_at is not None
            and len(acked) == len(script.lines)  # every commit so far flushed
        )
    )
    assert runtime.state.incidents["INC-C1"].status == "open"

    def refused(fd: int) -> None:  # the disk refuses the log's flush
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", refused)
    # nothing more arrives: the window's timer escalates the incident, and its commit fails
    await stopped_by_a_refused_flush(running)
    assert runtime.state.incidents["INC-C1"].status == "escalated"


async def test_recording_live_traffic_gives_a_recording_that_replays_the_same(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    url = BrokerURL.parse(broker.url)
    out = tmp_path / "recorded.jsonl"
    stop = asyncio.Event()
    recorder = asyncio.create_task(record(settings, url, out, stop))
    await asyncio.sleep(0.3)
    await publish_recording(SEED, url, speed=SPEED)
    await asyncio.sleep(0.3)
    stop.set()
    assert await recorder == 25
    assert statuses(await replay(out, settings)) == statuses(await replay(SEED, settings))


async def test_recording_goes_on_across_a_broker_restart_and_leaves_no_session_behind(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """What is published while the recorder is cut off is recorded once it is back, in order,
    and a retained presence recorded before the restart is not recorded twice."""
    url = BrokerURL.parse(broker.url)
    lines = [json.loads(line) for line in SEED.read_text(encoding="utf-8").splitlines()]
    calls = [line for line in lines if line["topic"].endswith("/calls")][:6]
    presence = Script().status(0, "G-YJ-CH-01", "online").lines[0]
    out = tmp_path / "recorded.jsonl"

    async def publish(batch: list[dict[str, Any]]) -> None:
        async with open_client(url) as source:
            for line in batch:
                retain = line["topic"].endswith("/status")
                await source.publish(line["topic"], json.dumps(line["payload"]), 1, retain)

    def recorded_lines() -> int:
        return len(out.read_text(encoding="utf-8").splitlines()) if out.exists() else 0

    await publish([presence])  # retained: the recorder gets it as soon as it has subscribed
    stop = asyncio.Event()
    recorder = asyncio.create_task(record(settings, url, out, stop, client_id="recorder-1"))
    await wait_until(lambda: recorded_lines() == 1)
    await publish(calls[:3])
    await wait_until(lambda: recorded_lines() == 4)
    broker.restart()
    await publish(calls[3:])  # the recorder is still reconnecting: its session keeps them
    await wait_until(lambda: recorded_lines() >= 7, within=20)
    await asyncio.sleep(0.3)  # and nothing more comes (the retained presence, again)
    stop.set()
    assert await asyncio.wait_for(recorder, 10) == 7
    recorded = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["payload"]["id"] for r in recorded] == [
        line["payload"]["id"] for line in [presence, *calls]
    ]
    assert [r["at"] for r in recorded] == sorted(r["at"] for r in recorded)
    # the recorder's session was removed: nothing is queued for its id any more
    await publish(calls[:1])
    async with open_client(url, "recorder-1", persistent=True) as again:
        deadline = time.monotonic() + 1.0
        queued = [m async for m in messages_until(again, asyncio.Event(), deadline)]
    assert queued == []


async def test_publishing_a_recording_onto_a_broker_that_dies_says_how_far_it_got(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapters import recorder
    from dispatcher.errors import BrokerError

    script = Script()
    script.started(0, "C1", CHEN, CLEAN).started(3.0, "C2", ZHAO, CLEAN)
    recording = script.write(tmp_path / "two.jsonl")
    url = BrokerURL.parse(broker.url)
    acknowledged = asyncio.Event()
    original = recorder.publish_acknowledged

    async def publish_acknowledged(*args: Any) -> None:
        await original(*args)
        acknowledged.set()

    monkeypatch.setattr(recorder, "publish_acknowledged", publish_acknowledged)
    publishing = asyncio.create_task(publish_recording(recording, url, speed=1.0))
    await asyncio.wait_for(acknowledged.wait(), 10)  # the broker has the first line
    broker.kill()  # before the second, 3 s after the first
    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"after 1 line\(s\) of .*two\.jsonl were published"):
        await asyncio.wait_for(publishing, 20)
    # at the second line, not after the 10 s it could have waited for an acknowledgement
    assert time.monotonic() - started < 8


async def test_recording_refuses_a_file_that_already_holds_a_recording(
    settings: Settings, tmp_path: Path
) -> None:
    from dispatcher.errors import RecordingError

    out = tmp_path / "case.jsonl"
    earlier = SEED.read_text(encoding="utf-8")
    out.write_text(earlier, encoding="utf-8")
    with pytest.raises(RecordingError, match=r"case\.jsonl: already holds a recording"):
        await record(settings, BrokerURL.parse("mqtt://127.0.0.1:9"), out, asyncio.Event())
    assert out.read_text(encoding="utf-8") == earlier


async def test_a_delivering_client_hands_over_each_message_and_says_when_it_is_cut_off(
    broker: Mosquitto,
) -> None:
    """The dispatcher's client: messages handed over in order as they are decoded (none left
    in aiomqtt's queue), and ``disconnected`` raising ``BrokerError`` once the broker is gone."""
    url = BrokerURL.parse(broker.url)
    got: list[tuple[aiomqtt.Client, bytes]] = []
    arrived = asyncio.Event()

    def deliver(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        got.append((client, bytes(message.payload)))
        if len(got) == 3:
            arrived.set()

    async with open_client(url, "deliverer", deliver=deliver) as client:
        await client.subscribe("t/#", qos=1)
        async with open_client(url) as sender:
            for n in range(3):
                await sender.publish("t/x", f"m{n}".encode(), qos=1)
        await asyncio.wait_for(arrived.wait(), 5)
        assert got == [(client, b"m0"), (client, b"m1"), (client, b"m2")]
        assert len(client.messages) == 0
        broker.kill()
        with pytest.raises(BrokerError):
            await asyncio.wait_for(disconnected(client), 10)


async def test_published_packets_leave_at_once_and_leave_no_writer_behind(
    broker: Mosquitto,
) -> None:
    """``publish_now`` writes each packet from the call itself, in order; once all are on the
    socket, neither paho nor the event loop keeps a writer registered (which would spin)."""
    url = BrokerURL.parse(broker.url)
    async with open_client(url) as receiver, open_client(url) as sender:
        await receiver.subscribe("t/#", qos=1)
        waiting = publish_now(sender, [(f"t/{n}", f"m{n}".encode(), 1, False) for n in range(5)])
        assert not sender._client.want_write()  # all on the socket before the call returned
        loop = asyncio.get_running_loop()
        key = loop._selector.get_map().get(sender._client.socket().fileno())
        assert key is None or not key.events & selectors.EVENT_WRITE
        assert not sender._client._registered_write
        await acknowledged(sender, waiting)
        received = []
        async for message in receiver.messages:
            received.append((str(message.topic), bytes(message.payload)))
            if len(received) == 5:
                break
        assert received == [(f"t/{n}", f"m{n}".encode()) for n in range(5)]


async def test_a_large_commit_leaves_at_once_not_twenty_messages_per_round_trip(
    broker: Mosquitto,
) -> None:
    """paho holds back every QoS 1 message beyond 20 unacknowledged until acknowledgements
    return; a commit of 100 messages must be on the socket at once."""
    url = BrokerURL.parse(broker.url)
    async with open_client(url) as sender:
        waiting = publish_now(sender, [(f"t/{n}", b"m", 1, False) for n in range(100)])
        paho = sender._client
        assert paho._inflight_messages == 100
        assert not paho.want_write()  # none queued behind the others
        await asyncio.wait_for(acknowledged(sender, waiting), 10)


async def test_a_client_never_has_more_in_flight_than_the_broker_says_it_receives() -> None:
    """MQTT 5: a broker's CONNACK may carry Receive Maximum; sending more unacknowledged
    messages than that is a protocol error."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    from adapters.mqtt import IN_FLIGHT, Client

    for announced, expected in ((32, 32), (None, IN_FLIGHT), (65535, IN_FLIGHT)):
        client = Client("127.0.0.1", 1, max_inflight_messages=IN_FLIGHT)
        props = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
        if announced is not None:
            props.ReceiveMaximum = announced
        success = ReasonCode(PacketTypes.CONNACK, "Success")  # type: ignore[no-untyped-call]
        client._on_connect(client._client, None, None, success, props)
        assert client._client._max_inflight_messages == expected


async def test_mqtt_5_where_the_broker_speaks_it_else_3_1_1() -> None:
    async with local_broker("mosquitto") as (url, _), open_client(BrokerURL.parse(url)) as c5:
        assert protocol_of(c5) == "5"
    async with local_broker("amqtt") as (url, _):
        from adapters import mqtt

        mqtt._protocols.clear()  # forget what the launcher noted: find out by trying 5.0
        async with open_client(BrokerURL.parse(url)) as client:
            assert protocol_of(client) == "3.1.1"
        mqtt._protocols.clear()
        async with open_client(
            BrokerURL.parse(url), "persistent-one", persistent=True, operation_timeout=2
        ) as c:
            assert protocol_of(c) == "3.1.1"


@pytest.mark.parametrize("kind", ["mosquitto", "amqtt"])
async def test_the_demo_runs_to_the_end(settings: Settings, kind: str, tmp_path: Path) -> None:
    import io

    from tools.demo import DEFAULT_RECORDING, run_demo

    out = io.StringIO()
    async with local_broker(kind) as (url, _):
        code = await run_demo(settings, DEFAULT_RECORDING, url, speed=200.0, out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "the live run ends as its replay does" in text
    assert "G-YJ-CH-01 ▶ 接受" in text and "事件结案：已阻止\n" in text
    assert "（prevented）" not in text and "（dissuaded）" not in text  # words, not codes


def test_the_live_clock_is_not_moved_by_a_step_of_the_system_clock() -> None:
    """Timers run on the monotonic clock: a wall clock stepped an hour ahead (an NTP
    correction, a virtual machine resumed) must not expire every pending offer at once."""
    wall, monotonic = [1_000_000.0], [50.0]
    clock = Clock(speed=2.0, wall=lambda: wall[0], monotonic=lambda: monotonic[0])
    assert clock.now() == 1_000_000.0
    wall[0] += 10
    monotonic[0] += 10
    assert clock.now() == 1_000_020.0  # ten real seconds, twice as fast
    wall[0] += 3600
    assert clock.now() == 1_000_020.0
    wall[0] -= 7200
    monotonic[0] += 1
    assert clock.now() == 1_000_022.0
    # started in the past: the time since then counts, at the clock's speed
    late = Clock(speed=60.0, start=999_970.0, wall=lambda: 1_000_000.0, monotonic=lambda: 5.0)
    assert late.now() == 999_970.0 + 30 * 60


async def test_a_handset_key_never_acts_on_an_offer_that_was_stood_down(
    settings: Settings,
) -> None:
    """A guard pressing accept after his offer was taken by another guard (or expired) must
    not be shown "accepted": the key acts on the newest offer still open, or says none is."""
    shown: list[str] = []
    handset = Handset(
        settings, "G-YJ-CH-02", BrokerURL.parse("mqtt://127.0.0.1:9"), show=shown.append
    )
    replied: list[tuple[str, str]] = []

    async def reply(dispatch_id: str, verb: str, outcome: str | None = None) -> None:
        replied.append((dispatch_id, verb))

    handset.reply = reply  # type: ignore[method-assign]
    topic = f"{P}/units/G-YJ-CH-02/dispatches"

    def deliver(n: int, kind: str, dispatch_id: str) -> None:
        event = {
            "id": f"e{n}",
            "source": "antifraud/dispatcher",
            "type": f"cn.antifraud.dispatch.{kind}",
            "data": {"dispatch_id": dispatch_id, "text": "已由其他人员接警，您无需前往。"},
        }
        handset.on_message(aiomqtt.Message(topic, json.dumps(event).encode(), 1, False, n, None))

    deliver(1, "offered", "INC-A:G-YJ-CH-02")
    deliver(2, "offered", "INC-B:G-YJ-CH-02")
    deliver(3, "cancelled", "INC-B:G-YJ-CH-02")  # taken by another guard
    await handset.on_key("1")
    assert replied == [("INC-A:G-YJ-CH-02", "accepted")]  # the offer still open
    deliver(4, "cancelled", "INC-A:G-YJ-CH-02")
    await handset.on_key("1")
    assert replied == [("INC-A:G-YJ-CH-02", "accepted")]
    assert shown[-1].strip() == "当前没有待处理的出警单  [q] 退出"


def keyed_handset(
    settings: Settings,
) -> tuple[Handset, list[str], list[tuple[str, str, str | None]]]:
    """Guard G-YJ-CH-02's handset off any broker, with what it shows and the replies its
    keys make (recorded, not sent)."""
    shown: list[str] = []
    handset = Handset(
        settings, "G-YJ-CH-02", BrokerURL.parse("mqtt://127.0.0.1:9"), show=shown.append
    )
    replied: list[tuple[str, str, str | None]] = []

    async def reply(dispatch_id: str, verb: str, outcome: str | None = None) -> None:
        replied.append((dispatch_id, verb, outcome))

    handset.reply = reply  # type: ignore[method-assign]
    return handset, shown, replied


async def test_a_guard_with_two_offers_knows_which_one_each_key_is_for(
    settings: Settings,
) -> None:
    """Two residents of one estate at once: the guard's screen names the door of every
    prompt and echo, says a second offer came and which one the keys act on, [0] switches,
    and an outcome goes to the dispatch its [4] was pressed for, whatever arrives between."""
    handset, shown, replied = keyed_handset(settings)
    topic = f"{P}/units/G-YJ-CH-02/dispatches"

    def deliver(n: int, kind: str, dispatch_id: str, address: str) -> None:
        data = {"dispatch_id": dispatch_id, "address": address, "text": "反诈紧急上门"}
        if n <= 2:  # the first two offers count down their 30 s
            data["expires_at"] = datetime.fromtimestamp(time.time() + 30, UTC).isoformat()
        event = {
            "id": f"e{n}",
            "source": "antifraud/dispatcher",
            "type": f"cn.antifraud.dispatch.{kind}",
            "data": data,
        }
        handset.on_message(aiomqtt.Message(topic, json.dumps(event).encode(), 1, False, n, None))

    deliver(1, "offered", "INC-A:G-YJ-CH-02", "3栋502")
    assert not any("共有" in line for line in shown)  # one offer: nothing to choose
    deliver(2, "offered", "INC-B:G-YJ-CH-02", "7栋101")
    assert shown[-1].strip() == "⚠ 共有2张出警单：按键作用于最新一张（7栋101），按0切换"
    await asyncio.sleep(0.05)  # each offer's countdown says how to answer it
    countdowns = [line.strip() for line in shown if line.strip().startswith("⏳")]
    assert any(
        c.startswith("⏳ 7栋101：请在") and c.endswith("（按1接受，按2拒绝）") for c in countdowns
    ), countdowns
    assert any(
        c.startswith("⏳ 3栋502：请在") and c.endswith("（先按0切换到此单，再按1接受或按2拒绝）")
        for c in countdowns
    ), countdowns
    await handset.on_key("0")
    assert shown[-1].strip() == "当前出警单：3栋502（第1/2张，按0切换）"
    await handset.on_key("1")
    assert replied[-1] == ("INC-A:G-YJ-CH-02", "accepted", None)
    await handset.on_key("4")
    assert shown[-1].strip().endswith("（3栋502）")
    assert shown[-2].strip().startswith("⚠ 尚未报到达：已到门口请先按3")  # none keyed
    deliver(3, "offered", "INC-C:G-YJ-CH-02", "9栋303")  # while the outcome is asked for
    await handset.on_key("d")
    assert replied[-1] == ("INC-A:G-YJ-CH-02", "reported", "dissuaded")
    await handset.on_key("0")
    assert handset.current == "INC-A:G-YJ-CH-02"  # the keys cycle through what is open
    deliver(4, "cancelled", "INC-A:G-YJ-CH-02", "3栋502")
    assert shown[-2].strip().endswith("· 3栋502")  # the stand-down names its door
    assert shown[-1].strip().startswith("当前出警单：9栋303")
    await handset.on_key("2")
    assert replied[-1] == ("INC-C:G-YJ-CH-02", "declined", None)
    # the operator closes the incident while the guard is asked for its outcome: he is told
    deliver(5, "offered", "INC-D:G-YJ-CH-02", "2栋404")
    await handset.on_key("4")
    deliver(6, "cancelled", "INC-D:G-YJ-CH-02", "2栋404")
    assert "结果未发送：此单已结束，无需再报（2栋404）" in [line.strip() for line in shown]
    await handset.on_key("d")
    assert replied[-1] == ("INC-C:G-YJ-CH-02", "declined", None)  # nothing sent for INC-D
    for task in list(handset._tasks):  # the countdown of INC-B, still open
        task.cancel()


async def test_a_guard_asked_for_an_outcome_before_his_arrival_can_still_say_it_first(
    settings: Settings,
) -> None:
    """[4] with no [3] before it: the screen says the report will be checked by phone, and
    [3] still sends the arrival first, for the same dispatch, then the outcome is asked."""
    handset, shown, replied = keyed_handset(settings)
    data = {"dispatch_id": "INC-A:G-YJ-CH-02", "address": "3栋502", "text": "反诈紧急上门"}
    event = {"id": "e1", "source": "d", "type": "cn.antifraud.dispatch.offered", "data": data}
    topic = f"{P}/units/G-YJ-CH-02/dispatches"
    handset.on_message(aiomqtt.Message(topic, json.dumps(event).encode(), 1, False, 1, None))
    await handset.on_key("1")
    await handset.on_key("4")
    assert shown[-2].strip() == (
        "⚠ 尚未报到达：已到门口请先按3，再选结果；未上门就反馈，调度台会来电核实"
    )
    await handset.on_key("3")
    assert replied[-1] == ("INC-A:G-YJ-CH-02", "arrived", None)
    assert shown[-1].strip().startswith("结果：") and shown[-1].strip().endswith("（3栋502）")
    await handset.on_key("3")  # once arrived, [3] is not an outcome: the choices again
    assert len(replied) == 2 and shown[-1].strip().startswith("结果：")
    assert "尚未报到达" not in shown[-2]
    await handset.on_key("d")
    assert replied[-1] == ("INC-A:G-YJ-CH-02", "reported", "dissuaded")


@contextlib.asynccontextmanager
async def guard_with_an_offer(
    settings: Settings, broker: Mosquitto, tmp_path: Path, via: str | None = None
) -> AsyncIterator[tuple[Running, Handset, list[str]]]:
    """A dispatcher on the real clock (the guard's offer stays open for 30 s), C1 escalated,
    and the handset of guard G-YJ-CH-01 (with what it showed) once the offer reached it; the
    handset connects to the broker through ``via`` (a relay's URL) when given."""
    url = BrokerURL.parse(broker.url)
    script = Script()
    script.escalated(0, "C1")
    async with dispatcher(settings, broker, tmp_path / "live.sqlite3", speed=1.0) as running:
        shown: list[str] = []
        handset = Handset(
            settings, "G-YJ-CH-01", BrokerURL.parse(via or broker.url), show=shown.append
        )
        async with handset_running(handset):
            await asyncio.wait_for(handset.connected.wait(), 10)
            await publish_recording(script.write(tmp_path / "e.jsonl"), url, speed=1000)
            await wait_until(lambda: handset.current == "INC-C1:G-YJ-CH-01")
            yield running, handset, shown


async def test_a_reply_made_while_the_handset_is_cut_off_goes_out_when_it_is_back(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """The guard presses accept while his radio has no connection: the key does not fail,
    he is told the reply will go when the connection is back, and it does."""
    async with guard_with_an_offer(settings, broker, tmp_path) as (running, handset, shown):
        broker.stop()
        await wait_until(lambda: not handset.connected.is_set())
        await asyncio.wait_for(handset.on_key("1"), 5)  # the key returns at once
        assert shown[-1].strip() == f"接受：未连接，恢复连接后自动发送 · {CHEN_DOOR}"
        assert dispatch_status(running, "INC-C1:G-YJ-CH-01") == "offered"
        broker.start()
        await wait_until(
            lambda: dispatch_status(running, "INC-C1:G-YJ-CH-01") == "accepted", within=20
        )
        echo = f"📻 G-YJ-CH-01 ▶ 接受 · {CHEN_DOOR}"  # the press, with the door it is for
        await wait_until(lambda: echo in shown)
        assert shown.count(echo) == 1


async def test_a_reply_the_broker_never_acknowledged_goes_again_over_the_next_connection(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection dies between the guard's reply reaching the broker and its
    acknowledgement reaching the radio: the radio cannot know it arrived, so it sends it
    again (the same CloudEvent) over the next connection, and the dispatcher handles it once."""
    from tools import handset as handset_module

    sent: list[bytes | None] = []
    original = handset_module.publish_acknowledged

    async def publish_acknowledged(
        client: aiomqtt.Client, messages: list[tuple[str, bytes | None, int, bool]]
    ) -> None:
        sent.extend(payload for topic, payload, _, _ in messages if topic.endswith("/replies"))
        await original(client, messages)

    monkeypatch.setattr(handset_module, "publish_acknowledged", publish_acknowledged)
    async with (
        Relay(("127.0.0.1", broker.port), mqtt=True) as relay,  # the radio's way to the broker
        guard_with_an_offer(settings, broker, tmp_path, via=relay.url) as (running, handset, shown),
    ):
        # nothing about the reply comes back over this connection (the next one is not
        # affected): neither the broker's acknowledgement nor the dispatcher's receipt (a
        # receipt would stop the re-send), which the radio's MQTT library took and its
        # application never saw: only the repeat's receipt can then show
        relay.lose(PUBACK)
        relay.lose(PUBLISH, containing=b"cn.antifraud.reply.receipt", acknowledged=True)
        await asyncio.wait_for(handset.on_key("1"), 5)
        await wait_until(
            lambda: (
                dispatch_status(running, "INC-C1:G-YJ-CH-01") == "accepted"
                and any(kind_of(packet) == PUBACK for packet in relay.lost)
            )
        )
        echo = f"📻 G-YJ-CH-01 ▶ 接受 · {CHEN_DOOR}"
        assert echo not in shown  # not known to have arrived
        runtime = running.service.runtime
        assert runtime is not None
        duplicates = runtime.counts["duplicates"]
        broker.restart()
        await wait_until(lambda: echo in shown, within=20)
        await wait_until(lambda: runtime.counts["duplicates"] > duplicates, within=20)

        def receipts() -> int:
            return sum(
                line.endswith(f"◀ ✔ 接警成功：此任务由您负责，请立即上门 · {CHEN_DOOR}")
                for line in shown
            )

        # the repeat's receipt leaves once its commit is written, a moment after the repeat
        # is counted
        await wait_until(lambda: receipts() >= 1, within=10)
        await asyncio.sleep(0.3)
    assert len(sent) == 2 and sent[0] == sent[1]  # the same event, twice
    accepted = [
        e.kind
        for e in runtime.state.incidents["INC-C1"].timeline
        if e.dispatch_id == "INC-C1:G-YJ-CH-01" and e.kind == "accepted"
    ]
    assert accepted == ["accepted"]
    assert runtime.counts["rejected"] == 0

    # the repeat was answered with the receipt, shown once
    assert receipts() == 1


async def test_a_receipt_stops_the_handset_sending_its_reply_again(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's acknowledgement of the guard's accept is lost, but the dispatcher's
    receipt arrives: the handset knows the reply is in, shows it in Chinese, and does not
    send it again after the reconnect."""
    from tools import handset as handset_module

    sent: list[bytes | None] = []
    original = handset_module.publish_acknowledged

    async def publish_acknowledged(
        client: aiomqtt.Client, messages: list[tuple[str, bytes | None, int, bool]]
    ) -> None:
        sent.extend(payload for topic, payload, _, _ in messages if topic.endswith("/replies"))
        await original(client, messages)

    monkeypatch.setattr(handset_module, "publish_acknowledged", publish_acknowledged)
    async with (
        Relay(("127.0.0.1", broker.port), mqtt=True) as relay,  # the radio's way to the broker
        guard_with_an_offer(settings, broker, tmp_path, via=relay.url) as (running, handset, shown),
    ):
        # the countdown, shown once the offer is in
        countdown = f"⏳ {CHEN_DOOR}：请在"
        await wait_until(lambda: any(line.strip().startswith(countdown) for line in shown))
        relay.lose(PUBACK)  # the broker's acknowledgements do not reach the radio
        await asyncio.wait_for(handset.on_key("1"), 5)
        receipt = f"◀ ✔ 接警成功：此任务由您负责，请立即上门 · {CHEN_DOOR}"
        await wait_until(lambda: any(line.endswith(receipt) for line in shown), within=20)
        assert any(kind_of(packet) == PUBACK for packet in relay.lost)  # the receipt alone
        assert not handset._unsent and not handset._unanswered
        runtime = running.service.runtime
        assert runtime is not None
        broker.restart()
        await wait_until(lambda: handset.connected.is_set(), within=20)
        await asyncio.sleep(1.0)
    assert len(sent) == 1
    assert "⚠ 连接中断，正在重连…" in shown and shown.count("📶 已连接") == 2


def test_a_handset_shows_a_refusal_in_chinese_and_lets_go_of_the_offer(
    settings: Settings,
) -> None:
    shown: list[str] = []
    handset = Handset(
        settings, "G-YJ-CH-02", BrokerURL.parse("mqtt://127.0.0.1:9"), show=shown.append
    )
    topic = f"{P}/units/G-YJ-CH-02/dispatches"
    offer = {
        "id": "o1",
        "source": "s",
        "type": "cn.antifraud.dispatch.offered",
        "data": {"dispatch_id": "INC-A:G-YJ-CH-02", "text": "t"},
    }
    handset.on_message(aiomqtt.Message(topic, json.dumps(offer).encode(), 1, False, 1, None))
    assert handset.current == "INC-A:G-YJ-CH-02"
    receipt = {
        "id": "r1",
        "source": "s",
        "type": "cn.antifraud.reply.receipt",
        "data": {
            "reply_id": "x",
            "dispatch_id": "INC-A:G-YJ-CH-02",
            "reply": "accepted",
            "status": "refused",
            "code": "incident_closed",
            "reason": "事件已结案，无需前往",
            "text": "操作被拒绝：事件已结案，无需前往",
        },
    }
    handset.on_message(aiomqtt.Message(topic, json.dumps(receipt).encode(), 1, False, 2, None))
    # the offer named no address: the refusal names its dispatch
    assert shown[-1].endswith("◀ ✖ 操作被拒绝：事件已结案，无需前往 · INC-A:G-YJ-CH-02")
    assert handset.current is None
    assert not any(line.lstrip().startswith("{") for line in shown)


async def test_a_lost_connection_is_not_logged_again_when_its_future_is_collected(
    broker: Mosquitto,
) -> None:
    """A connection that dies while its client is idle (a console between actions, a radio
    between replies) must not be logged again later, out of context, by asyncio as "Future
    exception was never retrieved" (a radio's terminal would show it to the guard)."""
    import gc

    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unhandled.append(context))
    try:
        async with Relay(("127.0.0.1", broker.port)) as relay:
            async with open_client(BrokerURL.parse(relay.url), "idle") as client:
                relay.drop()  # no goodbye from either side
                await asyncio.sleep(0.5)  # the client sees its socket closed
            del client
            gc.collect()
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unhandled == []


async def test_publishing_stops_at_once_when_the_broker_dies_before_acknowledging(
    broker: Mosquitto,
) -> None:
    """aiomqtt's publish() would wait out its whole operation timeout for an acknowledgement
    that can no longer come; ``publish_acknowledged`` says so the moment the connection ends."""
    from adapters.mqtt import publish_acknowledged

    async with (
        acknowledgements_lost(broker) as relay,
        open_client(BrokerURL.parse(relay.url), "impatient", operation_timeout=600) as client,
    ):
        sending = asyncio.create_task(
            publish_acknowledged(client, [(f"{P}/events/hengnan/calls", b"{}", 1, False)])
        )
        await asyncio.sleep(0.3)
        assert not sending.done()  # its acknowledgement is withheld
        broker.kill()
        with pytest.raises(BrokerError, match="connection was lost"):
            await asyncio.wait_for(sending, 20)


def test_handset_scripts_count_each_delay_from_the_previous_step() -> None:
    from tools.handset import auto_script

    assert auto_script(5, 60, 30, "dissuaded") == [
        Step("accepted", 5),
        Step("arrived", 65),
        Step("reported", 95, "dissuaded"),
    ]
    assert auto_script(3, None, None, "x", decline=True) == [Step("declined", 3)]


async def test_a_broker_restart_without_persistence_loses_nothing_the_dispatcher_holds(
    settings: Settings, tmp_path: Path
) -> None:
    """The broker forgets every session; the dispatcher subscribes again and its outbox,
    filled by timers while the broker was away, goes out to a handset that is back."""
    # the platform's offer must outlast the reconnections on a busy machine (at this clock
    # speed its 60 s are 0.6 s): what is tested is that its answer is heard again
    dispatch = settings.dispatch.model_copy(update={"police_accept_s": 3000.0})
    settings = dataclasses.replace(settings, dispatch=dispatch)
    broker = Mosquitto(tmp_path / "forgetful", persistence=False)
    broker.start()
    try:
        async with (
            dispatcher(settings, broker, tmp_path / "live.sqlite3") as running,
            offer_across_a_broker_restart(settings, broker, running, tmp_path) as handset,
        ):
            # and the dispatcher hears again: the platform's acceptance is handled
            await handset.reply("INC-C1:Q-YJ-YL", "accepted")
            await wait_until(
                lambda: dispatch_status(running, "INC-C1:Q-YJ-YL") == "accepted", within=20
            )
    finally:
        broker.kill()


async def test_a_dispatcher_started_before_its_broker_connects_when_it_appears(
    settings: Settings, tmp_path: Path
) -> None:
    from adapters.broker import free_port

    broker = Mosquitto(tmp_path / "late", port=free_port())
    running = Running(settings, broker, tmp_path / "live.sqlite3")
    try:
        await asyncio.sleep(1.5)  # several attempts fail meanwhile, each logged
        assert not running.service.connected.is_set()
        broker.start()
        await asyncio.wait_for(running.service.ready.wait(), 40)
        await running.finish()
    finally:
        broker.kill()


async def test_recording_for_a_duration_keeps_receiving_across_quiet_gaps(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    url = BrokerURL.parse(broker.url)
    out = tmp_path / "recorded.jsonl"
    recorder = asyncio.create_task(record(settings, url, out, asyncio.Event(), duration=2.0))
    await asyncio.sleep(0.3)
    async with open_client(url) as source:
        for gap in (0.0, 0.6, 0.6):  # quiet gaps longer than nothing, shorter than the duration
            await asyncio.sleep(gap)
            await source.publish(
                f"{P}/events/hengnan/calls",
                json.dumps(json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])["payload"]),
                qos=1,
            )
    assert await recorder == 3


async def test_a_backlog_arriving_before_the_subscription_is_confirmed_is_acknowledged(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A persistent session's queued messages flow as soon as the broker accepts the
    connection, before it confirms the subscription. Each must still be acknowledged on the
    connection it came over: otherwise the broker's in-flight window fills with messages
    never acknowledged and stops delivering for good (here a window of 5)."""
    from adapters.broker import CONFIG

    conf = tmp_path / "narrow.conf"
    text = CONFIG.read_text(encoding="utf-8")
    assert "max_inflight_messages 1000" in text
    conf.write_text(text.replace("max_inflight_messages 1000", "max_inflight_messages 5"))
    broker = Mosquitto(tmp_path / "narrow", config=conf)
    broker.start()
    try:
        store = tmp_path / "live.sqlite3"
        async with dispatcher(settings, broker, store):  # creates its persistent session
            pass
        script = Script()
        for i in range(30):
            script.started(i * 0.01, f"CLEAN-{i}", CHEN, CLEAN)
        async with open_client(BrokerURL.parse(broker.url)) as source:
            for line in script.lines:
                await source.publish(line["topic"], json.dumps(line["payload"]), qos=1)

        real_subscribe = aiomqtt.Client.subscribe

        async def slow_subscribe(self: aiomqtt.Client, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0.5)  # the backlog arrives and is handled meanwhile
            return await real_subscribe(self, *args, **kwargs)

        monkeypatch.setattr(aiomqtt.Client, "subscribe", slow_subscribe)
        async with dispatcher(settings, broker, store) as running:
            runtime = running.service.runtime
            assert runtime is not None
            await wait_until(lambda: runtime.counts["handled"] == 30)
    finally:
        broker.kill()


async def test_the_private_broker_keeps_sessions_and_retained_state_across_a_restart(
    broker: Mosquitto,
) -> None:
    """What the shipped config promises, also when the broker is started by root (Mosquitto
    then switches to another user, which must still be able to write its persistence file)."""
    url = BrokerURL.parse(broker.url)
    async with open_client(url, "handset-keeper", persistent=True) as handset:
        await handset.subscribe("t/dispatches", qos=1)
    async with open_client(url) as publisher:
        await publisher.publish("t/state", b"retained", qos=1, retain=True)
        await publisher.publish("t/dispatches", b"queued", qos=1)
    broker.restart()
    async with open_client(url, "handset-keeper", persistent=True) as handset:
        messages = handset.messages.__aiter__()
        queued = await asyncio.wait_for(anext(messages), 5)  # no new subscription needed
        await handset.subscribe("t/state", qos=1)
        retained = await asyncio.wait_for(anext(messages), 5)
    assert (queued.topic.value, queued.payload) == ("t/dispatches", b"queued")
    assert (retained.topic.value, retained.payload) == ("t/state", b"retained")
    assert "Permission denied" not in broker.log.read_text(errors="replace")


async def test_an_alive_line_says_what_flowed_and_what_waits(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """The heartbeat an engineer on call reads to tell a quiet service from a stuck one."""
    import io

    from dispatcher import logs

    script = Script()
    script.call(0, "C1", CHEN, INVESTMENT, until_s=60)  # started, progress 30 s (a warning), …
    # a listed operator's action, which the session of every operator's actions receives too
    script.callback(45, "INC-C1", "no_answer")
    stream = io.StringIO()
    logs.configure("info", stream)
    try:
        service = LiveService(
            settings,
            BrokerURL.parse(broker.url),
            tmp_path / "live.sqlite3",
            Clock(SPEED),
            client_id="dispatcher-alive",
            heartbeat_s=0.2,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.ready.wait(), 10)
        await publish_recording(
            script.write(tmp_path / "c1.jsonl"), BrokerURL.parse(broker.url), speed=SPEED
        )
        runtime = service.runtime
        assert runtime is not None
        handled = len(script.lines)

        def settled() -> list[dict[str, Any]]:
            """Heartbeats saying everything was handled, acknowledged and sent."""
            lines = map(json.loads, stream.getvalue().splitlines())
            return [
                line
                for line in lines
                if line["event"] == "alive"
                and line["handled"] == handled
                and line["handled_not_yet_acknowledged"] == 0
                and line["committed_not_yet_sent"] == 0
                and line["sent"] == line["produced"]
            ]

        await wait_until(lambda: bool(settled()))  # the counts converge: nothing stays waiting
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        logs.configure("warning")
    last = settled()[-1]
    assert last["connected"] is True
    assert (last["handled"], last["rejected"], last["suppressed"]) == (handled, 0, 0)
    assert (last["received"], last["copies"]) == (handled + 1, 1)
    assert last["open_incidents"] == 1
    assert last["produced"] >= 1
    assert last["received_not_yet_handled"] == 0


async def test_a_message_the_broker_refuses_is_logged_as_an_error_with_its_topic(
    tmp_path: Path,
) -> None:
    """MQTT 5 brokers acknowledge a message their ACL refuses, with a failure reason, and
    drop it: an engineer must see that in the log, not find the offer missing."""
    import io

    from adapters.broker import CONFIG
    from dispatcher import logs

    acl = tmp_path / "acl"
    acl.write_text("topic readwrite allowed/#\n", encoding="utf-8")
    conf = tmp_path / "acl.conf"
    conf.write_text(CONFIG.read_text(encoding="utf-8") + f"acl_file {acl}\n", encoding="utf-8")
    broker = Mosquitto(tmp_path / "acl-broker", config=conf)
    broker.start()
    stream = io.StringIO()
    logs.configure("info", stream)
    try:
        async with open_client(BrokerURL.parse(broker.url)) as client:
            assert protocol_of(client) == "5"
            waiting = publish_now(
                client, [("allowed/x", b"1", 1, False), ("antifraud/v1/denied", b"2", 1, False)]
            )
            await asyncio.wait_for(acknowledged(client, waiting), 5)
    finally:
        logs.configure("warning")
        broker.kill()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    refused = [line for line in lines if line["event"] == "publish_refused"]
    assert [(r["topic"], r["level"]) for r in refused] == [("antifraud/v1/denied", "error")]
    assert "authori" in refused[0]["reason"].lower()


async def test_a_stop_while_the_dispatcher_connects_ends_the_run_and_never_says_online(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retained presence must never say online for a dispatcher that has stopped, and a
    stop must not wait on a session that was connecting: a stop that comes while the
    sessions connect ends the run, and online never follows."""
    from adapters import mqtt

    status_topic = f"{settings.service.prefix}/dispatcher/status"
    stop = asyncio.Event()
    service = LiveService(
        settings, BrokerURL.parse(broker.url), tmp_path / "live.sqlite3", Clock(speed=SPEED)
    )
    original_connect = mqtt.Client.__aenter__

    async def connect(self: mqtt.Client) -> Any:
        if self.identifier == service.client_id:  # the session that says online
            stop.set()
            await asyncio.sleep(0.3)  # the stop is under way, and the other sessions connect
        return await original_connect(self)

    monkeypatch.setattr(mqtt.Client, "__aenter__", connect)
    await asyncio.wait_for(service.run(stop), 5)
    monkeypatch.undo()
    async with open_client(BrokerURL.parse(broker.url)) as reader:
        await reader.subscribe(status_topic, qos=1)
        with contextlib.suppress(TimeoutError):
            retained = await asyncio.wait_for(anext(reader.messages.__aiter__()), 2)
            assert json.loads(bytes(retained.payload))["data"] == {"state": "offline"}  # type: ignore[arg-type]


async def test_operators_actions_are_read_on_their_own_session_not_the_publishing_one(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """The main session publishes and reads nothing: a flood on an operator's topic can fill
    only the operators' session's queue at the broker, never the one the acknowledgements of
    the dispatcher's messages wait in. A main session that an earlier version subscribed to
    the actions (a persistent session keeps its subscriptions) is unsubscribed: each action
    arrives once, on the operators' session."""
    from tools.bench_live import FLAGGED, call_bytes

    url = BrokerURL.parse(broker.url)
    async with open_client(url, "dispatcher-under-test", persistent=True) as earlier:
        await earlier.subscribe(f"{P}/operators/+/actions", qos=1)  # what it used to read
    async with (
        dispatcher(settings, broker, tmp_path / "live.sqlite3") as running,
        open_client(url) as console,
    ):
        assert running.service.sessions[""] == []
        await console.subscribe(f"{P}/operators/incidents", qos=1)
        received = console.messages.__aiter__()
        calls = f"{P}/events/{settings.service.region}/calls"
        await console.publish(calls, call_bytes("progress", "OWN", CHEN, FLAGGED, 130), qos=1)
        await asyncio.wait_for(anext(received), 5)
        action = escalation("INC-OWN", "op-01-esc-own")
        await console.publish(f"{P}/operators/op-01/actions", json.dumps(action), qos=1)
        while True:
            message = await asyncio.wait_for(anext(received), 5)
            data = json.loads(bytes(message.payload))["data"]  # type: ignore[arg-type]
            if data["status"] == "escalated":
                break
        # an operator the deployment does not list is read on the session of every
        # operator's actions (decisions.md 101): only the broker's ACL may refuse him
        assert "op-99" not in settings.access.operators
        close = action | {
            "id": "op-99-close-own",
            "source": "console/op-99",
            "type": "cn.antifraud.operator.close",
            "data": {"incident_id": "INC-OWN", "outcome": "false_alarm"},
        }
        await console.publish(f"{P}/operators/op-99/actions", json.dumps(close), qos=1)
        while True:
            message = await asyncio.wait_for(anext(received), 5)
            data = json.loads(bytes(message.payload))["data"]  # type: ignore[arg-type]
            if data["status"] == "closed":
                break
        # a second copy, if the main session still read it, or if the session of every
        # operator's actions read op-01's again
        await asyncio.sleep(0.5)
        runtime = running.service.runtime
        assert runtime is not None and runtime.counts["duplicates"] == 0
        assert runtime.counts["handled"] == 3


async def test_an_action_queued_only_for_every_operators_session_is_read(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """The first start of a version with a session per operator: an action sent while the
    dispatcher was down waits only in the session of every operator's actions (his own
    session did not exist yet). It is read from there, once."""
    from tools.bench_live import FLAGGED, call_bytes

    url = BrokerURL.parse(broker.url)
    store = tmp_path / "live.sqlite3"
    async with dispatcher(settings, broker, store) as first, open_client(url) as console:
        await console.subscribe(f"{P}/operators/incidents", qos=1)
        calls = f"{P}/events/{settings.service.region}/calls"
        await console.publish(calls, call_bytes("progress", "UPG", CHEN, FLAGGED, 130), qos=1)
        await asyncio.wait_for(anext(console.messages.__aiter__()), 5)
        await wait_until(lambda: first.service.acker.unacknowledged == 0)
    # op-01's own session as if it had never been made: an earlier version had none
    async with open_client(url, "dispatcher-under-test-operator-op-01", persistent=False):
        pass
    action = escalation("INC-UPG", "op-01-esc-upg")
    async with open_client(url) as console:
        await console.publish(f"{P}/operators/op-01/actions", json.dumps(action), qos=1)
    async with dispatcher(settings, broker, store) as running:
        runtime = running.service.runtime
        assert runtime is not None
        await wait_until(lambda: runtime.state.incidents["INC-UPG"].status == "escalated")
        await asyncio.sleep(0.5)
        assert runtime.counts["duplicates"] == 0


async def test_an_operators_flood_never_costs_another_operator_his_action(
    settings: Settings, tmp_path: Path
) -> None:
    """Each listed operator's actions come on a session of the dispatcher's own: a flood on
    one operator's topic (his lost credentials, QoS 1 at full speed) fills only that
    session's queue at the broker. Here the queue holds 20 messages behind a window of 5:
    with one session for every operator, the broker dropped another operator's escalation
    queued behind the flood; now it is applied, and once."""
    from adapters.broker import CONFIG
    from tools.bench_live import FLAGGED, call_bytes

    assert settings.access.operators == ["op-01", "op-02"]
    conf = tmp_path / "short.conf"
    text = CONFIG.read_text(encoding="utf-8")
    for setting in ("max_queued_messages 100000", "max_inflight_messages 1000"):
        assert setting in text
    text = text.replace("max_queued_messages 100000", "max_queued_messages 20")
    conf.write_text(text.replace("max_inflight_messages 1000", "max_inflight_messages 5"))
    broker = Mosquitto(tmp_path / "short", config=conf)
    broker.start()
    url = BrokerURL.parse(broker.url)
    stop = asyncio.Event()
    flooded = 0

    async def flood(client: aiomqtt.Client) -> None:
        nonlocal flooded
        topic = f"{P}/operators/op-02/actions"
        while not stop.is_set():
            sent = [client.publish(topic, b"flood %d" % (flooded + i), qos=1) for i in range(200)]
            await asyncio.gather(*sent)
            flooded += len(sent)

    try:
        async with (
            dispatcher(settings, broker, tmp_path / "live.sqlite3") as running,
            open_client(url) as console,
            open_client(url) as flooder,
        ):
            # assert "operator-op-01" in running.service.sessions
            await console.subscribe(f"{P}/operators/incidents", qos=1)
            received = console.messages.__aiter__()
            calls = f"{P}/events/{settings.service.region}/calls"
            await console.publish(calls, call_bytes("progress", "FLOOD", CHEN, FLAGGED, 130), qos=1)
            await asyncio.wait_for(anext(received), 5)
            flooding = asyncio.create_task(flood(flooder))
            await wait_until(lambda: flooded >= 2000)  # the operators' queues are full now
            action = escalation("INC-FLOOD", "op-01-esc-flood")
            await console.publish(f"{P}/operators/op-01/actions", json.dumps(action), qos=1)
            try:
                async with asyncio.timeout(10):
                    while True:
                        message = await anext(received)
                        data = json.loads(bytes(message.payload))["data"]  # type: ignore[arg-type]
                        if data["status"] == "escalated":
                            break
            finally:
                stop.set()
                await flooding
            runtime = running.service.runtime
            assert runtime is not None and runtime.counts["duplicates"] == 0
            assert runtime.counts["suppressed"] > 0  # the flood was read, and over budget
    finally:
        broker.kill()


@contextlib.asynccontextmanager
async def acknowledgements_lost(
    broker: Mosquitto, at_most: int | None = None
) -> AsyncIterator[Relay]:
    """A way to ``broker`` (``relay.url``) on which the broker's acknowledgements of a
    client's messages (the first ``at_most`` of them, or all) never come back, on every
    connection through it; each one lost is in ``relay.lost``."""
    async with Relay(("127.0.0.1", broker.port), mqtt=True) as relay:
        relay.lose(PUBACK, at_most=at_most, later_connections=True)
        yield relay


async def test_outputs_do_not_wait_for_the_broker_to_acknowledge_the_dispatchers_presence(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """While Mosquitto sends the dispatcher a persistent session's backlog it holds back its
    acknowledgements of the dispatcher's own messages, the online announcement too, for
    seconds: offers must not wait for that. Here that acknowledgement never comes."""
    from tools.bench_live import CHEN as RESIDENT
    from tools.bench_live import FLAGGED, call_bytes

    url = BrokerURL.parse(broker.url)
    async with (
        # the first QoS 1 message of the dispatcher's: its presence
        acknowledgements_lost(broker, at_most=1) as relay,
        open_client(url) as console,
    ):
        await console.subscribe(f"{P}/operators/incidents", qos=1)
        async with dispatcher(settings, broker, tmp_path / "live.sqlite3", via=relay.url):
            async with open_client(url) as feed:
                call = call_bytes("progress", "LATE-ACK", RESIDENT, FLAGGED, 30)
                await feed.publish(f"{P}/events/{settings.service.region}/calls", call, qos=1)
            message = await asyncio.wait_for(anext(console.messages.__aiter__()), 5)
    assert json.loads(bytes(message.payload))["subject"] == "INC-LATE-ACK"  # type: ignore[arg-type]
    assert len(relay.lost) == 1


async def test_a_connection_whose_acknowledgements_never_come_is_replaced(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An acknowledgement the broker dropped never comes: past ``ACK_WAIT_S`` for the
    oldest, the connection is given up and replaced, and what was not acknowledged goes
    again from the store, until nothing committed is left unsent (before, the messages
    waited for ever and, once 1,000 did, nothing more went out)."""
    from tools.bench_live import FLAGGED, call_bytes

    monkeypatch.setattr(publisher_stage, "ACK_WAIT_S", 1.0)
    url = BrokerURL.parse(broker.url)
    store = tmp_path / "live.sqlite3"
    calls = f"{P}/events/{settings.service.region}/calls"
    # the first three acknowledgements: the presence, then both messages of the incident
    async with acknowledgements_lost(broker, at_most=3) as relay, open_client(url) as console:
        await console.subscribe(f"{P}/operators/incidents", qos=1)
        async with dispatcher(settings, broker, store, via=relay.url) as running:
            await console.publish(calls, call_bytes("progress", "NOACK", CHEN, FLAGGED, 30), qos=1)
            message = await asyncio.wait_for(anext(console.messages.__aiter__()), 5)
            assert json.loads(bytes(message.payload))["subject"] == "INC-NOACK"  # type: ignore[arg-type]
            publisher = running.service.publisher
            assert publisher is not None
            await wait_until(
                lambda: (
                    publisher.replaced >= 1
                    and publisher.published >= 2
                    # and none left waiting: the two, sent again, were acknowledged
                    and publisher.waiting == 0
                )
            )
    assert len(relay.lost) == 3
    async with Store(store) as reopened:
        assert await reopened.fetchall("SELECT count(*) FROM outbox WHERE sent = 0") == [(0,)]


async def test_outputs_go_out_while_earlier_ones_wait_for_the_broker_to_acknowledge_them(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """A broker sending the dispatcher a backlog holds its acknowledgements back until the
    backlog is through, while it routes the dispatcher's messages at once. The next
    incident's messages must not wait for the last one's acknowledgements; here they never
    come."""
    from tools.bench_live import FLAGGED, call_bytes

    url = BrokerURL.parse(broker.url)
    calls = f"{P}/events/{settings.service.region}/calls"
    async with acknowledgements_lost(broker) as relay, open_client(url) as console:
        await console.subscribe(f"{P}/operators/incidents", qos=1)
        received = console.messages.__aiter__()
        async with (
            dispatcher(settings, broker, tmp_path / "live.sqlite3", via=relay.url),
            open_client(url) as feed,
        ):
            for call_id, resident in (("FIRST", CHEN), ("SECOND", ZHAO)):
                await feed.publish(
                    calls, call_bytes("progress", call_id, resident, FLAGGED, 30), qos=1
                )
                message = await asyncio.wait_for(anext(received), 5)
                assert json.loads(bytes(message.payload))["subject"] == f"INC-{call_id}"  # type: ignore[arg-type]
    assert len(relay.lost) >= 4  # presence, then two messages per incident: none acknowledged


async def test_a_broker_restart_in_the_middle_of_a_burst_loses_no_output(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker goes away during a catch-up while the dispatcher has messages written and
    not yet acknowledged, and more committed behind them: every incident still reaches the
    operators (repeats allowed: same ids), and the outbox ends with nothing unsent. The
    publisher's reads of the store are slowed, so acknowledgements arrive while it reads: it
    must not miss them and wait for ever."""
    from tools.bench_live import FLAGGED, call_bytes

    url = BrokerURL.parse(broker.url)
    count = 1200
    async with open_client(url, "console-under-test", persistent=True) as console:
        await console.subscribe(f"{P}/operators/incidents", qos=1)
    first = time.time() - count / 1000  # stamped as a feed of 1,000 calls a second sent them
    calls = [
        call_bytes(
            "progress", f"B-{i}", f"+8613{i + 500_000_000:09d}", FLAGGED, 30, first + i / 1000
        )
        for i in range(count)
    ]
    store = tmp_path / "live.sqlite3"
    in_flight_at_stop: list[int] = []
    original_write = Publisher.write

    def write(self: Publisher, client: aiomqtt.Client, rows: list[Any]) -> None:
        original_write(self, client, rows)
        if self.published >= 100 and not in_flight_at_stop:
            in_flight_at_stop.append(self.in_window)  # written, not yet acknowledged
            broker.stop()  # at once: those acknowledgements never come

    async with dispatcher(settings, broker, store):
        pass  # its session now exists: the burst waits there for it, as after an outage
    async with open_client(url) as feed:
        for call in calls:
            await feed.publish(f"{P}/events/{settings.service.region}/calls", call, qos=1)
    original_unsent = Store.unsent

    async def unsent(self: Store, *args: Any, **kwargs: Any) -> Any:
        rows = await original_unsent(self, *args, **kwargs)
        await asyncio.sleep(0.1)  # a slow read: acknowledgements arrive meanwhile
        return rows

    monkeypatch.setattr(Publisher, "write", write)
    monkeypatch.setattr(Store, "unsent", unsent)
    async with dispatcher(settings, broker, store) as running:
        await wait_until(lambda: bool(in_flight_at_stop), within=30)
        await asyncio.sleep(0.5)
        broker.start()
        runtime = running.service.runtime
        assert runtime is not None
        await wait_until(lambda: len(runtime.state.incidents) == count, within=60)
        await wait_until(lambda: running.service.stats["published"] >= 2 * count, within=60)
    async with Store(store) as opened:
        assert await opened.unsent(10) == []
    subjects: set[str] = set()
    async with open_client(url, "console-under-test", persistent=True) as console:
        await console.subscribe(f"{P}/operators/incidents", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                async for message in console.messages:
                    subjects.add(json.loads(bytes(message.payload))["subject"])  # type: ignore[arg-type]
                    if len(subjects) == count:
                        break
    assert subjects == {f"INC-B-{i}" for i in range(count)}
    assert in_flight_at_stop[0] > 0


async def test_every_reply_on_the_broker_gets_its_receipt_applied_or_refused(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """On a real broker: an accept, its redelivery, a second guard's accept (taken), a reply
    naming another unit's dispatch and one for no dispatch each get a receipt on the
    speaker's own dispatches topic, valid against its schema; the duplicate's is the same."""
    from dispatcher.inbound import cloudevent
    from dispatcher.protocol import validate_outbound

    url = BrokerURL.parse(broker.url)
    script = Script()
    script.escalated(0, "C1")

    def reply(n: int, unit: str, verb: str, dispatch: str) -> tuple[str, bytes]:
        event = cloudevent(
            f"r-{n}", f"unit/{unit}", f"cn.antifraud.unit.{verb}", {"dispatch_id": dispatch}
        )
        return f"{P}/units/{unit}/replies", json.dumps(event).encode()

    sends = [
        reply(1, "G-YJ-CH-01", "accepted", "INC-C1:G-YJ-CH-01"),
        reply(1, "G-YJ-CH-01", "accepted", "INC-C1:G-YJ-CH-01"),  # redelivered
        reply(2, "G-YJ-CH-02", "accepted", "INC-C1:G-YJ-CH-02"),  # taken
        reply(3, "G-YJ-CH-02", "arrived", "INC-C1:G-YJ-CH-01"),  # not its dispatch
        reply(4, "P-YJ-01", "accepted", "INC-NONE:P-YJ-01"),  # unknown
    ]
    got: list[tuple[str, dict[str, Any]]] = []
    async with (
        dispatcher(settings, broker, tmp_path / "live.sqlite3", speed=1.0) as running,
        open_client(url, "receipt-watcher") as watcher,
    ):
        await watcher.subscribe(f"{P}/units/+/dispatches", qos=1)
        await publish_recording(script.write(tmp_path / "e.jsonl"), url, speed=1000)
        await wait_until(lambda: dispatch_status(running, "INC-C1:G-YJ-CH-01") == "offered")

        async def collect() -> None:
            async for message in watcher.messages:
                event = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                if event["type"] == "cn.antifraud.reply.receipt":
                    validate_outbound(event)
                    got.append((str(message.topic).split("/")[-2], event))

        collecting = asyncio.create_task(collect())
        async with open_client(url, "reply-sender") as sender:
            for topic, payload in sends:
                await sender.publish(topic, payload, qos=1)
                await asyncio.sleep(0.2)
        await wait_until(lambda: len(got) == len(sends), within=20)
        collecting.cancel()
    summary = [
        (unit, e["data"]["reply_id"], e["data"]["status"], e["data"].get("code")) for unit, e in got
    ]
    assert summary == [
        ("G-YJ-CH-01", "r-1", "applied", None),
        ("G-YJ-CH-01", "r-1", "applied", None),
        ("G-YJ-CH-02", "r-2", "refused", "taken"),
        ("G-YJ-CH-02", "r-3", "refused", "not_your_dispatch"),
        ("P-YJ-01", "r-4", "refused", "unknown_dispatch"),
    ]
    assert got[0][1] == got[1][1]  # the same event again


async def test_a_call_the_broker_kept_is_refused_live_and_recorded_as_kept(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """A source that publishes retained by mistake (or a party planting a message) leaves it
    on the broker, sent again on every subscription: it is refused, not taken as new input,
    and a recording says it was kept, so that its replay refuses it too (decisions.md 94)."""
    url = BrokerURL.parse(broker.url)
    flagged = json.loads(SEED.read_text(encoding="utf-8").splitlines()[6])
    assert flagged["payload"]["data"]["duration_s"] >= 180  # critical: it would open one
    async with open_client(url) as source:
        await source.publish(flagged["topic"], json.dumps(flagged["payload"]), qos=1, retain=True)
    out = tmp_path / "recorded.jsonl"
    recorder = asyncio.create_task(record(settings, url, out, asyncio.Event(), duration=1.5))
    async with dispatcher(settings, broker, tmp_path / "s.sqlite3") as running:
        runtime = running.service.runtime
        assert runtime is not None
        await wait_until(lambda: runtime.counts["rejected"] == 1)
        assert runtime.state.incidents == {}
    assert await recorder == 1
    (line,) = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["retained"] is True
    report = await replay(out, settings)
    assert report["incidents"] == []
    assert "a retained message" in report["rejected"][0]["reason"]


def test_a_police_app_names_an_unregistered_resident_as_such(settings: Settings) -> None:
    from tools.handset import render

    event = {
        "type": "cn.antifraud.dispatch.offered",
        "data": {
            "dispatch_id": "INC-C1:P-YJ-01",
            "incident": {"subscriber": {"msisdn": "+8613999999999", "known": False}},
        },
    }
    (_, resident, *_) = render(settings.units["P-YJ-01"], event)
    assert "未登记用户" in resident and "?" not in resident
