"""The connection: the dispatcher's sessions with the broker.

The main session connects with a fixed client id and a persistent session, announces the
dispatcher ``online`` (retained, with an ``offline`` will) and publishes the dispatcher's
messages; it reads nothing, so that no party's flood can fill its queue at the broker, where
the acknowledgements of those messages wait (``Topics.session_filters``). The sessions that
only receive (call warnings, operators' actions, units' messages) subscribe (QoS 1) and
queue every message as paho decodes it (not through aiomqtt's per-message iterator,
adapters/mqtt.py). When the broker is unreachable or lost, each
reconnects with capped exponential backoff and jitter, logging each attempt, and retries at
once when another session got through. Of a clustered broker, each connection takes the
first node that answers and, once it is lost, the next (``open_client``); the log says which.

Sessions connect in the order their messages cause one another, each once the one before has
subscribed: the backlog of each arrives after the backlogs of what causes it.

In: the broker URL, the client id, each session's topic filters. Out: messages, into the
``Inbox``; the main connection, to the publisher (``Link``); ``Sessions.ready`` once every
session has subscribed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import aiomqtt
import orjson
import structlog

from adapters.live.inbox import Inbox
from adapters.live.link import Link
from adapters.mqtt import (
    Backoff,
    BrokerURL,
    Deliver,
    disconnected,
    node_of,
    open_client,
    protocol_of,
    publish,
    publish_now,
    unsubscribe,
)
from dispatcher.errors import BrokerError
from dispatcher.inbound import cloudevent
from dispatcher.outbound import OPERATORS_SESSION, is_operator_session

log = structlog.get_logger("live")

# on a reconnect, the longest the main session waits for the receiving ones before it sends
RECEIVERS_WAIT_S = 2.0


class Sessions:
    """Which of the sessions (by the suffix of their client ids, ``""`` the main one) are up,
    and the order they connect in."""

    def __init__(self, suffixes: list[str]) -> None:
        self.suffixes = suffixes
        self.ready = asyncio.Event()  # each subscribed at least once
        self._subscribed_once: set[str] = set()
        self._session_up = {suffix: asyncio.Event() for suffix in suffixes}
        self._up: set[str] = set()  # the sessions connected now
        self._up_changed = asyncio.Event()
        # set when another session connects: the broker is back, retry now, not after backoff
        self._retry: dict[str, asyncio.Event] = {}

    def announced(self, suffix: str) -> None:
        """``suffix`` is connected and subscribed: the sessions after it may connect."""
        self._session_up[suffix].set()
        self.wake_others(suffix)

    def wake_others(self, suffix: str) -> None:
        """A session has connected: the others retry at once."""
        for other, retry in self._retry.items():
            if other != suffix:
                retry.set()

    def subscribed(self, suffix: str) -> None:
        self._up.add(suffix)
        self._up_changed.set()
        self.wake_others(suffix)
        self._subscribed_once.add(suffix)
        self._session_up[suffix].set()
        if len(self._subscribed_once) == len(self.suffixes):
            self.ready.set()

    def gone(self, suffix: str) -> None:
        self._up.discard(suffix)

    async def after_previous(self, suffix: str) -> None:
        """Wait until what ``suffix``'s messages answer is read: the operators' sessions and
        the main one connect once the call warnings' has subscribed, the units' sessions
        (all at once) once the main one has."""
        if suffix in ("", OPERATORS_SESSION) or is_operator_session(suffix):
            await self._session_up["calls"].wait()
        elif suffix != "calls":
            await self._session_up[""].wait()

    async def backoff(self, suffix: str, delay: float) -> None:
        """Wait ``delay`` before the next attempt, or less: until another of the sessions
        has connected (the broker is back)."""
        retry = self._retry.setdefault(suffix, asyncio.Event())
        retry.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(retry.wait(), delay)

    async def others_up(self, within: float) -> None:
        """Wait, at most ``within``, for the receiving sessions to be connected, so that
        the replies to what is sent next are read at once."""
        wanted = set(self.suffixes) - {""}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not wanted <= self._up:
                    self._up_changed.clear()
                    await self._up_changed.wait()


def session_broker(broker: BrokerURL, suffix: str) -> BrokerURL:
    """The broker URL of a session: its own username, when the dispatcher has one (the
    broker binds each session's client id to it), with the dispatcher's password."""
    if not suffix or not broker.username:
        return broker
    return dataclasses.replace(broker, username=f"{broker.username}-{suffix}")


async def receiving_session(
    suffix: str,
    filters: list[str],
    broker: BrokerURL,
    client_id: str,
    deliver: Deliver,
    sessions: Sessions,
    may_connect: Callable[[], bool] = lambda: True,
) -> None:
    """One of the sessions that only receive: persistent, QoS 1, reconnecting on its own
    (the messages of the others go on meanwhile), as long as ``may_connect``."""
    backoff = Backoff()
    broker = session_broker(broker, suffix)
    await sessions.after_previous(suffix)
    while True:
        if not may_connect():  # the session is another instance's now
            await asyncio.Event().wait()
        try:
            async with open_client(
                broker, client_id, persistent=True, manual_acks=True, deliver=deliver
            ) as client:
                await client.subscribe([(f, 1) for f in filters])
                sessions.subscribed(suffix)
                backoff.reset()
                log.info("broker_session_connected", broker=node_of(client), client_id=client_id)
                await disconnected(client)
        except BrokerError as exc:
            if may_connect():  # else the session is another instance's: nothing is wrong
                log.warning(
                    "broker_unavailable", broker=str(broker), client_id=client_id, error=str(exc)
                )
        finally:
            sessions.gone(suffix)
        await sessions.backoff(suffix, backoff.next_delay())


class Connection:
    """The main session: inbound topics in, the dispatcher's messages out (through the
    ``Link``), its presence announced on ``status_topic``."""

    def __init__(
        self,
        broker: BrokerURL,
        client_id: str,
        filters: list[str],
        status_topic: str,
        source: str,
        sessions: Sessions,
        inbox: Inbox,
        link: Link,
        may_connect: Callable[[], bool] = lambda: True,
        serving: Callable[[], dict[str, Any]] = dict,
        stale: tuple[str, ...] = (),
    ) -> None:
        """``may_connect``: asked before every attempt (an instance whose lease has ended
        never takes the session back); ``serving``: who serves, said in the status;
        ``stale``: filters an earlier version's main session subscribed to, which its
        persistent session at the broker would go on reading."""
        self.may_connect, self.serving, self.stale = may_connect, serving, stale
        self.broker, self.client_id, self.filters = broker, client_id, filters
        self.status_topic, self.source = status_topic, source
        self.sessions, self.inbox, self.link = sessions, inbox, link
        # the open connection, from before it announces the dispatcher online until it is gone
        self.announcer: aiomqtt.Client | None = None
        self.stopping = False  # once set, no connection announces online any more
        self.connects = 0

    def status(self, state: str) -> bytes:
        """The dispatcher's own presence, retained on ``{prefix}/dispatcher/status``: online
        once it is connected and subscribed, offline when it stops, and offline as its will
        when its connection is lost, so that operators see when nobody is dispatching. With
        a PostgreSQL store it also names the instance serving, since when and its epoch."""
        event = cloudevent(
            f"status-{uuid.uuid4().hex}",
            self.source,
            "cn.antifraud.dispatcher.status",
            {"state": state, **self.serving()},
            subject=self.client_id,
        )
        return orjson.dumps(event)

    async def say_offline(self) -> None:
        """Stop announcing online, and say offline over the open connection, if any."""
        self.stopping = True
        # not the link's client: a stop between announcing online and handing the connection
        # to the publisher must still say offline, or the retained online would outlive the
        # dispatcher
        if self.announcer is not None:
            await self._say_offline_over(self.announcer)

    async def _say_offline_over(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(BrokerError, TimeoutError):
            await asyncio.wait_for(
                publish(client, self.status_topic, self.status("offline"), qos=1, retain=True),
                2.0,
            )

    async def run(self) -> None:
        sessions, link = self.sessions, self.link
        await sessions.after_previous("")
        backoff = Backoff()
        while True:
            if not self.may_connect():  # the session is another instance's now
                await asyncio.Event().wait()
            log.info("broker_connecting", broker=str(self.broker), attempt=backoff.attempt + 1)
            try:
                will = aiomqtt.Will(self.status_topic, self.status("offline"), qos=1, retain=True)
                async with open_client(
                    self.broker,
                    self.client_id,
                    persistent=True,
                    manual_acks=True,
                    deliver=self.inbox.receive_action,
                    on_acknowledged=link.wake.set,
                    will=will,
                ) as client:
                    self.announcer = client
                    if self.filters:
                        await client.subscribe([(f, 1) for f in self.filters])
                    if self.stale:
                        await unsubscribe(client, list(self.stale))
                    if self.stopping:
                        # a stop came while this connection was set up: offline is said
                        # over it (again, if it was already), and never online after it
                        await self._say_offline_over(client)
                        return
                    # not awaited: behind a persistent session's backlog the broker may
                    # acknowledge it only seconds later, and outputs must not wait for that
                    publish_now(client, [(self.status_topic, self.status("online"), 1, True)])
                    sessions.announced("")  # the units' sessions may connect now
                    await sessions.others_up(RECEIVERS_WAIT_S)
                    self.connects += 1
                    link.up(client)
                    sessions.subscribed("")
                    backoff.reset()
                    log.info(
                        "broker_connected",
                        broker=node_of(client),
                        protocol=protocol_of(client),
                        client_id=self.client_id,
                    )
                    await disconnected(client)  # messages arrive through the inbox
            except BrokerError as exc:
                if self.may_connect():  # else the session is another instance's: all is well
                    log.warning("broker_unavailable", broker=str(self.broker), error=str(exc))
            finally:
                self.announcer = None
                link.down()
            if not self.may_connect():
                continue  # waits above, without a word, until the service stops
            delay = backoff.next_delay()
            log.info("broker_reconnect_wait", seconds=round(delay, 2))
            await sessions.backoff("", delay)
