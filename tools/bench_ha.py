"""``antifraud bench takeover``: how long a door-knock waits when the serving dispatcher dies.

Two ``antifraud run`` processes share one PostgreSQL store (a database made for the run and
dropped after) on a private Mosquitto. Each connects to PostgreSQL through a TCP relay of its
own in this process, so that its connection can be cut. For each round:

1. a flagged call opens an incident (the console-side client waits until it is open);
2. the serving instance is **killed** (SIGKILL), **frozen** (SIGSTOP, woken once the other
   has taken over) or **cut** from the database (its relay stops forwarding, both ways,
   while its connections stay open: a network partition, not a refused connection);
3. at once, an operator escalates the incident;
4. the takeover time is from the disruption to the escalation's offer arriving at the
   guard's handset (a client subscribed to its dispatches): the first outbound message of
   the instance that took over which a unit waits for. An offer that never comes within
   30 s is counted lost.

The disrupted instance is then restored (started again, woken, or its relay reopened) and
stands by for the next round. Figures: p50 / p90 / p99 / max per kind, against the target
p99 <= the lease's TTL + 2 s, and offers lost (target 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg

from adapters.broker import local_broker
from adapters.mqtt import BrokerURL, open_client
from dispatcher.model import incident_of_call
from dispatcher.outbound import Topics
from dispatcher.settings import Settings
from tools.bench_live import CHEN, FLAGGED, call_bytes, event_bytes, percentile
from tools.dispatcher_process import DispatcherProcess
from tools.relay import Relay

OFFER_WAIT_S = 30.0
KINDS = ("kill", "freeze", "cut")


def holder_pid(store: str) -> int | None:
    with psycopg.connect(store) as db:
        try:
            row = db.execute(
                "SELECT holder, expires_at > clock_timestamp() FROM lease WHERE name = 'dispatcher'"
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    if not row or not row[0] or not row[1]:
        return None
    return int(str(row[0]).split(":")[1])


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _deployment(settings: Settings, folder: Path, ttl: float) -> Path:
    """The deployment with the lease's TTL set, its registries beside it as the original's."""
    config = folder / "deployment.toml"
    original = Path(settings.path).resolve()
    text = original.read_text(encoding="utf-8")
    text = text.replace("[service]\n", f"[service]\nlease_ttl_s = {ttl}\n", 1)
    config.write_text(text, encoding="utf-8")
    for entry in original.parent.iterdir():
        if entry.is_dir():
            (folder / entry.name).symlink_to(entry)
    return config


async def run_takeover_bench(
    settings: Settings, server: str, rounds: int, kinds: list[str], ttl: float
) -> int:
    name = f"bench_takeover_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    direct = f"{server}/{name}"
    host = psycopg.conninfo.conninfo_to_dict(direct)
    target = (str(host.get("host") or "127.0.0.1"), int(str(host.get("port") or 5432)))
    try:
        async with local_broker("mosquitto") as (url, _kind):
            with tempfile.TemporaryDirectory(prefix="antifraud-bench-takeover-") as tmp:
                folder = Path(tmp)
                config = await asyncio.to_thread(_deployment, settings, folder, ttl)
                results = await _rounds(
                    settings, BrokerURL.parse(url), direct, target, folder, config, rounds, kinds
                )
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    ok = True
    print(
        f"takeover: disruption of the serving instance → the escalation's offer at the guard's "
        f"handset, lease TTL {ttl:g} s, target p99 <= {ttl + 2:g} s, 0 lost"
    )
    print("            rounds     p50      p90      p99      max   lost")
    for kind in kinds:
        times, lost = results[kind]
        if times:
            print(
                f"  {kind:8} {len(times) + lost:8} {percentile(times, 0.5):7.2f}  "
                f"{percentile(times, 0.9):7.2f}  {percentile(times, 0.99):7.2f}  "
                f"{max(times):7.2f}  {lost:5}"
            )
        else:
            print(f"  {kind:8} {lost:8}  no offer arrived  {lost:5}")
        ok = ok and lost == 0 and bool(times) and percentile(times, 0.99) <= ttl + 2
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


async def _rounds(
    settings: Settings,
    broker: BrokerURL,
    direct: str,
    target: tuple[str, int],
    folder: Path,
    config: Path,
    rounds: int,
    kinds: list[str],
) -> dict[str, tuple[list[float], int]]:
    topics = Topics(settings.service.prefix)
    calls, actions = topics.calls(settings.service.region), topics.actions("bench")
    relays = [Relay(target), Relay(target)]
    for relay in relays:
        await relay.start()
    store_of = [direct.replace(f":{target[1]}/", f":{r.port}/", 1) for r in relays]
    instances = [
        DispatcherProcess(config, str(broker), store_of[i], name=n, log=folder / f"{n}.log")
        for i, n in enumerate(("a", "b"))
    ]
    offers: dict[str, float] = {}
    offered = asyncio.Event()
    states: dict[str, str] = {}
    results: dict[str, tuple[list[float], int]] = {}
    async with (
        open_client(broker, f"bench-guard-{uuid.uuid4().hex[:6]}") as guard,
        open_client(broker, f"bench-ops-{uuid.uuid4().hex[:6]}") as ops,
    ):
        await guard.subscribe(topics.dispatches("G-YJ-CH-01"), qos=1)
        await ops.subscribe(topics.operators, qos=1)

        async def listen_guard() -> None:
            async for message in guard.messages:
                event = json.loads(bytes(message.payload))
                if event["type"] == "cn.antifraud.dispatch.offered":
                    offers.setdefault(event["data"]["incident_id"], time.perf_counter())
                    offered.set()

        async def listen_ops() -> None:
            async for message in ops.messages:
                event = json.loads(bytes(message.payload))
                states[event["data"]["incident_id"]] = event["data"]["status"]

        listeners = [asyncio.create_task(listen_guard()), asyncio.create_task(listen_ops())]
        try:
            for instance in instances:
                await instance.start()
                await asyncio.sleep(0.5)
            for kind in kinds:
                times: list[float] = []
                lost = 0
                for i in range(rounds):
                    taken = await _round(
                        kind,
                        i,
                        instances,
                        relays,
                        direct,
                        ops,
                        (calls, actions),
                        states,
                        (offers, offered),
                    )
                    if taken is None:
                        lost += 1
                    else:
                        times.append(taken)
                    print(
                        f"  {kind} {i + 1}/{rounds}: "
                        + ("lost" if taken is None else f"{taken:.2f} s"),
                        file=sys.stderr,
                        flush=True,
                    )
                results[kind] = (times, lost)
        except BaseException:
            for instance in instances:  # what each instance said last, to see why
                assert instance.log is not None
                lines = instance.log.read_text(encoding="utf-8").splitlines()[-5:]
                print(f"{instance.name}'s log ends:", *lines, sep="\n  ", file=sys.stderr)
            raise
        finally:
            for task in listeners:
                task.cancel()
            for instance in instances:
                await instance.stop(strict=False)
            for relay in relays:
                await relay.close()
    return results


async def _round(
    kind: str,
    i: int,
    instances: list[DispatcherProcess],
    relays: list[Relay],
    store: str,
    ops: Any,
    topics: tuple[str, str],
    states: dict[str, str],
    offer: tuple[dict[str, float], asyncio.Event],
) -> float | None:
    (calls, actions), (offers, offered) = topics, offer
    # both up: one serving, the other standing by
    await until(lambda: holder_pid(store) in {x.pid for x in instances}, 60, "a holder")
    active = next(x for x in instances if x.pid == holder_pid(store))
    standby = next(x for x in instances if x is not active)
    await until(standby.standing_by, 60, "the standby")
    call = f"TK-{kind}-{i}-{uuid.uuid4().hex[:6]}"
    incident = incident_of_call(call)
    await ops.publish(calls, call_bytes("progress", call, CHEN, FLAGGED, 30), qos=1)
    await until(lambda: states.get(incident) == "open", 30, "the incident")
    await asyncio.sleep(0.3)
    relay = relays[instances.index(active)]
    restore: Callable[[], Awaitable[None]]
    start = time.perf_counter()
    if kind == "kill":
        active.send(signal.SIGKILL)

        async def restore() -> None:
            assert active.process is not None
            await active.process.wait()
            await active.start()

    elif kind == "freeze":
        active.freeze()

        async def restore() -> None:
            active.wake()

    else:
        relay.cut()

        async def restore() -> None:
            relay.mend()

    await ops.publish(
        actions, event_bytes("operator.escalate", {"incident_id": incident}, "console/bench"), 1
    )
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(OFFER_WAIT_S):
            while incident not in offers:
                offered.clear()
                await offered.wait()
    taken = offers[incident] - start if incident in offers else None
    await restore()
    await ops.publish(
        actions,
        event_bytes(
            "operator.close", {"incident_id": incident, "outcome": "false_alarm"}, "console/bench"
        ),
        qos=1,
    )
    with contextlib.suppress(RuntimeError):
        await until(lambda: states.get(incident) == "closed", 30, "the close")
    return taken


def run(args: argparse.Namespace) -> int:
    from dispatcher.settings import load_settings

    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        print(f"antifraud: unknown kinds: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    return asyncio.run(
        run_takeover_bench(load_settings(args.config), args.server, args.rounds, kinds, args.ttl)
    )
