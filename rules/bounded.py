"""Bounded memory in insertion-ordered dicts: forgetting from the front, at a cost that
grows with what is forgotten.

Deleting a dict's first entry leaves a dummy slot, and every later look for the first entry
(``next(iter(d))``) passes over all of them again, until the dict next resizes. Forgetting
k entries one look at a time costs k²; a dict at its cap that forgets one entry for each new
one slows down with every entry forgotten (at 2,000,000 entries, from 8 µs to over 200 µs
an entry within 400,000 of them). Here the front is looked for once per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice, takewhile
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def forget_while(ordered: dict[K, V], old: Callable[[V], bool]) -> None:
    """Forget the entries from the front for as long as ``old(value)`` holds."""
    for key, _ in list(takewhile(lambda item: old(item[1]), ordered.items())):
        del ordered[key]


def trim(ordered: dict[K, V], cap: int) -> None:
    """Keep at most ``cap`` entries, forgetting the first ones. Past the cap it forgets a
    little more (a 1,024th of the cap), so that the next few new entries forget nothing."""
    over = len(ordered) - cap
    if over > 0:
        for key in list(islice(ordered, over + cap // 1024)):
            del ordered[key]
