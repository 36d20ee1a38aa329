"""``antifraud bench pgdriver``: psycopg 3 against asyncpg on the store's own transactions.

The PostgreSQL store's cost is its commits: one transaction per processed batch, holding the
lease check, an incident upsert, its dispatch rows, timeline rows, outbox rows, the processed
pairs and the clock. Both drivers run the same transactions against a database of their own
on the same server, in one run, alternating, so the figures are ratios measured together:

- a small commit (one escalation: 1 incident, 3 dispatches, 2 timeline rows, 5 outbox rows),
  one after another, latency p50 / p99;
- a large commit (a backlog batch: 200 of each), throughput in rows a second.

psycopg sends a transaction's statements in one pipeline (one round trip for the whole
transaction); asyncpg sends each ``executemany`` and waits for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

SCHEMA = """
CREATE TABLE lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch BIGINT NOT NULL);
CREATE TABLE incidents (id TEXT PRIMARY KEY, status TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE dispatches (id TEXT PRIMARY KEY, incident_id TEXT NOT NULL, status TEXT NOT NULL);
CREATE TABLE timeline (seq BIGSERIAL PRIMARY KEY, incident_id TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE outbox (seq BIGINT PRIMARY KEY, topic TEXT NOT NULL, payload TEXT);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO lease VALUES ('default', 'bench', 1);
"""

Rows = dict[str, list[tuple[Any, ...]]]


def batch(n: int, seq: int) -> Rows:
    doc = '{"id": "x", "timeline": []}' + " " * 1500
    return {
        "incidents": [(f"INC-{seq}-{i}", "dispatched", doc) for i in range(max(1, n // 3))],
        "dispatches": [(f"D-{seq}-{i}", f"INC-{seq}-0", "offered") for i in range(n)],
        "timeline": [(f"INC-{seq}-0", "派出 门卫 王师傅") for _ in range(max(2, n // 2))],
        "outbox": [(seq * 10_000 + i, "antifraud/units/G/offers", "x" * 900) for i in range(n)],
    }


UPSERT_INCIDENT = (
    "INSERT INTO incidents VALUES ({}) ON CONFLICT (id) DO UPDATE "
    "SET status = EXCLUDED.status, doc = EXCLUDED.doc"
)
UPSERT_DISPATCH = (
    "INSERT INTO dispatches VALUES ({}) ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status"
)
INSERT_TIMELINE = "INSERT INTO timeline (incident_id, text) VALUES ({})"
INSERT_OUTBOX = "INSERT INTO outbox VALUES ({})"
UPSERT_META = "INSERT INTO meta VALUES ({}) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
FENCE = "SELECT epoch FROM lease WHERE name = {} AND holder = {} AND epoch = {} FOR SHARE"


def marks(style: str, n: int) -> str:
    return ", ".join("%s" if style == "psycopg" else f"${i + 1}" for i in range(n))


async def with_psycopg(dsn: str) -> Callable[[Rows], Awaitable[None]]:
    import psycopg  # type: ignore[import-not-found]  # installed only to run this bench

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

    def m(n: int) -> str:
        return marks("psycopg", n)

    async def commit(rows: Rows) -> None:
        async with conn.transaction(), conn.pipeline(), conn.cursor() as cur:
            await cur.execute(FENCE.format("%s", "%s", "%s"), ("default", "bench", 1))
            await cur.executemany(UPSERT_INCIDENT.format(m(3)), rows["incidents"])
            await cur.executemany(UPSERT_DISPATCH.format(m(3)), rows["dispatches"])
            await cur.executemany(INSERT_TIMELINE.format(m(2)), rows["timeline"])
            await cur.executemany(INSERT_OUTBOX.format(m(3)), rows["outbox"])
            await cur.execute(UPSERT_META.format(m(2)), ("clock", str(time.time())))

    return commit


async def with_asyncpg(dsn: str) -> Callable[[Rows], Awaitable[None]]:
    import asyncpg  # type: ignore[import-not-found]  # installed only to run this bench

    conn = await asyncpg.connect(dsn)

    def m(n: int) -> str:
        return marks("asyncpg", n)

    async def commit(rows: Rows) -> None:
        async with conn.transaction():
            await conn.fetchval(FENCE.format("$1", "$2", "$3"), "default", "bench", 1)
            await conn.executemany(UPSERT_INCIDENT.format(m(3)), rows["incidents"])
            await conn.executemany(UPSERT_DISPATCH.format(m(3)), rows["dispatches"])
            await conn.executemany(INSERT_TIMELINE.format(m(2)), rows["timeline"])
            await conn.executemany(INSERT_OUTBOX.format(m(3)), rows["outbox"])
            await conn.execute(UPSERT_META.format(m(2)), "clock", str(time.time()))

    return commit


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(server: str, small: int, large: int) -> None:
    import psycopg

    names = {d: f"bench_{d}_{uuid.uuid4().hex[:8]}" for d in ("psycopg", "asyncpg")}
    admin = await psycopg.AsyncConnection.connect(f"{server}/postgres", autocommit=True)
    try:
        for name in names.values():
            await admin.execute(f'CREATE DATABASE "{name}"')
            async with await psycopg.AsyncConnection.connect(
                f"{server}/{name}", autocommit=True
            ) as c:
                await c.execute(SCHEMA)
        commits = {
            "psycopg": await with_psycopg(f"{server}/{names['psycopg']}"),
            "asyncpg": await with_asyncpg(f"{server}/{names['asyncpg']}"),
        }
        latency: dict[str, list[float]] = {d: [] for d in commits}
        rate: dict[str, list[float]] = {d: [] for d in commits}
        seq = 0
        for _ in range(small):  # alternating, so both see the same machine
            for driver, commit in commits.items():
                seq += 1
                rows = batch(5, seq)
                start = time.perf_counter()
                await commit(rows)
                latency[driver].append((time.perf_counter() - start) * 1000)
        for _ in range(large):
            for driver, commit in commits.items():
                seq += 1
                rows = batch(200, seq)
                n = sum(len(r) for r in rows.values())
                start = time.perf_counter()
                await commit(rows)
                rate[driver].append(n / (time.perf_counter() - start))
        print(f"small commit (12 rows), {small} each, ms:  p50     p99")
        for d in commits:
            print(
                f"  {d:8}                          {statistics.median(latency[d]):6.2f}"
                f"  {pct(latency[d], 0.99):6.2f}"
            )
        print(f"large commit (467 rows), {large} each, rows/s (median)")
        for d in commits:
            print(f"  {d:8}  {statistics.median(rate[d]):10,.0f}")
        p = statistics.median(latency["psycopg"]) / statistics.median(latency["asyncpg"])
        r = statistics.median(rate["psycopg"]) / statistics.median(rate["asyncpg"])
        print(f"psycopg / asyncpg: small p50 {p:.2f} x, large throughput {r:.2f} x")
    finally:
        for name in names.values():
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="antifraud bench pgdriver", description=__doc__)
    parser.add_argument(
        "--server",
        default=os.environ.get("ANTIFRAUD_PG_SERVER", "postgresql://postgres@127.0.0.1:5432"),
        help="the PostgreSQL server, without a database (default $ANTIFRAUD_PG_SERVER or "
        "postgresql://postgres@127.0.0.1:5432); two databases are made and dropped",
    )
    parser.add_argument("--small", type=int, default=2000, help="small commits per driver")
    parser.add_argument("--large", type=int, default=100, help="large commits per driver")
    args = parser.parse_args(argv)
    asyncio.run(run(args.server, args.small, args.large))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
