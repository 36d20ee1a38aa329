"""The live service, wired: its stages, what each hands the next, and how it starts and stops.

    broker ─▶ connection ─▶ inbox ─▶ processor ─▶ (commit) ─▶ publisher ─▶ broker
                                         │                       │
                                         ▼                       ▼
                                       acker ─▶ PUBACK         marker ─▶ store

and a heartbeat beside them. Each stage is a module of this package with its inputs and outputs
passed in; this module is the one place that makes them and hands each its neighbours.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import structlog

from adapters import heap
from adapters.journal import LiveJournal, open_store
from adapters.live.acker import Acker
from adapters.live.clock import Clock
from adapters.live.connection import Connection, Sessions, receiving_session
from adapters.live.heartbeat import HEARTBEAT_S, heartbeat
from adapters.live.inbox import Inbox
from adapters.live.link import Link
from adapters.live.marker import Marker
from adapters.live.processor import Processor
from adapters.live.publisher import Publisher
from adapters.mqtt import BrokerURL
from dispatcher import logs
from dispatcher.errors import LeaseLost, StoreError
from dispatcher.outbound import OPERATORS_SESSION, Topics, is_operator_session
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

if TYPE_CHECKING:
    from adapters.pgstore import Term

log = structlog.get_logger("live")

Task = tuple[str, Coroutine[Any, Any, None]]  # a stage's work, by the name of its task


class Stats(Mapping[str, int]):
    """The service's counts, read from the stages that keep them: ``connects`` (the main
    session's), ``received`` and ``dropped`` (the inbox's), ``published`` (acknowledged by the
    broker, the publisher's)."""

    def __init__(self, service: LiveService) -> None:
        self._service = service

    def _counts(self) -> dict[str, int]:
        service = self._service
        publisher = service.publisher
        return {
            "connects": service.connection.connects,
            "received": service.inbox.received,
            "published": 0 if publisher is None else publisher.published,
            "dropped": service.inbox.dropped,
        }

    def __getitem__(self, key: str) -> int:
        return self._counts()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._counts())

    def __len__(self) -> int:
        return 4


