"""structlog set-up: one JSON line per event, phone numbers masked before anything is written.

``configure()`` is called once by the entry point; everything else uses ``structlog.get_logger``.

**Held lines.** The live service holds the log lines of a batch (``hold()``) while it gets the
batch's outbound messages out, and writes them right after (``release()``): rendering and
writing six to eight lines, and waking whatever reads them, would otherwise sit between an
escalation and the guard's offer. A held line keeps its level, timestamp, context and
exception as of the moment it was logged; only masking and rendering wait. A warning or an
error releases everything held at once, and so does the process exiting.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

PHONE = re.compile(r"\+[1-9]\d{6,14}")


def mask_number(match: re.Match[str]) -> str:
    """+8613800000001 -> +86138****0001: enough to tell numbers apart, not to dial one."""
    number = match.group(0)
    digits = number[1:]
    keep_head = min(5, max(len(digits) - 6, 1))
    return "+" + digits[:keep_head] + "****" + digits[-4:]


def mask(value: Any) -> Any:
    if isinstance(value, str):
        return PHONE.sub(mask_number, value)
    if isinstance(value, dict):
        return {k: mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask(v) for v in value]
    return value


def mask_phone_numbers(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        event_dict[key] = mask(value)
    return event_dict


class _Held:
    """Log events held back (already stamped) until ``release()``; see the module docstring."""

    def __init__(self) -> None:
        self.holding = False
        self.events: list[MutableMapping[str, Any]] = []
        self.stream: TextIO | _Stderr | None = None
        self.render: list[Callable[..., Any]] = []  # what runs after the hold

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self.holding:
            return event_dict
        self.events.append(event_dict)
        if event_dict.get("level") in ("warning", "error", "critical"):
            self.release()
        raise structlog.DropEvent

    def release(self) -> None:
        self.holding = False
        if not self.events or self.stream is None:
            self.events.clear()
            return
        events, self.events = self.events, []
        lines = []
        for event_dict in events:
            for processor in self.render:
                event_dict = processor(None, event_dict.get("level", "info"), event_dict)
            lines.append(f"{event_dict}\n")
        self.stream.write("".join(lines))
        self.stream.flush()


_held = _Held()
atexit.register(_held.release)


def hold() -> None:
    """Hold log lines from now until ``release()``."""
    _held.holding = True


def release() -> None:
    """Write every held line, in order, and stop holding."""
    _held.release()


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the moment of writing (it may be replaced)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


# the least level written (``configure``); before any set-up, structlog writes every level
_least = logging.NOTSET


def info_enabled() -> bool:
    """Whether an ``info`` line would be written: a caller that logs a line for every entry
    of a busy loop asks first (a filtered line still costs a logger bound for it)."""
    return _least <= logging.INFO


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    global _least
    _held.release()  # lines held under the previous set-up go where it said
    _least = logging.getLevelNamesMapping()[level.upper()]
    _held.stream = stream or _Stderr()
    _held.render = [mask_phone_numbers, structlog.processors.JSONRenderer(ensure_ascii=False)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # the exception being handled, while it is
            _held,
            *_held.render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(_held.stream),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
