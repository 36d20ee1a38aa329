"""The PostgreSQL store (psycopg 3): the dispatcher's state on a database built for failover.

``--store postgresql://user@host:port/dbname`` (or ``service.store``) names it. The password
never travels in the URL (it would show in the process list and the logs): libpq reads it
from ``PGPASSWORD`` or a ``PGPASSFILE`` (docs/operations.md). A URL holding one is refused.

It keeps the SQLite store's tables and meanings (adapters/store.py) and implements the same
ports, so the runtime, the live service, replay and the report use either the same way:

- **Two moments, as in SQLite.** A commit is one transaction sent in one pipeline (one round
  trip) on a connection with ``synchronous_commit`` off: once the server has it, no crash of this
  process can lose it, and its messages go to the publisher (**written**). ``flush()`` then
  commits a transaction of its own with ``synchronous_commit`` on, on a second connection:
  the server returns once the log holds everything before it on its disk (and, with
  synchronous replication, on a standby's), and only then are inbound messages acknowledged
  (**durable**). Waiting callers share one flush.
- **Fenced.** A writer holds the store's lease (``Lease``: a row with the holder and an epoch
  raised at every take, its expiry on the database's clock). The first statement of every
  write transaction is ``antifraud_fence(name, holder, epoch)``, which raises unless that
  lease is still this writer's: a process frozen past its lease and woken after another took
  over can commit nothing (``LeaseLost``). Replay takes the lease for as long as it runs; the
  live service takes it through ``adapters/live/standby.py``, which keeps it.
- **Versioned.** ``store_schema`` holds the schema version; a newer one than this code knows
  is refused, an older one migrated forward (``PG_MIGRATIONS``), both under a transaction
  lock so that two processes starting together do not both create the schema. A database
  holding tables but no store is refused, never written into.
- **Timeouts.** Connections are made with TCP keepalives and a TCP user timeout
  (``CONNECT_PARAMS``), so a cut connection fails a commit within seconds, rather than after
  the kernel's minutes of retries.

PostgreSQL's text cannot hold the NUL character; a refused message's text is written with
each NUL as ``\\u0000`` (docs/decisions.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg
import structlog

from adapters.store import (
    DEAD_LETTER,
    RECEIPT,
    SCHEMA_VERSION,
    TIMELINE_SELECT,
    QueuedWrites,
    _Batch,
    _dumps,
    _Rows,
    serialise_outbox,
    timeline_rows,
)
from dispatcher.errors import FlushError, LeaseLost, StoreError, StoreUnavailable
from dispatcher.model import Incident, TimelineEntry
from dispatcher.ports import OutboxRow, Snapshot

log = structlog.get_logger("store")

LEASE_NAME = "dispatcher"  # the deployment's lease row (one region: one store, one lease)
LEASE_TTL_S = 4.0  # a lease not renewed for this long may be taken by a standby
FENCED = "AF001"  # the SQLSTATE antifraud_fence raises
# keepalives and a TCP user timeout: a cut connection fails its statement within ~3 s
CONNECT_PARAMS = {
    "connect_timeout": "3",
    "keepalives": "1",
    "keepalives_idle": "2",
    "keepalives_interval": "1",
    "keepalives_count": "2",
    "tcp_user_timeout": "3000",
    "application_name": "antifraud",
}

SCHEMA = f"""
CREATE TABLE store_schema (version INTEGER NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE incidents (
    id TEXT PRIMARY KEY, subscriber TEXT NOT NULL, status TEXT NOT NULL, severity TEXT NOT NULL,
    rule TEXT NOT NULL, opened_at DOUBLE PRECISION NOT NULL, closed_at DOUBLE PRECISION,
    outcome TEXT, doc TEXT NOT NULL
);
CREATE INDEX incidents_status ON incidents (status, closed_at);
CREATE INDEX incidents_opened ON incidents (opened_at, id);
CREATE TABLE dispatches (
    id TEXT PRIMARY KEY, incident_id TEXT NOT NULL, unit TEXT NOT NULL, role TEXT NOT NULL,
    status TEXT NOT NULL, offered_at DOUBLE PRECISION NOT NULL, accepted_at DOUBLE PRECISION,
    arrived_at DOUBLE PRECISION, reported_at DOUBLE PRECISION, outcome TEXT
);
CREATE INDEX dispatches_incident ON dispatches (incident_id);
CREATE INDEX dispatches_unit ON dispatches (unit, status);
CREATE TABLE timeline (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, incident_id TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, "by" TEXT NOT NULL, text TEXT NOT NULL,
    dispatch_id TEXT, action_id TEXT
);
CREATE INDEX timeline_incident ON timeline (incident_id, seq);
CREATE TABLE outbox (
    seq BIGINT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, topic TEXT NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, type TEXT, payload TEXT,
    sent INTEGER NOT NULL DEFAULT 0, same_as BIGINT
);
CREATE INDEX outbox_unsent ON outbox (seq) WHERE sent = 0;
CREATE INDEX outbox_dead_letters ON outbox (at) WHERE type = '{DEAD_LETTER}';
CREATE INDEX outbox_receipts ON outbox (at) WHERE type = '{RECEIPT}';
CREATE TABLE inbound (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, first_at DOUBLE PRECISION NOT NULL,
    last_at DOUBLE PRECISION NOT NULL, pairs TEXT NOT NULL
);
CREATE INDEX inbound_last_at ON inbound (last_at);
CREATE TABLE rejected (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at DOUBLE PRECISION NOT NULL,
    topic TEXT NOT NULL, reason TEXT NOT NULL, payload TEXT NOT NULL
);
CREATE INDEX rejected_at ON rejected (at);
CREATE TABLE contacts (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, subscriber TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL, counterpart TEXT NOT NULL
);
CREATE INDEX contacts_at ON contacts (at);
CREATE TABLE presence (unit TEXT PRIMARY KEY, state TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE TABLE incident_inbound (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, incident_id TEXT, subscriber TEXT,
    call_id TEXT, contact INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL, topic TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE INDEX incident_inbound_incident ON incident_inbound (incident_id, seq);
CREATE INDEX incident_inbound_contacts ON incident_inbound (subscriber, at)
    WHERE incident_id IS NULL;
CREATE INDEX incident_inbound_at ON incident_inbound (at);
CREATE TABLE lease (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch BIGINT NOT NULL,
    since TIMESTAMPTZ NOT NULL, expires_at TIMESTAMPTZ NOT NULL
);
CREATE FUNCTION antifraud_fence(lease_name TEXT, lease_holder TEXT, lease_epoch BIGINT)
RETURNS VOID LANGUAGE plpgsql AS $$
BEGIN
    -- FOR SHARE: a take waits until this transaction ends, so it cannot slip in between
    PERFORM 1 FROM lease
        WHERE name = lease_name AND holder = lease_holder AND epoch = lease_epoch FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the lease % epoch % is no longer held by %',
            lease_name, lease_epoch, lease_holder USING ERRCODE = '{FENCED}';
    END IF;
END $$;
INSERT INTO store_schema VALUES ({SCHEMA_VERSION});
"""

# Forward migrations, as adapters/store.py's: PG_MIGRATIONS[v] takes a store from v to v + 1.
# A new store is made at SCHEMA_VERSION; the first PostgreSQL stores were made at version 6.
PG_MIGRATIONS: dict[int, str] = {
    # 7: a retained copy of an earlier row's payload names that row (adapters/store.py)
    6: "ALTER TABLE outbox ADD COLUMN same_as BIGINT",
}
FIRST_PG_VERSION = 6
# an outbox row's payload, its own or that of the row it repeats (``same_as``)
OUTBOX_PAYLOAD = (
    "COALESCE(outbox.payload, (SELECT p.payload FROM outbox AS p WHERE p.seq = outbox.same_as))"
)

_TIMELINE_SELECT = TIMELINE_SELECT.replace("?", "%s")


def _insert(table: str, columns: str, types: str, conflict: str = "") -> tuple[str, str]:
    """Two ways to INSERT a batch's rows: one statement for all of them, each column sent
    as an array and unnested by the server in the batch's order (a table numbered by an
    identity keeps it), and one for a row, repeated. A large batch (a replay, a backlog) is
    written the first way: the server's cost is a statement's, once; a small one (an
    escalation) the second: its prepared statements cost less than planning the unnesting."""
    names = [c.strip() for c in columns.split(",")]
    arrays = ", ".join(f"%s::{t.strip()}[]" for t in types.split(","))
    alias = ", ".join(f"c{i}" for i in range(len(names)))
    sql = (
        f"INSERT INTO {table} ({', '.join(names)}) SELECT {alias} FROM unnest({arrays}) "
        f"WITH ORDINALITY AS u({alias}, n) ORDER BY n"
    )
    values = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(['%s'] * len(names))})"
    if conflict:
        key, _, rest = conflict.partition(":")
        updated = [n for n in names if n not in key.split("+")] if rest == "*" else []
        upsert = f" ON CONFLICT ({key.replace('+', ', ')}) DO UPDATE SET " + ", ".join(
            f"{n} = EXCLUDED.{n}" for n in updated
        )
        sql += upsert
        values += upsert
    return sql, values


_TABLES: dict[str, tuple[str, str]] = {
    "incidents": _insert(
        "incidents",
        "id, subscriber, status, severity, rule, opened_at, closed_at, outcome, doc",
        "text, text, text, text, text, float8, float8, text, text",
        "id:*",
    ),
    "dispatches": _insert(
        "dispatches",
        "id, incident_id, unit, role, status, offered_at, accepted_at, arrived_at, "
        "reported_at, outcome",
        "text, text, text, text, text, float8, float8, float8, float8, text",
        "id:*",
    ),
    "timeline": _insert(
        "timeline",
        'incident_id, at, kind, "by", text, dispatch_id, action_id',
        "text, float8, text, text, text, text, text",
    ),
    "outbox": _insert(
        "outbox",
        "seq, at, topic, qos, retain, type, payload, sent, same_as",
        "int8, float8, text, int4, int4, text, text, int4, int8",
    ),
    "inbound": _insert("inbound", "first_at, last_at, pairs", "float8, float8, text"),
    "rejected": _insert("rejected", "at, topic, reason, payload", "float8, text, text, text"),
    "contacts": _insert("contacts", "subscriber, at, counterpart", "text, float8, text"),
    "presence": _insert("presence", "unit, state, at", "text, text, float8", "unit:*"),
    "incident_inbound": _insert(
        "incident_inbound",
        "incident_id, subscriber, call_id, contact, at, topic, payload",
        "text, text, text, int4, float8, text, text",
    ),
    "meta": _insert("meta", "key, value", "text, text", "key:*"),
}


ROWS_ONE_BY_ONE = 32  # a table's rows in a commit written one statement each, up to this


def _text(value: Any) -> Any:
    """``value``, a text PostgreSQL can hold: each NUL written as ``\\u0000``."""
    return value.replace("\x00", "\\u0000") if type(value) is str and "\x00" in value else value


def _cleaned(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(_text(v) for v in row) for row in rows]


def _columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """A batch's rows as one list a column (each NUL written as ``\\u0000``: text
    PostgreSQL cannot hold)."""
    return [[_text(v) for v in column] for column in zip(*rows, strict=True)]


SECRET_PARAMS = ("password", "passfile")  # never in a URL: they would show where it does


def conninfo(url: str) -> str:
    """libpq's connection string for ``url``, with the store's timeouts unless the URL sets
    its own. A password in the URL, as ``user:password@`` or as a parameter, is refused."""
    shown = _shown(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (parsing it is the check)
        given = dict(parse_qsl(parts.query))
    except ValueError as exc:
        raise StoreError(f"{shown}: not a PostgreSQL URL: {exc}") from None
    if parts.password is not None or "password" in given:
        raise StoreError(
            f"{shown}: the store URL holds a password, which would show in the process "
            "list and the logs; give it in PGPASSWORD or a PGPASSFILE instead"
        )
    if not parts.path.strip("/"):
        raise StoreError(f"{shown}: the store URL names no database (postgresql://user@host/db)")
    params = {k: v for k, v in CONNECT_PARAMS.items() if k not in given}
    return psycopg.conninfo.make_conninfo(url, **params)


def _shown(url: str) -> str:
    """``url`` without its password (``user:password@`` or ``password=``), for messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        head, at, rest = url.rpartition("@")
        if not at:
            return url
        scheme, _, user = head.partition("://")
        return f"{scheme}://{user.split(':', 1)[0]}:***@{rest}"
    if password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@", 1))
    if any(k in SECRET_PARAMS for k, _ in query):
        masked = "&".join(f"{k}={'***' if k in SECRET_PARAMS else v}" for k, v in query)
        parts = parts._replace(query=masked)
    return parts.geturl()


def _failure(url: str, doing: str, exc: BaseException) -> StoreError:
    if isinstance(exc, psycopg.Error) and getattr(exc, "sqlstate", None) == FENCED:
        return LeaseLost(f"{_shown(url)}: {doing}: {_first_line(exc)}")
    if isinstance(exc, psycopg.OperationalError):  # unreachable, cut off, shut down
        return StoreUnavailable(f"{_shown(url)}: {doing} failed: {_first_line(exc)}")
    return StoreError(f"{_shown(url)}: {doing} failed: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# A writer's transaction never waits for its client: it is sent whole, in one pipeline. One
# left open longer than this belongs to a process that froze or lost its network mid-commit;
# the server ends it, so that its lock on the lease row cannot hold a takeover up (a take
# waits for the lease's TTL anyway, longer than this).
WRITER_IDLE_IN_TRANSACTION_MS = 2000
# the lease's statements wait at most this long for the row (a take behind a fenced commit)
LEASE_LOCK_TIMEOUT_MS = 1000


async def connect(
    url: str, *, autocommit: bool = True, role: str = "reader"
) -> psycopg.AsyncConnection[Any]:
    """A connection to the store's database, set for its ``role``:

    - ``writer``: the commits', written with ``synchronous_commit`` off (made durable by the
      flusher's transactions, decisions.md 82), each transaction ended by the server once
      idle for ``WRITER_IDLE_IN_TRANSACTION_MS``;
    - ``flusher``: the same timeout, with the server's ``synchronous_commit``;
    - ``lease``: the same timeout, its statements waiting for the row at most
      ``LEASE_LOCK_TIMEOUT_MS``;
    - ``reader``: as the URL says."""
    settings = []
    if role in ("writer", "flusher", "lease"):
        settings.append(f"-c idle_in_transaction_session_timeout={WRITER_IDLE_IN_TRANSACTION_MS}")
    if role == "writer":
        settings.append("-c synchronous_commit=off")
    if role == "lease":
        settings.append(f"-c lock_timeout={LEASE_LOCK_TIMEOUT_MS}")
    try:
        info = conninfo(url)
        if settings:  # after whatever options the URL gives
            given = psycopg.conninfo.conninfo_to_dict(info).get("options") or ""
            options = " ".join([str(given), *settings]).strip()
            info = psycopg.conninfo.make_conninfo(info, options=options)
        return await psycopg.AsyncConnection.connect(info, autocommit=autocommit)
    except psycopg.Error as exc:
        raise _failure(url, "connecting to the store", exc) from None


def instance_name() -> str:
    """This process, as a lease's holder and in the dispatcher's status: host, pid, and a
    random part (a pid is reused after a restart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


async def ensure_schema(conn: psycopg.AsyncConnection[Any], url: str, *, create: bool) -> int:
    """Check the store's schema, migrate it forward, or (``create``) make it in an empty
    database. Returns the version found (0: made now)."""
    try:
        async with conn.transaction():
            # one process at a time checks or makes the schema (a transaction's lock: it
            # goes with the transaction, never outlives it)
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('antifraud store schema'))")
            cur = await conn.execute("SELECT to_regclass('store_schema') IS NOT NULL")
            row = await cur.fetchone()
            if not (row and row[0]):
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()"
                )
                tables = (await cur.fetchone() or (0,))[0]
                if tables:
                    raise StoreError(
                        f"{_shown(url)}: the database holds {tables} tables but no dispatcher "
                        "store; name an empty database (nothing was changed)"
                    )
                if not create:
                    raise StoreError(f"{_shown(url)}: no dispatcher store in this database")
                cur = await conn.execute("SELECT current_schema()")
                if (await cur.fetchone() or (None,))[0] is None:
                    raise StoreError(
                        f"{_shown(url)}: the URL's search path names no schema that exists; "
                        "create it first (CREATE SCHEMA …) or name another"
                    )
                await conn.execute(SCHEMA)
                return 0
            cur = await conn.execute("SELECT version FROM store_schema")
            found = await cur.fetchall()
            if len(found) != 1:
                raise StoreError(f"{_shown(url)}: store_schema holds {len(found)} rows, not one")
            version = int(found[0][0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{_shown(url)}: store schema version {version} is newer than this "
                    f"dispatcher's {SCHEMA_VERSION}; upgrade the dispatcher"
                )
            if version < FIRST_PG_VERSION:
                raise StoreError(f"{_shown(url)}: store schema version {version} is unexpected")
            for step in range(version, SCHEMA_VERSION):
                await conn.execute(PG_MIGRATIONS[step])
                await conn.execute("UPDATE store_schema SET version = %s", (step + 1,))
            return version
    except psycopg.Error as exc:
        raise _failure(url, "checking the store's schema", exc) from None


# ---- the lease ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    """A taken lease: what every write transaction of its holder checks."""

    name: str
    holder: str
    epoch: int
    since: datetime


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as the database says now."""

    holder: str
    epoch: int
    since: datetime
    expires_in_s: float  # negative: expired


class Lease:
    """The store's lease, on a connection of its own (a long commit never delays a renewal).

    ``take`` succeeds only once the lease has expired on the database's clock (or was never
    taken, or was released), and raises the epoch; ``renew`` extends it only for the holder of
    that epoch; ``release`` lets it expire now, so a standby takes over at once."""

    def __init__(
        self,
        url: str,
        name: str = LEASE_NAME,
        holder: str | None = None,
        ttl_s: float = LEASE_TTL_S,
    ) -> None:
        self.url, self.name, self.ttl_s = url, name, ttl_s
        self.holder = holder or instance_name()
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def _db(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                await self._conn.close()
            self._conn = None
            conn = await connect(self.url, role="lease")
            await ensure_schema(conn, self.url, create=True)
            self._conn = conn
        return self._conn

    async def _execute(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        conn = await self._db()
        try:
            cur = await conn.execute(sql, params)
            return await cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise _failure(self.url, "the store's lease", exc) from None

    async def take(self) -> Fence | None:
        """The lease, if it is free (expired, released or never taken); else None."""
        await self._execute(
            "INSERT INTO lease VALUES (%s, '', 0, clock_timestamp(), '-infinity') "
            "ON CONFLICT (name) DO NOTHING",
            (self.name,),
        )
        rows = await self._execute(
            "UPDATE lease SET holder = %s, epoch = epoch + 1, since = clock_timestamp(), "
            "expires_at = clock_timestamp() + make_interval(secs => %s) "
            "WHERE name = %s AND expires_at < clock_timestamp() RETURNING epoch, since",
            (self.holder, self.ttl_s, self.name),
        )
        if not rows:
            return None
        epoch, since = rows[0]
        return Fence(self.name, self.holder, int(epoch), since)

    async def renew(self, fence: Fence) -> bool:
        """Extend ``fence``'s lease by the TTL; False when it is no longer held."""
        rows = await self._execute(
            "UPDATE lease SET expires_at = clock_timestamp() + make_interval(secs => %s) "
            "WHERE name = %s AND holder = %s AND epoch = %s RETURNING epoch",
            (self.ttl_s, fence.name, fence.holder, fence.epoch),
        )
        return bool(rows)

    async def release(self, fence: Fence) -> None:
        """Let the lease expire now (a clean stop: a standby need not wait out the TTL)."""
        await self._execute(
            "UPDATE lease SET expires_at = clock_timestamp() "
            "WHERE name = %s AND holder = %s AND epoch = %s",
            (fence.name, fence.holder, fence.epoch),
        )

    async def current(self) -> Holder | None:
        """Who holds the lease now, or None if nobody ever took it."""
        rows = await self._execute(
            "SELECT holder, epoch, since, "
            "extract(epoch FROM expires_at - clock_timestamp()) FROM lease WHERE name = %s",
            (self.name,),
        )
        if not rows or not rows[0][0]:
            return None
        holder, epoch, since, left = rows[0]
        return Holder(holder, int(epoch), since, float(left) if left is not None else -1.0)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class Term:
    """A holder's time with the lease, as this process can know it without the database:
    valid until ``lost`` is set (a renewal found the lease gone, or a write was fenced) or the
    local deadline passes. The deadline counts from the moment each take or renewal was
    *sent*, on this process's monotonic clock, which runs on while the process is frozen, and
    ends a margin before the TTL (``held_for``): the database's expiry is later, so a holder
    stops before any standby may take over."""

    def __init__(self, fence: Fence, ttl_s: float, sent_at: float) -> None:
        self.fence, self.ttl_s = fence, ttl_s
        self.deadline = sent_at + self.held_for(ttl_s)
        self.lost = asyncio.Event()
        self.why = ""

    @staticmethod
    def held_for(ttl_s: float) -> float:
        """How long after a take or renewal was sent the holder counts on the lease: the TTL
        less a margin (0.5 s, an eighth of a short TTL), so that it has left the broker
        sessions before the lease can expire on the database, whatever its clock's rate."""
        return ttl_s - min(0.5, ttl_s / 8)

    def valid(self) -> bool:
        return not self.lost.is_set() and time.monotonic() < self.deadline

    def end(self, why: str) -> None:
        if not self.lost.is_set():
            self.why = why
            self.lost.set()


async def keep(lease: Lease, term: Term, every_s: float) -> None:
    """Renew ``term``'s lease every ``every_s`` until it is lost; end the term when a renewal
    finds it gone, or when no renewal got through before the local deadline."""
    while term.valid():
        left = term.deadline - time.monotonic()
        await asyncio.sleep(max(0.0, min(every_s, left)))
        if not term.valid():
            break
        sent = time.monotonic()
        try:
            async with asyncio.timeout(max(0.05, term.deadline - sent)):
                held = await lease.renew(term.fence)
        except (StoreError, TimeoutError) as exc:
            log.warning("lease_renewal_failed", error=str(exc) or "timed out")
            await lease.close()  # a new connection next time
            continue
        if not held:
            term.end("another instance holds the lease")
            break
        term.deadline = sent + term.held_for(term.ttl_s)
    term.end(term.why or "the lease was not renewed in time")


# ---- the store ---------------------------------------------------------------------------


class PgStore(QueuedWrites):
    """The store on PostgreSQL, an async context manager like ``adapters.store.Store``.

    ``writer``: this process writes the store; it must hold the lease, given as ``term``
    (the live service's standby runner keeps it) or taken here and renewed while the store
    is open (replay). Without ``writer`` the store is only read (the report, the console)."""

    # a flush is a transaction on the server, which makes its disk write the log out: started
    # 50 ms after a commit, it covers the commits of those 50 ms at once and stays clear of
    # the ones that follow an operator's action (decisions.md 86)
    flush_after_s = 0.05

    def __init__(
        self,
        url: str,
        sync: str = "full",
        *,
        writer: bool = False,
        term: Term | None = None,
    ) -> None:
        if sync not in ("full", "normal"):
            raise ValueError(f"sync must be 'full' or 'normal', not {sync!r}")
        conninfo(url)  # a bad URL is refused before anything connects
        self.url = url
        self.path = _shown(url)  # as shown in messages, like the SQLite store's path
        self._sync = sync
        self._writer = writer
        self._term = term
        self._fence = term.fence if term is not None else None
        self._own_lease: Lease | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None  # writes
        self._reader: psycopg.AsyncConnection[Any] | None = None
        self._flusher: psycopg.AsyncConnection[Any] | None = None
        self._batch = _Batch()
        # each open incident's dispatch rows as last written: an unchanged one is not
        # written again (``_Rows.snapshot``)
        self._dispatch_rows: dict[str, tuple[Any, ...]] = {}
        self._writing = asyncio.Lock()
        self._reading = asyncio.Lock()
        self._next_seq = 1
        self._mode = ""
        self._written = 0
        self._flushed = 0
        self._flushing: asyncio.Future[None] | None = None
        self._flush_failed: FlushError | None = None
        self.migrated_from = SCHEMA_VERSION

    async def __aenter__(self) -> PgStore:
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
    def fence(self) -> Fence | None:
        return self._fence

    async def open(self) -> None:
        try:
            self._reader = await connect(self.url)
            self.migrated_from = await ensure_schema(self._reader, self.url, create=self._writer)
            if self._writer:
                if self._fence is None:
                    await self._take_lease()
                self._conn = await connect(self.url, role="writer")
                self._flusher = await connect(self.url, role="flusher")
                cur = await self._flusher.execute("SHOW synchronous_commit")
                setting = (await cur.fetchone() or ("on",))[0]
                if setting == "off":  # the server's default would make a flush wait for nothing
                    await self._flusher.execute("SET synchronous_commit TO on")
            rows = await self._read("SELECT COALESCE(MAX(seq), 0) FROM outbox")
            self._next_seq = int(rows[0][0]) + 1
            rows = await self._read("SELECT value FROM meta WHERE key = 'mode'")
            self._mode = str(rows[0][0]) if rows else ""
        except BaseException:
            await self.close()
            raise

    async def _take_lease(self) -> None:
        lease = self._own_lease = Lease(self.url)
        sent = time.monotonic()
        fence = await lease.take()
        if fence is None:
            current = await lease.current()
            who = f"{current.holder} since {current.since:%Y-%m-%d %H:%M:%S%z}" if current else "?"
            raise StoreError(
                f"{self.path}: the store is in use: its lease is held by {who}; "
                "stop that dispatcher or name another database"
            )
        self._fence = fence
        self._term = Term(fence, lease.ttl_s, sent)
        self._keeper = asyncio.create_task(keep(lease, self._term, lease.ttl_s / 4), name="lease")

    async def close(self) -> None:
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        if self._own_lease is not None:
            if self._fence is not None and self._term is not None and self._term.valid():
                try:
                    await self._own_lease.release(self._fence)
                except StoreError as exc:
                    log.warning("lease_release_failed", error=str(exc))
            await self._own_lease.close()
            self._own_lease = None
        for name in ("_conn", "_reader", "_flusher"):
            conn = getattr(self, name)
            if conn is not None:
                await conn.close()
                setattr(self, name, None)

    # ---- reading ---------------------------------------------------------------------------

    async def _read(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        if self._reader is None:
            raise StoreError("store is not open")
        async with self._reading:
            try:
                cur = await self._reader.execute(sql, tuple(params))
                return await cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                raise _failure(self.url, "reading the store", exc) from None

    async def load(
        self,
        now_hint: float | None,
        retention_s: float,
        dedupe_window_s: float,
        contact_horizon_s: float,
    ) -> Snapshot:
        meta = {k: v for k, v in await self._read("SELECT key, value FROM meta")}
        rows = await self._read("SELECT id, status, closed_at, doc FROM incidents")
        incidents: list[Incident] = []
        ids: set[str] = set()
        latest = float(meta.get("clock", "0") or 0) if now_hint is None else now_hint
        for incident_id, status, closed_at, doc in rows:
            ids.add(incident_id)
            if status != "closed":
                incidents.append(
                    Incident.from_doc(json.loads(doc), await self.timeline(incident_id))
                )
            elif closed_at + retention_s > latest:
                incidents.append(Incident.from_doc(json.loads(doc)))
        contacts = [
            (s, at, c)
            for s, at, c in await self._read(
                "SELECT subscriber, at, counterpart FROM contacts WHERE at >= %s ORDER BY seq",
                (latest - contact_horizon_s,),
            )
        ]
        presence = {u: s for u, s in await self._read("SELECT unit, state FROM presence")}
        since = latest - dedupe_window_s
        inbound = [
            (source, event_id, at)
            for (pairs,) in await self._read(
                "SELECT pairs FROM inbound WHERE last_at >= %s ORDER BY seq", (since,)
            )
            for source, event_id, at in json.loads(pairs)
            if at >= since
        ]
        receipts = [
            (at, topic, payload)
            for at, topic, payload in await self._read(
                f"SELECT at, topic, payload FROM outbox WHERE type = '{RECEIPT}' AND at >= %s "
                "ORDER BY seq",
                (since,),
            )
        ]
        return Snapshot(meta, incidents, ids, contacts, presence, inbound, receipts)

    async def timeline(self, incident_id: str) -> list[TimelineEntry]:
        return timeline_rows(await self._read(_TIMELINE_SELECT, (incident_id,)))

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        return await self._read(placeholders(sql), params)

    async def rows(self, sql: str, params: Iterable[Any] = ()) -> AsyncIterator[Any]:
        """The rows of a query, a thousand at a time (a server-side cursor), on a connection
        of their own so that the store's other reads go on meanwhile."""
        conn = await connect(self.url, autocommit=False)
        try:
            async with conn.cursor(name="antifraud_rows") as cur:
                cur.itersize = 1000
                await cur.execute(placeholders(sql), tuple(params))
                async for row in cur:
                    yield row
        except psycopg.Error as exc:
            raise _failure(self.url, "reading the store", exc) from None
        finally:
            await conn.close()

    def published(self) -> AsyncIterator[Any]:
        return self.rows(
            f"SELECT at, topic, type, CASE WHEN type = ? THEN ({OUTBOX_PAYLOAD})::json->>'id' "
            "END FROM outbox ORDER BY seq",
            (RECEIPT,),
        )

    # ---- committing (queueing: QueuedWrites, adapters/store.py) -------------------------

    def writes_inline(self, inline: bool = True) -> bool:
        """A commit is sent to the server from the event loop, which is free meanwhile."""
        return True

    async def commit(
        self,
        written: Callable[[list[OutboxRow]], None] | None = None,
        flush: bool = True,
        inline: bool = True,
    ) -> list[OutboxRow]:
        """Write everything queued in one transaction (all or nothing; a failed commit keeps
        it queued), hand its messages waiting for a publisher to ``written``, then flush it
        unless ``flush`` is false. Raises ``LeaseLost`` when this writer was fenced."""
        batch, self._batch = self._batch, _Batch()
        try:
            if not len(batch):
                return []
            rows = _Rows.snapshot(batch, self._dispatch_rows)
            outbox, pending = serialise_outbox(rows.outbox)
            async with self._writing:
                await self._write(rows, outbox)
        except BaseException:
            batch.absorb(self._batch)
            self._batch = batch
            self._dispatch_rows.clear()  # which rows were written is no longer known
            raise
        self._written += 1
        if written is not None and pending:
            written(pending)
        if flush:
            await self.flush()
        return pending

    def _writes(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None:
            raise StoreError(f"{self.path}: the store is not open for writing")
        if self._term is not None and not self._term.valid():
            raise LeaseLost(f"{self.path}: this instance's lease ended: {self._term.why}")
        return self._conn

    async def _fenced(self, cur: psycopg.AsyncCursor[Any]) -> None:
        if self._fence is not None:
            f = self._fence
            await cur.execute("SELECT antifraud_fence(%s, %s, %s)", (f.name, f.holder, f.epoch))

    async def _write(self, rows: _Rows, outbox: list[tuple[Any, ...]]) -> None:
        conn = self._writes()
        incidents = rows.incidents
        kept = [(*k[:3], int(k[3]), *k[4:]) for k in rows.kept]
        inbound = []
        if rows.inbound:
            inbound = [(rows.inbound[0][2], rows.inbound[-1][2], _dumps(rows.inbound))]
        try:
            async with conn.pipeline(), conn.transaction(), conn.cursor(binary=True) as cur:
                # written now (synchronous_commit off), durable at the next flush; parameters
                # in binary (no text to format and parse); a few rows a table one statement
                # each, many as one statement of arrays (``_TABLES``)
                await self._fenced(cur)
                for table, batch in (
                    ("incidents", incidents),
                    ("dispatches", rows.dispatches),
                    ("timeline", rows.timeline),
                    ("outbox", outbox),
                    ("inbound", inbound),
                    ("rejected", rows.rejected),
                    ("contacts", rows.contacts),
                    ("presence", rows.presence),
                    ("incident_inbound", kept),
                    ("meta", rows.meta),
                ):
                    if len(batch) > ROWS_ONE_BY_ONE:
                        await cur.execute(_TABLES[table][0], _columns(batch))
                    elif batch:
                        await cur.executemany(_TABLES[table][1], _cleaned(batch))
        except psycopg.Error as exc:
            raise self._lost(_failure(self.url, "commit", exc)) from None

    def _lost(self, exc: StoreError) -> StoreError:
        if isinstance(exc, LeaseLost) and self._term is not None:
            self._term.end("a write was fenced: another instance holds the lease")
        return exc

    async def flush(self) -> None:
        """Return once every commit written so far is durable (module docstring)."""
        if self._sync != "full" or self._flusher is None:
            return
        target = self._written
        while self._flushed < target:
            if self._flush_failed is not None:
                raise self._flush_failed
            if self._flushing is None:
                self._flushing = asyncio.ensure_future(self._flush_once())
            await asyncio.shield(self._flushing)

    async def _flush_once(self) -> None:
        assert self._flusher is not None
        covers = self._written
        try:
            # a transaction with an id of its own commits a record behind every commit
            # before it, and with synchronous_commit on returns once that is on the disk
            async with self._flusher.pipeline(), self._flusher.transaction():
                await self._flusher.execute("SELECT pg_current_xact_id()")
        except psycopg.Error as exc:
            self._flush_failed = FlushError(
                f"{self.path}: making the store's commits durable failed: {_first_line(exc)}"
            )
            raise self._flush_failed from None
        finally:
            self._flushing = None
        self._flushed = max(self._flushed, covers)

    async def prune(
        self,
        before_inbound: float,
        before_contacts: float,
        kept_before: tuple[float, float] | None = None,
    ) -> None:
        """As ``Store.prune``, in one fenced transaction."""
        forget_refused = self._mode != "replay"
        async with self._writing:
            conn = self._writes()
            try:
                async with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                    await self._fenced(cur)
                    await cur.execute("DELETE FROM inbound WHERE last_at < %s", (before_inbound,))
                    await cur.execute("DELETE FROM contacts WHERE at < %s", (before_contacts,))
                    if forget_refused:
                        await cur.execute("DELETE FROM rejected WHERE at < %s", (before_inbound,))
                        await cur.execute(
                            f"DELETE FROM outbox WHERE type = '{DEAD_LETTER}' AND at < %s "
                            "AND sent = 1",
                            (before_inbound,),
                        )
                        if kept_before is not None:
                            closed_before, contacts_before = kept_before
                            await cur.execute(
                                "DELETE FROM incident_inbound WHERE incident_id IN (SELECT id "
                                "FROM incidents WHERE status = 'closed' AND closed_at < %s)",
                                (closed_before,),
                            )
                            await cur.execute(
                                "DELETE FROM incident_inbound WHERE incident_id IS NULL "
                                "AND at < %s",
                                (contacts_before,),
                            )
            except psycopg.Error as exc:
                raise self._lost(_failure(self.url, "pruning the store", exc)) from None

    # ---- the outbox ------------------------------------------------------------------------

    async def unsent(self, limit: int, after: int = 0) -> list[OutboxRow]:
        rows = await self._read(
            f"SELECT seq, topic, qos, retain, {OUTBOX_PAYLOAD} FROM outbox "
            "WHERE sent = 0 AND seq > %s ORDER BY seq LIMIT %s",
            (after, limit),
        )
        return [
            (seq, topic, qos, bool(retain), None if p is None else p.encode("utf-8"))
            for seq, topic, qos, retain, p in rows
        ]

    async def mark_sent(self, seqs: list[int]) -> None:
        if not seqs:
            return
        async with self._writing:
            conn = self._writes()
            try:
                async with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                    await self._fenced(cur)
                    await cur.execute("UPDATE outbox SET sent = 1 WHERE seq = ANY(%s)", (seqs,))
            except psycopg.Error as exc:
                raise self._lost(_failure(self.url, "marking messages sent", exc)) from None

    async def backup(self, target: object) -> None:
        raise StoreError(
            f"{self.path}: a PostgreSQL store is backed up with pg_dump "
            "(docs/operations.md, 'A PostgreSQL store: active/standby')"
        )


def placeholders(sql: str) -> str:
    """SQL written with SQLite's ``?`` placeholders, for psycopg."""
    return sql.replace("%", "%%").replace("?", "%s")