async def _ended(task: asyncio.Task[Any]) -> None:
    """Wait for a cancelled task to end, cancelling it again while it runs on: Python 3.11's
    ``asyncio.wait_for`` (inside aiomqtt's connect) loses a cancellation that comes as the
    connection completes, and the session would then run on, holding the stop up."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()


class LiveService:
    def __init__(
        self,
        settings: Settings,
        broker: BrokerURL,
        store_path: str | Path,
        clock: Clock | None = None,
        client_id: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        term: Term | None = None,
        instance: str | None = None,
    ) -> None:
        """``store_path``: the SQLite store's path or a PostgreSQL store's URL; ``term``: the
        lease this instance serves a PostgreSQL store under (adapters/live/standby.py):
        nothing connects to the broker once it has ended; ``instance``: this process's name,
        said in the dispatcher's status and its ``alive`` lines."""
        self.settings = settings
        self.heartbeat_s = heartbeat_s
        self.broker = broker
        self.store_path = store_path
        self.term = term
        self.instance = instance
        self.clock = clock or Clock()
        # by default the broker username: a broker that binds client ids to usernames
        # (config/mosquitto/production.conf) gives every session the id it asks for
        self.client_id = client_id or broker.username or settings.service.client_id
        self.topics = Topics(settings.service.prefix)
        self.runtime: Runtime | None = None
        # the sessions, by the suffix of their client ids, in the order they connect
        operators = settings.access.operators
        self.sessions = self.topics.session_filters(
            settings.service.region, settings.units, operators
        )
        self.inbox = Inbox(self.topics.actions(o) for o in operators)
        self.link = Link()
        self.acker = Acker()
        self.session_state = Sessions(list(self.sessions))
        self.connection = Connection(
            broker,
            self.client_id,
            self.sessions[""],
            self.topics.dispatcher_status,
            settings.service.source,
            self.session_state,
            self.inbox,
            self.link,
            may_connect=self.may_connect,
            serving=self.serving,
            # read on the operators' own session now (decisions.md 116)
            stale=(self.topics.all_actions,),
        )
        # made once the store is open (``run``)
        self.processor: Processor | None = None
        self.publisher: Publisher | None = None
        self.marker: Marker | None = None
        self.stats = Stats(self)

    @property
    def client(self) -> aiomqtt.Client | None:
        """The main session's connection, while the dispatcher is online over it."""
        return self.link.client

    @property
    def connected(self) -> asyncio.Event:
        return self.link.connected

    @property
    def ready(self) -> asyncio.Event:
        """Set once every session has subscribed."""
        return self.session_state.ready

    def may_connect(self) -> bool:
        """Whether this instance may connect its sessions: always, unless it serves under a
        lease that has ended (another instance owns the sessions now)."""
        return self.term is None or self.term.valid()

    def serving(self) -> dict[str, Any]:
        """Who serves, for the dispatcher's status: this instance, since when, its epoch."""
        if self.instance is None:
            return {}
        said: dict[str, Any] = {"instance": self.instance}
        if self.term is not None:
            said["since"] = self.term.fence.since.isoformat(timespec="seconds")
            said["epoch"] = self.term.fence.epoch
        return said

    def session_id(self, suffix: str) -> str:
        """The client id of one of the dispatcher's sessions (see ``Topics.session_filters``)."""
        return f"{self.client_id}-{suffix}" if suffix else self.client_id

    def _wire(self, runtime: Runtime, store: LiveJournal) -> tuple[Processor, Publisher, Marker]:
        """The stages that need the store, each handed its neighbours."""
        marker = self.marker = Marker(store)
        publisher = self.publisher = Publisher(store, self.link, marker)
        processor = self.processor = Processor(runtime, self.clock, self.inbox, self.acker)
        runtime.on_written = publisher.written  # each commit's messages, as it is written
        return processor, publisher, marker

    def _tasks(
        self, runtime: Runtime, processor: Processor, publisher: Publisher, marker: Marker
    ) -> list[Task]:
        """Every stage's work, as the tasks to run."""
        inbox = self.inbox
        receivers = {"calls": inbox.receive_call, OPERATORS_SESSION: inbox.receive_action}
        receivers |= {s: inbox.receive_action for s in self.sessions if is_operator_session(s)}
        sessions = [
            (
                f"session-{suffix}",
                receiving_session(
                    suffix,
                    filters,
                    self.broker,
                    self.session_id(suffix),
                    receivers.get(suffix, inbox.receive_unit),
                    self.session_state,
                    self.may_connect,
                ),
            )
            for suffix, filters in self.sessions.items()
            if suffix
        ]
        return [
            ("connection", self.connection.run()),
            *sessions,
            ("processor", processor.run()),
            ("acker", self.acker.run()),
            ("publisher", publisher.run()),
            ("marker", marker.run()),
            (
                "heartbeat",
                heartbeat(
                    self.heartbeat_s,
                    runtime,
                    self.link,
                    inbox,
                    self.acker,
                    publisher,
                    self.serving,
                ),
            ),
        ]

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        async with open_store(
            self.store_path,
            self.settings.service.store_sync,
            inline_writes=True,
            writer=True,
            term=self.term,
        ) as store:
            runtime = self.runtime = Runtime(self.settings, store, outbox=True)
            processor, publisher, marker = self._wire(runtime, store)
            await runtime.start()
            if runtime.meta.get("mode", "live") != "live":
                raise StoreError(
                    f"{store.path}: this store holds a replay, not a live "
                    "dispatcher's state; use another --store"
                )
            store.set_meta("mode", "live")
            await runtime.commit()
            # Everything loaded so far lives as long as the process: keep it out of every
            # garbage collection, or a full collection stalls the loop for tens of ms.
            heap.settle()
            self.link.wake.set()  # anything left unsent by the last process goes first
            tasks = [
                asyncio.create_task(coro, name=name)
                for name, coro in self._tasks(runtime, processor, publisher, marker)
            ]
            stopper = asyncio.create_task(stop.wait(), name="stop")
            waits = [*tasks, stopper]
            if self.term is not None:
                waits.append(asyncio.create_task(self.term.lost.wait(), name="term"))
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task in tasks and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                # an instance whose lease ended says nothing more: the retained status and
                # the sessions are the next holder's now, and its writes would be refused
                ended = self.term is not None and not self.term.valid()
                if not ended:
                    await self.connection.say_offline()
                for task in waits:
                    task.cancel()
                for task in tasks:
                    await _ended(task)
                for flush in list(processor.flushes):  # waiting to start: flushed below
                    flush.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await flush
                logs.release()
                if ended:
                    log.warning(
                        "lease_ended", why=self.term.why if self.term else "", **runtime.counts
                    )
                else:
                    await self._settle(runtime, store, publisher, marker)
                    log.info("stopped", **runtime.counts)

    async def _settle(
        self, runtime: Runtime, store: LiveJournal, publisher: Publisher, marker: Marker
    ) -> None:
        """A clean stop: what is handled is committed and flushed, what the broker took is
        marked sent."""
        try:
            runtime.report_suppressed(runtime.clock, force=True)
            await runtime.commit()
            await store.flush()
            publisher.settle()
            if marker.sent:
                await marker.mark()
        except LeaseLost as exc:  # fenced on the way out: the next holder goes on from here
            log.warning("lease_ended", why=str(exc), **runtime.counts)
