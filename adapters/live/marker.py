"""The marker: records in the store, a few times a second, which messages the broker took.

A message sent but not yet marked when the process dies is sent again (same id: dropped as a
duplicate by receivers).

In: the outbox sequence numbers the broker acknowledged, from the publisher (``add``).
Out: ``Store.mark_sent``, every ``MARK_INTERVAL_S``, or at once by the publisher's ``mark``
once ``MARK_EVERY`` wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from adapters.journal import LiveJournal

MARK_EVERY = 500  # published messages marked sent in the store at once …
MARK_INTERVAL_S = 0.25  # … or this often


class Marker:
    def __init__(self, store: LiveJournal) -> None:
        self.store = store
        self.sent: list[int] = []  # published, not yet marked in the store

    def add(self, seqs: Iterable[int]) -> None:
        self.sent.extend(seqs)

    @property
    def full(self) -> bool:
        return len(self.sent) >= MARK_EVERY

    async def mark(self) -> None:
        seqs, self.sent = self.sent, []
        await self.store.mark_sent(seqs)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(MARK_INTERVAL_S)
            if self.sent:
                await self.mark()
