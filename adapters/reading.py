"""Plain reads of a store beside a writing dispatcher: the console's history and presence,
``antifraud stats``. A SQLite store is opened read-only (adapters/store.py,
``connect_read_only``); a PostgreSQL store gets a connection of its own in autocommit, each
statement reading what is committed. Both answer ``execute(sql, params)`` with a cursor, for
SQL written with ``?`` placeholders in what both engines share.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from adapters.journal import is_postgres
from dispatcher.errors import StoreError

# what a read of either store may raise when the store is unreachable, damaged or foreign
READ_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
STORE_READ_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error, StoreError)


def read_failure(store: object, exc: BaseException) -> StoreError:
    """What a failed read says, on one line: the store unreachable, or not a store."""
    first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if isinstance(exc, psycopg.OperationalError):
        return StoreError(f"{store}: cannot read the store: {first}")
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return StoreError(f"{store}: no dispatcher store in this database ({first})")
    return StoreError(f"{store}: not a dispatcher store ({first})")


class PgReader:
    """A PostgreSQL store read as a SQLite connection is: ``execute`` returns a cursor."""

    def __init__(self, url: str) -> None:
        from adapters.pgstore import _shown, conninfo

        self.shown = _shown(url)
        self._conn = psycopg.connect(conninfo(url), autocommit=True)

    def execute(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> psycopg.Cursor[Any]:
        from adapters.pgstore import placeholders

        if not params:
            return self._conn.execute(sql.replace("?", "%s"))
        return self._conn.execute(placeholders(sql), tuple(params))

    def close(self) -> None:
        self._conn.close()


class StoreRef:
    """A store named by ``--store``: a SQLite file's path or a PostgreSQL URL."""

    def __init__(self, spec: str | Path) -> None:
        self.spec = spec
        self.postgres = is_postgres(spec)

    def __str__(self) -> str:
        if self.postgres:
            from adapters.pgstore import _shown

            return _shown(str(self.spec))  # never a password
        return str(self.spec)

    def exists(self) -> bool:
        """Whether there is a store to read: a SQLite file must exist; a PostgreSQL
        database is asked when read."""
        return self.postgres or Path(self.spec).exists()

    def connect(self) -> Any:
        """A connection to read with (``execute``, ``close``)."""
        if self.postgres:
            return PgReader(str(self.spec))
        from adapters.store import connect_read_only

        return connect_read_only(Path(self.spec))

    def check(self) -> None:
        """Refuse, now, a store that cannot be read (damaged, foreign, none there)."""
        if self.postgres:
            from adapters.pgstore import PgStore

            async def check() -> None:
                async with PgStore(str(self.spec)):
                    pass

            asyncio.run(check())
            return
        from adapters.store import check_store

        check_store(Path(self.spec))
