"""A TCP relay that stands for the network between a client and its server (PostgreSQL, or
an MQTT broker): it can be cut, its connections dropped, and, for MQTT, chosen packets from
the server lost on the way to the client.

Used as ``async with Relay(target) as relay``, or ``start()`` and ``close()``. ``cut()`` stops
forwarding on every connection, open or new, until ``mend()``; the
connections themselves stay open (a partition, not a refused connection). ``drop()`` closes
every open connection at once, with no goodbye from either side, and relays new ones as
before.

``lose(kind)`` (with ``mqtt=True``): from now on, the server's packets of that kind
(``PUBACK``, or ``PUBLISH``), and holding the bytes ``containing`` anywhere in them if given,
are read and not delivered, as if lost on the way, ``at_most`` of them if given. That holds
on the connections being relayed now (accepted and being served), and with
``later_connections`` on those opened later too. A lost QoS 1 ``PUBLISH`` is acknowledged
to the server in the client's name when ``acknowledged`` (as if the client's MQTT library
took it and it went no further): else the server sends it again, as it must, on the
client's next connection to its session. Each lost packet is kept in ``lost``, and
``a_packet_lost`` is set at the first.

With ``mqtt=True`` both directions are relayed a whole packet at a time, so that a packet
the relay writes itself never lands inside one of the client's.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

PUBLISH = 3  # MQTT control packet types (the high nibble of a packet's first byte)
PUBACK = 4


@dataclass
class Loss:
    kind: int
    containing: bytes = b""
    at_most: int | None = None
    acknowledged: bool = False
    count: int = 0

    def takes(self, packet: bytes) -> bool:
        """Whether ``packet`` is lost (and counted) by this loss."""
        if self.at_most is not None and self.count >= self.at_most:
            return False
        if kind_of(packet) != self.kind or self.containing not in packet:
            return False
        self.count += 1
        return True


@dataclass
class _Link:
    losses: list[Loss] = field(default_factory=list)


class Relay:
    def __init__(self, target: tuple[str, int], mqtt: bool = False) -> None:
        self.target = target
        self.mqtt = mqtt
        self.open = asyncio.Event()
        self.open.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.lost: list[bytes] = []
        self.a_packet_lost = asyncio.Event()
        self._links: dict[asyncio.Task[None], _Link] = {}
        self._standing: list[Loss] = []  # for the connections to come

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self, port: int = 0) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.open.clear()

    def mend(self) -> None:
        """Forward again; what was held during the cut is dropped with its connections
        (as after a partition, the peers' TCP gave up on them)."""
        self.drop()
        self.open.set()

    def drop(self) -> None:
        for task in list(self._links):
            task.cancel()

    def lose(
        self,
        kind: int,
        containing: bytes = b"",
        at_most: int | None = None,
        later_connections: bool = False,
        acknowledged: bool = False,
    ) -> None:
        if not self.mqtt:
            raise ValueError("packets can be lost only on an MQTT relay (mqtt=True)")
        if acknowledged and kind != PUBLISH:
            raise ValueError("only a PUBLISH is acknowledged in the client's name")
        loss = Loss(kind, containing, at_most, acknowledged)
        for link in self._links.values():
            link.losses.append(loss)
        if later_connections:
            self._standing.append(loss)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        link = self._links[task] = _Link(list(self._standing))
        try:
            await self.open.wait()
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            try:
                async with asyncio.TaskGroup() as directions:  # one ends: both do
                    if self.mqtt:
                        directions.create_task(self._packets(reader, up_writer, None, None))
                        directions.create_task(self._packets(up_reader, writer, up_writer, link))
                    else:
                        directions.create_task(self._pipe(reader, up_writer))
                        directions.create_task(self._pipe(up_reader, writer))
            except* OSError:
                pass
            finally:
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.pop(task, None)
            writer.close()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self.open.wait()  # cut: held, never delivered
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()

    async def _packets(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        back: asyncio.StreamWriter | None,
        link: _Link | None,
    ) -> None:
        """One direction of an MQTT connection, packet by packet; from the server (``link``
        given), its losses applied, and ``back`` the way to the server."""
        try:
            while True:
                try:
                    packet = await read_packet(source)
                except asyncio.IncompleteReadError:
                    return  # the other side closed the connection
                await self.open.wait()
                loss = next((x for x in link.losses if x.takes(packet)), None) if link else None
                if loss is None:
                    sink.write(packet)
                    await sink.drain()
                    continue
                self.lost.append(packet)
                self.a_packet_lost.set()
                if loss.acknowledged and back is not None:
                    acknowledgement = puback_for(packet)
                    if acknowledgement is not None:
                        back.write(acknowledgement)
                        await back.drain()
        finally:
            sink.close()

    async def close(self) -> None:
        self.mend()
        links = list(self._links)
        if links:
            await asyncio.gather(*links, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(OSError):
                await self.server.wait_closed()


def kind_of(packet: bytes) -> int:
    return packet[0] >> 4


def puback_for(packet: bytes) -> bytes | None:
    """The acknowledgement of a QoS 1 ``PUBLISH`` (its packet id follows the topic); None
    for QoS 0, which has none, and QoS 2, which is acknowledged in two steps."""
    if kind_of(packet) != PUBLISH or (packet[0] >> 1) & 0x03 != 1:
        return None
    # the variable header starts after the remaining length's last byte (high bit clear)
    start = next(i for i in range(1, 5) if not packet[i] & 0x80) + 1
    topic = int.from_bytes(packet[start : start + 2], "big")
    packet_id = packet[start + 2 + topic : start + 4 + topic]
    return bytes([PUBACK << 4, 2]) + packet_id  # MQTT 3.1.1 and 5: success, no properties


async def read_packet(source: asyncio.StreamReader) -> bytes:
    """One MQTT control packet, whole: its first byte, its remaining length (one to four
    bytes, seven bits each, least significant first) and that many bytes."""
    head = await source.readexactly(1)
    length, shift = 0, 0
    for _ in range(4):
        byte = (await source.readexactly(1))[0]
        head += bytes([byte])
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return head + await source.readexactly(length)
