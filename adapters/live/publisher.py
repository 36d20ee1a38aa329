"""The publisher: sends the store's outbox in order, QoS 1, incident state retained.

Fresh commits go straight from memory; after a (re)connect or a failed write, first
everything the store still holds unsent. Up to ``PUBLISH_WINDOW`` messages are written ahead of
their acknowledgements, which it settles in order; while it waits for work, a commit's
messages are written to the socket by the commit itself (``written``).

In: each commit's outbound rows as it is written (``written``, the runtime's ``on_written``);
the connection (``Link``); the store's unsent rows after a reconnect. Out: the messages, on
the socket; the sequence numbers the broker acknowledged, to the marker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

import aiomqtt
import structlog

from adapters.journal import LiveJournal
from adapters.live.link import Link
from adapters.live.marker import Marker
from adapters.mqtt import drop, forget, publish_now
from dispatcher.errors import BrokerError
from dispatcher.ports import OutboxRow

log = structlog.get_logger("live")

PUBLISH_CHUNK = 200  # messages handed to the client at once at most
# messages written and not yet acknowledged at most: the publisher writes the next chunk
# without waiting for the last one's acknowledgements (which a broker sending this client a
# backlog may hold back until the backlog is through; the messages themselves go on at once)
PUBLISH_WINDOW = 1000
# the longest the oldest message written may wait for its acknowledgement before the
# connection is taken for broken and replaced: an acknowledgement the broker dropped never
# comes, and once the window is full of them nothing more would go out, silently
ACK_WAIT_S = 30.0

# a chunk written over a connection, with the acknowledgements it waits for and when
Chunk = tuple[aiomqtt.Client, list[OutboxRow], dict[int, asyncio.Event], float]


def _messages(rows: list[OutboxRow]) -> list[tuple[str, bytes, int, bool]]:
    return [(topic, payload or b"", qos, retain) for _, topic, qos, retain, payload in rows]


class Publisher:
    def __init__(self, store: LiveJournal, link: Link, marker: Marker) -> None:
        self.store, self.link, self.marker = store, link, marker
        self.ready: deque[OutboxRow] = deque()  # committed, not yet written
        # messages go out in strictly increasing outbox order: the last one written over the
        # current connection, and the last one the broker acknowledged
        self.last_written = 0
        self.last_sent = 0
        self.window: deque[Chunk] = deque()  # over the current connection, oldest first
        self.in_window = 0  # messages in those chunks
        self.write_failed = False  # a write found the connection broken: send again from the store
        self.published = 0  # messages the broker acknowledged
        self.replaced = 0  # connections given up on for an acknowledgement that never came
        self._dropped: aiomqtt.Client | None = None  # the one given up on last

    @property
    def waiting(self) -> int:
        """Messages committed, not yet acknowledged by the broker."""
        return len(self.ready) + self.in_window

    def written(self, rows: list[OutboxRow]) -> None:
        """Called as each commit is written with its outbound messages, in order. While the
        publisher waits for work, they are written to the socket from here, without waiting
        for its turn on the loop; the publisher then settles their acknowledgements."""
        self.ready.extend(rows)
        client = self.link.client
        if self.link.direct and client is not None and self.in_window < PUBLISH_WINDOW:
            batch = self._take_ready()
            if batch:
                self.write(client, batch)
        self.link.wake.set()

    def _take_ready(self) -> list[OutboxRow]:
        """The next committed messages not yet written, in order, at most a chunk."""
        rows: list[OutboxRow] = []
        while self.ready and len(rows) < PUBLISH_CHUNK:
            row = self.ready.popleft()
            if row[0] > self.last_written:  # else: sent again from the store already
                rows.append(row)
        return rows

    def write(self, client: aiomqtt.Client, rows: list[OutboxRow]) -> None:
        """Write ``rows`` to the socket now; their acknowledgements join the window."""
        try:
            waiting = publish_now(client, _messages(rows))
        except BrokerError as exc:  # the store still holds them: sent again
            log.warning("publish_failed", error=str(exc), pending=len(rows))
            self.write_failed = True
            return
        self.window.append((client, rows, waiting, asyncio.get_running_loop().time()))
        self.in_window += len(rows)
        self.last_written = rows[-1][0]

    def settle(self) -> None:
        """The chunks at the head of the window the broker acknowledged, in order."""
        while self.window:
            _client, rows, waiting, _at = self.window[0]
            if not all(event.is_set() for event in reversed(waiting.values())):
                return  # acknowledgements come in order: the last one is checked first
            self.window.popleft()
            self.in_window -= len(rows)
            self.last_sent = rows[-1][0]
            self.marker.add(row[0] for row in rows)
            self.published += len(rows)

    def _lose_window(self) -> None:
        """The connection the window was written over is gone (or broke): its messages go
        again, from the store, over the next one."""
        for client, _rows, waiting, _at in self.window:
            forget(client, waiting)
        self.window.clear()
        self.in_window = 0
        self.last_written = self.last_sent
        self.write_failed = False

    async def run(self) -> None:
        link, store = self.link, self.store
        resync = True
        current: aiomqtt.Client | None = None  # the connection the window is written over
        while True:
            # cleared before looking: whatever happens from here on (also during the awaits
            # below) wakes the wait at the end of this turn
            link.wake.clear()
            self.settle()
            if self.marker.full:
                await self.marker.mark()
                continue  # settle what was acknowledged meanwhile
            client = link.client
            if client is None or client is not current or self.write_failed:
                # a new connection, none, or a broken one: what was written and not
                # acknowledged goes again, from the store
                if self.write_failed:
                    await asyncio.sleep(0.1)  # the connection task notices and reconnects
                self._lose_window()
                resync = True
                if link.client is None:
                    await link.connected.wait()
                current = link.client
                continue
            if self.in_window < PUBLISH_WINDOW:
                if resync:
                    rows = await store.unsent(PUBLISH_CHUNK, after=self.last_written)
                    if client is not link.client:
                        continue  # lost while reading: the next turn starts again
                    if rows:
                        self.write(client, rows)
                        continue
                    resync = False
                rows = self._take_ready()
                if rows:
                    self.write(client, rows)
                    continue
            link.direct = not resync
            try:
                await self._wait(client)
            finally:
                link.direct = False

    async def _wait(self, client: aiomqtt.Client) -> None:
        """Wait for work; past ``ACK_WAIT_S`` for the oldest message's acknowledgement, give
        the connection up: the connection stage reconnects, and what was not acknowledged
        goes again, from the store."""
        if not self.window:
            await self.link.wake.wait()
            return
        _client, rows, _waiting, written_at = self.window[0]
        late = written_at + ACK_WAIT_S - asyncio.get_running_loop().time()
        if late > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.link.wake.wait(), late)
            return
        if client is self._dropped:
            await self.link.wake.wait()  # given up on already: its end wakes this
            return
        log.warning(
            "publish_unacknowledged",
            seconds=round(asyncio.get_running_loop().time() - written_at, 1),
            oldest=rows[0][0],
            waiting=self.in_window,
            hint="the broker never acknowledged these messages: reconnecting to send them again",
        )
        self.replaced += 1
        self._dropped = client
        drop(client)
