"""MQTT connections (aiomqtt): broker URLs, protocol fallback, persistent sessions, acks.

Every client of the project connects through ``open_client``: MQTT 5 where the broker speaks
it, else 3.1.1 (the choice is remembered per broker). Persistent clients (the dispatcher, the
handsets) keep a fixed client id and a session that survives disconnects, so messages published
while they were away are delivered when they come back.

aiomqtt acknowledges QoS 1 messages as soon as they arrive. The dispatcher must acknowledge a
message only once its effects are committed, so ``manual_acks`` switches the underlying
paho-mqtt client to application-controlled acknowledgements (aiomqtt has no option for it yet;
this is the workaround its maintainers point to) and ``ack`` sends the PUBACK.

Outgoing packets leave from the call that queues them. aiomqtt registers its socket writer
through ``call_soon_threadsafe`` (paho may ask from the thread that connects), so a packet
queued on the event loop waited two passes of the loop: one to register the writer, one for
the socket to be reported writable. ``Client`` registers the writer at once when asked on the
loop, which keeps paho's idea of "registered" and the loop's in step, and ``publish_now``
then writes each packet straight away.

Incoming messages can skip a queue too: aiomqtt's ``messages`` iterator creates a task and
waits on it for every message, so a message passed through three turns of the loop before
its reader saw it. A ``Client`` given ``deliver`` hands each message over as it is decoded
(the dispatcher); the other clients use ``messages`` as it is.

Outgoing messages are not held back by the client. paho keeps at most 20 QoS 1 messages
unacknowledged and queues the rest until acknowledgements come back, so the messages of a
commit (or of several, published together) beyond the 20th went out 20 per round trip
through the broker. Every client allows ``IN_FLIGHT`` instead, or what the broker's CONNACK
says it receives at most (MQTT 5 Receive Maximum), whichever is less.

Each of these reaches into aiomqtt's or paho's private attributes; all such uses are in
adapters/mqtt_internals.py, which checks the installed versions and attributes when the first
client is opened. Errors do not leave this module as ``aiomqtt.MqttError``: whatever fails on a
connection, in these functions or in the body of ``open_client``, is a ``BrokerError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt_internals import (
    IN_FLIGHT,
    Client,
    Deliver,
    ack_manually,
    check_client,
    check_mqtt_library,
    ending,
    paho_of,
    pending_publishes,
    write_packet,
)
from dispatcher.errors import BrokerError, ConfigError
from dispatcher.settings import check_broker_urls

__all__ = [
    "IN_FLIGHT",
    "Backoff",
    "BrokerURL",
    "Client",
    "Deliver",
    "ack",
    "acknowledged",
    "disconnected",
    "forget",
    "messages_until",
    "node_of",
    "open_client",
    "protocol_of",
    "publish",
    "publish_acknowledged",
    "publish_now",
    "remember_protocol",
]

log = structlog.get_logger("mqtt")

SESSION_EXPIRY_S = 7 * 24 * 3600
UNSUPPORTED_PROTOCOL = {1, 132}  # 3.1.1 "unacceptable protocol version", 5.0 0x84
PASSWORD_ENV = "ANTIFRAUD_BROKER_PASSWORD"


@dataclass(frozen=True)
class BrokerURL:
    """``mqtt://[user@]host[:port]`` or ``mqtts://…`` (TLS); for a clustered broker, its nodes'
    URLs separated by commas (``mqtt://a:1883,mqtt://b:1883``): ``host`` and ``port`` are the
    first node's, ``others`` the rest, in order. The password never comes from the URL's text
    on a command line: it is read from ``ANTIFRAUD_BROKER_PASSWORD`` or the config."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    others: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(
        cls,
        url: str,
        password: str | None = None,
        username: str | None = None,
        ca_file: str | None = None,
    ) -> BrokerURL:
        try:
            urls = check_broker_urls(url)
        except ValueError as exc:
            raise ConfigError([str(exc)]) from None
        nodes = [urlsplit(u if "://" in u else f"mqtt://{u}") for u in urls]
        tls = nodes[0].scheme == "mqtts"
        names = {unquote(n.username) for n in nodes if n.username}
        if len(names) > 1:
            raise ConfigError([f"broker URLs {url!r}: name different users; name one or none"])
        username = names.pop() if names else username
        secret = next((unquote(n.password) for n in nodes if n.password), None)
        secret = os.environ.get(PASSWORD_ENV) or password or secret
        addresses = [(str(n.hostname), n.port or (8883 if tls else 1883)) for n in nodes]
        (host, port), *others = addresses
        return cls(host, port, tls, username, secret, ca_file, tuple(others))

    @property
    def nodes(self) -> list[BrokerURL]:
        """Each node of the broker as a URL of its own (one for a broker that is not
        clustered)."""
        first = dataclasses.replace(self, others=())
        return [first] + [dataclasses.replace(first, host=h, port=p) for h, p in self.others]

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        scheme = "mqtts" if self.tls else "mqtt"
        addresses = [(self.host, self.port), *self.others]
        return ",".join(f"{scheme}://{user}{host}:{port}" for host, port in addresses)


