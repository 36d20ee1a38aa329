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
milliseconds.

The schema is versioned with ``PRAGMA user_version``; a store written by a newer version is
refused rather than guessed at.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiosqlite
import orjson
import structlog

from dispatcher.errors import StoreError
from dispatcher.model import Incident, Publish, TimelineEntry

SCHEMA_VERSION = 2
T = TypeVar("T")
log = structlog.get_logger("store")
CHECKPOINT_EVERY_S = 10.0  # the log is copied back into the database at most this often
# with inline_writes, a commit of more rows than this (a backlog drained in large batches) is
# still written on aiosqlite's thread, so that the loop receives the next messages meanwhile
INLINE_MAX_WRITES = 200
OutboxRow = tuple[int, str, int, bool, bytes | None]  # seq, topic, qos, retain, payload

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
}


@dataclass
class Snapshot:
    """What a starting process needs from the store to continue where the last one stopped."""

    meta: dict[str, str]
    incidents: list[Incident]  # open ones, and closed ones still within retention
    incident_ids: set[str]
    contacts: list[tuple[str, float, str]]
    presence: dict[str, str]
    inbound: list[tuple[str, str, float]]


@dataclass
class _Batch:
    meta: dict[str, str] = field(default_factory=dict)
    incidents: dict[str, Incident] = field(default_factory=dict)
    timeline: list[tuple[Any, ...]] = field(default_factory=list)
    outbox: list[tuple[Any, ...]] = field(default_factory=list)
    inbound: list[tuple[str, str, float]] = field(default_factory=list)
    rejected: list[tuple[Any, ...]] = field(default_factory=list)
    contacts: list[tuple[str, float, str]] = field(default_factory=list)
    presence: dict[str, tuple[str, float]] = field(default_factory=dict)

    def absorb(self, newer: _Batch) -> None:
        """Append a newer batch to this one (its values win where both set one)."""
        self.meta.update(newer.meta)
        self.incidents.update(newer.incidents)
        self.presence.update(newer.presence)
        for name in ("timeline", "outbox", "inbound", "rejected", "contacts"):
            getattr(self, name).extend(getattr(newer, name))

    def holds_effects(self) -> bool:
        """Whether this batch changes more than bookkeeping: processed pairs and the clock."""
        return bool(
            self.incidents
            or self.timeline
            or self.outbox
            or self.rejected
            or self.contacts
            or self.presence
            or self.meta.keys() - {"clock"}
        )

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
        )


class FlushError(StoreError):
    """Flushing written transactions to the disk failed: nothing they cover may be
    acknowledged, and the store must not be used further."""


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


class WriterLock:
    """One writer per store: ``PATH.lock`` beside it, locked (``flock``) for as long as a
    live service or a replay holds the store. A second writer would keep its own idea of the
    state in memory and write over the first one's; two live services would also share one
    MQTT client id and keep taking the connection from each other. Readers (``report``, the
    console's history, ``backup``) do not take it. The lock goes with the process, however
    it ends; the file stays, naming the last holder."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.path = store.with_name(store.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot create the store's lock: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise StoreError(
                f"{self.store}: already in use by {holder} (a live service or a replay writes "
                "it); stop that one first, or use another --store"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    """Async context manager over one SQLite file.

    ``sync="full"`` (the default) flushes every commit to the disk before ``commit()`` returns;
    ``sync="normal"`` does not (a commit survives the process dying, not a power cut).
    """

    def __init__(
        self,
        path: str | Path,
        sync: str = "full",
        *,
        inline_writes: bool = False,
        writer: bool = False,
    ) -> None:
        self.path = Path(path)
        # the live service and replay write the store: one of them at a time (WriterLock)
        self._lock = WriterLock(self.path) if writer else None
        self._inline = inline_writes
        self._writer: sqlite3.Connection | None = None  # with inline_writes: the loop's own
        if sync not in ("full", "normal"):
            raise ValueError(f"sync must be 'full' or 'normal', not {sync!r}")
        self._log: _Log | None = _Log(self.path) if sync == "full" else None
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
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._lock is not None:
            self._lock.acquire()
        try:
            await self._open()
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    async def _open(self) -> None:
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            version = (await (await self._db.execute("PRAGMA user_version")).fetchone() or (0,))[0]
            if version > SCHEMA_VERSION:
                await self._db.close()
                self._db = None
                raise StoreError(
                    f"{self.path}: store schema version {version} is newer than this dispatcher "
                    f"understands ({SCHEMA_VERSION}); upgrade the dispatcher or use another store"
                )
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")  # the store flushes the log
            await self._db.execute("PRAGMA wal_autocheckpoint=0")  # and checkpoints it
            await self._db.execute("PRAGMA busy_timeout=5000")
            if version == 0:
                await self._db.executescript(SCHEMA)
                await self._db.execute("PRAGMA user_version=1")
                version = 1
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
            if self._inline:
                self._writer = sqlite3.connect(self.path, isolation_level=None)
                for pragma in ("synchronous=NORMAL", "wal_autocheckpoint=0", "busy_timeout=5000"):
                    self._writer.execute(f"PRAGMA {pragma}")
        except (aiosqlite.Error, sqlite3.Error) as exc:
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from None

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
            if status != "closed" or closed_at + retention_s > latest:
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
        return Snapshot(meta, incidents, ids, contacts, presence, inbound)

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.db.execute_fetchall(sql, tuple(params))]

    # ---- queueing (synchronous, in memory) -------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        self._batch.meta[key] = value

    def save_incident(self, incident: Incident) -> None:
        self._batch.incidents[incident.id] = incident

    def add_timeline(self, incident_id: str, entry: TimelineEntry) -> None:
        self._batch.timeline.append(
            (incident_id, entry.at, entry.kind, entry.by, entry.text, entry.dispatch_id)
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

    # ---- committing ------------------------------------------------------------------------

    def holds_effects(self) -> bool:
        """Whether anything queued since the last commit is more than bookkeeping (processed
        ``(source, id)`` pairs and the clock): what handling a message changed or produced."""
        return self._batch.holds_effects()

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
            rows = _Rows.snapshot(batch)  # on the event loop: state may change right after
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
            self._flush_failed = FlushError(
                f"{self.path}: flushing the store to the disk failed: {exc}"
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
                self._checkpointer = await aiosqlite.connect(self.path, isolation_level=None)
            # PASSIVE: copies what no reader still needs, never waits for the writer
            await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except (aiosqlite.Error, sqlite3.Error) as exc:
            log.warning("store_checkpoint_failed", store=str(self.path), error=str(exc))

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` on aiosqlite's connection thread, in one hop.

        aiosqlite runs each statement as one round trip to its thread; a commit of a dozen
        statements would pay a dozen. Every public aiosqlite method is built on this same
        queueing primitive (``Connection._execute``), used here for a whole transaction.
        """
        db = self.db
        return await db._execute(lambda: fn(db._conn, *args))  # type: ignore[no-untyped-call,no-any-return]

    async def prune(self, before_inbound: float, before_contacts: float) -> None:
        """Forget dedupe pairs and contacts too old to matter (they are bounded by time)."""
        async with self._writing:
            await self.db.execute("DELETE FROM inbound WHERE last_at < ?", (before_inbound,))
            await self.db.execute("DELETE FROM contacts WHERE at < ?", (before_contacts,))

    # ---- the outbox ------------------------------------------------------------------------

    async def unsent(self, limit: int, after: int = 0) -> list[OutboxRow]:
        """The oldest outbound messages not yet acknowledged by the broker, in order."""
        rows = await self.db.execute_fetchall(
            "SELECT seq, topic, qos, retain, payload FROM outbox WHERE sent = 0 AND seq > ? "
            "ORDER BY seq LIMIT ?",
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
                    raise StoreError(f"{self.path}: marking messages sent failed: {exc}") from exc
            else:
                await self._in_thread(_mark_sent, seqs)

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

    @classmethod
    def snapshot(cls, batch: _Batch) -> _Rows:
        incidents: list[tuple[Any, ...]] = []
        dispatches: list[tuple[Any, ...]] = []
        for inc in batch.incidents.values():
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
                    inc.to_doc(),
                )
            )
            dispatches.extend(
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
            )
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
        )


