"""``antifraud bench live``: the dispatcher on a real broker, against that broker's ceiling.

All figures come from one run against one private Mosquitto:

(a) **ceiling**: N messages queued for a bare aiomqtt subscriber's persistent session while it
    is away; then it connects and drains them. Messages per second from CONNACK to the last.
    Then the same with the subscriber taking each message as paho decodes it, as the
    dispatcher's client does, instead of through aiomqtt's ``messages`` iterator (which costs
    a task per message): the ceiling of the client the dispatcher actually uses.
(b) **dispatcher**: the same N call events queued for the dispatcher's session while it is
    stopped; then ``antifraud run`` starts as its own process and drains them: each received,
    committed to its store, acknowledged, and its outputs published. Events per second from
    its "broker_connecting" log line (just before it sends CONNECT: the broker starts sending
    the backlog at CONNACK, before the dispatcher has even subscribed) to the output of the
    last event (a flagged call that opens an incident) arriving at a subscriber.
(c) **latency** under background traffic (clean call events at a steady rate): from the
    ``operator.escalate`` that starts a door-knock to the offer arriving at the guard's
    subscribed handset, next to the bare publish → subscribe latency of the same broker, and
    next to a bare relay: an aiomqtt client in its own process that republishes each message
    it receives, with no work in between, taking and sending messages the way the
    dispatcher's client does. The relay's path crosses the broker twice, as the dispatcher's
    does; it is the floor for any dispatcher built on this MQTT client.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt

from adapters.broker import local_broker
from adapters.mqtt import BrokerURL, acknowledged, disconnected, open_client, publish_now
from dispatcher.inbound import call_data, cloudevent
from dispatcher.model import incident_of_call
from dispatcher.outbound import Topics, rfc3339
from dispatcher.settings import Settings
from tools.dispatcher_process import DispatcherProcess

BACKLOG_RATE = 1000.0  # events/s of the feed whose backlog (b) drains
CHEN = "+8613800000001"
FLAGGED = "+85251230002"


def event_bytes(
    type_: str, data: dict[str, Any], source: str = "bench", sent: float | None = None
) -> bytes:
    """``sent``: the epoch seconds the source stamps (default now)."""
    stamp = None if sent is None else rfc3339(0.0, sent)
    event = cloudevent(uuid.uuid4().hex, source, f"cn.antifraud.{type_}", data, time=stamp)
    return json.dumps(event).encode()


def call_bytes(
    verb: str, call_id: str, sub: str, other: str, duration: float = 0, sent: float | None = None
) -> bytes:
    return event_bytes(
        f"call.{verb}", call_data(verb, call_id, sub, other, duration), "bench/carrier", sent
    )


async def _publish_all(broker: BrokerURL, messages: list[tuple[str, bytes]]) -> None:
    async with open_client(broker, f"bench-pub-{uuid.uuid4().hex[:6]}") as client:
        client.pending_calls_threshold = 1000  # a bulk load: many publishes in flight is normal
        for start in range(0, len(messages), 500):
            await asyncio.gather(
                *(client.publish(t, p, qos=1) for t, p in messages[start : start + 500])
            )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- (a) ------------------------------------------------------------------------------------


async def ceiling(broker: BrokerURL, count: int, delivered: bool = False) -> float:
    """(a): a bare aiomqtt subscriber reading ``messages``; with ``delivered``, the same
    client taking each message as paho decodes it, as the dispatcher does (adapters.mqtt)."""
    topic, client_id = "bench/ceiling", f"bench-ceiling-{uuid.uuid4().hex[:6]}"
    async with open_client(broker, client_id, persistent=True) as sub:
        await sub.subscribe(topic, qos=1)
    await _publish_all(broker, [(topic, b"x" * 300)] * count)
    received, done = 0, asyncio.Event()

    def deliver(_client: Any, _message: Any) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    async with open_client(
        broker, client_id, persistent=True, deliver=deliver if delivered else None
    ) as sub:
        # a delivering client may have taken the first messages while it connected
        start, already = time.perf_counter(), received
        if delivered:
            await asyncio.wait_for(done.wait(), 300)
        else:
            async for _ in sub.messages:
                received += 1
                if received == count:
                    break
        return (count - already) / (time.perf_counter() - start)


# ---- the dispatcher as its own process -------------------------------------------------------


class TimedDispatcher:
    """``antifraud run`` whose log is read as it is written: when it began connecting (by
    this process's clock), whether it is connected, and its counts when it stopped."""

    def __init__(self, config: Path, broker: BrokerURL, store: str | Path) -> None:
        self.process = DispatcherProcess(config, str(broker), store, on_event=self._heard)
        self.connecting_at: float | None = None  # of the latest start
        self.connected = asyncio.Event()
        self.last_counts: dict[str, Any] = {}

    def _heard(self, line: dict[str, Any]) -> None:
        if line.get("event") == "broker_connecting" and self.connecting_at is None:
            self.connecting_at = time.perf_counter()
        elif line.get("event") == "broker_connected":
            self.connected.set()
        elif line.get("event") == "stopped":
            self.last_counts = line

    async def start(self) -> None:
        self.connected.clear()
        self.connecting_at = None
        await self.process.start()
        await asyncio.wait_for(self.connected.wait(), 30)

    async def stop(self) -> None:
        await self.process.stop()


# ---- (b) ------------------------------------------------------------------------------------


async def dispatcher_rate(
    settings: Settings, broker: BrokerURL, store: str | Path, count: int
) -> tuple[float, dict[str, Any], TimedDispatcher]:
    """(b) on ``store``: a SQLite file's path or a PostgreSQL URL."""
    topics = Topics(settings.service.prefix)
    calls = topics.calls(settings.service.region)
    dispatcher = TimedDispatcher(settings.path, broker, store)
    await dispatcher.start()  # creates its persistent session
    await dispatcher.stop()
    # what a carrier feed sending BACKLOG_RATE events/s produced while the dispatcher was down:
    # stamped with the times it sent them, as the per-source rate limit expects
    messages: list[tuple[str, bytes]] = []
    first = time.time() - count / BACKLOG_RATE
    for i in range(count - 1):
        sub, sent = f"+8613{i % 900_000_000 + 100_000_000:09d}", first + i / BACKLOG_RATE
        if i % 20 == 0:  # a flagged call reaching 30 s: a warning incident, with outputs
            messages.append((calls, call_bytes("progress", f"BF-{i}", sub, FLAGGED, 30, sent)))
        else:
            messages.append(
                (calls, call_bytes("started", f"BC-{i}", sub, "+8613712345678", 0, sent))
            )
    marker = f"BENCH-LAST-{uuid.uuid4().hex[:6]}"
    messages.append((calls, call_bytes("progress", marker, "+8613999999999", FLAGGED, 30)))
    await _publish_all(broker, messages)

    done = asyncio.Event()
    async with open_client(broker, f"bench-console-{uuid.uuid4().hex[:6]}") as console:
        await console.subscribe(topics.operators, qos=1)

        async def watch() -> None:
            async for message in console.messages:
                if json.loads(bytes(message.payload))["subject"] == incident_of_call(marker):
                    done.set()
                    return

        watcher = asyncio.create_task(watch())
        await dispatcher.start()
        await asyncio.wait_for(done.wait(), 300)
        finished = time.perf_counter()
        watcher.cancel()
    assert dispatcher.connecting_at is not None
    return count / (finished - dispatcher.connecting_at), dispatcher.last_counts, dispatcher


# ---- (c) ------------------------------------------------------------------------------------


async def background(broker: BrokerURL, topic: str, rate: float, stop: asyncio.Event) -> int:
    sent = 0
    async with open_client(broker, f"bench-background-{uuid.uuid4().hex[:6]}") as client:
        start = time.perf_counter()
        while not stop.is_set():
            due = start + sent / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sub = f"+8614{sent % 900_000_000 + 100_000_000:09d}"
            await client.publish(
                topic, call_bytes("started", f"BG-{sent}", sub, "+8613712345678"), qos=1
            )
            sent += 1
    return sent


PING, RELAY_IN, RELAY_OUT = "bench/ping", "bench/relay/in", "bench/relay/out"


async def handset_process(broker: BrokerURL, *topics: str) -> None:
    """The guard's handset for (c), as its own process (a real handset is its own device):
    prints ``ready``, then one line per message received, ``perf_counter`` first. Both
    processes read the same monotonic clock, so times compare across them."""
    async with open_client(broker, f"bench-guard-{uuid.uuid4().hex[:6]}") as guard:
        await guard.subscribe([(topic, 1) for topic in topics])
        print("ready", flush=True)
        async for message in guard.messages:
            now = time.perf_counter()
            topic = str(message.topic)
            if topic in (PING, RELAY_OUT):
                kind = "ping" if topic == PING else "relay"
                print(f"{now!r} {kind} {bytes(message.payload).decode()}", flush=True)
                continue
            event = json.loads(bytes(message.payload))
            if event["type"] == "cn.antifraud.dispatch.offered":
                print(f"{now!r} offer {event['data']['incident_id']}", flush=True)


async def relay_process(broker: BrokerURL) -> None:
    """The bare relay for (c), as its own process (as the dispatcher is): republishes every
    message it receives (QoS 1), with no work in between, on the dispatcher's own way through
    the client: each message taken as paho decodes it, its copy written to the socket from
    that same call (adapters.mqtt)."""
    acks: set[asyncio.Task[None]] = set()

    def deliver(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        payload = message.payload if isinstance(message.payload, bytes) else b""
        waiting = publish_now(client, [(RELAY_OUT, payload, 1, False)])
        task = asyncio.ensure_future(acknowledged(client, waiting))
        acks.add(task)
        task.add_done_callback(acks.discard)

    async with open_client(broker, f"bench-relay-{uuid.uuid4().hex[:6]}", deliver=deliver) as r:
        await r.subscribe(RELAY_IN, qos=1)
        print("ready", flush=True)
        await disconnected(r)


async def _child(
    function: str, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start ``function(BrokerURL.parse(args[0]), …)`` of this module in a process of its
    own (with ``env``, else this one's environment); return once it printed ``ready``."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        f"import asyncio, sys; from tools.bench_live import {function}; "
        "from adapters.mqtt import BrokerURL; "
        f"asyncio.run({function}(BrokerURL.parse(sys.argv[1]), *sys.argv[2:]))",
        *args,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert child.stdout is not None
    if (await asyncio.wait_for(child.stdout.readline(), 30)).strip() != b"ready":
        child.kill()
        await child.wait()
        raise RuntimeError(f"the benchmark's {function} did not start")
    return child


async def latencies(
    settings: Settings, broker: BrokerURL, samples: int, rate: float
) -> tuple[list[float], list[float], list[float], int]:
    topics = Topics(settings.service.prefix)
    calls, actions = topics.calls(settings.service.region), topics.actions("bench")
    stop = asyncio.Event()
    load = asyncio.create_task(background(broker, calls, rate, stop))
    offer_times: dict[str, float] = {}
    states: dict[str, str] = {}
    arrived = asyncio.Event()
    changed = asyncio.Event()
    dispatcher_ms: list[float] = []
    bare_ms: list[float] = []
    relay_ms: list[float] = []
    children = [await _child("relay_process", str(broker))]
    try:
        handset = await _child(
            "handset_process", str(broker), topics.dispatches("G-YJ-CH-01"), PING, RELAY_OUT
        )
        children.append(handset)
        async with open_client(broker, f"bench-ops-{uuid.uuid4().hex[:6]}") as ops:
            await ops.subscribe(topics.operators, qos=1)

            async def listen_handset() -> None:
                assert handset.stdout is not None
                async for line in handset.stdout:
                    at, kind, value = line.decode().split()
                    if kind in ("ping", "relay"):
                        (bare_ms if kind == "ping" else relay_ms).append(
                            (float(at) - float(value)) * 1000
                        )
                    else:
                        offer_times[value] = float(at)
                        arrived.set()

            async def listen_ops() -> None:
                async for message in ops.messages:
                    event = json.loads(bytes(message.payload))
                    states[event["data"]["incident_id"]] = event["data"]["status"]
                    changed.set()

            async def until(predicate: Any) -> None:
                while not predicate():
                    changed.clear()
                    await asyncio.wait_for(changed.wait(), 10)

            listeners = [asyncio.create_task(listen_handset()), asyncio.create_task(listen_ops())]
            await asyncio.sleep(0.5)  # the background load settles
            for _ in range(samples):
                call = f"LAT-{uuid.uuid4().hex[:8]}"
                incident = incident_of_call(call)
                await ops.publish(calls, call_bytes("progress", call, CHEN, FLAGGED, 30), qos=1)
                await until(lambda incident=incident: states.get(incident) == "open")
                arrived.clear()
                sent = time.perf_counter()
                await ops.publish(
                    actions,
                    event_bytes("operator.escalate", {"incident_id": incident}, "console/bench"),
                    qos=1,
                )
                while incident not in offer_times:
                    await asyncio.wait_for(arrived.wait(), 10)
                    arrived.clear()
                dispatcher_ms.append((offer_times[incident] - sent) * 1000)
                await ops.publish(
                    actions,
                    event_bytes(
                        "operator.close",
                        {"incident_id": incident, "outcome": "false_alarm"},
                        "console/bench",
                    ),
                    qos=1,
                )
                await until(lambda incident=incident: states.get(incident) == "closed")
                # the bare broker and the bare relay, under the same load, in the same run
                for topic in (RELAY_IN, PING, PING):
                    await ops.publish(topic, repr(time.perf_counter()).encode(), qos=1)
                    await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)
            stop.set()
            sent_background = await load
            for task in listeners:
                task.cancel()
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
            await child.wait()
    return dispatcher_ms, bare_ms, relay_ms, sent_background


async def run_live_bench(
    settings: Settings, events: int, samples: int, rate: float, postgresql: str | None = None
) -> int:
    # the measuring clients live in this process: keep its start-up objects out of garbage
    # collections too, so a collection here does not pass for the dispatcher's latency
    gc.collect()
    gc.freeze()
    async with local_broker("mosquitto") as (url, kind):
        broker = BrokerURL.parse(url)
        print(f"broker: a private {kind} at {url} (config/mosquitto/local.conf)")
        with tempfile.TemporaryDirectory(prefix="antifraud-bench-live-") as tmp:
            a = await ceiling(broker, events)
            print(
                f"(a) bare aiomqtt subscriber, draining {events:,} queued QoS 1 messages: "
                f"{a:,.0f} msgs/s"
            )
            a2 = await ceiling(broker, events, delivered=True)
            print(
                f"    the same subscriber taking each message as paho decodes it (as the "
                f"dispatcher does): {a2:,.0f} msgs/s"
            )
            sqlite = await _store_figures(
                settings, broker, Path(tmp) / "bench.sqlite3", events, samples, rate, a, a2
            )
            if postgresql is None:
                return 0
            with database(postgresql) as store:
                print(f"the same on a PostgreSQL store ({store}):")
                pg = await _store_figures(settings, broker, store, events, samples, rate, a, a2)
            throughput, p99 = pg[0] / sqlite[0], pg[1] / sqlite[1]
            print(
                f"PostgreSQL / SQLite in this run: throughput {throughput:.2f} x (goal >= 0.5), "
                f"escalate → offer p99 {p99:.2f} x (goal <= 2); p50 {pg[2] / sqlite[2]:.2f} x"
            )
    return 0


@contextlib.contextmanager
def database(server: str, prefix: str = "bench_live") -> Iterator[str]:
    """A database of its own on ``server``, dropped after."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _store_figures(
    settings: Settings,
    broker: BrokerURL,
    store: str | Path,
    events: int,
    samples: int,
    rate: float,
    a: float,
    a2: float,
) -> tuple[float, float, float]:
    """(b) and (c) on ``store``, printed; returns (events/s, p99 ms, p50 ms)."""
    b, _, dispatcher = await dispatcher_rate(settings, broker, store, events)
    print(
        f"(b) dispatcher (own process), draining {events:,} queued call events, each "
        f"committed, acknowledged and its outputs published: {b:,.0f} events/s"
    )
    print(
        f"    (b)/(a) = {b / a:.2f}  (target >= 0.7); against the subscriber taking "
        f"messages as decoded: {b / a2:.2f}"
    )
    try:
        d_ms, bare_ms, relay_ms, bg = await latencies(settings, broker, samples, rate)
    finally:
        await dispatcher.stop()
    print(
        f"(c) escalate → offer at the guard's handset, {len(d_ms)} samples under "
        f"{rate:g} events/s of background calls ({bg:,} sent):"
    )
    print(
        f"    dispatcher p50 {percentile(d_ms, 0.5):.2f} ms, "
        f"p99 {percentile(d_ms, 0.99):.2f} ms, max {max(d_ms):.2f} ms"
    )
    print(
        f"    bare publish → subscribe p50 {percentile(bare_ms, 0.5):.2f} ms, "
        f"p99 {percentile(bare_ms, 0.99):.2f} ms, max {max(bare_ms):.2f} ms "
        f"({len(bare_ms)} samples)"
    )
    print(
        f"    bare relay (receive, republish) p50 {percentile(relay_ms, 0.5):.2f} ms, "
        f"p99 {percentile(relay_ms, 0.99):.2f} ms, max {max(relay_ms):.2f} ms "
        f"({len(relay_ms)} samples)"
    )
    ratio = percentile(d_ms, 0.99) / percentile(bare_ms, 0.99)
    print(f"    p99 dispatcher / p99 bare = {ratio:.2f}  (target <= 3)")
    print(
        f"    p99 relay / p99 bare = "
        f"{percentile(relay_ms, 0.99) / percentile(bare_ms, 0.99):.2f}; "
        f"p50 dispatcher - p50 relay = "
        f"{percentile(d_ms, 0.5) - percentile(relay_ms, 0.5):.2f} ms (the dispatcher's own)"
    )
    print(
        f"    mean dispatcher {statistics.mean(d_ms):.2f} ms; "
        f"dispatcher counts at stop: {dispatcher.last_counts.get('handled')} handled, "
        f"{dispatcher.last_counts.get('rejected')} rejected"
    )
    return b, percentile(d_ms, 0.99), percentile(d_ms, 0.5)