_protocols: dict[tuple[str, int], aiomqtt.ProtocolVersion] = {}


async def disconnected(client: aiomqtt.Client) -> None:
    """Return when the connection ends, raising ``BrokerError`` as ``messages`` raises
    ``MqttError`` when it was lost (for a client that hands its messages to ``deliver``)."""
    ended = ending(client)
    await asyncio.wait([ended])  # never raises what the connection ended with
    raise BrokerError("Disconnected") from ended.exception()


def _client(
    broker: BrokerURL,
    protocol: aiomqtt.ProtocolVersion,
    identifier: str | None,
    persistent: bool,
    will: aiomqtt.Will | None,
    timeout: float,
) -> Client:
    properties = None
    kwargs: dict[str, object] = {}
    if protocol == aiomqtt.ProtocolVersion.V5:
        if persistent:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = SESSION_EXPIRY_S
        kwargs["clean_start"] = not persistent
    else:
        kwargs["clean_session"] = not persistent
    client = Client(
        broker.host,
        broker.port,
        identifier=identifier,
        protocol=protocol,
        username=broker.username,
        password=broker.password,
        will=will,
        timeout=timeout,
        keepalive=30,
        max_inflight_messages=IN_FLIGHT,
        properties=properties,
        tls_context=ssl.create_default_context(cafile=broker.ca_file) if broker.tls else None,
        # paho leaves Nagle's algorithm on: small QoS 1 packets then wait for delayed ACKs
        # (~40 ms on Linux). Alerts must not.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        **kwargs,  # type: ignore[arg-type]
    )
    check_client(client)
    client.publishing = {}
    return client


async def _connect(
    node: BrokerURL,
    identifier: str | None,
    persistent: bool,
    will: aiomqtt.Will | None,
    manual_acks: bool,
    operation_timeout: float,
    deliver: Deliver | None,
    on_acknowledged: Callable[[], None] | None,
) -> Client:
    """A connected client on one node (MQTT 5, or 3.1.1 when it refuses 5); ``BrokerError``."""
    key = (node.host, node.port)
    first = _protocols.get(key, aiomqtt.ProtocolVersion.V5)
    candidates = (
        [first] if first == aiomqtt.ProtocolVersion.V311 else [first, aiomqtt.ProtocolVersion.V311]
    )
    for protocol in candidates:
        client = _client(node, protocol, identifier, persistent, will, operation_timeout)
        if manual_acks:
            ack_manually(client)
        client.deliver = deliver
        client.on_acknowledged = on_acknowledged
        client.node = str(node)
        try:
            await client.__aenter__()
            break
        except aiomqtt.MqttCodeError as exc:
            code = getattr(exc.rc, "value", exc.rc)
            if protocol == aiomqtt.ProtocolVersion.V5 and code in UNSUPPORTED_PROTOCOL:
                continue  # the broker speaks 3.1.1 only: try again with it
            raise BrokerError(f"{node}: connection refused: {exc}") from None
        except aiomqtt.MqttError as exc:
            if protocol == aiomqtt.ProtocolVersion.V5 and "timed out" in str(exc):
                continue  # some 3.1.1-only brokers ignore a 5.0 CONNECT instead of refusing it
            raise BrokerError(f"{node}: cannot connect: {exc}") from None
    _protocols[key] = protocol
    return client


# for each clustered broker (by its URL), the node to try first: the one in use, or once its
# connection was lost, the one after it
_first_node: dict[str, int] = {}


