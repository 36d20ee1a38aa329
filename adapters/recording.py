"""Recordings: JSON Lines, one inbound MQTT message a line (SPEC §6)."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from dispatcher.errors import RecordingError

MAX_LINE_CHARS = 4 << 20


class Line(NamedTuple):
    number: int  # 1-based line number in the file
    at: float
    topic: str
    # raw bytes (``payload_raw``, or a payload only Python's parser reads) or the decoded
    # JSON ``payload``, as the strict parser read it
    payload: bytes | Any
    # a checksum (CRC-32) of the file's lines up to this one: a store resumed on a recording
    # checks that the lines it already replayed are the ones it has (``prefix_digest``)
    digest: int = 0
    # the broker delivered a message it kept (``"retained": true`` on the line)
    retained: bool = False


def fingerprint(path: Path) -> str:
    """Identifies a recording by its first line, so a store is not resumed on another one."""
    with path.open("rb") as handle:
        return hashlib.sha256(handle.readline()).hexdigest()[:16]


def prefix_digest(path: Path, lines: int) -> int | None:
    """The ``Line.digest`` of the file's first ``lines`` physical lines, or None if it has
    fewer."""
    digest, count = 0, 0
    with path.open("rb") as handle:
        for raw in handle:
            if count == lines:
                break
            digest = zlib.crc32(raw, digest)
            count += 1
    return digest if count == lines else None


def read_lines(
    path: Path,
    skip: int = 0,
    skipped: list[RecordingError] | None = None,
    last_at: float = 0.0,
    digest: int = 0,
) -> Iterator[Line]:
    """Yield the recording's lines after the first ``skip`` physical lines (not parsed).

    Blank lines are passed over. A line that is not a recording line (not JSON, no ``at`` or
    ``topic``, ``at`` going backwards) raises ``RecordingError`` naming the file and line;
    with ``skipped``, it is passed over instead and its error appended there (a recording
    whose last line was cut short by a crash, say). Resuming after ``skip`` lines,
    ``last_at`` is the ``at`` of the last line yielded before them (a line after the cut is
    checked against it, as it would have been read straight through) and ``digest`` their
    ``Line.digest``.
    """
    try:
        handle = path.open("r", encoding="utf-8", errors="surrogateescape", newline="\n")
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read the recording: {exc.strerror}") from None
    loads, fast_loads, crc32 = json.loads, orjson.loads, zlib.crc32
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number <= skip:
                continue
            digest = crc32(raw.encode("utf-8", "surrogateescape"), digest)
            try:
                strict = True
                try:
                    line = fast_loads(raw)
                except ValueError:  # what only Python's parser reads: a raw payload's escaped
                    line = loads(raw)  # bytes (surrogates), integers beyond 64 bits
                    strict = False
                at = line["at"]
                topic = line["topic"]
                ok = (
                    (type(at) is float or type(at) is int)
                    and last_at <= at < math.inf
                    and type(topic) is str
                    and topic
                    and len(raw) <= MAX_LINE_CHARS
                )
            except (ValueError, RecursionError, KeyError, TypeError):
                ok = False
            try:
                if not ok:
                    if not raw.strip():
                        continue
                    _explain(f"{path}:{number}", raw, last_at)
                payload = line.get("payload", _MISSING)
                if payload is _MISSING or "payload_raw" in line:
                    payload = _raw_payload(f"{path}:{number}", line)
                elif not strict:
                    # a payload only Python's parser reads (a lone surrogate, an integer
                    # beyond 64 bits) is handed over as the bytes it stands for, which the
                    # dispatcher refuses as it would off the wire
                    payload = _loose_bytes(payload)
            except RecordingError as exc:
                if skipped is None:
                    raise
                skipped.append(exc)
                continue
            last_at = at
            yield Line(number, float(at), topic, payload, digest, line.get("retained") is True)


_MISSING = object()


def _raw_payload(where: str, line: dict[str, Any]) -> bytes:
    if ("payload" in line) == ("payload_raw" in line):
        raise RecordingError(f"{where}: needs exactly one of 'payload' and 'payload_raw'")
    if not isinstance(line["payload_raw"], str):
        raise RecordingError(f"{where}: 'payload_raw' must be a string")
    return line["payload_raw"].encode("utf-8", "surrogateescape")


def _loose_bytes(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _explain(where: str, raw: str, last_at: float) -> None:
    """Raise the precise ``RecordingError`` for a line the fast path refused."""
    if len(raw) > MAX_LINE_CHARS:
        raise RecordingError(f"{where}: line is longer than {MAX_LINE_CHARS} characters")
    try:
        line = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RecordingError(f"{where}: not JSON: {exc}") from None
    if not isinstance(line, dict):
        raise RecordingError(f"{where}: not a JSON object")
    at: Any = line.get("at")
    topic = line.get("topic")
    if type(at) not in (int, float) or not math.isfinite(at):
        raise RecordingError(f"{where}: 'at' must be a number of seconds")
    if at < 0:
        raise RecordingError(f"{where}: 'at' must not be negative")
    if at < last_at:
        raise RecordingError(f"{where}: 'at' {at} goes back in time (previous line: {last_at})")
    if type(topic) is not str or not topic:
        raise RecordingError(f"{where}: 'topic' must be a non-empty string")
    raise RecordingError(f"{where}: not a recording line")


def write_line(at: float, topic: str, payload: bytes, retained: bool = False) -> str:
    """One recording line for a message received at ``at`` with ``payload`` bytes (and
    ``"retained": true`` if the broker delivered a message it kept)."""
    kept = {"retained": True} if retained else {}
    try:
        decoded = json.loads(payload)
        line = {"at": at, "topic": topic, "payload": decoded, **kept}
    except (ValueError, RecursionError):
        text = payload.decode("utf-8", "replace")
        line = {"at": at, "topic": topic, "payload_raw": text, **kept}
    return json.dumps(line, ensure_ascii=False)
