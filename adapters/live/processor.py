"""The processor: fires due timers, handles received messages in batches, commits each batch.

A commit is written on the event loop while the service keeps up, on the store's thread while
it drains a backlog; once written, its outbound messages go to the publisher (the runtime's
``on_written``) and the next batch is handled while the commit is flushed to the disk. A
batch's log lines are written once its messages are on their way. Timers keep firing while
the broker is away.

In: batches from the ``Inbox``; due timers from the runtime. Out: commits (the store, and
through it the publisher); each handled batch with its commit's flush, to the ``Acker``.
"""

from __future__ import annotations

import asyncio
import contextlib

from adapters.live.acker import Acker
from adapters.live.clock import Clock, Rate
from adapters.live.inbox import Inbox, Received, payload_bytes
from dispatcher import logs
from dispatcher.ports import Journal
from dispatcher.runtime import Runtime

BATCH = 1000  # inbound messages handled per commit at most
DEFER_BOOKKEEPING_S = 1.0  # longest a batch of bookkeeping alone waits to be committed
# below this many inbound messages a second, commits are written on the event loop (each
# message's latency matters, and the loop has time to spare); above it, on the store's thread
# while the next messages are received (a backlog or a burst: throughput matters). Messages
# counted unread over their channel's budget do not count: a flood is no backlog to drain,
# and a commit on the thread would wait for the interpreter while the loop reads the flood
INLINE_MAX_RATE = 1000.0
# a batch's log lines are written this long after its commit, once its messages have left
# (from the commit itself, or from the publisher's next turn); warnings and errors at once
LOG_RELEASE_S = 0.002
# a commit written on the loop is flushed to the disk this long after it was written (its
# messages are on their way by then): the flush wakes the kernel's journal and the disk on
# the cores those messages need on their way to their subscribers (docs/decisions.md 54);
# its inbound messages are acknowledged once it is flushed, as always; a store may want
# longer (``Journal.flush_after_s``: PostgreSQL's, decisions.md 86)
FLUSH_AFTER_S = 0.005
# a timer later than this (real seconds) fell due while the service was not running: it fires
# at the current time, so that the offers it makes get their whole time (decisions.md 91)
LATE_TIMER_S = 2.0


async def _flush(store: Journal, after: float) -> None:
    if after:
        await asyncio.sleep(after)
    await store.flush()


class Processor:
    def __init__(self, runtime: Runtime, clock: Clock, inbox: Inbox, acker: Acker) -> None:
        self.runtime, self.clock, self.inbox, self.acker = runtime, clock, inbox, acker
        self.flushes: set[asyncio.Future[None]] = set()  # flushes not yet done

    async def run(self) -> None:
        runtime, clock, inbox = self.runtime, self.clock, self.inbox
        loop = asyncio.get_running_loop()
        deferred_since: float | None = None  # bookkeeping handled, not yet committed, since
        rate = Rate(INLINE_MAX_RATE)
        release: asyncio.TimerHandle | None = None  # of the held log lines
        while True:
            due = runtime.next_due()
            timeout = None if due is None else max(0.0, clock.real_seconds(due - clock.now()))
            if deferred_since is not None:
                left = max(0.0, deferred_since + DEFER_BOOKKEEPING_S - loop.time())
                timeout = left if timeout is None else min(timeout, left)
            if not inbox.waiting:
                inbox.arrived.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await inbox.arrived.wait()
            batch: list[Received] = inbox.take(BATCH)
            # this batch's log lines wait until its messages are on their way (logs.py)
            logs.hold()
            now = max(clock.now(), runtime.clock)
            runtime.advance(now, late_after=LATE_TIMER_S * clock.speed)
            if batch and "first_inbound_at" not in runtime.meta:
                runtime.meta["first_inbound_at"] = repr(now)
                runtime.store.set_meta("first_inbound_at", repr(now))
            suppressed = runtime.counts["suppressed"]
            for _client, message in batch:
                if inbox.echo(message):  # its other copy, from the other session, was read
                    continue
                runtime.handle(
                    str(message.topic),
                    payload_bytes(message.payload),
                    now,
                    retained=bool(message.retain),
                )
            # what was read counts towards the rate that moves commits to the store's thread
            # (INLINE_MAX_RATE); what was counted unread does not
            rate.add(len(batch) - (runtime.counts["suppressed"] - suppressed), loop.time())
            # A batch that changed nothing but bookkeeping (clean calls, duplicates: only their
            # processed pairs) is acknowledged without waiting for a disk flush; the pairs go
            # to disk with the next commit, at most DEFER_BOOKKEEPING_S later. Lost in a crash,
            # they could only let a duplicate of a message without effects be handled again.
            flushed: asyncio.Future[None] | None = None
            if runtime.store.holds_effects() or (
                deferred_since is not None and loop.time() - deferred_since >= DEFER_BOOKKEEPING_S
            ):
                # written (its messages handed to the publisher), then flushed while the next
                # batch is handled (FLUSH_AFTER_S later, unless a burst is being drained); the
                # acker acknowledges this batch once it is flushed
                await runtime.commit(flush=False, inline=not rate.busy)
                flushed = asyncio.ensure_future(
                    _flush(
                        runtime.store,
                        0.0 if rate.busy else max(FLUSH_AFTER_S, runtime.store.flush_after_s),
                    )
                )
                self.flushes.add(flushed)
                flushed.add_done_callback(self.flushes.discard)
                deferred_since = None
            elif batch and deferred_since is None:
                deferred_since = loop.time()
            if batch or flushed is not None:  # a failed flush stops the service even when
                self.acker.put(flushed, batch)  # only timers made the commit
            # the publisher is woken by its ``written``, and only when a commit has messages
            if release is None or loop.time() >= release.when():  # none pending
                release = loop.call_later(LOG_RELEASE_S, logs.release)