@asynccontextmanager
async def open_client(
    broker: BrokerURL,
    identifier: str | None = None,
    *,
    persistent: bool = False,
    will: aiomqtt.Will | None = None,
    manual_acks: bool = False,
    operation_timeout: float = 10.0,
    deliver: Deliver | None = None,
    on_acknowledged: Callable[[], None] | None = None,
) -> AsyncIterator[aiomqtt.Client]:
    """Connect (MQTT 5, or 3.1.1 when the broker refuses 5); ``BrokerError`` if unreachable,
    and for any ``MqttError`` raised while the connection is used (in the ``async with``).
    A clustered broker's nodes are tried in turn, from the one in use last (or the one after
    it, when that connection was lost): ``BrokerError`` once none answers; ``node_of`` says
    which one the client is on.
    ``deliver``: see ``Client`` (set before connecting: a persistent session's queued
    messages may arrive before anything is subscribed); ``on_acknowledged``: see ``Client``.
    ``UnsupportedLibrary`` if the installed aiomqtt or paho-mqtt is not a supported one."""
    check_mqtt_library()
    nodes, key = broker.nodes, str(broker)
    first = _first_node.get(key, 0)
    failures: list[str] = []
    for turn in range(len(nodes)):
        index = (first + turn) % len(nodes)
        try:
            client = await _connect(
                nodes[index],
                identifier,
                persistent,
                will,
                manual_acks,
                operation_timeout,
                deliver,
                on_acknowledged,
            )
            break
        except BrokerError as exc:
            if len(nodes) == 1:
                raise
            failures.append(str(exc))
            log.warning("broker_node_unavailable", node=str(nodes[index]), error=str(exc))
    else:
        raise BrokerError(f"no node of the broker answers: {'; '.join(failures)}")
    _first_node[key] = index
    lost = False
    try:
        yield client
    except aiomqtt.MqttError as exc:
        lost = True
        raise BrokerError(f"{client.node}: {exc}") from exc
    except BrokerError:
        lost = True
        raise
    finally:
        if lost and _first_node.get(key) == index:
            _first_node[key] = (index + 1) % len(nodes)  # the next connection tries another
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)
        ended = ending(client)
        if ended.done() and not ended.cancelled():
            # what a lost connection ended with was said (``BrokerError``, and the caller's
            # log); taken here, or asyncio would log it once more when the future is
            # collected, as an error with no context: "Future exception was never retrieved"
            ended.exception()


def node_of(client: aiomqtt.Client) -> str:
    """The URL of the node ``client`` is connected to (of a clustered broker, one of them)."""
    return client.node if isinstance(client, Client) else "?"


