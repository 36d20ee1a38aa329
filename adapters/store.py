"""The SQLite store (aiosqlite, WAL): the dispatcher's source of truth.

Writes are queued in memory as the workflow produces effects and committed together by
``commit()`` in one transaction, so persistence costs one flush per batch rather than one per
message. The runtime commits before it acknowledges anything as processed (the replay cursor
and the processed ``(source, id)`` pairs are in the same transaction as the effects), so a crash
loses only work that was never acknowledged and is therefore delivered again.

A commit has two moments. **Written**: the transaction is in the write-ahead log, in the
operating system's hands; a crash of the process can no longer lose it, and its outbound
messages are handed to the publisher then. **Flushed**: the log is on the disk (``fdatasync``),
so a power cut cannot lose it either; only then may the inbound messages be acknowledged
(``commit()`` returns then; with ``flush=False`` it returns once written, and ``flush()`` says
when). SQLite runs with ``synchronous=NORMAL`` (consistent, never flushes on commit) and the
store flushes the log itself, after handing over, on a thread of its own, which keeps the
disk's flush time (0.3–2 ms here) out of the time an offer takes to reach a unit.

Where a commit is written: on aiosqlite's thread (the default: replay hands a batch over and
handles the next one meanwhile), or, with ``inline_writes``, on the event loop itself through a
connection of its own (the live service: an escalation's offers then go out without two
hand-offs between threads, each a chance to wait for a core; the write itself is an append to
the log in the operating system's cache, never a disk flush). When the caller says so
(``inline=False``: the live service while messages arrive faster than it wants to write them
one commit at a time on the loop, as in a backlog drain) or a commit is large (more than
``INLINE_MAX_WRITES`` rows), the commit still goes to the thread, where it is written while
the loop receives the next messages: there throughput matters more than one message's
latency. Either way one write transaction runs at a time (``_writing``), so the inline
connection never waits for SQLite's lock.

The log is copied back into the database (a checkpoint) by a second connection in the
background, at most every ``CHECKPOINT_EVERY_S``, never by a commit: a checkpoint flushes the
database file and would otherwise stall whichever commit happened to trigger it for several
milliseconds. Once the log holds ``LOG_LIMIT_FRAMES`` pages, the checkpoint copies what is left
with the writer held back, so that the next commit starts the log over.

The schema is versioned with ``PRAGMA user_version``; a store written by a newer version is
refused rather than guessed at.

The store on disk is checked each time it is opened, before anything reads or writes it
(``inspect_store``): only a path where no file exists becomes a new store (made under another
name and renamed into place once complete, so a half-made one is never left at the path); an
existing file must be a whole SQLite database (its header, its size against the header's page
count), with a write-ahead log whose header is SQLite's, a known schema version and the
store's tables, and must pass ``PRAGMA quick_check`` within ``CHECK_BUDGET_S``. Anything else
is refused with the file's name and what is wrong, and left as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import socket
import sqlite3
import stat
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiosqlite
import orjson
import structlog

from adapters.sqlite_internals import check_aiosqlite, in_thread
from adapters.sqlite_writes import (
    INLINE_WRITER_PRAGMAS,
    WRITER_PRAGMAS,
    Tables,
    rollback,
    write_tables,
)
from dispatcher.errors import FlushError, StoreError
from dispatcher.model import Incident, Publish, TimelineEntry
from dispatcher.ports import KeptInbound, OutboxRow, QueuedEffects, Snapshot

SCHEMA_VERSION = 7
T = TypeVar("T")
log = structlog.get_logger("store")
CHECKPOINT_EVERY_S = 10.0  # the log is copied back into the database at most this often
CHECKPOINT = "PRAGMA wal_checkpoint(PASSIVE)"
LOG_LIMIT_FRAMES = 16_384  # pages (64 MiB): a log this long is copied with the writer held
# with inline_writes, a commit of more rows than this (a backlog drained in large batches) is
# still written on aiosqlite's thread, so that the loop receives the next messages meanwhile
INLINE_MAX_WRITES = 200
# the largest outbound payload handed to the publisher: below the 256 KiB packet limit of
# config/mosquitto/production.conf, with room for the topic and the packet's header
MAX_MESSAGE_BYTES = 250_000


def _too_large(text: str) -> bool:
    return len(text.encode()) > MAX_MESSAGE_BYTES


# PRAGMA quick_check on open stops after this long (it reads every page: about 0.5 s per
# 350 MB from the page cache on a 2-core machine, longer from a cold disk); a store it cannot
# finish in time is opened all the same, with a warning (docs/RELIABILITY.md)
CHECK_BUDGET_S = 10.0
DEAD_LETTER = "cn.antifraud.input.rejected"  # the type of the outbox's dead letters
RECEIPT = "cn.antifraud.reply.receipt"  # the type of the outbox's reply receipts
LOCK_TRIES = 5  # taking the writer lock, 20 ms apart, before it is taken to be held
# what every store holds, whatever its version
TABLES = (
    "meta",
    "incidents",
    "dispatches",
    "timeline",
    "outbox",
    "inbound",
    "rejected",
    "contacts",
    "presence",
)
RESTORE = (
    "restore the store from its last backup (antifraud backup), or keep this file for "
    "salvage (sqlite3 FILE .recover) and start on another --store"
)
_SQLITE_HEADER = b"SQLite format 3\x00"
_WAL_MAGIC = (0x377F0682, 0x377F0683)  # the log's checksums little- or big-endian
_WAL_VERSION = 3007000
# SQLite's primary result codes this module tells apart
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_IOERR, _SQLITE_NOTADB = 11, 13, 10, 26
_SQLITE_INTERRUPT = 9

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (
    id TEXT PRIMARY KEY, subscriber TEXT NOT NULL, status TEXT NOT NULL, severity TEXT NOT NULL,
    rule TEXT NOT NULL, opened_at REAL NOT NULL, closed_at REAL, outcome TEXT, doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS incidents_status ON incidents (status, closed_at);
CREATE TABLE IF NOT EXISTS dispatches (
    id TEXT PRIMARY KEY, incident_id TEXT NOT NULL, unit TEXT NOT NULL, role TEXT NOT NULL,
    status TEXT NOT NULL, offered_at REAL NOT NULL, accepted_at REAL, arrived_at REAL,
    reported_at REAL, outcome TEXT
);
CREATE INDEX IF NOT EXISTS dispatches_incident ON dispatches (incident_id);
CREATE TABLE IF NOT EXISTS timeline (
    seq INTEGER PRIMARY KEY, incident_id TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,
    by TEXT NOT NULL, text TEXT NOT NULL, dispatch_id TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY, at REAL NOT NULL, topic TEXT NOT NULL, qos INTEGER NOT NULL,
    retain INTEGER NOT NULL, type TEXT, payload TEXT, sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (sent, seq);
-- processed inbound (source, id) pairs, one row per commit: [[source, id, at], ...]
CREATE TABLE IF NOT EXISTS inbound (
    seq INTEGER PRIMARY KEY, first_at REAL NOT NULL, last_at REAL NOT NULL, pairs TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS inbound_last_at ON inbound (last_at);
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY, at REAL NOT NULL, topic TEXT NOT NULL, reason TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS contacts (subscriber TEXT NOT NULL, at REAL NOT NULL,
    counterpart TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS contacts_at ON contacts (at);
CREATE TABLE IF NOT EXISTS presence (unit TEXT PRIMARY KEY, state TEXT NOT NULL, at REAL NOT NULL);
"""

