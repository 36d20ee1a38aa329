"""``antifraud bench escalation``: the dispatcher's own work for one escalation, in-process.

No broker and no other process: a flagged call opens an incident, an ``operator.escalate``
is handled and committed the way the live service's processor does it (handled, then
written on the event loop until the commit's messages are handed over), and the incident is
closed; over and over. The figures are the two stages of the escalation: **handled**
(validation, workflow, six messages built) and **written** (the commit prepared, serialised
and written to the store, up to the moment its messages are handed to the publisher).

Each round runs after a chosen idle pause, because that is what the live benchmark's
escalations see: the same work costs more once the process has slept and its neighbours
have filled the caches. Comparing the rows separates what the code costs (no pause) from
what a busy shared machine adds to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import tempfile
import time
import uuid
from pathlib import Path

from adapters.journal import open_store
from dispatcher import logs
from dispatcher.model import incident_of_call
from dispatcher.outbound import Topics
from dispatcher.ports import OutboxRow
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tools.bench_live import CHEN, FLAGGED, call_bytes, database, event_bytes, percentile


async def escalation_stages(
    settings: Settings, samples: int, pause_s: float, postgresql: str | None = None
) -> tuple[list[float], list[float]]:
    """(handled ms, written ms) of ``samples`` escalations, each after ``pause_s`` idle.
    The operator's and the resident's rate limits are lifted: the benchmark sends faster
    than any operator, on purpose."""
    limits = settings.limits.model_copy(
        update={
            "rate_per_party": 1e9,
            "burst_per_party": 10**9,
            "rate_per_subscriber": 1e9,
            "burst_per_subscriber": 10**9,
        }
    )
    settings = dataclasses.replace(settings, limits=limits)
    topics = Topics(settings.service.prefix)
    calls, actions = topics.calls(settings.service.region), topics.actions("bench")
    handed_over: list[float] = []

    def written(_rows: list[OutboxRow]) -> None:
        handed_over.append(time.perf_counter())

    handled_ms: list[float] = []
    written_ms: list[float] = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="antifraud-bench-esc-"))
        where: str | Path = Path(tmp) / "bench.sqlite3"
        if postgresql is not None:
            where = stack.enter_context(database(postgresql, "bench_escalation"))
        sync = settings.service.store_sync
        async with open_store(where, sync, inline_writes=True, writer=True) as store:
            runtime = Runtime(settings, store, outbox=True)
            runtime.on_written = written
            await runtime.start()
            await runtime.commit()
            gc.collect()
            gc.freeze()

            async def step(topic: str, payload: bytes) -> float:
                """Handle and write one message as the live processor does; the moment it
                was handled."""
                logs.hold()
                now = time.time()
                runtime.advance(now)
                runtime.handle(topic, payload, now)
                handled = time.perf_counter()
                await runtime.commit(flush=False, inline=True)
                logs.release()
                await store.flush()
                return handled

            for _ in range(samples):
                call = f"ESC-{uuid.uuid4().hex[:8]}"
                incident = incident_of_call(call)
                await step(calls, call_bytes("progress", call, CHEN, FLAGGED, 30))
                escalate = event_bytes(
                    "operator.escalate", {"incident_id": incident}, "console/bench"
                )
                await asyncio.sleep(pause_s)
                handed_over.clear()  # the opening's messages are not the escalation's
                started = time.perf_counter()
                handled = await step(actions, escalate)
                if not handed_over:
                    raise RuntimeError(f"escalating {incident} handed no messages over")
                handled_ms.append((handled - started) * 1000)
                written_ms.append((handed_over[-1] - handled) * 1000)
                close = {"incident_id": incident, "outcome": "false_alarm"}
                await step(actions, event_bytes("operator.close", close, "console/bench"))
            gc.unfreeze()
    return handled_ms, written_ms


async def run_escalation_bench(
    settings: Settings, samples: int, pauses_ms: list[float], postgresql: str | None = None
) -> int:
    stores = [None] if postgresql is None else [None, postgresql]
    for server in stores:
        await _rows(settings, samples, pauses_ms, server)
    return 0


async def _rows(
    settings: Settings, samples: int, pauses_ms: list[float], server: str | None
) -> None:
    store = "SQLite" if server is None else "PostgreSQL"
    print(
        f"an escalation handled and written in this process (no broker), {store} store, "
        f"{samples} samples per row, ms (p50 / p90):"
    )
    print(f"  {'idle before each':>16}  {'handled':>13}  {'written':>13}  {'both, p50':>9}")
    for pause in pauses_ms:
        handled, written = await escalation_stages(settings, samples, pause / 1000, server)
        both = [h + w for h, w in zip(handled, written, strict=True)]
        print(
            f"  {pause:>13g} ms  "
            f"{percentile(handled, 0.5):>5.2f} / {percentile(handled, 0.9):<5.2f}  "
            f"{percentile(written, 0.5):>5.2f} / {percentile(written, 0.9):<5.2f}  "
            f"{percentile(both, 0.5):>9.2f}"
        )