async def messages_until(
    client: aiomqtt.Client, stop: asyncio.Event, deadline: float | None = None
) -> AsyncIterator[aiomqtt.Message]:
    """The client's messages until ``stop`` is set or the ``time.monotonic()`` deadline passes.

    One read stays pending across waits and is cancelled only at the end: cancelling a read
    of aiomqtt's message generator closes the generator for good. ``BrokerError`` once the
    connection is lost.
    """
    messages = client.messages.__aiter__()
    stopper = asyncio.ensure_future(stop.wait())
    waiter: asyncio.Future[aiomqtt.Message] | None = None
    try:
        while not stop.is_set():
            if waiter is None:
                waiter = asyncio.ensure_future(messages.__anext__())
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            either: set[asyncio.Future[Any]] = {waiter, stopper}
            done, _ = await asyncio.wait(
                either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if waiter in done:
                try:
                    message = waiter.result()
                except aiomqtt.MqttError as exc:
                    raise BrokerError(str(exc)) from exc
                waiter = None
                yield message
            elif not done:
                return  # the deadline passed
    finally:
        stopper.cancel()
        if waiter is not None:
            waiter.cancel()


def remember_protocol(broker: BrokerURL, version: str) -> None:
    """Tell ``open_client`` which protocol a broker speaks, saving the 5.0 attempt."""
    _protocols[(broker.host, broker.port)] = (
        aiomqtt.ProtocolVersion.V5 if version == "5" else aiomqtt.ProtocolVersion.V311
    )


def protocol_of(client: aiomqtt.Client) -> str:
    return "5" if paho_of(client).protocol == aiomqtt.ProtocolVersion.V5.value else "3.1.1"


def publish_now(
    client: aiomqtt.Client, messages: Sequence[tuple[str, bytes | None, int, bool]]
) -> dict[int, asyncio.Event]:
    """Queue ``(topic, payload, qos, retain)`` messages with paho in order and write them to
    the socket now; return, per message id, the event set once the broker acknowledged it
    (QoS > 0). Pass the result to ``acknowledged``. ``BrokerError`` if paho refuses one
    (the connection is gone): none of them is then awaited.

    aiomqtt's ``publish()`` is a coroutine per message: gathered, each becomes a task that
    queues its packet on its own pass of the event loop. Here every packet is queued and
    written from this call, each as soon as it is built (see the module docstring): the
    broker routes the first message while the next ones are built. Acknowledgements are
    awaited the way aiomqtt's ``publish()`` awaits them: an event in its table of pending
    publishes, set by its ``on_publish`` callback.
    """
    paho, pending = paho_of(client), pending_publishes(client)
    waiting: dict[int, asyncio.Event] = {}
    ours = client if isinstance(client, Client) else None
    writing = ours is not None  # until the socket takes no more: then the loop's writer goes on
    try:
        for topic, payload, qos, retain in messages:
            info = paho.publish(topic, payload, qos, retain)
            if info.rc != 0:
                raise BrokerError(str(aiomqtt.MqttCodeError(info.rc, "Could not publish message")))
            if not info.is_published():
                waiting[info.mid] = pending[info.mid] = asyncio.Event()
                if ours is not None:
                    ours.publishing[info.mid] = topic
            if writing:
                # each packet as soon as it is built (paho sends one packet per system call
                # anyway): the first message is on its way while the next ones are built
                writing = write_packet(paho)
    except BaseException:
        forget(client, waiting)
        raise
    finally:
        if ours is not None:
            # now, not two passes of the loop later: what is left, if anything, and paho's
            # bookkeeping (the loop's writer is dropped once nothing waits to be written)
            ours.write_ready()
    return waiting


async def acknowledged(client: aiomqtt.Client, waiting: dict[int, asyncio.Event]) -> None:
    """Return once the broker acknowledged every message ``publish_now`` returned."""
    try:
        for event in waiting.values():
            await event.wait()
    finally:
        forget(client, waiting)


async def publish_acknowledged(
    client: aiomqtt.Client,
    messages: Sequence[tuple[str, bytes | None, int, bool]],
) -> None:
    """Publish ``messages`` (as ``publish_now``) and return once the broker acknowledged them.

    Raises ``BrokerError`` the moment the connection is lost; aiomqtt's ``publish()`` instead
    waits out its whole operation timeout on a connection that is already gone. A link that
    died without a word is noticed only by the keepalive (up to 45 s): a caller that cannot
    wait that long bounds the call with ``asyncio.timeout``.
    """
    waiting = publish_now(client, messages)
    if not waiting:
        return
    acked = asyncio.ensure_future(acknowledged(client, waiting))
    lost = asyncio.ensure_future(disconnected(client))
    try:
        await asyncio.wait([acked, lost], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (acked, lost):
            task.cancel()
        await asyncio.wait([acked, lost])  # acknowledged() forgets what it still waited for
    if not acked.cancelled():
        if not lost.cancelled():
            lost.exception()  # the connection ended just after: that is not this call's news
        return
    raise BrokerError("the connection was lost before the broker acknowledged") from (
        lost.exception()
    )


async def publish(
    client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False
) -> None:
    """aiomqtt's ``publish()``, raising ``BrokerError`` where it raises ``MqttError`` (for a
    publish outside the ``async with`` of ``open_client``)."""
    try:
        await client.publish(topic, payload, qos=qos, retain=retain)
    except aiomqtt.MqttError as exc:
        raise BrokerError(str(exc)) from exc


def drop(client: aiomqtt.Client) -> None:
    """End the connection (a clean DISCONNECT: the will is not sent); whoever awaits
    ``disconnected`` then reconnects."""
    paho_of(client).disconnect()


async def unsubscribe(client: aiomqtt.Client, filters: list[str]) -> None:
    """aiomqtt's ``unsubscribe()`` (a filter the session does not hold is no error)."""
    await client.unsubscribe(filters)


def forget(client: aiomqtt.Client, waiting: dict[int, asyncio.Event]) -> None:
    """Stop waiting for the acknowledgements ``publish_now`` returned (the connection is
    gone: they will never come)."""
    pending = pending_publishes(client)
    publishing = client.publishing if isinstance(client, Client) else {}
    for mid, event in waiting.items():
        if pending.get(mid) is event:
            del pending[mid]
            publishing.pop(mid, None)


def ack(client: aiomqtt.Client, message: aiomqtt.Message) -> None:
    """Acknowledge a QoS 1/2 message received with ``manual_acks`` on the connection it came
    over (a no-op for QoS 0). Once that connection is closed there is nothing to do: its
    session redelivers the message over the next connection."""
    if message.qos > 0 and (paho := paho_of(client)).is_connected():
        paho.ack(message.mid, message.qos)


class Backoff:
    """Capped exponential backoff with full jitter: 0.5 s, 1 s, 2 s … up to ``cap`` s."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        self.base, self.cap = base, cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
