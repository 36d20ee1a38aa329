"""Recording live inbound traffic, and playing a recording onto a live broker (SPEC §6)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import structlog

from adapters.mqtt import BrokerURL, messages_until, open_client
from adapters.recording import read_lines, write_line
from dispatcher.errors import RecordingError
from dispatcher.outbound import Topics
from dispatcher.settings import Settings

log = structlog.get_logger("recorder")


def _refuse_a_recording(out: Path) -> None:
    if out.exists() and out.stat().st_size > 0:
        raise RecordingError(
            f"{out}: already holds a recording; record to a new file (a recording's times "
            "count from its own first line)"
        )


async def record(
    settings: Settings,
    broker: BrokerURL,
    out: Path,
    stop: asyncio.Event,
    duration: float | None = None,
) -> int:
    """Append every inbound message to ``out`` as a recording line until ``stop`` is set.

    ``at`` counts seconds from the first message recorded. Lines are flushed one by one, so a
    recording cut short is still a valid recording up to its last line. A file that already
    holds lines is refused, never overwritten: new lines appended to it would start again at
    0 s, and the replay of the whole would stop where time goes backwards.
    """
    _refuse_a_recording(out)
    filters = Topics(settings.service.prefix).inbound_filters(settings.service.region)
    count = 0
    start: float | None = None
    out.parent.mkdir(parents=True, exist_ok=True)
    async with open_client(broker) as client:
        await client.subscribe([(f, 1) for f in filters])
        log.info("recording", broker=str(broker), out=str(out), topics=filters)
        with out.open("a", encoding="utf-8") as handle:
            deadline = None if duration is None else time.monotonic() + duration
            async for message in messages_until(client, stop, deadline):
                now = time.monotonic()
                start = now if start is None else start
                payload = message.payload
                raw = (
                    payload
                    if isinstance(payload, bytes | bytearray)
                    else str(payload or "").encode()
                )
                handle.write(
                    write_line(round(now - start, 3), str(message.topic), bytes(raw)) + "\n"
                )
                handle.flush()
                count += 1
    return count


async def publish_recording(
    recording: Path, broker: BrokerURL, speed: float = 1.0, status_suffix: str = "/status"
) -> int:
    """Publish every line of ``recording`` at its own pace divided by ``speed`` (QoS 1).

    Unit presence (``…/status``) is published retained, as handsets do.
    """
    count = 0
    async with open_client(broker, persistent=False) as client:
        start = time.monotonic()
        for line in read_lines(recording):
            delay = start + line.at / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            payload = (
                line.payload
                if isinstance(line.payload, bytes)
                else json.dumps(line.payload, ensure_ascii=False).encode("utf-8")
            )
            await client.publish(
                line.topic, payload, qos=1, retain=line.topic.endswith(status_suffix)
            )
            count += 1
    return count
