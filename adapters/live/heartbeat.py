"""The heartbeat: an ``alive`` line every ``every`` seconds, a quiet service told from a stuck one.

Counts that grow while work flows, and what waits at each stage: ``received`` standing still
while senders send, or a count of what waits that only grows, says where the service is stuck
(docs/operations.md).

In: the stages' counters. Out: the log line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from adapters.live.acker import Acker
from adapters.live.inbox import Inbox
from adapters.live.link import Link
from adapters.live.publisher import Publisher
from dispatcher.runtime import Runtime

log = structlog.get_logger("live")

HEARTBEAT_S = 60.0  # one `alive` line this often


async def heartbeat(
    every: float,
    runtime: Runtime,
    link: Link,
    inbox: Inbox,
    acker: Acker,
    publisher: Publisher,
    serving: Callable[[], dict[str, Any]] = dict,
) -> None:
    while True:
        await asyncio.sleep(every)
        counts = runtime.counts
        log.info(
            "alive",
            connected=link.connected.is_set(),
            received=inbox.received,
            handled=counts["handled"],
            rejected=counts["rejected"],
            suppressed=counts["suppressed"],
            duplicates=counts["duplicates"],
            timers=counts["timers"],
            produced=counts["published"],
            sent=publisher.published,
            received_not_yet_handled=inbox.waiting,
            dropped=inbox.dropped,
            copies=inbox.copies,
            handled_not_yet_acknowledged=acker.unacknowledged,
            committed_not_yet_sent=publisher.waiting,  # or acknowledged
            open_incidents=len(runtime.state.open_by_subscriber),  # one open per resident
            **serving(),  # with a PostgreSQL store: which instance serves, since when
        )
