"""What the sessions received and the processor has not yet handled.

Three queues, taken in the order their messages cause one another: call warnings, then
operators' actions, then units' messages (a call opens an incident an operator acts on, whose
offers units answer). Backlogs delivered at once after a restart are then handled in that
order, and a flooding handset's messages wait behind nobody's.

In: each message as paho decodes it, from the receiving sessions (``receive_call``,
``receive`` for the operators' actions, ``receive_unit``). Out: batches, to the processor
(``take``).
"""

from __future__ import annotations

import asyncio
from collections import deque

import aiomqtt

# QoS 0 messages of the operators' or the units' waiting to be handled at most, in each queue
# (QoS 1 is bounded by the broker's in-flight window; QoS 0, which no console or handset
# uses, by nothing)
QUEUED_QOS0 = 10_000

Received = tuple[aiomqtt.Client, aiomqtt.Message]  # a message, with the connection it came over


class Inbox:
    def __init__(self) -> None:
        self.calls: deque[Received] = deque()
        self.actions: deque[Received] = deque()
        self.units: deque[Received] = deque()
        self.arrived = asyncio.Event()  # set by each message, cleared by the processor
        self.received = 0
        self.dropped = 0  # QoS 0 messages over ``QUEUED_QOS0``

    def receive(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """An operator's action, or anything else a session that reads nothing of its own
        was sent. Past a bound, QoS 0 is dropped (and counted)."""
        self._queue(self.actions, client, message)

    def receive_call(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        self.received += 1
        self.calls.append((client, message))
        self.arrived.set()

    def receive_unit(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """A unit's message: into the queue taken after the others. Past a bound, QoS 0 is
        dropped (and counted)."""
        self._queue(self.units, client, message)

    def _queue(
        self, queue: deque[Received], client: aiomqtt.Client, message: aiomqtt.Message
    ) -> None:
        self.received += 1
        if message.qos == 0 and len(queue) >= QUEUED_QOS0:
            self.dropped += 1
            return
        queue.append((client, message))
        self.arrived.set()

    @property
    def waiting(self) -> int:
        """Messages received, not yet taken."""
        return len(self.calls) + len(self.actions) + len(self.units)

    def take(self, most: int) -> list[Received]:
        """The next ``most`` messages at most: calls first, then actions, then units."""
        batch: list[Received] = []
        for queue in (self.calls, self.actions, self.units):
            while queue and len(batch) < most:
                batch.append(queue.popleft())
        return batch
