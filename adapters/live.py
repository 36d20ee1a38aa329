"""The live service: the same runtime as replay, on a real broker and the system clock.

Six tasks share one runtime:

- **connection**: connects with a fixed client id and a persistent session, subscribes to the
  inbound topics (QoS 1), announces the dispatcher ``online`` (retained, with an ``offline``
  will) and queues every message as paho decodes it (not through aiomqtt's
  per-message iterator, adapters/mqtt.py); when the broker is unreachable or lost it
  reconnects with capped exponential backoff and jitter, logging each attempt;
- **processor**: fires due timers, handles queued messages in batches and commits each batch
  to the store (on the event loop while the service keeps up, on the store's thread while it
  drains a backlog); once written, the commit's outbound messages go to the publisher and the
  next batch is handled while the commit is flushed to the disk. A batch's log lines are
  written once its messages are on their way. Timers keep firing while the broker is away;
- **acker**: acknowledges (PUBACK) each batch, in order, only once its commit is flushed, so a
  crash at any moment loses nothing (unacknowledged messages are redelivered to the
  persistent session) and processes nothing twice (redeliveries are dropped as duplicates).
  A batch that changed nothing but bookkeeping (clean calls: only their processed pairs) is
  acknowledged without waiting; its pairs ride with the next commit, at most a second later;
- **publisher**: sends the store's outbox in order (QoS 1, incident state retained) and marks
  each message sent once the broker acknowledged it; what was produced while disconnected goes
  out after the reconnect. Up to ``PUBLISH_WINDOW`` messages are written ahead of their
  acknowledgements, which it settles in order; while it waits for work, a commit's messages
  are written to the socket by the commit itself;
- **marker**: records in the store, a few times a second, which messages the broker took;
- **heartbeat**: logs an ``alive`` line every minute, with what flowed and what waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import orjson
import structlog

from adapters.mqtt import (
    Backoff,
    BrokerURL,
    ack,
    disconnected,
    forget,
    open_client,
    protocol_of,
    publish,
    publish_now,
)
from adapters.store import OutboxRow, Store
from dispatcher import logs
from dispatcher.errors import BrokerError, StoreError
from dispatcher.inbound import cloudevent
from dispatcher.outbound import Topics
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

log = structlog.get_logger("live")

BATCH = 1000  # inbound messages handled per commit at most
PUBLISH_CHUNK = 200  # messages handed to the client at once at most
# messages written and not yet acknowledged at most: the publisher writes the next chunk
# without waiting for the last one's acknowledgements (which a broker sending this client a
# backlog may hold back until the backlog is through; the messages themselves go on at once)
PUBLISH_WINDOW = 1000
MARK_EVERY = 500  # published messages marked sent in the store at once …
MARK_INTERVAL_S = 0.25  # … or this often
DEFER_BOOKKEEPING_S = 1.0  # longest a batch of bookkeeping alone waits to be committed
# below this many inbound messages a second, commits are written on the event loop (each
# message's latency matters, and the loop has time to spare); above it, on the store's thread
# while the next messages are received (a backlog or a burst: throughput matters). Messages
# counted unread over their channel's budget do not count: a flood is no backlog to drain,
# and a commit on the thread would wait for the interpreter while the loop reads the flood
INLINE_MAX_RATE = 1000.0
# a batch's log lines are written this long after its commit, once its messages have left
# (from the commit itself, or from the publisher's next turn); warnings and errors at once
LOG_RELEASE_S = 0.002
# a commit written on the loop is flushed to the disk this long after it was written (its
# messages are on their way by then): the flush wakes the kernel's journal and the disk on
# the cores those messages need on their way to their subscribers (docs/decisions.md 54);
# its inbound messages are acknowledged once it is flushed, as always
FLUSH_AFTER_S = 0.005
# a unit's QoS 0 messages waiting to be handled at most (QoS 1 is bounded by the broker)
UNITS_QUEUED_QOS0 = 10_000
# on a reconnect, the longest the main session waits for the receiving ones before it sends
RECEIVERS_WAIT_S = 2.0
HEARTBEAT_S = 60.0  # one `alive` line this often: a quiet service told from a stuck one


class Rate:
    """Inbound messages per second, counted over windows of ``window`` seconds: ``busy`` once
    the last window counted more than ``limit`` a second."""

    def __init__(self, limit: float, window: float = 0.25) -> None:
        self.limit = limit
        self.window = window
        self.busy = False
        self._since: float | None = None
        self._count = 0

    def add(self, count: int, now: float) -> None:
        if self._since is None:
            self._since = now
        elif now - self._since >= self.window:
            self.busy = self._count / (now - self._since) > self.limit
            self._since, self._count = now, 0
        self._count += count


class Clock:
    """The runtime's seconds: wall-clock time, or time running ``speed`` times faster from
    ``start`` (the demo plays a 25-minute case in under a minute, timers included).

    The wall clock is read once, when the clock is made; from then on it advances with the
    monotonic clock, so a step of the system clock (an NTP correction, a virtual machine
    resumed) neither fires every pending timer at once nor holds them back (decisions.md 46).
    """

    def __init__(
        self,
        speed: float = 1.0,
        start: float | None = None,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.speed = speed
        self._monotonic = monotonic
        wall_now, monotonic_now = wall(), monotonic()
        self.start = wall_now if start is None else start
        self._started = monotonic_now - (wall_now - self.start)  # ``start`` on that clock

    def now(self) -> float:
        return self.start + (self._monotonic() - self._started) * self.speed

    def real_seconds(self, clock_seconds: float) -> float:
        return clock_seconds / self.speed


def _messages(rows: list[OutboxRow]) -> list[tuple[str, bytes, int, bool]]:
    return [(topic, payload or b"", qos, retain) for _, topic, qos, retain, payload in rows]


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode("utf-8")


class LiveService:
    def __init__(
        self,
        settings: Settings,
        broker: BrokerURL,
        store_path: Path,
        clock: Clock | None = None,
        client_id: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.settings = settings
        self.heartbeat_s = heartbeat_s
        self.broker = broker
        self.store_path = store_path
        self.clock = clock or Clock()
        # by default the broker username: a broker that binds client ids to usernames
        # (config/mosquitto/production.conf) gives every session the id it asks for
        self.client_id = client_id or broker.username or settings.service.client_id
        self.topics = Topics(settings.service.prefix)
        self.client: aiomqtt.Client | None = None
        # the open connection, from before it announces the dispatcher online until it is gone
        self._announcer: aiomqtt.Client | None = None
        self._stopping = False  # once set, no connection announces online any more
        self.connected = asyncio.Event()
        self.ready = asyncio.Event()  # subscribed at least once
        self.runtime: Runtime | None = None
        # received, not yet handled, by session: call warnings, then operators' actions, then
        # units' messages are taken, in the order they cause one another (a call opens an
        # incident an operator acts on, whose offers units answer), so that backlogs
        # delivered at once after a restart are handled in that order, and a flooding
        # handset's messages wait behind nobody's
        self._calls: deque[tuple[aiomqtt.Client, aiomqtt.Message]] = deque()
        self._inbox: deque[tuple[aiomqtt.Client, aiomqtt.Message]] = deque()
        self._units: deque[tuple[aiomqtt.Client, aiomqtt.Message]] = deque()
        self._arrived = asyncio.Event()
        self._sessions_ready: set[str] = set()
        # sessions connect in that order too, each once the one before has subscribed: the
        # backlog of each arrives after the backlogs of what causes it
        # the sessions, by the suffix of their client ids, in the order they connect
        self.sessions = self.topics.session_filters(settings.service.region, settings.units)
        self._session_up = {suffix: asyncio.Event() for suffix in self.sessions}
        self._up: set[str] = set()  # the sessions connected now
        self._up_changed = asyncio.Event()
        # set when another session connects: the broker is back, retry now, not after backoff
        self._retry: dict[str, asyncio.Event] = {}
        # handled batches waiting for their commit's flush before they are acknowledged
        self._to_ack: asyncio.Queue[
            tuple[asyncio.Future[None] | None, list[tuple[aiomqtt.Client, aiomqtt.Message]]]
        ] = asyncio.Queue()
        self._unacknowledged = 0  # messages in those batches
        self._flushes: set[asyncio.Future[None]] = set()  # flushes not yet done
        # the publisher has something to do: messages committed, acknowledged, or a connection
        # gained or lost
        self._wake = asyncio.Event()
        self._ready: deque[OutboxRow] = deque()  # committed, not yet written
        # messages go out in strictly increasing outbox order: the last one written over the
        # current connection, and the last one the broker acknowledged
        self._last_written = 0
        self._last_sent = 0
        # chunks written over the current connection, oldest first, with their acknowledgements
        self._window: deque[tuple[aiomqtt.Client, list[OutboxRow], dict[int, asyncio.Event]]] = (
            deque()
        )
        self._in_window = 0  # messages in those chunks
        self._write_failed = False  # a write found the connection broken: send again from the store
        self._direct = False  # commits may write their messages themselves (see _written)
        self._sent: list[int] = []  # published, not yet marked in the store
        self.stats = {"connects": 0, "received": 0, "published": 0, "dropped": 0}

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        async with Store(
            self.store_path, self.settings.service.store_sync, inline_writes=True, writer=True
        ) as store:
            runtime = self.runtime = Runtime(self.settings, store, outbox=True)
            runtime.on_written = self._written
            await runtime.start()
            if runtime.meta.get("mode", "live") != "live":
                raise StoreError(
                    f"{self.store_path}: this store holds a replay, not a live "
                    "dispatcher's state; use another --store"
                )
            store.set_meta("mode", "live")
            await runtime.commit()
            # Everything loaded so far lives as long as the process: keep it out of every
            # garbage collection, or a full collection stalls the loop for tens of ms.
            gc.collect()
            gc.freeze()
            self._wake.set()  # anything left unsent by the last process goes first
            tasks = [
                asyncio.create_task(coro, name=name)
                for name, coro in (
                    ("connection", self._connection()),
                    *(
                        (f"session-{suffix}", self._session(suffix, filters))
                        for suffix, filters in self.sessions.items()
                        if suffix
                    ),
                    ("processor", self._processor(runtime)),
                    ("acker", self._acker()),
                    ("publisher", self._publisher(store)),
                    ("marker", self._marker(store)),
                    ("heartbeat", self._heartbeat(runtime)),
                )
            ]
            stopper = asyncio.create_task(stop.wait(), name="stop")
            try:
                done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stopper and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                self._stopping = True
                await self._say_offline()
                for task in [*tasks, stopper]:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
                for flush in list(self._flushes):  # waiting to start: flushed just below
                    flush.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await flush
                logs.release()
                runtime.report_suppressed(runtime.clock, force=True)
                await runtime.commit()
                await store.flush()
                self._settle()
                if self._sent:
                    await self._mark_sent(store)
                log.info("stopped", **runtime.counts)

    async def _heartbeat(self, runtime: Runtime) -> None:
        """An ``alive`` line every ``heartbeat_s``: counts that grow while work flows, and
        what waits at each step. ``received`` standing still while senders send, or a count
        of what waits that only grows, says where the service is stuck (docs/operations.md).
        """
        while True:
            await asyncio.sleep(self.heartbeat_s)
            counts = runtime.counts
            log.info(
                "alive",
                connected=self.connected.is_set(),
                received=self.stats["received"],
                handled=counts["handled"],
                rejected=counts["rejected"],
                duplicates=counts["duplicates"],
                timers=counts["timers"],
                produced=counts["published"],
                sent=self.stats["published"],
                received_not_yet_handled=len(self._calls) + len(self._inbox) + len(self._units),
                dropped=self.stats["dropped"],
                handled_not_yet_acknowledged=self._unacknowledged,
                committed_not_yet_sent=len(self._ready) + self._in_window,  # or acknowledged
                open_incidents=len(runtime.state.open_by_subscriber),  # one open per resident
            )

    # ---- connection ------------------------------------------------------------------------

    def _status(self, state: str) -> bytes:
        """The dispatcher's own presence, retained on ``{prefix}/dispatcher/status``: online
        once it is connected and subscribed, offline when it stops, and offline as its will
        when its connection is lost, so that operators see when nobody is dispatching."""
        event = cloudevent(
            f"status-{uuid.uuid4().hex}",
            self.settings.service.source,
            "cn.antifraud.dispatcher.status",
            {"state": state},
            subject=self.client_id,
        )
        return orjson.dumps(event)

    async def _say_offline(self) -> None:
        # not self.client: a stop between announcing online and taking the connection as its
        # own must still say offline, or the retained online would outlive the dispatcher
        client = self._announcer
        if client is None:
            return
        with contextlib.suppress(BrokerError, TimeoutError):
            await asyncio.wait_for(
                publish(
                    client,
                    self.topics.dispatcher_status,
                    self._status("offline"),
                    qos=1,
                    retain=True,
                ),
                2.0,
            )

    def session_id(self, suffix: str) -> str:
        """The client id of one of the dispatcher's sessions (see ``Topics.session_filters``)."""
        return f"{self.client_id}-{suffix}" if suffix else self.client_id

    def _session_broker(self, suffix: str) -> BrokerURL:
        """The broker URL of a session: its own username, when the dispatcher has one (the
        broker binds each session's client id to it), with the dispatcher's password."""
        if not suffix or not self.broker.username:
            return self.broker
        return dataclasses.replace(self.broker, username=f"{self.broker.username}-{suffix}")

    def _wake_others(self, suffix: str) -> None:
        """A session has connected: the others retry at once."""
        for other, retry in self._retry.items():
            if other != suffix:
                retry.set()

    def _subscribed(self, suffix: str) -> None:
        self._up.add(suffix)
        self._up_changed.set()
        self._wake_others(suffix)
        self._sessions_ready.add(suffix)
        self._session_up[suffix].set()
        if len(self._sessions_ready) == len(self.sessions):
            self.ready.set()

    async def _after_previous(self, suffix: str) -> None:
        """Wait until what ``suffix``'s messages answer is read: the main session connects
        once the call warnings' has subscribed, the units' sessions (all at once) once the
        main one has."""
        if suffix == "":
            await self._session_up["calls"].wait()
        elif suffix != "calls":
            await self._session_up[""].wait()

    async def _session(self, suffix: str, filters: list[str]) -> None:
        """One of the sessions that only receive: persistent, QoS 1, reconnecting on its own
        (the messages of the others go on meanwhile)."""
        backoff = Backoff()
        client_id = self.session_id(suffix)
        broker = self._session_broker(suffix)
        deliver = self._receive_call if suffix == "calls" else self._receive_unit
        await self._after_previous(suffix)
        while True:
            try:
                async with open_client(
                    broker, client_id, persistent=True, manual_acks=True, deliver=deliver
                ) as client:
                    await client.subscribe([(f, 1) for f in filters])
                    self._subscribed(suffix)
                    backoff.reset()
                    log.info("broker_session_connected", client_id=client_id)
                    await disconnected(client)
            except BrokerError as exc:
                log.warning(
                    "broker_unavailable", broker=str(broker), client_id=client_id, error=str(exc)
                )
            finally:
                self._up.discard(suffix)
            await self._backoff(suffix, backoff.next_delay())

    async def _backoff(self, suffix: str, delay: float) -> None:
        """Wait ``delay`` before the next attempt, or less: until another of the sessions
        has connected (the broker is back)."""
        retry = self._retry.setdefault(suffix, asyncio.Event())
        retry.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(retry.wait(), delay)

    async def _others_up(self, within: float) -> None:
        """Wait, at most ``within``, for the receiving sessions to be connected, so that
        the replies to what is sent next are read at once."""
        wanted = set(self.sessions) - {""}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not wanted <= self._up:
                    self._up_changed.clear()
                    await self._up_changed.wait()

    async def _connection(self) -> None:
        await self._after_previous("")
        backoff = Backoff()
        filters = self.sessions[""]
        while True:
            log.info("broker_connecting", broker=str(self.broker), attempt=backoff.attempt + 1)
            try:
                will = aiomqtt.Will(
                    self.topics.dispatcher_status, self._status("offline"), qos=1, retain=True
                )
                async with open_client(
                    self.broker,
                    self.client_id,
                    persistent=True,
                    manual_acks=True,
                    deliver=self._receive,
                    on_acknowledged=self._wake.set,
                    will=will,
                ) as client:
                    self._announcer = client
                    await client.subscribe([(f, 1) for f in filters])
                    if self._stopping:  # offline is said over this connection: never online after
                        await disconnected(client)  # it, and keep the connection until run() ends
                        return
                    # not awaited: behind a persistent session's backlog the broker may
                    # acknowledge it only seconds later, and outputs must not wait for that
                    publish_now(
                        client,
                        [(self.topics.dispatcher_status, self._status("online"), 1, True)],
                    )
                    self._session_up[""].set()  # the units' sessions may connect now
                    self._wake_others("")
                    await self._others_up(RECEIVERS_WAIT_S)
                    self.client = client
                    self.stats["connects"] += 1
                    self.connected.set()
                    self._subscribed("")
                    self._wake.set()
                    backoff.reset()
                    log.info(
                        "broker_connected",
                        broker=str(self.broker),
                        protocol=protocol_of(client),
                        client_id=self.client_id,
                    )
                    await disconnected(client)  # messages arrive through _receive
            except BrokerError as exc:
                log.warning("broker_unavailable", broker=str(self.broker), error=str(exc))
            finally:
                self.client = self._announcer = None
                self.connected.clear()
                # what is in flight over it is lost: nothing is written over the next one
                # before the publisher has seen that and sends again from the store
                self._direct = False
                self._wake.set()
            delay = backoff.next_delay()
            log.info("broker_reconnect_wait", seconds=round(delay, 2))
            await self._backoff("", delay)

    def _receive(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """Each message as paho decodes it, straight into the processor's queue."""
        self.stats["received"] += 1
        self._inbox.append((client, message))
        self._arrived.set()

    def _receive_call(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        self.stats["received"] += 1
        self._calls.append((client, message))
        self._arrived.set()

    def _receive_unit(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """A unit's message: into the queue taken after the others. Its length is bounded
        by the broker's in-flight window for QoS 1; QoS 0, which no handset uses, is not
        bounded by anything, so past a bound it is dropped (and counted)."""
        self.stats["received"] += 1
        if message.qos == 0 and len(self._units) >= UNITS_QUEUED_QOS0:
            self.stats["dropped"] += 1
            return
        self._units.append((client, message))
        self._arrived.set()

    # ---- processing ------------------------------------------------------------------------

    async def _processor(self, runtime: Runtime) -> None:
        clock, loop = self.clock, asyncio.get_running_loop()
        deferred_since: float | None = None  # bookkeeping handled, not yet committed, since
        rate = Rate(INLINE_MAX_RATE)
        release: asyncio.TimerHandle | None = None  # of the held log lines
        while True:
            due = runtime.next_due()
            timeout = None if due is None else max(0.0, clock.real_seconds(due - clock.now()))
            if deferred_since is not None:
                left = max(0.0, deferred_since + DEFER_BOOKKEEPING_S - loop.time())
                timeout = left if timeout is None else min(timeout, left)
            calls, inbox, units = self._calls, self._inbox, self._units
            if not calls and not inbox and not units:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._arrived.wait()
            batch: list[tuple[aiomqtt.Client, aiomqtt.Message]] = []
            while calls and len(batch) < BATCH:
                batch.append(calls.popleft())
            while inbox and len(batch) < BATCH:
                batch.append(inbox.popleft())
            while units and len(batch) < BATCH:
                batch.append(units.popleft())
            # this batch's log lines wait until its messages are on their way (logs.py)
            logs.hold()
            now = max(clock.now(), runtime.clock)
            runtime.advance(now)
            if batch and "first_inbound_at" not in runtime.meta:
                runtime.meta["first_inbound_at"] = repr(now)
                runtime.store.set_meta("first_inbound_at", repr(now))
            suppressed = runtime.counts["suppressed"]
            for _client, message in batch:
                runtime.handle(str(message.topic), _payload_bytes(message.payload), now)
            # what was read counts towards the rate that moves commits to the store's thread
            # (INLINE_MAX_RATE); what was counted unread does not
            rate.add(len(batch) - (runtime.counts["suppressed"] - suppressed), loop.time())
            # A batch that changed nothing but bookkeeping (clean calls, duplicates: only their
            # processed pairs) is acknowledged without waiting for a disk flush; the pairs go
            # to disk with the next commit, at most DEFER_BOOKKEEPING_S later. Lost in a crash,
            # they could only let a duplicate of a message without effects be handled again.
            flushed: asyncio.Future[None] | None = None
            if runtime.store.holds_effects() or (
                deferred_since is not None and loop.time() - deferred_since >= DEFER_BOOKKEEPING_S
            ):
                # written (its messages handed to the publisher), then flushed while the next
                # batch is handled (FLUSH_AFTER_S later, unless a burst is being drained); the
                # acker acknowledges this batch once it is flushed
                await runtime.commit(flush=False, inline=not rate.busy)
                flushed = asyncio.ensure_future(
                    self._flush(runtime.store, 0.0 if rate.busy else FLUSH_AFTER_S)
                )
                self._flushes.add(flushed)
                flushed.add_done_callback(self._flushes.discard)
                deferred_since = None
            elif batch and deferred_since is None:
                deferred_since = loop.time()
            if batch or flushed is not None:  # a failed flush stops the service even when
                self._to_ack.put_nowait((flushed, batch))  # only timers made the commit
                self._unacknowledged += len(batch)
            # the publisher is woken by _written, and only when a commit has messages for it
            if release is None or loop.time() >= release.when():  # none pending
                release = loop.call_later(LOG_RELEASE_S, logs.release)

    @staticmethod
    async def _flush(store: Store, after: float) -> None:
        if after:
            await asyncio.sleep(after)
        await store.flush()

    async def _acker(self) -> None:
        """Acknowledges handled batches in the order they were received, each once its commit
        is on the disk. A failed flush stops the service: nothing it covers is acknowledged."""
        while True:
            flushed, batch = await self._to_ack.get()
            if flushed is not None:
                await flushed
            # on the connection each message came over, whether or not the service has seen
            # that connection's subscription confirmed yet: a persistent session's backlog
            # flows before it is, and a message never acknowledged holds a place in the
            # broker's in-flight window until the connection ends
            for client, message in batch:
                ack(client, message)
            self._unacknowledged -= len(batch)

    # ---- publishing ------------------------------------------------------------------------

    def _written(self, rows: list[OutboxRow]) -> None:
        """Called as each commit is written with its outbound messages, in order. While the
        publisher waits for work, they are written to the socket from here, without waiting
        for its turn on the loop; the publisher then settles their acknowledgements."""
        self._ready.extend(rows)
        client = self.client
        if self._direct and client is not None and self._in_window < PUBLISH_WINDOW:
            batch = self._take_ready()
            if batch:
                self._write(client, batch)
        self._wake.set()

    def _take_ready(self) -> list[OutboxRow]:
        """The next committed messages not yet written, in order, at most a chunk."""
        rows: list[OutboxRow] = []
        while self._ready and len(rows) < PUBLISH_CHUNK:
            row = self._ready.popleft()
            if row[0] > self._last_written:  # else: sent again from the store already
                rows.append(row)
        return rows

    def _write(self, client: aiomqtt.Client, rows: list[OutboxRow]) -> None:
        """Write ``rows`` to the socket now; their acknowledgements join the window."""
        try:
            waiting = publish_now(client, _messages(rows))
        except BrokerError as exc:  # the store still holds them: sent again
            log.warning("publish_failed", error=str(exc), pending=len(rows))
            self._write_failed = True
            return
        self._window.append((client, rows, waiting))
        self._in_window += len(rows)
        self._last_written = rows[-1][0]

    def _settle(self) -> None:
        """The chunks at the head of the window the broker acknowledged, in order."""
        while self._window:
            _client, rows, waiting = self._window[0]
            if not all(event.is_set() for event in reversed(waiting.values())):
                return  # acknowledgements come in order: the last one is checked first
            self._window.popleft()
            self._in_window -= len(rows)
            self._last_sent = rows[-1][0]
            self._sent.extend(row[0] for row in rows)
            self.stats["published"] += len(rows)

    def _lose_window(self) -> None:
        """The connection the window was written over is gone (or broke): its messages go
        again, from the store, over the next one."""
        for client, _rows, waiting in self._window:
            forget(client, waiting)
        self._window.clear()
        self._in_window = 0
        self._last_written = self._last_sent
        self._write_failed = False

    async def _publisher(self, store: Store) -> None:
        """Send the outbox in order: fresh commits straight from memory; after a (re)connect
        or a failed write, first everything the store still holds unsent. Up to
        ``PUBLISH_WINDOW`` messages are written ahead of their acknowledgements."""
        resync = True
        current: aiomqtt.Client | None = None  # the connection the window is written over
        while True:
            # cleared before looking: whatever happens from here on (also during the awaits
            # below) wakes the wait at the end of this turn
            self._wake.clear()
            self._settle()
            if len(self._sent) >= MARK_EVERY:
                await self._mark_sent(store)
                continue  # settle what was acknowledged meanwhile
            client = self.client
            if client is None or client is not current or self._write_failed:
                # a new connection, none, or a broken one: what was written and not
                # acknowledged goes again, from the store
                if self._write_failed:
                    await asyncio.sleep(0.1)  # the connection task notices and reconnects
                self._lose_window()
                resync = True
                if self.client is None:
                    await self.connected.wait()
                current = self.client
                continue
            if self._in_window < PUBLISH_WINDOW:
                if resync:
                    rows = await store.unsent(PUBLISH_CHUNK, after=self._last_written)
                    if client is not self.client:
                        continue  # lost while reading: the next turn starts again
                    if rows:
                        self._write(client, rows)
                        continue
                    resync = False
                rows = self._take_ready()
                if rows:
                    self._write(client, rows)
                    continue
            self._direct = not resync
            try:
                await self._wake.wait()
            finally:
                self._direct = False

    async def _mark_sent(self, store: Store) -> None:
        seqs, self._sent = self._sent, []
        await store.mark_sent(seqs)

    async def _marker(self, store: Store) -> None:
        """Records in the store, a few times a second, what the broker acknowledged. A message
        sent but not yet marked when the process dies is sent again (same id: dropped as a
        duplicate by receivers)."""
        while True:
            await asyncio.sleep(MARK_INTERVAL_S)
            if self._sent:
                await self._mark_sent(store)