# Forward migrations: MIGRATIONS[v] takes a store from version v to v + 1, in one transaction.
# A new store is created at version 1 (SCHEMA) and migrated like any other.
MIGRATIONS: dict[int, str] = {
    # 2: look up a unit's dispatches and an incident's timeline without scanning
    1: """
CREATE INDEX IF NOT EXISTS dispatches_unit ON dispatches (unit, status);
CREATE INDEX IF NOT EXISTS timeline_incident ON timeline (incident_id, seq);
""",
    # 3: prune refused input and its dead letters by age (``Store.prune``) without scanning;
    # the outbox's index holds the dead letters alone
    2: f"""
CREATE INDEX IF NOT EXISTS rejected_at ON rejected (at);
CREATE INDEX IF NOT EXISTS outbox_dead_letters ON outbox (at) WHERE type = '{DEAD_LETTER}';
""",
    # 4: a starting process reads the reply receipts of the dedupe window (a redelivered
    # reply is answered with its receipt again) without scanning the outbox
    3: f"""
CREATE INDEX IF NOT EXISTS outbox_receipts ON outbox (at) WHERE type = '{RECEIPT}';
""",
    # 5: a timeline entry names the operator action it came of; the incident's document no
    # longer repeats its timeline, which these rows alone now hold
    4: """
ALTER TABLE timeline ADD COLUMN action_id TEXT;
""",
    # 6: the inbound messages, as received, that touched each incident, and the flagged
    # contacts that touched none (by subscriber): what ``antifraud export`` writes back as a
    # recording (docs/decisions.md)
    5: """
CREATE TABLE IF NOT EXISTS incident_inbound (
    seq INTEGER PRIMARY KEY, incident_id TEXT, subscriber TEXT, call_id TEXT,
    contact INTEGER NOT NULL, at REAL NOT NULL, topic TEXT NOT NULL, payload TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS incident_inbound_incident ON incident_inbound (incident_id, seq);
CREATE INDEX IF NOT EXISTS incident_inbound_contacts ON incident_inbound (subscriber, at)
    WHERE incident_id IS NULL;
CREATE INDEX IF NOT EXISTS incident_inbound_at ON incident_inbound (at);
""",
    # 7: the retained copy of an incident's state repeats, word for word, the message to the
    # operators just before it: its row names that row (``same_as``, the earlier row's seq,
    # in the same commit) and holds no payload of its own; a row with neither payload nor
    # ``same_as`` still clears its retained topic
    6: """
ALTER TABLE outbox ADD COLUMN same_as INTEGER;
""",
}

# an outbox row's payload, its own or that of the row it repeats (``same_as``, schema 7)
OUTBOX_PAYLOAD = (
    "COALESCE(outbox.payload, (SELECT p.payload FROM outbox AS p WHERE p.seq = outbox.same_as))"
)


@dataclass
class _Batch(QueuedEffects):
    meta: dict[str, str] = field(default_factory=dict)
    # incident_id -> (the incident, its document if the caller made it)
    incidents: dict[str, tuple[Incident, str | None]] = field(default_factory=dict)
    timeline: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[tuple[Any, ...]] = field(default_factory=list)
    inbound: list[tuple[str, str, float]] = field(default_factory=list)
    rejected: list[tuple[Any, ...]] = field(default_factory=list)
    contacts: list[tuple[str, float, str]] = field(default_factory=list)
    presence: dict[str, tuple[str, float]] = field(default_factory=dict)
    kept: list[KeptInbound] = field(default_factory=list)

    def effects(self) -> int:
        """How many rows this batch writes, not counting processed pairs (one row for all)."""
        return len(self) - len(self.inbound)

    def __len__(self) -> int:
        return (
            len(self.incidents)
            + len(self.timeline)
            + len(self.outbox)
            + len(self.inbound)
            + len(self.rejected)
            + len(self.contacts)
            + len(self.presence)
            + len(self.meta)
            + len(self.kept)
        )


