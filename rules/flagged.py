"""Flagged numbers: exact numbers and prefixes, each with a fraud category."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class FlaggedPattern:
    """One line of the flagged-numbers registry: an exact number or a prefix."""

    pattern: str
    match: Literal["exact", "prefix"]
    category: str
    label: str


class FlaggedNumbers:
    """Looks a number up by exact match first, then by its longest flagged prefix.

    A lookup costs one dict probe per distinct prefix length (a handful), never a scan of the
    list, so a registry of millions of numbers answers as fast as one of four.
    """

    def __init__(self, patterns: Iterable[FlaggedPattern]) -> None:
        self._exact: dict[str, FlaggedPattern] = {}
        self._prefix: dict[str, FlaggedPattern] = {}
        for pattern in patterns:
            table = self._exact if pattern.match == "exact" else self._prefix
            table[pattern.pattern] = pattern
        self._lengths = sorted({len(p) for p in self._prefix}, reverse=True)
        self.categories = frozenset(
            p.category for p in (*self._exact.values(), *self._prefix.values())
        )

    def lookup(self, number: str) -> FlaggedPattern | None:
        hit = self._exact.get(number)
        if hit is not None:
            return hit
        for length in self._lengths:
            if length <= len(number):
                hit = self._prefix.get(number[:length])
                if hit is not None:
                    return hit
        return None

    def __len__(self) -> int:
        return len(self._exact) + len(self._prefix)
