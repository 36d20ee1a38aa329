"""structlog set-up: one JSON line per event, phone numbers masked before anything is written.

``configure()`` is called once by the entry point; everything else uses ``structlog.get_logger``.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
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


class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the moment of writing (it may be replaced)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            mask_phone_numbers,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream or _Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