def _mark_sent(db: sqlite3.Connection, seqs: list[int]) -> None:
    """One transaction (in autocommit mode each UPDATE would be a commit of its own)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.executemany("UPDATE outbox SET sent = 1 WHERE seq = ?", [(s,) for s in seqs])
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _write(
    db: sqlite3.Connection,
    rows: _Rows,
    path: Path,
    hand_over: Callable[[list[OutboxRow]], None],
) -> list[OutboxRow]:
    """One transaction, on the store's thread; its unsent outbox rows are handed over as soon
    as it is written, and returned."""
    texts: dict[int, str] = {}  # one serialisation per payload (an event sent to two topics)
    outbox = []
    pending: list[OutboxRow] = []
    for seq, at, topic, qos, retain, type_, payload, sent in rows.outbox:
        text = None
        if payload is not None:
            text = texts.get(id(payload))
            if text is None:
                text = texts[id(payload)] = _dumps(payload)
        outbox.append((seq, at, topic, qos, int(retain), type_, text, int(sent)))
        if not sent:
            pending.append((seq, topic, qos, retain, None if text is None else text.encode()))
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            if rows.incidents:
                db.executemany(
                    "INSERT OR REPLACE INTO incidents VALUES (?,?,?,?,?,?,?,?,?)",
                    [(*r[:8], _dumps(r[8])) for r in rows.incidents],
                )
            if rows.dispatches:
                db.executemany(
                    "INSERT OR REPLACE INTO dispatches VALUES (?,?,?,?,?,?,?,?,?,?)",
                    rows.dispatches,
                )
            if rows.timeline:
                db.executemany(
                    "INSERT INTO timeline (incident_id, at, kind, by, text, "
                    "dispatch_id) VALUES (?,?,?,?,?,?)",
                    rows.timeline,
                )
            if outbox:
                db.executemany(
                    "INSERT INTO outbox (seq, at, topic, qos, retain, type, payload, "
                    "sent) VALUES (?,?,?,?,?,?,?,?)",
                    outbox,
                )
            if rows.inbound:
                db.execute(
                    "INSERT INTO inbound (first_at, last_at, pairs) VALUES (?,?,?)",
                    (rows.inbound[0][2], rows.inbound[-1][2], _dumps(rows.inbound)),
                )
            if rows.rejected:
                db.executemany(
                    "INSERT INTO rejected (at, topic, reason, payload) VALUES (?,?,?,?)",
                    rows.rejected,
                )
            if rows.contacts:
                db.executemany("INSERT INTO contacts VALUES (?,?,?)", rows.contacts)
            if rows.presence:
                db.executemany("INSERT OR REPLACE INTO presence VALUES (?,?,?)", rows.presence)
            if rows.meta:
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", rows.meta)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: commit failed: {exc}") from exc
    hand_over(pending)
    return pending
