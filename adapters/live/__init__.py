"""The live service: the same runtime as replay, on a real broker and the system clock.

Six stages, each a module of this package with its inputs and outputs passed in, wired in
``service.py``:

- **connection** (``connection.py``): the dispatcher's sessions with the broker; every message
  received goes into the ``Inbox`` (``inbox.py``) as paho decodes it;
- **processor** (``processor.py``): fires due timers, handles the inbox in batches (calls, then
  actions, then units) and commits each batch to the store;
- **acker** (``acker.py``): acknowledges each batch, in order, once its commit is flushed;
- **publisher** (``publisher.py``): sends the store's outbox in order over the main session's
  connection (``Link``, ``link.py``), a window of messages ahead of their acknowledgements;
- **marker** (``marker.py``): records in the store which messages the broker took;
- **heartbeat** (``heartbeat.py``): an ``alive`` line every minute, with what waits where.

docs/architecture.md follows one message through them.
"""

from adapters.live.acker import Acker
from adapters.live.clock import Clock, Rate
from adapters.live.connection import RECEIVERS_WAIT_S, Connection, Sessions
from adapters.live.heartbeat import HEARTBEAT_S
from adapters.live.inbox import QUEUED_QOS0, Inbox
from adapters.live.link import Link
from adapters.live.marker import MARK_EVERY, MARK_INTERVAL_S, Marker
from adapters.live.processor import (
    BATCH,
    DEFER_BOOKKEEPING_S,
    FLUSH_AFTER_S,
    INLINE_MAX_RATE,
    LOG_RELEASE_S,
    Processor,
)
from adapters.live.publisher import PUBLISH_CHUNK, PUBLISH_WINDOW, Publisher
from adapters.live.service import LiveService, Stats

__all__ = [
    "BATCH",
    "DEFER_BOOKKEEPING_S",
    "FLUSH_AFTER_S",
    "HEARTBEAT_S",
    "INLINE_MAX_RATE",
    "LOG_RELEASE_S",
    "MARK_EVERY",
    "MARK_INTERVAL_S",
    "PUBLISH_CHUNK",
    "PUBLISH_WINDOW",
    "QUEUED_QOS0",
    "RECEIVERS_WAIT_S",
    "Acker",
    "Clock",
    "Connection",
    "Inbox",
    "Link",
    "LiveService",
    "Marker",
    "Processor",
    "Publisher",
    "Rate",
    "Sessions",
    "Stats",
]
