"""The fence around aiosqlite's internals: the one queueing primitive the store uses directly.

aiosqlite runs each statement as one round trip to its connection thread; a commit of a dozen
statements would pay a dozen. Every public aiosqlite method is built on the same primitive
(``Connection._execute``, run on that thread with the ``sqlite3`` connection ``_conn``): the
store uses it for a whole transaction at once (``in_thread``). ``check_aiosqlite`` verifies,
before the store opens its first connection, that the installed aiosqlite is a version this
was tested with (``SUPPORTED``) and has both attributes; else ``UnsupportedLibrary``, naming the
versions supported.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import aiosqlite

from adapters.libraries import require

SUPPORTED = ("0.20", "0.23")  # at least, below
ATTRIBUTES = ("_execute", "_conn")

T = TypeVar("T")

_checked = False


def check_aiosqlite(version: str | None = None) -> None:
    """Refuse to go on unless the installed aiosqlite is supported and has the attributes
    ``in_thread`` uses (``UnsupportedLibrary``); the version may be given (to check another)."""
    global _checked
    if _checked and version is None:
        return
    require(
        "aiosqlite",
        SUPPORTED,
        [(aiosqlite.Connection, "aiosqlite.Connection", ATTRIBUTES)],
        version,
    )
    _checked = version is None


async def in_thread(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(connection, *args)`` on ``db``'s thread with its ``sqlite3`` connection, in
    one hop."""

    def call() -> T:
        connection: sqlite3.Connection = db._conn
        return fn(connection, *args)

    return await db._execute(call)  # type: ignore[no-untyped-call,no-any-return]
