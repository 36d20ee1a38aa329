"""One write transaction of the SQLite store: its rows (``Tables``: plain tuples of text and
numbers), the statements that write them, and ``write_tables``, which runs them all or none.
The store runs it on the event loop (``inline_writes``) or on aiosqlite's thread; it needs
nothing but ``sqlite3``.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any, NamedTuple


class Tables(NamedTuple):
    """A transaction's rows, as written: plain tuples of text and numbers."""

    meta: list[tuple[str, str]]
    incidents: list[tuple[Any, ...]]
    dispatches: list[tuple[Any, ...]]
    timeline: list[tuple[Any, ...]]
    outbox: list[tuple[Any, ...]]  # serialised: payloads as JSON text (``serialise_outbox``)
    inbound: tuple[float, float, str] | None  # the processed pairs: first at, last at, JSON
    rejected: list[tuple[Any, ...]]
    contacts: list[tuple[Any, ...]]
    presence: list[tuple[Any, ...]]
    kept: list[tuple[Any, ...]]


def upsert(table: str, columns: str) -> str:
    """Insert a row, or update the one with its id in place: unlike ``INSERT OR REPLACE``
    (a delete and an insert under a new rowid), an index whose columns did not change is
    left alone."""
    names = columns.split()
    return (
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({','.join('?' * len(names))}) "
        f"ON CONFLICT (id) DO UPDATE SET "
        + ", ".join(f"{name} = excluded.{name}" for name in names[1:])
    )


UPSERT_INCIDENT = upsert(
    "incidents", "id subscriber status severity rule opened_at closed_at outcome doc"
)
UPSERT_DISPATCH = upsert(
    "dispatches",
    "id incident_id unit role status offered_at accepted_at arrived_at reported_at outcome",
)
INSERT_TIMELINE = (
    "INSERT INTO timeline (incident_id, at, kind, by, text, dispatch_id, action_id) "
    "VALUES (?,?,?,?,?,?,?)"
)
INSERT_OUTBOX = (
    "INSERT INTO outbox (seq, at, topic, qos, retain, type, payload, sent, same_as) "
    "VALUES (?,?,?,?,?,?,?,?,?)"
)
INSERT_INBOUND = "INSERT INTO inbound (first_at, last_at, pairs) VALUES (?,?,?)"
INSERT_REJECTED = "INSERT INTO rejected (at, topic, reason, payload) VALUES (?,?,?,?)"
INSERT_CONTACT = "INSERT INTO contacts VALUES (?,?,?)"
PUT_PRESENCE = "INSERT OR REPLACE INTO presence VALUES (?,?,?)"
INSERT_KEPT = (
    "INSERT INTO incident_inbound (incident_id, subscriber, call_id, contact, at, topic, "
    "payload) VALUES (?,?,?,?,?,?,?)"
)
PUT_META = "INSERT OR REPLACE INTO meta VALUES (?,?)"

# the connection settings of the writer on the event loop: the store flushes the log and
# checkpoints it itself; a log started over is cut back to 64 MiB on the disk
INLINE_WRITER_PRAGMAS = (
    "synchronous=NORMAL",
    "wal_autocheckpoint=0",
    "busy_timeout=5000",
    "journal_size_limit=67108864",
)
# and of the writer on aiosqlite's thread, with 8 MiB of pages (SQLite's default is 2), so
# that the index pages a large commit touches stay in memory instead of being written out and
# read back within it
WRITER_PRAGMAS = (*INLINE_WRITER_PRAGMAS, "cache_size=-8192")


def rollback(db: sqlite3.Connection) -> None:
    """Roll back what is left of a failed transaction. SQLite has already rolled it back
    itself after some failures (a full disk, for one): then there is nothing to do, and the
    error to report is the one that failed it, not ``cannot rollback``."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")


def write_tables(db: sqlite3.Connection, tables: Tables) -> None:
    """Write ``tables`` in one transaction, all or nothing (``sqlite3.Error`` if refused)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql, rows in (
            (UPSERT_INCIDENT, tables.incidents),
            (UPSERT_DISPATCH, tables.dispatches),
            (INSERT_TIMELINE, tables.timeline),
            (INSERT_OUTBOX, tables.outbox),
        ):
            if rows:
                db.executemany(sql, rows)
        if tables.inbound is not None:
            db.execute(INSERT_INBOUND, tables.inbound)
        for sql, rows in (
            (INSERT_REJECTED, tables.rejected),
            (INSERT_CONTACT, tables.contacts),
            (PUT_PRESENCE, tables.presence),
            (INSERT_KEPT, tables.kept),
            (PUT_META, tables.meta),
        ):
            if rows:
                db.executemany(sql, rows)
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise
