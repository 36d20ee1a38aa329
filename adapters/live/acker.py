"""The acker: acknowledges (PUBACK) each handled batch, in order, once its commit is flushed.

A crash at any moment then loses nothing (unacknowledged messages are redelivered to the
persistent session) and processes nothing twice (redeliveries are dropped as duplicates). A
batch that changed nothing but bookkeeping comes without a flush and is acknowledged at once.

In: ``(flush, batch)`` from the processor (``put``), in the order the batches were handled.
Out: the acknowledgements, on the connection each message came over.
"""

from __future__ import annotations

import asyncio

from adapters.live.inbox import Received
from adapters.mqtt import ack

Handled = tuple[asyncio.Future[None] | None, list[Received]]  # a batch and its commit's flush


class Acker:
    def __init__(self) -> None:
        self._handled: asyncio.Queue[Handled] = asyncio.Queue()
        self.unacknowledged = 0  # messages handled, not yet acknowledged

    def put(self, flushed: asyncio.Future[None] | None, batch: list[Received]) -> None:
        self._handled.put_nowait((flushed, batch))
        self.unacknowledged += len(batch)

    async def run(self) -> None:
        """A failed flush stops the service: nothing it covers is acknowledged."""
        while True:
            flushed, batch = await self._handled.get()
            if flushed is not None:
                await flushed
            # on the connection each message came over, whether or not the service has seen
            # that connection's subscription confirmed yet: a persistent session's backlog
            # flows before it is, and a message never acknowledged holds a place in the
            # broker's in-flight window until the connection ends
            for client, message in batch:
                ack(client, message)
            self.unacknowledged -= len(batch)
