"""Which store a ``--store`` names, and what the live service, replay and the report need of it.

A store is named by a path (the embedded SQLite store, adapters/store.py) or by a URL
``postgresql://user@host:port/dbname`` (adapters/pgstore.py). Both implement the core's
``Journal`` port and the few reads the adapters make beside it (``LiveJournal``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from dispatcher.model import TimelineEntry
from dispatcher.ports import Journal, OutboxRow

if TYPE_CHECKING:
    from adapters.pgstore import Term


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(store: str | Path) -> bool:
    """Whether ``store`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(store, str) and store.startswith(POSTGRES_SCHEMES)


class LiveJournal(Journal, Protocol):
    """A journal the live service, replay and the report can use: opened as an async
    context manager, its outbox read in order and marked sent, its rows read back."""

    @property
    def path(self) -> str | Path:
        """The store as shown in messages: a file's path, a database's URL."""
        ...

    async def __aenter__(self) -> LiveJournal: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def unsent(self, limit: int, after: int = 0) -> list[OutboxRow]: ...

    async def mark_sent(self, seqs: list[int]) -> None: ...

    async def timeline(self, incident_id: str) -> list[TimelineEntry]: ...

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """A query of ``?`` placeholders, in the SQL both engines share."""
        ...

    def rows(self, sql: str, params: Iterable[Any] = ()) -> AsyncIterator[Any]: ...

    def published(self) -> AsyncIterator[Any]:
        """(at, topic, type, the receipt's id or None) of every outbound message, in order."""
        ...


def open_store(
    store: str | Path,
    sync: str = "full",
    *,
    inline_writes: bool = False,
    writer: bool = False,
    term: Term | None = None,
) -> LiveJournal:
    """The store ``store`` names, not yet opened. ``writer``: the caller writes it (one
    writer at a time: the SQLite store's lock file; a PostgreSQL store's lease, taken here
    unless ``term`` says which lease this writer holds)."""
    if is_postgres(store):
        from adapters.pgstore import PgStore

        return PgStore(str(store), sync, writer=writer, term=term)
    from adapters.store import Store

    return Store(store, sync, inline_writes=inline_writes, writer=writer)