class _Log:
    """The store's write-ahead log file, flushed to the disk on demand."""

    def __init__(self, store_path: Path) -> None:
        self.path = Path(f"{store_path}-wal")
        self._fd: int | None = None
        self._inode = 0

    def flush(self) -> None:
        """``fdatasync`` the log: every transaction written so far becomes durable."""
        inode = os.stat(self.path).st_ino
        if self._fd is None or inode != self._inode:  # opened once; again if SQLite replaced it
            self.close()
            self._fd = os.open(self.path, os.O_RDWR)
            self._inode = os.fstat(self._fd).st_ino
        getattr(os, "fdatasync", os.fsync)(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def store_failure(path: Path, doing: str, exc: BaseException) -> StoreError:
    """The error to stop with when SQLite or the file system refused ``doing`` on the store at
    ``path``: a full disk and a damaged store are named as such, whatever SQLite's wording."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    full = primary == _SQLITE_FULL or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
    if not full and primary == _SQLITE_IOERR:  # e.g. the shared-memory file could not grow
        full = _no_space_left(path)
    if full:
        return StoreError(
            f"{path}: the disk is full: {doing} failed ({exc}). Nothing was lost: what could "
            "not be written was not acknowledged, and is handled again once the service is "
            f"started again with free space on {path.parent}"
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreError(f"{path}: damaged store: {doing} failed ({exc}); {RESTORE}")
    return StoreError(f"{path}: {doing} failed: {exc}")


def _no_space_left(path: Path) -> bool:
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def inspect_store(path: Path, *, check_log: bool = True, shown: Path | None = None) -> bool:
    """Check the files of the store at ``path`` before SQLite opens them, and say whether there
    is one (False: no file at the path; only then may a new store be made).

    Raises ``StoreError`` naming the file (``shown``, the path as given, else ``path``) for an
    empty file, one that is not an SQLite database, one shorter than its own header says (a
    store cut short; checked when no log holds later pages), a store with a second hard link
    (SQLite names its log after the path, so two names would mean two logs), and, with
    ``check_log``, a write-ahead log that does not start with SQLite's header (SQLite would
    drop it, and with it every transaction it holds, without a word). ``check_log`` is false
    for a reader while a writer holds the store: that writer checked the log when it opened
    it, and is writing it now."""
    shown = shown or path
    wal = Path(f"{path}-wal")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if _size(wal):
            raise StoreError(
                f"{shown}-wal: a write-ahead log without its database {shown.name}: it holds "
                "committed transactions. Put the database back beside it, or move the log "
                "away if the store is really meant to start afresh"
            ) from None
        return False
    except OSError as exc:
        raise StoreError(f"{shown}: cannot read the store: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise StoreError(f"{shown}: not a store: not a regular file; use another --store")
    if info.st_nlink > 1:
        raise StoreError(
            f"{shown}: the store has {info.st_nlink} hard links (names for the same file); "
            "SQLite keys its log on the name, so a second name can corrupt the store: remove "
            f"the other names (find / -samefile {shown}) and keep one"
        )
    if info.st_size == 0:
        raise StoreError(
            f"{shown}: not a store: the file is empty (0 bytes). A new store is made only where "
            "no file exists: if this was the store, restore it from its last backup "
            "(antifraud backup); if not, remove the file or use another --store"
        )
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except OSError as exc:
        raise StoreError(f"{shown}: cannot read the store: {exc.strerror}") from None
    if len(header) < 100 or not header.startswith(_SQLITE_HEADER):
        raise StoreError(
            f"{shown}: not an SQLite database (the file does not start with SQLite's header): "
            f"a damaged store or another kind of file; {RESTORE}"
        )
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise StoreError(f"{shown}: damaged store: its header names no valid page size; {RESTORE}")
    wal_size = _size(wal)
    pages = int.from_bytes(header[28:32], "big")
    counted = header[24:28] == header[92:96]  # else the header's page count is stale
    if info.st_size % page_size or (counted and not wal_size and info.st_size < pages * page_size):
        raise StoreError(
            f"{shown}: damaged store: truncated: the file holds {info.st_size} bytes, its header "
            f"says {pages} pages of {page_size} ({pages * page_size} bytes); {RESTORE}"
        )
    if wal_size and check_log:
        _inspect_log(wal, Path(f"{shown}-wal"), wal_size, page_size)
    return True


def _inspect_log(wal: Path, shown: Path, size: int, page_size: int) -> None:
    try:
        with open(wal, "rb") as file:
            header = file.read(32)
    except OSError as exc:
        raise StoreError(f"{shown}: cannot read the store's log: {exc.strerror}") from None
    problem = None
    if len(header) < 32:
        problem = f"{size} bytes, shorter than a log's header"
    else:
        magic, version, pages = struct.unpack(">III", header[:12])
        if magic not in _WAL_MAGIC or version != _WAL_VERSION:
            problem = "it does not start with SQLite's log header"
        elif struct.unpack(">II", header[24:32]) != _wal_checksum(header[:24], magic & 1 == 1):
            problem = "its header fails its checksum"
        elif pages != page_size:
            problem = f"its pages are {pages} bytes, the database's {page_size}"
    if problem is not None:
        raise StoreError(
            f"{shown}: damaged write-ahead log of the store: {problem}. It may hold committed "
            "transactions, which SQLite would drop without a word: keep a copy of it, then "
            f"{RESTORE}; or move the log away to go on from "
            "the database alone"
        )


def _wal_checksum(data: bytes, big_endian: bool) -> tuple[int, int]:
    """SQLite's log checksum of ``data`` (a multiple of 8 bytes)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    s0 = s1 = 0
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def read_only_uri(path: Path) -> str:
    """The URI that opens the SQLite file at ``path`` read-only (``uri=True``), with every
    character of the path taken literally (a ``?`` or ``#`` in a folder name included)."""
    return f"{path.resolve().as_uri()}?mode=ro"


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection to the store at ``path``: what readers beside the dispatcher
    (the console, ``stats``, ``export``) use."""
    return sqlite3.connect(read_only_uri(path), uri=True)


def check_database(path: Path, *, readonly: bool = False, shown: Path | None = None) -> None:
    """Open the store at ``path`` (it exists; ``inspect_store`` passed) and check what only
    SQLite can: a schema version this dispatcher knows, the store's tables, and
    ``PRAGMA quick_check`` (within ``CHECK_BUDGET_S``: a store too large to finish in time is
    used all the same, with a ``store_check_incomplete`` warning). Raises ``StoreError``."""
    shown = shown or path
    target = read_only_uri(path) if readonly else str(path)
    try:
        db = sqlite3.connect(target, uri=readonly, isolation_level=None)
    except sqlite3.Error as exc:
        raise store_failure(shown, "opening the store", exc) from None
    try:
        with contextlib.closing(db):
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{shown}: store schema version {version} is newer than this dispatcher "
                    f"understands ({SCHEMA_VERSION}); upgrade the dispatcher or use another store"
                )
            tables = {
                name
                for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            missing = [name for name in TABLES if name not in tables]
            if version == 0:
                what = (
                    f"and tables of its own ({', '.join(sorted(tables)[:5])}): another "
                    "application's database?"
                    if tables
                    else "and nothing in it"
                )
                raise StoreError(
                    f"{shown}: not a store: an SQLite database with no schema version {what} "
                    "A new store is made only where no file exists: use another --store"
                )
            if missing:
                raise StoreError(
                    f"{shown}: not a store: schema version {version}, but without the store's "
                    f"tables {', '.join(missing)}; use another --store"
                )
            _quick_check(db, shown)
    except sqlite3.Error as exc:
        raise store_failure(shown, "checking the store", exc) from None


def _quick_check(db: sqlite3.Connection, shown: Path) -> None:
    started = time.monotonic()
    deadline = started + CHECK_BUDGET_S
    db.set_progress_handler(lambda: int(time.monotonic() > deadline), 1_000)
    try:
        rows = db.execute("PRAGMA quick_check(10)").fetchall()
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code != _SQLITE_INTERRUPT and str(exc) != "interrupted":
            raise store_failure(shown, "PRAGMA quick_check", exc) from None
        log.warning(
            "store_check_incomplete",
            store=str(shown),
            seconds=CHECK_BUDGET_S,
            size=_size(shown),
            hint="PRAGMA quick_check did not finish in time; check the store offline",
        )
        return
    finally:
        db.set_progress_handler(None, 0)
    if rows != [("ok",)]:
        found = "; ".join(str(row[0]) for row in rows[:3])
        raise StoreError(
            f"{shown}: damaged store: PRAGMA quick_check found {len(rows)} problem(s): "
            f"{found}; {RESTORE}"
        )
    log.debug("store_checked", store=str(shown), seconds=round(time.monotonic() - started, 3))


def check_store(path: Path) -> bool:
    """For a reader that opens the store itself (the console's history): refuse a damaged
    or foreign store as ``Store`` does, never changing it; False if there is none yet."""
    real = Path(os.path.realpath(path))
    if not inspect_store(real, check_log=not WriterLock(path).held(), shown=path):
        return False
    check_database(real, readonly=True, shown=path)
    return True


def _create(path: Path, shown: Path) -> None:
    """Make a new store at ``path`` (where no file exists): written under another name and
    renamed into place once complete, so the path never holds half a store."""
    partial = path.with_name(path.name + ".new")
    leftovers = [partial, *(Path(f"{partial}{end}") for end in ("-journal", "-wal", "-shm"))]
    for name in leftovers:
        name.unlink(missing_ok=True)
    try:
        with contextlib.closing(sqlite3.connect(partial, isolation_level=None)) as db:
            db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nPRAGMA user_version=1;\nCOMMIT;")
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(partial, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (sqlite3.Error, OSError) as exc:
        for name in leftovers:
            with contextlib.suppress(OSError):
                name.unlink(missing_ok=True)
        raise store_failure(shown, "creating the store", exc) from None


class WriterLock:
    """One writer per store: ``REAL.lock`` beside the store's real path (symlinks and any
    spelling of the path resolved), locked (``flock``) for as long as a live service or a
    replay holds the store. A second writer would keep its own idea of the state in memory
    and write over the first one's; two live services would also share one MQTT client id and
    keep taking the connection from each other. Readers (``report``, the console's history,
    ``backup``) do not take it. The lock goes with the process, however it ends; the file
    stays, naming the last holder. (A second hard link to the store is refused outright:
    ``inspect_store``.)"""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.real = Path(os.path.realpath(store))
        self.path = self.real.with_name(self.real.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot create the store's lock: {exc.strerror}"
            ) from None
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # a reader asking whether a writer holds it (``held``) holds it for an instant
                if attempt < LOCK_TRIES - 1:
                    time.sleep(0.02)
        else:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            same = "" if self.real == Path(os.path.abspath(self.store)) else f" ({self.real})"
            raise StoreError(
                f"{self.store}{same}: already in use by {holder} (a live service or a replay "
                "writes it); stop that one first, or use another --store"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise store_failure(self.store, "writing the store's lock", exc) from None
        self._fd = fd

    def held(self) -> bool:
        """Whether a writer (another process, or another ``Store`` here) holds the lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # a shared lock taken goes with it
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class QueuedWrites:
    """The queueing half of both stores (SQLite here, PostgreSQL in adapters/pgstore.py):
    each write of a step goes into ``_batch`` until ``commit()`` writes it; outbox rows are
    numbered as they are queued (``_next_seq``, read from the store when it opens)."""

    _batch: _Batch
    _next_seq: int
    _mode: str  # meta "mode": "live", "replay", or not yet said

    def set_meta(self, key: str, value: str) -> None:
        self._batch.meta[key] = value
        if key == "mode":
            self._mode = value

    def save_incident(self, incident: Incident, doc: str | None = None) -> None:
        """Upsert ``incident``; ``doc``: its ``to_json()`` as of now, if already made."""
        self._batch.incidents[incident.id] = (incident, doc)

    def add_timeline(self, incident_id: str, entry: TimelineEntry) -> None:
        self._batch.timeline.append(
            (
                incident_id,
                entry.at,
                entry.kind,
                entry.by,
                entry.text,
                entry.dispatch_id,
                entry.action_id,
            )
        )

    def add_outbox(self, at: float, message: Publish, sent: bool) -> None:
        """Queue an outbound message; it is serialised when committed (``payload`` is not
        changed after it was built)."""
        self._batch.outbox.append(
            (
                self._next_seq,
                at,
                message.topic,
                message.qos,
                message.retain,
                message.type,
                message.payload,
                sent,
            )
        )
        self._next_seq += 1

    def add_inbound(self, source: str, event_id: str, at: float) -> None:
        self._batch.inbound.append((source, event_id, at))

    def add_rejected(self, at: float, topic: str, reason: str, payload: str) -> None:
        self._batch.rejected.append((at, topic, reason, payload))

    def add_contact(self, subscriber: str, at: float, counterpart: str) -> None:
        self._batch.contacts.append((subscriber, at, counterpart))

    def set_presence(self, unit: str, state: str, at: float) -> None:
        self._batch.presence[unit] = (state, at)

    def keep_inbound(self, message: KeptInbound) -> None:
        self._batch.kept.append(message)

    def holds_effects(self) -> bool:
        """Whether anything queued since the last commit is more than bookkeeping (processed
        ``(source, id)`` pairs and the clock): what handling a message changed or produced."""
        return self._batch.holds_effects()


