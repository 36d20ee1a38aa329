"""Attacks with one party's own credentials, on a real Mosquitto running the shipped config.

The threat model (docs/RELIABILITY.md): any one party's credentials can at most spoil that
party's own messages. Each test here is an attack that worked before the dispatcher and the
broker config were hardened against it; each holds only a guard's radio (G-YJ-CH-01).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_security import SecureBroker
from test_security import secure as secure  # the fixture, under its name

from adapters.live import Clock, LiveService
from adapters.mqtt import open_client
from adapters.replay import replay
from dispatcher.inbound import cloudevent
from dispatcher.outbound import Topics
from dispatcher.settings import Settings
from tools.bench_live import FLAGGED, call_bytes, percentile

P = "antifraud/v1"
TOPICS = Topics(P)
ATTACKER = "G-YJ-CH-01"
VICTIM = "G-YJ-CH-02"  # the other guard of 春晖小区
SOURCE = "app-warning-hengnan"
CHEN = "+8613800000001"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed")


@contextlib.asynccontextmanager
async def dispatching(
    settings: Settings, secure: SecureBroker, store: Path
) -> AsyncIterator[LiveService]:
    service = LiveService(settings, secure.url("dispatcher", tls=False), store, Clock())
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), 15)
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def until(condition: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def incident_count(service: LiveService) -> int:
    assert service.runtime is not None
    return len(service.runtime.state.incidents)


def critical_call(n: int, subscriber: str) -> bytes:
    """A call long enough with a flagged number to open a critical incident."""
    return call_bytes("progress", f"A-{n}", subscriber, FLAGGED, 200)


def stranger(n: int) -> str:
    return f"+86139{n:08d}"  # not in the registry: opens an incident of its own


# ---- a lone surrogate ----------------------------------------------------------------------


async def test_a_lone_surrogate_on_a_guards_topics_never_stops_the_dispatcher(
    settings: Settings, secure: SecureBroker, tmp_path: Path
) -> None:
    escaped = b'{"source":"x","id":"\\ud800"}'
    raw = b'{"source":"x","id":"\xed\xa0\x80"}'
    status = b'{"data":{"state":"\\ud800"}}'
    store = tmp_path / "live.sqlite3"
    async with dispatching(settings, secure, store) as service:
        async with open_client(secure.url(ATTACKER, tls=False)) as radio:
            await radio.publish(TOPICS.replies(ATTACKER), escaped, qos=1)
            await radio.publish(TOPICS.replies(ATTACKER), raw, qos=1)
            await radio.publish(TOPICS.unit_status(ATTACKER), status, qos=1, retain=True)
        async with open_client(secure.url(SOURCE, tls=False)) as source:
            await source.publish(TOPICS.calls("hengnan"), critical_call(1, stranger(1)), qos=1)
        await until(lambda: incident_count(service) == 1)
        assert service.runtime is not None
        assert service.runtime.counts["rejected"] == 3
    # the retained one is delivered again to every restart: the dispatcher stays up
    async with dispatching(settings, secure, store) as service:
        async with open_client(secure.url(SOURCE, tls=False)) as source:
            await source.publish(TOPICS.calls("hengnan"), critical_call(2, stranger(2)), qos=1)
        await until(lambda: incident_count(service) == 2)


async def test_a_recording_holding_lone_surrogates_replays(
    settings: Settings, tmp_path: Path
) -> None:
    lines = [
        '{"at": 1.0, "topic": "antifraud/v1/units/G-YJ-CH-01/replies", '
        '"payload": {"source": "x", "id": "\\ud800"}}',
        '{"at": 2.0, "topic": "antifraud/v1/units/G-YJ-CH-01/status", '
        '"payload_raw": "{\\"data\\":{\\"state\\":\\"\\udced\\udca0\\udc80\\"}}"}',
        '{"at": 3.0, "topic": "antifraud/v1/units/G-YJ-CH-01\\udfff/replies", "payload": {}}',
    ]
    path = tmp_path / "surrogates.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = await replay(path, settings)
    assert [r["at"] for r in report["rejected"]] == [1.0, 2.0, 3.0]
    assert "\\udfff" in report["rejected"][2]["topic"]  # written as its escape


# ---- dedupe poisoning ----------------------------------------------------------------------


async def test_a_guard_cannot_mark_the_call_sources_next_id_as_seen(
    settings: Settings, secure: SecureBroker, tmp_path: Path
) -> None:
    real = json.loads(critical_call(1, stranger(1)))
    poison = json.dumps({"source": real["source"], "id": real["id"]}).encode()
    async with dispatching(settings, secure, tmp_path / "live.sqlite3") as service:
        async with open_client(secure.url(ATTACKER, tls=False)) as radio:
            await radio.publish(TOPICS.replies(ATTACKER), poison, qos=1)
            await radio.publish(TOPICS.unit_status(ATTACKER), json.dumps(real), qos=1)
        assert service.runtime is not None
        await until(lambda: service.runtime is not None and service.runtime.counts["rejected"] == 2)
        async with open_client(secure.url(SOURCE, tls=False)) as source:
            await source.publish(TOPICS.calls("hengnan"), json.dumps(real), qos=1)
        await until(lambda: incident_count(service) == 1)
        assert service.runtime.counts["duplicates"] == 0


# ---- client-id takeover --------------------------------------------------------------------


async def test_a_guards_credentials_cannot_take_the_dispatchers_or_another_units_session(
    settings: Settings, secure: SecureBroker, tmp_path: Path
) -> None:
    victim = secure.url(VICTIM, tls=False)
    async with open_client(victim, VICTIM, persistent=True) as radio:
        await radio.subscribe(TOPICS.dispatches(VICTIM), qos=1)  # a session to queue into
    async with dispatching(settings, secure, tmp_path / "live.sqlite3") as service:
        ids = [service.session_id(s) for s in service.sessions]
        for _ in range(3):
            for client_id in [*ids, VICTIM]:  # kicking them, and wiping their sessions
                async with open_client(secure.url(ATTACKER, tls=False), client_id):
                    await asyncio.sleep(0.05)
        # the dispatcher was never kicked: one connection, and every message still arrives
        assert service.stats["connects"] == 1
        async with open_client(secure.url(SOURCE, tls=False)) as source:
            await source.publish(TOPICS.calls("hengnan"), critical_call(1, CHEN), qos=1)
        await until(lambda: incident_count(service) == 1)
        async with open_client(secure.url("op-01", tls=False)) as console:
            event = cloudevent(
                "esc-1",
                "console/op-01",
                "cn.antifraud.operator.escalate",
                {"incident_id": "INC-A-1"},
            )
            await console.publish(TOPICS.actions("op-01"), json.dumps(event), qos=1)
        await asyncio.sleep(0.5)  # the offer is queued in the guard's session
    # the victim's session kept the offer queued while it was away
    async with open_client(victim, VICTIM, persistent=True) as radio:
        await radio.subscribe(TOPICS.dispatches(VICTIM), qos=1)
        message = await asyncio.wait_for(anext(aiter(radio.messages)), 5)
    assert json.loads(bytes(message.payload))["type"] == "cn.antifraud.dispatch.offered"


# ---- a flood from one handset --------------------------------------------------------------


FLOOD = 30_000


def flood(secure: SecureBroker, count: int = FLOOD) -> subprocess.Popen[bytes]:
    """``count`` garbage messages at full speed on the guard's own replies topic (QoS 0, the
    fastest a client can send), by Mosquitto's own client."""
    client = shutil.which("mosquitto_pub")
    assert client is not None, "mosquitto_pub is needed (apt-get install mosquitto-clients)"
    process = subprocess.Popen(
        [
            client,
            *("-h", "127.0.0.1", "-p", str(secure.local_port)),
            *("-u", ATTACKER, "-P", secure.passwords[ATTACKER], "-i", ATTACKER),
            *("-t", TOPICS.replies(ATTACKER), "-q", "0", "-l"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None
    process.stdin.write(b"".join(b"garbage %d \xff{\n" % i for i in range(count)))
    process.stdin.close()
    return process


async def escalation_latency(
    source: Any,
    console: Any,
    service: LiveService,
    n: int,
    offers: asyncio.Queue[float],
    guard: Any = None,
) -> float:
    """Seconds from an operator's escalate to the victim guard's offer, for Chen's n-th
    call; the incident is closed after, so that the next call opens a new one. (One
    connection a party: the broker binds client ids to usernames.)"""
    await source.publish(TOPICS.calls("hengnan"), critical_call(n, CHEN), qos=1)
    await until(lambda: f"INC-A-{n}" in service.runtime.state.incidents)  # type: ignore[union-attr]
    escalate = cloudevent(
        uuid.uuid4().hex, "console/op-01", "cn.antifraud.operator.escalate",
        {"incident_id": f"INC-A-{n}"},
    )  # fmt: skip
    sent = time.perf_counter()
    await console.publish(TOPICS.actions("op-01"), json.dumps(escalate), qos=1)
    arrived = await asyncio.wait_for(offers.get(), 10)
    if guard is not None:  # the other guard's answer is read, whatever the flooder sends
        dispatch = f"INC-A-{n}:{VICTIM}"
        accept = cloudevent(
            uuid.uuid4().hex, f"unit/{VICTIM}", "cn.antifraud.unit.accepted",
            {"dispatch_id": dispatch},
        )  # fmt: skip
        await guard.publish(TOPICS.replies(VICTIM), json.dumps(accept), qos=1)
        incident = service.runtime.state.incidents[f"INC-A-{n}"]  # type: ignore[union-attr]
        await until(lambda: incident.dispatches[dispatch].status == "accepted")
    close = cloudevent(
        uuid.uuid4().hex, "console/op-01", "cn.antifraud.operator.close",
        {"incident_id": f"INC-A-{n}", "outcome": "false_alarm"},
    )  # fmt: skip
    await console.publish(TOPICS.actions("op-01"), json.dumps(close), qos=1)
    await until(lambda: CHEN not in service.runtime.state.open_by_subscriber)  # type: ignore[union-attr]
    return arrived - sent


def store_bytes(store: Path) -> int:
    """The store's size as SQLite sees it (the log's pages included)."""
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size: int = (pages - free) * db.execute("PRAGMA page_size").fetchone()[0]
        return size


async def test_a_flooding_handset_costs_nobody_else_anything(
    settings: Settings, secure: SecureBroker, tmp_path: Path
) -> None:
    """While one handset floods 30,000 garbage messages at full speed: 100 of 100 call
    warnings open incidents, the other guard's every acceptance is read, the store grows by
    what the same wave costs without the flood, and the refusals are counted, not each
    stored. It prints escalate → offer during the flood against its unloaded time."""
    store = tmp_path / "live.sqlite3"
    async with (
        dispatching(settings, secure, store) as service,
        open_client(secure.url(VICTIM, tls=False), VICTIM, persistent=True) as guard,
        contextlib.AsyncExitStack() as stack,
    ):
        await guard.subscribe(TOPICS.dispatches(VICTIM), qos=1)
        offers: asyncio.Queue[float] = asyncio.Queue()

        async def collect() -> None:
            async for message in guard.messages:
                kind = json.loads(bytes(message.payload))["type"]
                if kind == "cn.antifraud.dispatch.offered":
                    offers.put_nowait(time.perf_counter())

        collector = asyncio.create_task(collect())
        source = await stack.enter_async_context(open_client(secure.url(SOURCE, tls=False)))
        console = await stack.enter_async_context(open_client(secure.url("op-01", tls=False)))
        unloaded = [await escalation_latency(source, console, service, n, offers) for n in range(8)]
        runtime = service.runtime
        assert runtime is not None

        async def wave(first: int, flooding: bool) -> tuple[int, list[float]]:
            """100 call warnings and an escalation every 12 of them: the store's growth,
            and the escalations' latencies."""
            before, opened = store_bytes(store), incident_count(service)
            flooder = flood(secure) if flooding else None
            latencies: list[float] = []
            for i in range(100):
                call = critical_call(first + i, stranger(first + i))
                await source.publish(TOPICS.calls("hengnan"), call, qos=1)
                if i % 12 == 0:
                    n = first + 500 + i
                    latencies.append(
                        await escalation_latency(source, console, service, n, offers, guard)
                    )
            if flooder is not None:
                flooder.wait(60)
            want = opened + 100 + len(latencies)
            await until(lambda: incident_count(service) == want, within=30)
            await asyncio.sleep(0.5)
            await until(lambda: not service.inbox.waiting)
            await asyncio.sleep(1.5)  # the bookkeeping of the last batch is committed
            return store_bytes(store) - before, latencies

        quiet, _ = await wave(1000, flooding=False)
        growth, loaded = await wave(2000, flooding=True)
        collector.cancel()
        counts = dict(runtime.counts)
    ratio = percentile(loaded, 0.99) / percentile(unloaded, 0.99)
    print(
        f"\nflood: {FLOOD} garbage messages; {service.stats['received']} received, "
        f"{counts['suppressed']} counted unread, {counts['rejected']} dead-lettered; "
        f"escalate→offer p99 unloaded {percentile(unloaded, 0.99) * 1000:.1f} ms, "
        f"loaded {percentile(loaded, 0.99) * 1000:.1f} ms ({ratio:.1f}×); "
        f"store +{growth / 1e6:.2f} MB (+{quiet / 1e6:.2f} MB without the flood)"
    )
    assert counts["rejected"] <= 2 * settings.limits.refusals_per_period
    assert growth - quiet < 2_000_000
    # escalate → offer during the flood is a figure, printed above (-s), not a timed
    # assertion: these machines are shared and noisy. Its target is held by many samples
    # under a sustained flood in `antifraud bench flood` (docs/PERFORMANCE.md, "Flood")


# ---- an incident grown without bound ---------------------------------------------------------


async def test_the_call_source_and_an_operator_cannot_grow_an_incident_past_the_packet_limit(
    settings: Settings, secure: SecureBroker, tmp_path: Path
) -> None:
    """The source floods one resident's open incident with new calls, an operator floods it
    with actions that change nothing: the incident's messages used to outgrow the broker's
    packet limit, and the broker then cut the dispatcher off on every attempt to send. Now
    another resident's escalation still reaches its guard, over the first connection."""
    li, li_guard = "+8613800000004", "G-ST-XH-01"  # 星海花园
    async with (
        dispatching(settings, secure, tmp_path / "live.sqlite3") as service,
        open_client(secure.url(li_guard, tls=False), li_guard, persistent=True) as guard,
        open_client(secure.url(SOURCE, tls=False)) as source,
        open_client(secure.url("op-01", tls=False)) as console,
    ):
        await guard.subscribe(TOPICS.dispatches(li_guard), qos=1)
        await source.publish(TOPICS.calls("hengnan"), critical_call(0, CHEN), qos=1)
        await until(lambda: incident_count(service) == 1)
        for k in range(1500):
            call = call_bytes("started", f"F-{k}", CHEN, FLAGGED)
            await source.publish(TOPICS.calls("hengnan"), call, qos=1)
        for k in range(600):
            callback = cloudevent(
                f"cb-{k}", "console/op-01", "cn.antifraud.operator.escalate",
                {"incident_id": "INC-A-0"},
            )  # fmt: skip
            await console.publish(TOPICS.actions("op-01"), json.dumps(callback), qos=1)
        await source.publish(TOPICS.calls("hengnan"), critical_call(1, li), qos=1)
        await until(lambda: incident_count(service) == 2)
        escalate = cloudevent(  # by another operator: op-01 spent its own budget
            "esc-li", "console/op-02", "cn.antifraud.operator.escalate", {"incident_id": "INC-A-1"}
        )
        async with open_client(secure.url("op-02", tls=False)) as other:
            await other.publish(TOPICS.actions("op-02"), json.dumps(escalate), qos=1)
        offer = await asyncio.wait_for(anext(aiter(guard.messages)), 15)
        assert json.loads(bytes(offer.payload))["type"] == "cn.antifraud.dispatch.offered"
        assert service.stats["connects"] == 1


# ---- the console -----------------------------------------------------------------------------


async def test_a_radio_flooding_its_status_does_not_hold_back_the_console(
    settings: Settings, secure: SecureBroker, tmp_path: Path
) -> None:
    """100,000 status messages at full speed from one guard's radio: the console, which reads
    presence from the dispatcher's store and subscribes to no unit's status, still shows a
    new incident at once. Over one session with the status topics, the broker's queue for
    the console filled and the incident's messages waited behind the flood or were dropped."""
    from aiohttp import ClientSession, CookieJar, web
    from test_console import PASSWORD, login

    from adapters.broker import free_port
    from adapters.console import Console, Users

    store = tmp_path / "live.sqlite3"
    users = Users(tmp_path / "users.json")
    users.set_password("op-01", PASSWORD)
    async with dispatching(settings, secure, store) as service:
        console = Console(settings, secure.url("console", tls=False), store, users)
        runner = web.AppRunner(console.app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await asyncio.wait_for(console.connected.wait(), 10)
            base = f"http://127.0.0.1:{port}"
            async with (
                ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
                open_client(secure.url(SOURCE, tls=False)) as source,
            ):
                await login(http, base)
                status = cloudevent("s", f"unit/{ATTACKER}", "cn.antifraud.unit.status", {})
                status["data"] = {"state": "online"}
                line = json.dumps(status)
                client = shutil.which("mosquitto_pub")
                assert client is not None, "mosquitto_pub is needed"
                flooder = await asyncio.create_subprocess_exec(
                    *(client, "-h", "127.0.0.1", "-p", str(secure.local_port), "-q", "0"),
                    *("-u", ATTACKER, "-P", secure.passwords[ATTACKER], "-l"),
                    *("-t", TOPICS.unit_status(ATTACKER)),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                assert flooder.stdin is not None
                flooder.stdin.write(("\n".join([line] * 100_000) + "\n").encode())
                flooder.stdin.close()
                await asyncio.sleep(0.3)  # the flood is under way
                await source.publish(TOPICS.calls("hengnan"), critical_call(1, stranger(1)), qos=1)
                await until(lambda: incident_count(service) == 1)
                seen = time.monotonic()
                while True:
                    async with http.get(f"{base}/api/state") as response:
                        board = (await response.json())["incidents"]
                    if any(i["incident_id"] == "INC-A-1" for i in board):
                        break
                    assert time.monotonic() - seen < 3, "the incident did not reach the board"
                    await asyncio.sleep(0.05)
                await asyncio.wait_for(flooder.wait(), 30)
        finally:
            await runner.cleanup()
