"""Recording live inbound traffic, and playing a recording onto a live broker (SPEC §6)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.subscribeoptions import SubscribeOptions

from adapters.mqtt import (
    Backoff,
    BrokerURL,
    messages_until,
    node_of,
    open_client,
    protocol_of,
    publish_acknowledged,
)
from adapters.recording import read_lines, write_line
from dispatcher.errors import BrokerError, RecordingError
from dispatcher.outbound import Topics
from dispatcher.settings import Settings

log = structlog.get_logger("recorder")


def _subscriptions(
    filters: list[str], client: aiomqtt.Client, again: bool
) -> list[tuple[str, Any]]:
    if again and protocol_of(client) == "5":
        return [(f, SubscribeOptions(qos=1, retainHandling=1)) for f in filters]
    return [(f, 1) for f in filters]


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
    client_id: str | None = None,
) -> int:
    """Append every inbound message to ``out`` as a recording line until ``stop`` is set.

    ``at`` counts seconds from the first message recorded. Lines are flushed one by one, so a
    recording cut short is still a valid recording up to its last line. A file that already
    holds lines is refused, never overwritten: new lines appended to it would start again at
    0 s, and the replay of the whole would stop where time goes backwards.

    The recorder keeps a persistent session under ``client_id`` while it runs: when the
    broker goes away it reconnects with capped exponential backoff and jitter (each attempt
    logged), and what was published meanwhile is recorded when it is back, at the time it
    arrives. At the end the session is removed from the broker.
    """
    _refuse_a_recording(out)
    filters = Topics(settings.service.prefix).inbound_filters(settings.service.region)
    identifier = (
        client_id or broker.username or f"antifraud-recorder-{socket.gethostname()}-{os.getpid()}"
    )
    deadline = None if duration is None else time.monotonic() + duration
    count, start, subscribed = 0, None, False
    backoff = Backoff()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as handle:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            try:
                async with open_client(broker, identifier, persistent=True) as client:
                    # again on every connection, in case the broker lost the session; on
                    # MQTT 5 without the retained messages it sent for the first one
                    await client.subscribe(_subscriptions(filters, client, again=subscribed))
                    if not subscribed:
                        log.info("recording", broker=node_of(client), out=str(out), topics=filters)
                    else:
                        log.info("recording_resumed", broker=node_of(client), recorded=count)
                    subscribed = True
                    backoff.reset()
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
                            write_line(
                                round(now - start, 3),
                                str(message.topic),
                                bytes(raw),
                                retained=bool(message.retain),
                            )
                            + "\n"
                        )
                        handle.flush()
                        count += 1
            except BrokerError as exc:
                delay = backoff.next_delay()
                log.warning(
                    "broker_unavailable",
                    broker=str(broker),
                    error=str(exc),
                    retry_in=round(delay, 2),
                )
                if deadline is not None:
                    delay = min(delay, max(0.0, deadline - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
    if subscribed:  # leave no session behind to queue traffic for a recorder that is gone
        with contextlib.suppress(BrokerError):
            async with open_client(broker, identifier, persistent=False):
                pass
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
            try:
                retain = line.topic.endswith(status_suffix)
                async with asyncio.timeout(client.timeout):
                    await publish_acknowledged(client, [(line.topic, payload, 1, retain)])
            except (BrokerError, TimeoutError) as exc:
                why = str(exc) or f"no acknowledgement within {client.timeout:g} s"
                raise BrokerError(
                    f"{broker}: the connection failed after {count} line(s) of {recording} "
                    f"were published (line {line.number} may or may not have been): {why}"
                ) from None
            count += 1
    return count
