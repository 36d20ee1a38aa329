"""What the sessions received and the processor has not yet handled.

Three queues, taken in the order their messages cause one another: call warnings, then
operators' actions, then units' messages (a call opens an incident an operator acts on, whose
offers units answer). Backlogs delivered at once after a restart are then handled in that
order, and a flooding handset's messages wait behind nobody's.

In: each message as paho decodes it, from the receiving sessions (``receive_call``,
``receive_action`` for the operators' actions, ``receive_unit``). Out: batches, to the
processor (``take``), which passes over the second copies in them (``echo``).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Iterable

import aiomqtt

# QoS 0 messages of the operators' or the units' waiting to be handled at most, in each queue
# (QoS 1 is bounded by the broker's in-flight window; QoS 0, which no console or handset
# uses, by nothing)
QUEUED_QOS0 = 10_000
# digests of a listed operator's actions kept until their second copy comes, at most, for each
# operator: an identical message is a duplicate the runtime would drop, so a copy matched
# wrongly loses nothing
COPIES_KEPT = 1024

Received = tuple[aiomqtt.Client, aiomqtt.Message]  # a message, with the connection it came over


def payload_bytes(payload: object) -> bytes:
    """A message's payload as bytes, as paho decoded it."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode("utf-8")


class Inbox:
    def __init__(self, listed_actions: Iterable[str] = ()) -> None:
        """``listed_actions``: the action topics of the operators read on sessions of their
        own, which the session of every operator's actions receives too."""
        # for each such topic, the digests of messages received on one session and not yet
        # on the other, oldest first (at most ``COPIES_KEPT``): whichever copy comes first is
        # read, the second is not (``receive_action``)
        self._copies: dict[str, dict[bytes, None]] = {t: {} for t in listed_actions}
        # the messages queued in ``actions`` that are second copies, by id (each is alive
        # there until the processor takes it and asks ``echo``)
        self._echoes: set[int] = set()
        self.calls: deque[Received] = deque()
        self.actions: deque[Received] = deque()
        self.units: deque[Received] = deque()
        self.arrived = asyncio.Event()  # set by each message, cleared by the processor
        self.received = 0
        self.dropped = 0  # QoS 0 messages over ``QUEUED_QOS0``
        self.copies = 0  # second copies of listed operators' actions, not read

    def receive_action(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """An operator's action, from his own session or from the one that reads every
        operator's (or anything else a session that reads nothing of its own was sent). A
        listed operator's action comes on both: the copy that comes second is dropped if it
        needs no acknowledgement (QoS 0), else queued to be acknowledged in its turn, unread
        (the broker expects a session's acknowledgements in the order it sent). Either copy
        may come first, or alone: his session's queue at the broker may be full, or the
        session not yet made (the first start of a version that has it). Past a bound, QoS
        0 is dropped (and counted)."""
        if not self._first_copy(message):
            self.copies += 1
            if message.qos == 0:
                return
            self._echoes.add(id(message))
        self._queue(self.actions, client, message)

    def _first_copy(self, message: aiomqtt.Message) -> bool:
        copies = self._copies.get(message.topic.value)
        if copies is None:
            return True  # only one session reads this topic
        key = hashlib.blake2b(payload_bytes(message.payload), digest_size=16).digest()
        if key in copies:
            del copies[key]
            return False
        copies[key] = None
        if len(copies) > COPIES_KEPT:  # the other copy was lost (a full queue at the broker)
            del copies[next(iter(copies))]
        return True

    def echo(self, message: aiomqtt.Message) -> bool:
        """Whether a message taken is the second copy of a listed operator's action, which
        is acknowledged and not read (asked once for each message taken)."""
        if not self._echoes or id(message) not in self._echoes:
            return False
        self._echoes.discard(id(message))
        return True

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
