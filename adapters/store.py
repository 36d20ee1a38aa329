"""The SQLite store (aiosqlite, WAL): the dispatcher's source of truth.

Writes are queued in memory as the workflow produces effects and committed together by
``commit()`` in one transaction, so persistence costs one fsync per batch rather than one per
message. The runtime commits before it acknowledges anything as processed (the replay cursor
and the processed ``(source, id)`` pairs are in the same transaction as the effects), so a crash
loses only work that was never acknowledged and is therefore delivered again.

The schema is versioned with ``PRAGMA user_version``; a store written by a newer version is
refused rather than guessed at.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite

from dispatcher.errors import StoreError
from dispatcher.model import Incident, Publish, TimelineEntry

SCHEMA_VERSION = 1

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


class Store:
    """Async context manager over one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._batch = _Batch()
        self._writing = asyncio.Lock()  # one write transaction at a time

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
            await self._db.execute("PRAGMA synchronous=FULL")
            await self._db.execute("PRAGMA busy_timeout=5000")
            await self._db.executescript(SCHEMA)
            await self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except aiosqlite.Error as exc:
            raise StoreError(f"{self.path}: cannot open the store: {exc}") from None

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
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
        payload = (
            None
            if message.payload is None
            else json.dumps(message.payload, ensure_ascii=False, separators=(",", ":"))
        )
        self._batch.outbox.append(
            (at, message.topic, message.qos, int(message.retain), message.type, payload, int(sent))
        )

    def add_inbound(self, source: str, event_id: str, at: float) -> None:
        self._batch.inbound.append((source, event_id, at))

    def add_rejected(self, at: float, topic: str, reason: str, payload: str) -> None:
        self._batch.rejected.append((at, topic, reason, payload))

    def add_contact(self, subscriber: str, at: float, counterpart: str) -> None:
        self._batch.contacts.append((subscriber, at, counterpart))

    def set_presence(self, unit: str, state: str, at: float) -> None:
        self._batch.presence[unit] = (state, at)

    @property
    def pending(self) -> int:
        return len(self._batch)

    # ---- committing ------------------------------------------------------------------------

    async def commit(self) -> None:
        """Write everything queued in one transaction (all or nothing)."""
        batch, self._batch = self._batch, _Batch()
        try:
            async with self._writing:
                await self._commit(batch)
        except BaseException:
            # Nothing queued is ever dropped: a failed or interrupted commit puts its batch
            # back in front of whatever was queued since, for the next commit to write.
            batch.absorb(self._batch)
            self._batch = batch
            raise

    async def _commit(self, batch: _Batch) -> None:
        if not len(batch):
            return
        incident_rows = []
        dispatch_rows: list[tuple[Any, ...]] = []
        for inc in batch.incidents.values():
            doc = json.dumps(inc.to_doc(), ensure_ascii=False, separators=(",", ":"))
            incident_rows.append(
                (
                    inc.id,
                    inc.subscriber,
                    inc.status,
                    inc.severity,
                    inc.rule,
                    inc.opened_at,
                    inc.closed_at,
                    inc.outcome,
                    doc,
                )
            )
            dispatch_rows.extend(
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
        db = self.db
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                if incident_rows:
                    await db.executemany(
                        "INSERT OR REPLACE INTO incidents VALUES (?,?,?,?,?,?,?,?,?)", incident_rows
                    )
                if dispatch_rows:
                    await db.executemany(
                        "INSERT OR REPLACE INTO dispatches VALUES (?,?,?,?,?,?,?,?,?,?)",
                        dispatch_rows,
                    )
                if batch.timeline:
                    await db.executemany(
                        "INSERT INTO timeline (incident_id, at, kind, by, text, dispatch_id) "
                        "VALUES (?,?,?,?,?,?)",
                        batch.timeline,
                    )
                if batch.outbox:
                    await db.executemany(
                        "INSERT INTO outbox (at, topic, qos, retain, type, payload, sent) "
                        "VALUES (?,?,?,?,?,?,?)",
                        batch.outbox,
                    )
                if batch.inbound:
                    pairs = json.dumps(batch.inbound, ensure_ascii=False, separators=(",", ":"))
                    await db.execute(
                        "INSERT INTO inbound (first_at, last_at, pairs) VALUES (?,?,?)",
                        (batch.inbound[0][2], batch.inbound[-1][2], pairs),
                    )
                if batch.rejected:
                    await db.executemany(
                        "INSERT INTO rejected (at, topic, reason, payload) VALUES (?,?,?,?)",
                        batch.rejected,
                    )
                if batch.contacts:
                    await db.executemany("INSERT INTO contacts VALUES (?,?,?)", batch.contacts)
                if batch.presence:
                    await db.executemany(
                        "INSERT OR REPLACE INTO presence VALUES (?,?,?)",
                        [(u, s, at) for u, (s, at) in batch.presence.items()],
                    )
                if batch.meta:
                    await db.executemany(
                        "INSERT OR REPLACE INTO meta VALUES (?,?)", list(batch.meta.items())
                    )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        except aiosqlite.Error as exc:
            raise StoreError(f"{self.path}: commit failed: {exc}") from exc

    async def prune(self, before_inbound: float, before_contacts: float) -> None:
        """Forget dedupe pairs and contacts too old to matter (they are bounded by time)."""
        async with self._writing:
            await self.db.execute("DELETE FROM inbound WHERE last_at < ?", (before_inbound,))
            await self.db.execute("DELETE FROM contacts WHERE at < ?", (before_contacts,))

    # ---- the outbox ------------------------------------------------------------------------

    async def unsent(self, limit: int) -> list[tuple[int, str, int, bool, bytes | None]]:
        """The oldest outbound messages not yet acknowledged by the broker, in order."""
        rows = await self.db.execute_fetchall(
            "SELECT seq, topic, qos, retain, payload FROM outbox WHERE sent = 0 "
            "ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [
            (seq, topic, qos, bool(retain), None if p is None else p.encode("utf-8"))
            for seq, topic, qos, retain, p in rows
        ]

    async def mark_sent(self, seqs: list[int]) -> None:
        if not seqs:
            return
        async with self._writing:
            await self.db.executemany(
                "UPDATE outbox SET sent = 1 WHERE seq = ?", [(s,) for s in seqs]
            )

    async def integrity_check(self) -> str:
        row = await (await self.db.execute("PRAGMA integrity_check")).fetchone()
        return str(row[0]) if row else "no answer"