class Store(QueuedWrites):
    """Async context manager over one SQLite file.

    ``sync="full"`` (the default) flushes every commit to the disk before ``commit()`` returns;
    ``sync="normal"`` does not (a commit survives the process dying, not a power cut).
    """

    flush_after_s = 0.0  # the live processor's delay is the SQLite store's (decisions.md 54)

    def __init__(
        self,
        path: str | Path,
        sync: str = "full",
        *,
        inline_writes: bool = False,
        writer: bool = False,
    ) -> None:
        self.path = Path(path)  # as given, in messages
        # the file itself, symlinks resolved: SQLite names its log after the path it opens
        self._file = Path(os.path.realpath(self.path))
        # the live service and replay write the store: one of them at a time (WriterLock)
        self._lock = WriterLock(self.path) if writer else None
        self._inline = inline_writes
        self._writer: sqlite3.Connection | None = None  # with inline_writes: the loop's own
        if sync not in ("full", "normal"):
            raise ValueError(f"sync must be 'full' or 'normal', not {sync!r}")
        self._log: _Log | None = _Log(self._file) if sync == "full" else None
        # flushes run on their own thread, so the next transaction is written meanwhile
        self._flusher = ThreadPoolExecutor(1, "store-flush") if self._log is not None else None
        self._flushing: asyncio.Future[None] | None = None
        self._written = 0  # transactions written …
        self._flushed = 0  # … and known to be on the disk
        self._flush_failed: FlushError | None = None
        self._db: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        self._checkpointed_at = 0.0
        self._batch = _Batch()
        self._writing = asyncio.Lock()  # one write transaction at a time
        self._next_seq = 1  # of the outbox, assigned when queued
        # each open incident's dispatch rows as last written: an unchanged one is not written
        # again (``_Rows.snapshot``)
        self._dispatch_rows: dict[str, tuple[Any, ...]] = {}
        self._mode = ""  # meta "mode": "live", "replay", or not yet said
        self.migrated_from = SCHEMA_VERSION

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def open(self) -> None:
        """Open the store, refusing a damaged or foreign file (``inspect_store``,
        ``check_database``); only where no file exists is a new store made."""
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lock is not None:
            self._lock.acquire()
        try:
            await asyncio.to_thread(self._prepare)
            await self._open()
        except BaseException:
            try:
                await self._close()  # no connection is left open: it would keep the process
            finally:
                if self._lock is not None:
                    self._lock.release()
            raise

    def _prepare(self) -> None:
        # a writer holds the lock, so no one else writes the log; a reader checks the log
        # only while no writer holds the store
        check_log = self._lock is not None or not WriterLock(self.path).held()
        if inspect_store(self._file, check_log=check_log, shown=self.path):
            check_database(self._file, shown=self.path)
        else:
            _create(self._file, self.path)

    async def _open(self) -> None:
        try:
            check_aiosqlite()
            self._db = await aiosqlite.connect(self._file, isolation_level=None)
            version = (await (await self._db.execute("PRAGMA user_version")).fetchone() or (0,))[0]
            if not 1 <= version <= SCHEMA_VERSION:  # checked just before; changed since
                raise StoreError(f"{self.path}: store schema version {version} is unexpected")
            await self._db.execute("PRAGMA journal_mode=WAL")
            for pragma in WRITER_PRAGMAS:
                await self._db.execute(f"PRAGMA {pragma}")
            for step in range(version, SCHEMA_VERSION):
                await self._db.executescript(
                    f"BEGIN IMMEDIATE;\n{MIGRATIONS[step]}\nPRAGMA user_version={step + 1};\n"
                    "COMMIT;"
                )
            self.migrated_from = version
            row = await (
                await self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox")
            ).fetchone()
            self._next_seq = int(row[0] if row else 0) + 1
            row = await (
                await self._db.execute("SELECT value FROM meta WHERE key = 'mode'")
            ).fetchone()
            self._mode = str(row[0]) if row else ""
            if self._inline:
                self._writer = sqlite3.connect(self._file, isolation_level=None)
                for pragma in INLINE_WRITER_PRAGMAS:
                    self._writer.execute(f"PRAGMA {pragma}")
        except (aiosqlite.Error, sqlite3.Error) as exc:
            raise store_failure(self.path, "opening the store", exc) from None

    async def close(self) -> None:
        try:
            await self._close()
        finally:
            if self._lock is not None:
                self._lock.release()

    async def _close(self) -> None:
        if self._checkpointing is not None:
            await asyncio.gather(self._checkpointing, return_exceptions=True)
            self._checkpointing = None
        if self._checkpointer is not None:
            await self._checkpointer.close()
            self._checkpointer = None
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
        if self._log is not None:
            self._log.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._db is not None:
            await self._db.close()  # the last connection: SQLite checkpoints and removes the log
            self._db = None

    # ---- reading ---------------------------------------------------------------------------

    async def load(
        self,
        now_hint: float | None,
        retention_s: float,
        dedupe_window_s: float,
        contact_horizon_s: float,
    ) -> Snapshot:
        db = self.db
        meta = {k: v for k, v in await db.execute_fetchall("SELECT key, value FROM meta")}
        rows = await db.execute_fetchall("SELECT id, status, closed_at, doc FROM incidents")
        incidents: list[Incident] = []
        ids: set[str] = set()
        latest = float(meta.get("clock", "0") or 0) if now_hint is None else now_hint
        for incident_id, status, closed_at, doc in rows:
            ids.add(incident_id)
            if status != "closed":  # an open incident's timeline goes on
                incidents.append(
                    Incident.from_doc(json.loads(doc), await self.timeline(incident_id))
                )
            elif closed_at + retention_s > latest:  # a closed one's was said in full
                incidents.append(Incident.from_doc(json.loads(doc)))
        contacts = [
            (s, at, c)
            for s, at, c in await db.execute_fetchall(
                "SELECT subscriber, at, counterpart FROM contacts WHERE at >= ? ORDER BY rowid",
                (latest - contact_horizon_s,),
            )
        ]
        presence = {u: s for u, s in await db.execute_fetchall("SELECT unit, state FROM presence")}
        since = latest - dedupe_window_s
        inbound = [
            (source, event_id, at)
            for (pairs,) in await db.execute_fetchall(
                "SELECT pairs FROM inbound WHERE last_at >= ? ORDER BY seq", (since,)
            )
            for source, event_id, at in json.loads(pairs)
            if at >= since
        ]
        # the type spelled out, so that SQLite uses the receipts' own index
        receipts = [
            (at, topic, payload)
            for at, topic, payload in await db.execute_fetchall(
                f"SELECT at, topic, payload FROM outbox WHERE type = '{RECEIPT}' AND at >= ? "
                "ORDER BY seq",
                (since,),
            )
        ]
        return Snapshot(meta, incidents, ids, contacts, presence, inbound, receipts)

    async def timeline(self, incident_id: str) -> list[TimelineEntry]:
        return timeline_rows(await self.db.execute_fetchall(TIMELINE_SELECT, (incident_id,)))

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.db.execute_fetchall(sql, tuple(params))]

    async def rows(self, sql: str, params: Iterable[Any] = ()) -> AsyncIterator[Any]:
        """The rows of a query, a thousand at a time: a day's outbox need not be in memory
        all at once to be read."""
        async with self.db.execute(sql, tuple(params)) as cursor:
            cursor.arraysize = 1000
            async for row in cursor:
                yield row

    def published(self) -> AsyncIterator[Any]:
        """Every outbound message in order: its time, topic and type, and for a reply receipt
        the id of the receipt (the same receipt sent again is the same message)."""
        return self.rows(
            f"SELECT at, topic, type, CASE WHEN type = ? THEN json_extract({OUTBOX_PAYLOAD}, "
            "'$.id') END FROM outbox ORDER BY seq",
            (RECEIPT,),
        )

    # ---- committing ------------------------------------------------------------------------

    def writes_inline(self, inline: bool = True) -> bool:
        """Whether ``commit(inline=inline)`` would write what is queued now on the event
        loop (with ``inline_writes``, unless the caller says not to or it is large)."""
        return self._loop_writer(self._batch.effects(), inline) is not None

    def _loop_writer(self, rows: int, inline: bool = True) -> sqlite3.Connection | None:
        """The connection to write ``rows`` rows through on the event loop, or None: then
        they go to aiosqlite's thread (no ``inline_writes``, the caller said so, or many)."""
        return self._writer if inline and rows <= INLINE_MAX_WRITES else None

    async def commit(
        self,
        written: Callable[[list[OutboxRow]], None] | None = None,
        flush: bool = True,
        inline: bool = True,
    ) -> list[OutboxRow]:
        """Write everything queued in one transaction (all or nothing), then flush it (unless
        ``flush`` is false: then ``flush()`` says when it is on the disk).

        With ``inline_writes``, the transaction is written on the event loop unless ``inline``
        is false (the caller is draining a backlog: it receives the next messages while the
        thread writes) or it is large (over ``INLINE_MAX_WRITES`` rows).

        ``written`` is called on the event loop with the transaction's outbound messages that
        wait for a publisher, in order, as soon as the transaction is written (before the
        flush). Returns the same messages.
        """
        batch, self._batch = self._batch, _Batch()
        loop = asyncio.get_running_loop()

        def hand_over(pending: list[OutboxRow]) -> None:  # on the store's thread
            if written is not None and pending:
                loop.call_soon_threadsafe(written, pending)

        def hand_over_inline(pending: list[OutboxRow]) -> None:  # on the event loop
            if written is not None and pending:
                written(pending)

        try:
            if not len(batch):
                return []
            # on the event loop: state may change right after
            rows = _Rows.snapshot(batch, self._dispatch_rows)
            async with self._writing:
                writer = self._loop_writer(batch.effects(), inline)
                if writer is not None:
                    pending = _write(writer, rows, self.path, hand_over_inline)
                else:
                    pending = await self._in_thread(_write, rows, self.path, hand_over)
        except BaseException:
            # Nothing queued is ever dropped: a failed or interrupted commit puts its batch
            # back in front of whatever was queued since, for the next commit to write.
            batch.absorb(self._batch)
            self._batch = batch
            self._dispatch_rows.clear()  # which rows were written is no longer known
            raise
        self._written += 1
        self._checkpoint_soon(loop)
        if flush:
            await self.flush()
        return pending

    async def flush(self) -> None:
        """Return once every transaction written so far is on the disk. One ``fdatasync`` of
        the log covers all those written before it started, so waiting callers share one.
        Raises ``FlushError`` if the disk refused: for good (what it held may be lost, and a
        second try could falsely succeed), so the process must stop."""
        if self._log is None:
            return
        target = self._written
        while self._flushed < target:
            if self._flush_failed is not None:
                raise self._flush_failed
            if self._flushing is None:
                self._flushing = asyncio.ensure_future(self._flush_once())
            await asyncio.shield(self._flushing)

    async def _flush_once(self) -> None:
        assert self._log is not None
        covers = self._written
        try:
            await asyncio.get_running_loop().run_in_executor(self._flusher, self._log.flush)
        except OSError as exc:
            full = " (the disk is full)" if exc.errno == errno.ENOSPC else ""
            self._flush_failed = FlushError(
                f"{self.path}: flushing the store to the disk failed{full}: {exc}"
            )
            raise self._flush_failed from exc
        finally:
            self._flushing = None
        self._flushed = max(self._flushed, covers)

    def _checkpoint_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Copy the log back into the database in the background, at most every
        ``CHECKPOINT_EVERY_S``."""
        running = self._checkpointing is not None and not self._checkpointing.done()
        if running or loop.time() - self._checkpointed_at < CHECKPOINT_EVERY_S:
            return
        self._checkpointed_at = loop.time()
        self._checkpointing = loop.create_task(self._checkpoint(), name="store-checkpoint")

    async def _checkpoint(self) -> None:
        try:
            if self._checkpointer is None:
                self._checkpointer = await aiosqlite.connect(self._file, isolation_level=None)
            # PASSIVE: copies what no reader still needs, never waits for the writer
            (_, frames, _), *_ = await self._checkpointer.execute_fetchall(CHECKPOINT)
            if frames >= LOG_LIMIT_FRAMES:
                # SQLite starts the log over at the first commit after a checkpoint that
                # copied all of it; under a steady stream of commits one lands while each
                # checkpoint runs, and the log grew by everything written (a gigabyte in a
                # wave's replay), every page read searching more of it. Past the limit, what
                # the last copy left is copied with the writer held back: the next commit
                # starts the log over, and cuts its file to WRITER_PRAGMAS' size limit.
                async with self._writing:
                    await self._checkpointer.execute_fetchall(CHECKPOINT)
        except (aiosqlite.Error, sqlite3.Error) as exc:
            log.warning("store_checkpoint_failed", store=str(self.path), error=str(exc))

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` on aiosqlite's connection thread, in one hop (a whole
        transaction at once, not a round trip per statement: adapters/sqlite_internals.py)."""
        return await in_thread(self.db, fn, *args)

    async def prune(
        self,
        before_inbound: float,
        before_contacts: float,
        kept_before: tuple[float, float] | None = None,
    ) -> None:
        """Forget what is too old to matter, in one transaction: dedupe pairs and contacts
        (they are bounded by time), and refused input older than the dedupe window
        (``before_inbound``): its ``rejected`` rows and its dead letters, once sent (an unsent
        outbox row is never deleted). With ``kept_before`` (closed, contacts), the inbound
        messages kept for export: those of incidents closed before the first time, and the
        flagged contacts that touched no incident from before the second. A replay's store keeps its
        rejections and its kept messages: its report lists every rejection of the recording
        (SPEC §6), and a recording is finite."""
        forget_refused = self._mode != "replay"

        def prune(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM inbound WHERE last_at < ?", (before_inbound,))
                db.execute("DELETE FROM contacts WHERE at < ?", (before_contacts,))
                if forget_refused:
                    db.execute("DELETE FROM rejected WHERE at < ?", (before_inbound,))
                    # the type spelled out, so that SQLite uses the dead letters' own index
                    db.execute(
                        f"DELETE FROM outbox WHERE type = '{DEAD_LETTER}' AND at < ? AND sent = 1",
                        (before_inbound,),
                    )
                    if kept_before is not None:
                        _prune_kept(db, *kept_before)
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise

        async with self._writing:
            try:
                await self._in_thread(prune)
            except sqlite3.Error as exc:
                raise store_failure(self.path, "pruning the store", exc) from exc

    # ---- the outbox ------------------------------------------------------------------------

    async def unsent(self, limit: int, after: int = 0) -> list[OutboxRow]:
        """The oldest outbound messages not yet acknowledged by the broker, in order."""
        rows = await self.db.execute_fetchall(
            f"SELECT seq, topic, qos, retain, {OUTBOX_PAYLOAD} FROM outbox "
            "WHERE sent = 0 AND seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        )
        return [
            (seq, topic, qos, bool(retain), None if p is None else p.encode("utf-8"))
            for seq, topic, qos, retain, p in rows
        ]

    async def mark_sent(self, seqs: list[int]) -> None:
        """Record that the broker took these outbound messages. With ``inline_writes`` and at
        most ``INLINE_MAX_WRITES`` of them, on the event loop (an update of a few rows by
        their key, over before a thread could even be woken); else on aiosqlite's thread."""
        if not seqs:
            return
        async with self._writing:
            writer = self._loop_writer(len(seqs))
            if writer is not None:
                try:
                    _mark_sent(writer, seqs)
                except sqlite3.Error as exc:
                    raise store_failure(self.path, "marking messages sent", exc) from exc
            else:
                try:
                    await self._in_thread(_mark_sent, seqs)
                except sqlite3.Error as exc:
                    raise store_failure(self.path, "marking messages sent", exc) from exc

    async def backup(self, target: Path) -> None:
        """A consistent copy of the store while it is in use (SQLite's online backup), written
        next to ``target`` and renamed into place only once it is complete and checked."""
        partial = target.with_name(target.name + ".partial")
        partial.unlink(missing_ok=True)
        async with aiosqlite.connect(partial) as copy:
            await self.db.backup(copy)
            row = await (await copy.execute("PRAGMA integrity_check")).fetchone()
            if not row or row[0] != "ok":
                raise StoreError(f"{target}: the backup failed its integrity check: {row}")
        partial.replace(target)

    async def integrity_check(self) -> str:
        row = await (await self.db.execute("PRAGMA integrity_check")).fetchone()
        return str(row[0]) if row else "no answer"


def _prune_kept(db: sqlite3.Connection, closed_before: float, contacts_before: float) -> None:
    db.execute(
        "DELETE FROM incident_inbound WHERE incident_id IN (SELECT id FROM incidents "
        "WHERE status = 'closed' AND closed_at < ?)",
        (closed_before,),
    )
    db.execute(
        "DELETE FROM incident_inbound WHERE incident_id IS NULL AND at < ?", (contacts_before,)
    )


TIMELINE_SELECT = (
    'SELECT at, kind, "by", text, dispatch_id, action_id FROM timeline WHERE incident_id = ? '
    "ORDER BY seq"
)


def timeline_rows(rows: Iterable[Any]) -> list[TimelineEntry]:
    """An incident's timeline from its rows (``TIMELINE_SELECT``)."""
    return [
        TimelineEntry(at=at, kind=kind, by=by, text=text, dispatch_id=d, action_id=a)
        for at, kind, by, text, d, a in rows
    ]


def stored_timeline(db: sqlite3.Connection, incident_id: str) -> list[TimelineEntry]:
    """An incident's timeline read from a store, also from one a dispatcher not yet upgraded
    still holds at schema 4 (its entries name no action)."""
    try:
        return timeline_rows(db.execute(TIMELINE_SELECT, (incident_id,)))
    except sqlite3.OperationalError as exc:
        if "action_id" not in str(exc):
            raise
        legacy = TIMELINE_SELECT.replace("action_id", "NULL")
        return timeline_rows(db.execute(legacy, (incident_id,)))


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode("utf-8")  # compact, UTF-8 as is


@dataclass
class _Rows:
    """A batch turned into rows. ``snapshot`` runs on the event loop (it copies the incidents
    as they are now); ``_write`` serialises and writes them on the store's thread."""

    meta: list[tuple[str, str]]
    incidents: list[tuple[Any, ...]]
    dispatches: list[tuple[Any, ...]]
    timeline: list[tuple[Any, ...]]
    outbox: list[tuple[Any, ...]]
    inbound: list[tuple[str, str, float]]
    rejected: list[tuple[Any, ...]]
    contacts: list[tuple[str, float, str]]
    presence: list[tuple[str, str, float]]
    kept: list[KeptInbound]

    def tables(self, outbox: list[tuple[Any, ...]]) -> Tables:
        """The rows as written, with ``outbox`` as ``serialise_outbox`` made it."""
        inbound = self.inbound
        return Tables(
            self.meta,
            self.incidents,
            self.dispatches,
            self.timeline,
            outbox,
            (inbound[0][2], inbound[-1][2], _dumps(inbound)) if inbound else None,
            self.rejected,
            self.contacts,
            self.presence,
            [tuple(k) for k in self.kept],
        )

    @classmethod
    def snapshot(cls, batch: _Batch, written: dict[str, tuple[Any, ...]] | None = None) -> _Rows:
        """``written``: the row each dispatch was last given in, by dispatch id, kept by
        the caller across commits: a dispatch whose row is unchanged is not written again
        (``written`` is updated; the caller empties it when a commit fails). An incident that
        is closed is let go from it: if it is saved again, its rows are all written."""
        incidents: list[tuple[Any, ...]] = []
        dispatches: list[tuple[Any, ...]] = []
        for inc, doc in batch.incidents.values():
            incidents.append(
                (
                    inc.id,
                    inc.subscriber,
                    inc.status,
                    inc.severity,
                    inc.rule,
                    inc.opened_at,
                    inc.closed_at,
                    inc.outcome,
                    doc if doc is not None else inc.to_json(),
                )
            )
            rows = [
                (
                    d.id,
                    inc.id,
                    d.unit,
                    d.role,
                    d.status,
                    d.offered_at,
                    d.accepted_at,
                    d.arrived_at,
                    d.reported_at,
                    d.outcome,
                )
                for d in inc.dispatches.values()
            ]
            if written is None:
                dispatches.extend(rows)
            elif inc.status == "closed":
                dispatches.extend(rows)
                for row in rows:
                    written.pop(row[0], None)
            else:
                for row in rows:
                    if written.get(row[0]) != row:
                        written[row[0]] = row
                        dispatches.append(row)
        return cls(
            list(batch.meta.items()),
            incidents,
            dispatches,
            batch.timeline,
            batch.outbox,
            batch.inbound,
            batch.rejected,
            batch.contacts,
            [(u, st, at) for u, (st, at) in batch.presence.items()],
            batch.kept,
        )


def _mark_sent(db: sqlite3.Connection, seqs: list[int]) -> None:
    """One transaction (in autocommit mode each UPDATE would be a commit of its own)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("UPDATE outbox SET sent = 1 WHERE seq = ?", [(s,) for s in seqs])
        db.execute("COMMIT")
    except BaseException:
        rollback(db)
        raise


def _write(
    db: sqlite3.Connection,
    rows: _Rows,
    path: Path,
    hand_over: Callable[[list[OutboxRow]], None],
) -> list[OutboxRow]:
    """One transaction, on the store's thread; its unsent outbox rows are handed over as soon
    as it is written, and returned."""
    outbox, pending = serialise_outbox(rows.outbox)
    try:
        write_tables(db, rows.tables(outbox))
    except sqlite3.Error as exc:
        raise store_failure(path, "commit", exc) from exc
    hand_over(pending)
    return pending


def serialise_outbox(
    queued: list[tuple[Any, ...]],
) -> tuple[list[tuple[Any, ...]], list[OutboxRow]]:
    """A batch's outbox rows as written (payloads as JSON text, ``retain`` and ``sent`` as
    integers, and ``same_as``: a retained copy of an earlier row's payload names that row
    and holds none itself, schema 7), and those of them that wait for a publisher, with
    their whole payloads. A message over the broker's packet limit is kept, marked as never
    to be sent, and said loudly."""
    # one serialisation per payload (an event sent to two topics), and the first row that
    # holds it: a retained copy of it is written as a reference to that row (``same_as``)
    texts: dict[int, tuple[str, int, list[bytes]]] = {}
    outbox = []
    pending: list[OutboxRow] = []
    for seq, at, topic, qos, retain, type_, payload, sent in queued:
        text = None
        same_as = None
        encoded: list[bytes] = []  # the text as bytes, once made
        if payload is not None:
            known = texts.get(id(payload))
            if known is None:
                text = _dumps(payload)
                texts[id(payload)] = (text, seq, encoded)
            else:
                text, first, encoded = known
                if retain and type_ != DEAD_LETTER:  # a dead letter's row may be pruned
                    same_as = first
            if not sent and len(text) * 4 > MAX_MESSAGE_BYTES and _too_large(text):
                # a broker disconnects a client that sends a packet over its limit, and the
                # outbox goes in order: such a message would stop every one behind it, for
                # ever. It is kept, marked as never to be sent, and said loudly.
                log.error(
                    "outbound_too_large",
                    seq=seq,
                    topic=topic,
                    type=type_,
                    bytes=len(text.encode()),
                    limit=MAX_MESSAGE_BYTES,
                )
                sent = True
        stored = None if same_as is not None else text
        outbox.append((seq, at, topic, qos, int(retain), type_, stored, int(sent), same_as))
        if not sent:
            if text is not None and not encoded:
                encoded.append(text.encode())
            pending.append((seq, topic, qos, retain, encoded[0] if text is not None else None))
    return outbox, pending
