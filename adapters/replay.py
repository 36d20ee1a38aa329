"""Replay a recording through the real dispatcher on a virtual clock (SPEC §6).

Timers fire at their virtual due times, those due at or before a line's ``at`` before that
line; nothing sleeps. The replay position is stored with the state, so ``--until`` stops as if
the process had died there and a later run on the same store resumes exactly.
"""

from __future__ import annotations

import gc
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from adapters import heap
from adapters.journal import open_store
from adapters.recording import fingerprint, prefix_digest, read_lines
from adapters.report import build_report
from dispatcher.errors import RecordingError, StoreError
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

COMMIT_EVERY = 1000  # recording lines per transaction during a replay (a batch's messages
# wait in memory until it is written: a wave of incidents makes them many)


def _origin(payload: Any, at: float) -> float:
    """Epoch seconds at recording clock 0, taken from the first line's CloudEvent ``time``."""
    if isinstance(payload, dict) and isinstance(payload.get("time"), str):
        try:
            return datetime.fromisoformat(payload["time"]).timestamp() - at
        except ValueError:
            pass
    return 0.0


async def replay(
    recording: Path,
    settings: Settings,
    store_path: str | Path | None = None,
    until: float | None = None,
    skipped: list[RecordingError] | None = None,
) -> dict[str, Any]:
    """Replay ``recording`` (resuming from the store's position) and return the report.
    With ``skipped``, lines that are not recording lines are passed over and listed there
    instead of stopping the replay."""
    if store_path is None:
        with tempfile.TemporaryDirectory(prefix="antifraud-replay-") as tmp:
            return await _replay(recording, settings, Path(tmp) / "store.sqlite3", until, skipped)
    return await _replay(recording, settings, store_path, until, skipped)


async def _replay(
    recording: Path,
    settings: Settings,
    store_path: str | Path,
    until: float | None,
    skipped: list[RecordingError] | None,
) -> dict[str, Any]:
    try:
        print_ = fingerprint(recording)
    except OSError as exc:
        raise RecordingError(f"{recording}: cannot read the recording: {exc.strerror}") from None
    async with open_store(store_path, writer=True) as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        # start-up objects live as long as the process: keep them out of garbage collections
        # (a full collection walks them all, ~20 ms, several times in a day's replay)
        heap.settle()
        meta = runtime.meta
        if meta.get("mode", "replay") != "replay":
            raise StoreError(f"{store_path}: this store belongs to a live dispatcher, not a replay")
        if meta.get("replay.recording", print_) != print_:
            raise StoreError(
                f"{store_path}: this store holds the replay of another recording; "
                "use a fresh --store to replay this one"
            )
        cursor = start = int(meta.get("replay.cursor", "0"))
        digest = 0
        if start and "replay.prefix" in meta:  # stores of earlier versions have none
            digest = int(meta["replay.prefix"], 16)
            if prefix_digest(recording, start) != digest:
                raise StoreError(
                    f"{store_path}: this store holds the replay of another recording (its "
                    f"first {start} lines are not {recording}'s); use a fresh --store to "
                    "replay this one"
                )
        store.set_meta("mode", "replay")
        store.set_meta("replay.recording", print_)
        need_origin = "clock_origin" not in meta
        # a line after the cut is checked against the last one before it (the clock stands
        # at its ``at``), as it would have been read straight through
        lines = read_lines(recording, start, skipped, runtime.clock if start else 0.0, digest)
        try:
            for number, at, topic, payload, digest_, retained in lines:
                if until is not None and at > until:
                    break
                if need_origin:
                    runtime.set_clock_origin(_origin(payload, at))
                    need_origin = False
                runtime.advance(at)
                runtime.handle(topic, payload, at, strict=True, retained=retained)
                cursor, digest = number, digest_  # physical lines consumed so far
                if cursor % COMMIT_EVERY == 0:
                    store.set_meta("replay.cursor", str(cursor))
                    store.set_meta("replay.prefix", f"{digest:08x}")
                    # written, not flushed: safe from the process dying (--until), and a
                    # power cut can only take the last commits, with the cursor beside
                    # them, for the next run to do again (decisions.md 88)
                    await runtime.commit_soon(flush=False)
            else:
                # the recording is over: what was counted over a channel's budget and not
                # yet summed up is, as of its last line (a flood at its end is in the report)
                runtime.report_suppressed(runtime.clock, force=True)
        finally:
            store.set_meta("replay.cursor", str(cursor))
            store.set_meta("replay.prefix", f"{digest:08x}")
            await runtime.commit()
        # the report is read from the store alone: the state goes first, so that the two are
        # never in memory at once (at a wave of 5,000 cases, some 80 MB each)
        del runtime, meta
        gc.collect()
        return await build_report(store, settings)
