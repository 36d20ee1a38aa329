"""``antifraud bench regions``: N dispatcher workers serving M regions on fenced leases, simulated.

A deterministic discrete-event simulation (a seeded random generator, virtual time in
milliseconds, no IO) of the design in docs/scale.md: one lease row per region in the one
database, evaluated on the database's clock, with exactly its four statements —

- take:    holder, epoch + 1, since, expires_at = now + TTL, only where expires_at < now;
- renew:   expires_at = now + TTL where holder and epoch are still ours (0 rows: lost);
- fence:   the first statement of every write transaction: the row with our holder and epoch
           must exist, else the transaction is rolled back and the worker stands by;
- release: expires_at = now where holder and epoch are ours (a clean stop, a rebalance).

Each region has a stream of inbound events queued in its broker session until acknowledged.
The region's holder connects to that session (taking it over from whoever held it),
decides each event from its in-memory state and the moment, commits the decisions with their
outbox rows behind the fence, acknowledges the events only after the commit, and publishes
the outbox, marking rows sent in a fenced write. A new holder loads the store (processed
events, unsent outbox rows) and gets every unacknowledged event again.

Faults: a worker crash (restarts later under a new holder id), a freeze (SIGSTOP longer than
the TTL, struck between deciding a batch and committing it; it wakes and commits that batch),
a worker cut off from the database, a worker cut off from the broker, a database failover
(every statement fails for a while), a broker node lost (the streams it led stall while the
cluster elects new leaders).

Measured per region: the longest time nobody could process it, the longest wait of an event
from its arrival to its commit, events lost, events decided twice (the same or different
results), outbound messages published more than once, and messages of a commit made after its
worker was fenced that were published. ``main`` returns 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

FAULT_KINDS = ("crash", "freeze", "db-partition", "broker-partition", "failover", "node-loss")
BROKER_NODES = 3
PROBE_MS = 100  # the resolution of the unserved-gap measure
DRAIN_MS = 120_000  # after the last event: no faults start, every fault heals, queues drain
NEVER = -1


@dataclass(frozen=True)
class Params:
    """One run. Times in milliseconds unless the name says seconds."""

    workers: int = 3
    regions: int = 12
    seconds: float = 3600.0
    seed: int = 1
    ttl_ms: int = 4000
    renew_ms: int = 1000
    take_ms: int = 500
    # a holder that has not renewed stands by this long before its lease can expire on the
    # database, so it has let go of the broker session before anyone else can take the lease
    margin_ms: int = 500
    batch_ms: int = 50
    connect_ms: tuple[int, int] = (20, 200)
    rate: float = 1.0  # inbound events a second, per region
    faults: tuple[str, ...] = FAULT_KINDS
    fault_every_s: float = 120.0  # mean time between faults (exponential)
    fault_spacing_s: float = 0.0  # at least this between two faults (one fault at a time)
    slack: int | None = None  # None: the least that still covers every region with one worker down
    fence: bool = True  # False: the broken lease, to show that the checks can fail
    rebalance_s: float = 30.0
    broker_giveup_ms: int = 3000  # a holder cut off from the broker this long releases its leases
    crash_restart_s: tuple[float, float] = (2.0, 30.0)
    freeze_s: tuple[float, float] = (8.0, 20.0)  # longer than the TTL
    partition_s: tuple[float, float] = (1.0, 20.0)
    failover_s: tuple[float, float] = (10.0, 40.0)
    election_s: tuple[float, float] = (2.0, 12.0)

    def cap(self) -> int:
        """The most regions one worker takes: ceil(M/N) + slack."""
        return math.ceil(self.regions / self.workers) + self.slack_used()

    def slack_used(self) -> int:
        if self.slack is not None:
            return self.slack
        if self.workers == 1:
            return 0
        return max(
            1, math.ceil(self.regions / (self.workers - 1)) - math.ceil(self.regions / self.workers)
        )


# ---------------------------------------------------------------- the database


class DatabaseUnavailable(Exception):
    """A statement could not reach the database (failover, or this worker cut off)."""


@dataclass
class LeaseRow:
    name: str
    holder: str = ""
    epoch: int = 0
    since: int = NEVER
    expires_at: int = NEVER


class LeaseTable:
    """The ``lease`` table and its four statements, on the database's clock ``now``."""

    def __init__(self, names: Sequence[str]) -> None:
        self.rows = {name: LeaseRow(name) for name in names}

    def take(self, name: str, me: str, ttl: int, now: int) -> int | None:
        row = self.rows[name]
        if not row.expires_at < now:
            return None
        row.holder, row.epoch, row.since, row.expires_at = me, row.epoch + 1, now, now + ttl
        return row.epoch

    def renew(self, name: str, me: str, epoch: int, ttl: int, now: int) -> bool:
        row = self.rows[name]
        if row.holder != me or row.epoch != epoch:
            return False
        row.expires_at = now + ttl
        return True

    def fence(self, name: str, me: str, epoch: int) -> bool:
        row = self.rows[name]
        return row.holder == me and row.epoch == epoch

    def release(self, name: str, me: str, epoch: int, now: int) -> bool:
        row = self.rows[name]
        if row.holder != me or row.epoch != epoch:
            return False
        row.expires_at = now
        return True


@dataclass
class OutRow:
    msg_id: str  # the CloudEvent id: the same for every copy of one decision's message
    payload: int
    stale: bool  # written by a commit whose worker was no longer the holder
    sent: bool = False


@dataclass
class RegionStore:
    """One region's store: its processed events, decisions and outbox."""

    processed: set[str] = field(default_factory=set)
    decisions: dict[str, list[int]] = field(default_factory=dict)
    outbox: list[OutRow] = field(default_factory=list)
    commits: int = 0
    stale_commits: int = 0


# ---------------------------------------------------------------- the broker side


@dataclass
class Region:
    name: str
    index: int
    queue: dict[str, int] = field(default_factory=dict)  # unacknowledged event id -> arrival
    session: tuple[int, int] | None = None  # (worker, connection) holding the broker session
    stalled_until: int = 0
    published: dict[str, list[int]] = field(default_factory=dict)
    # figures
    events: int = 0
    takes: int = 0
    fenced: int = 0
    first_commit: dict[str, int] = field(default_factory=dict)
    max_delay: int = 0
    unserved_since: int | None = None
    max_gap: int = 0
    measuring: bool = False
    duplicates: int = 0  # extra copies of a message already published with the same payload
    contradictory_messages: int = 0  # a message id published with another payload
    stale_published: int = 0  # copies of messages written after their worker was fenced
    stale_published_by_zombie: int = 0  # of those, published by the fenced worker itself


# ---------------------------------------------------------------- the workers


@dataclass
class Held:
    """What a worker keeps for a region it holds."""

    epoch: int
    deadline: int  # on its own clock: stand by at this moment unless renewed
    taken_at: int
    processed: set[str]
    pending: list[OutRow]
    inbox: list[str] = field(default_factory=list)
    unmarked: list[OutRow] = field(default_factory=list)  # published, not yet marked sent
    delivered: set[str] = field(default_factory=set)
    connection: int | None = None
    connect_at: int = 0


@dataclass
class Frozen:
    region: str
    decisions: list[tuple[str, int]]
    acks: list[str]


@dataclass
class Worker:
    index: int
    host: str
    incarnation: int = 0
    alive: bool = True
    frozen_until: int = 0
    freeze_pending: int = 0  # a freeze of this length strikes at the next batch in hand
    freeze_asked_at: int = 0
    frozen_batch: Frozen | None = None
    db_cut_until: int = 0
    broker_cut_until: int = 0
    broker_lost_since: int | None = None
    held: dict[str, Held] = field(default_factory=dict)
    next_renew: int = 0
    next_take: int = 0
    next_rebalance: int = 0
    connections: int = 0
    max_held: int = 0

    holder: str = ""  # "<host>:<pid>:<random>", new at every start


@dataclass
class Figures:
    """What a run measured, per region and in total."""

    params: Params
    regions: list[Region]
    stores: dict[str, RegionStore]
    workers: list[Worker]
    faults: dict[str, int]

    def lost(self, region: Region) -> int:
        """Events no valid commit decided."""
        return region.events - len(region.first_commit)

    def decided_twice(self, region: Region) -> tuple[int, int]:
        """(the same result, different results) among events decided more than once."""
        same = different = 0
        for results in self.stores[region.name].decisions.values():
            if len(results) > 1:
                if len(set(results)) == 1:
                    same += 1
                else:
                    different += 1
        return same, different

    def unpublished(self, region: Region) -> int:
        """Messages of valid commits never published."""
        store = self.stores[region.name]
        return sum(
            1 for row in store.outbox if not row.stale and row.msg_id not in region.published
        )

    def violations(self) -> list[str]:
        found: list[str] = []
        for region in self.regions:
            lost, (_, different) = self.lost(region), self.decided_twice(region)
            if lost:
                found.append(f"{region.name}: {lost} events lost")
            if different:
                found.append(f"{region.name}: {different} events decided twice, differently")
            if region.contradictory_messages:
                found.append(
                    f"{region.name}: {region.contradictory_messages} messages published "
                    "with two payloads"
                )
            if region.stale_published:
                found.append(
                    f"{region.name}: {region.stale_published} messages published from commits "
                    f"made after fencing ({region.stale_published_by_zombie} by the fenced worker)"
                )
            if unpublished := self.unpublished(region):
                found.append(f"{region.name}: {unpublished} committed messages never published")
        return found

    def max_gap_ms(self) -> int:
        return max(region.max_gap for region in self.regions)

    def max_delay_ms(self) -> int:
        return max(region.max_delay for region in self.regions)


# ---------------------------------------------------------------- the simulation


def decide(region: str, event: str, state: int, now: int) -> int:
    """A decision: what the region's state and the moment make of an event.

    The moment counts (a unit that went offline meanwhile is not offered again,
    docs/RELIABILITY.md), so the same event decided later from the same state may differ.
    """
    return zlib.crc32(f"{region}|{event}|{state}|{now // 1000}".encode())


class Simulation:
    def __init__(self, params: Params) -> None:
        if params.workers < 1 or params.regions < 1:
            raise ValueError("at least one worker and one region")
        unknown = set(params.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds: {', '.join(sorted(unknown))}")
        self.p = params
        self.rng = random.Random(params.seed)
        self.now = 0
        self.end_events = int(params.seconds * 1000)
        self.end = self.end_events + DRAIN_MS
        self.heap: list[tuple[int, int, Callable[[], None]]] = []
        self.seq = 0
        names = [f"R{i + 1:02d}" for i in range(params.regions)]
        self.table = LeaseTable(names)
        # holder -> (heartbeat expiry, able to serve: reaches the broker), for the fair share
        self.members: dict[str, tuple[int, bool]] = {}
        self.stores = {name: RegionStore() for name in names}
        self.regions = {name: Region(name, i) for i, name in enumerate(names)}
        self.db_down_until = 0
        self.workers = [Worker(i, f"w{i + 1}") for i in range(params.workers)]
        self.faults: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self.event_seq = 0

    # -- the engine

    def at(self, when: int, action: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, action))

    def run(self) -> Figures:
        for worker in self.workers:
            self.start_worker(worker)
        for region in self.regions.values():
            self.at(self.next_arrival(0), self.arrival(region))
        self.at(PROBE_MS, self.probe)
        if self.p.faults and self.p.fault_every_s > 0:
            self.at(self.next_fault(10_000), self.fault)
        while self.heap:
            when, _, action = heapq.heappop(self.heap)
            if when > self.end:
                break
            self.now = when
            action()
        return Figures(self.p, list(self.regions.values()), self.stores, self.workers, self.faults)

    def next_arrival(self, after: int) -> int:
        return after + max(1, round(self.rng.expovariate(self.p.rate) * 1000))

    def next_fault(self, after: int) -> int:
        wait = self.rng.expovariate(1 / self.p.fault_every_s) + self.p.fault_spacing_s
        return after + max(1, round(wait * 1000))

    def uniform_ms(self, bounds: tuple[float, float]) -> int:
        return round(self.rng.uniform(*bounds) * 1000)

    # -- inbound events

    def arrival(self, region: Region) -> Callable[[], None]:
        def arrive() -> None:
            self.event_seq += 1
            event = f"{region.name}-{self.event_seq}"
            region.queue[event] = self.now
            region.events += 1
            following = self.next_arrival(self.now)
            if following <= self.end_events:
                self.at(following, arrive)

        return arrive

    # -- what the database and the broker let a worker do

    def db_ok(self, worker: Worker) -> bool:
        return self.now >= self.db_down_until and self.now >= worker.db_cut_until

    def broker_ok(self, worker: Worker) -> bool:
        return self.now >= worker.broker_cut_until

    def flowing(self, region: Region) -> bool:
        return self.now >= region.stalled_until

    def db(self, worker: Worker) -> LeaseTable:
        if not self.db_ok(worker):
            raise DatabaseUnavailable
        return self.table

    def current(self, worker: Worker, region: str, held: Held) -> bool:
        """The oracle: is this worker, with this epoch, the region's holder on the database?"""
        row = self.table.rows[region]
        return row.holder == worker.holder and row.epoch == held.epoch

    def connected(self, worker: Worker, region: Region, held: Held) -> bool:
        return held.connection is not None and region.session == (worker.index, held.connection)

    # -- a worker's life

    def start_worker(self, worker: Worker) -> None:
        worker.alive = True
        worker.holder = f"{worker.host}:{1000 + worker.incarnation}:{self.rng.getrandbits(32):08x}"
        worker.held = {}
        worker.broker_lost_since = None
        phase = self.rng.randrange(self.p.batch_ms)
        worker.next_renew = self.now + phase
        worker.next_take = self.now + self.rng.randrange(self.p.take_ms)
        worker.next_rebalance = self.now + round(self.p.rebalance_s * 1000) + phase
        incarnation = worker.incarnation

        def tick() -> None:
            if not worker.alive or worker.incarnation != incarnation:
                return
            if self.now >= worker.frozen_until and worker.frozen_batch is None:
                self.step(worker)
            self.at(self.now + self.p.batch_ms, tick)

        self.at(self.now + phase, tick)

    def stand_by(self, worker: Worker, name: str) -> None:
        """Let go of a region: stop processing and publishing it, leave its broker session."""
        held = worker.held.pop(name)
        region = self.regions[name]
        if self.connected(worker, region, held):
            region.session = None

    def step(self, worker: Worker) -> None:
        now = self.now
        for name in [n for n, h in worker.held.items() if now >= h.deadline]:
            self.stand_by(worker, name)
        if now >= worker.next_renew:
            worker.next_renew += self.p.renew_ms
            self.renew(worker)
        self.watch_broker(worker)
        for name in list(worker.held):
            held = worker.held.get(name)
            if held is None:
                continue
            region = self.regions[name]
            self.connect(worker, region, held)
            if name in worker.held and self.connected(worker, region, held):
                self.process(worker, region, held)
            if worker.frozen_until > now:
                return  # struck mid-batch
            if name in worker.held and self.connected(worker, region, held):
                self.publish(worker, region, held)
        if worker.freeze_pending and now - worker.freeze_asked_at >= 5000:
            self.freeze_now(worker, None)
            return
        if now >= worker.next_take:
            worker.next_take += self.p.take_ms
            self.take(worker)
        if now >= worker.next_rebalance:
            worker.next_rebalance += round(self.p.rebalance_s * 1000)
            self.rebalance(worker)
        worker.max_held = max(worker.max_held, len(worker.held))

    def renew(self, worker: Worker) -> None:
        try:
            table = self.db(worker)
        except DatabaseUnavailable:
            return
        self.members[worker.holder] = (self.now + self.p.ttl_ms, self.broker_ok(worker))
        for name, held in list(worker.held.items()):
            if table.renew(name, worker.holder, held.epoch, self.p.ttl_ms, self.now):
                held.deadline = self.now + self.p.ttl_ms - self.p.margin_ms
            else:
                self.stand_by(worker, name)

    def watch_broker(self, worker: Worker) -> None:
        if self.broker_ok(worker):
            worker.broker_lost_since = None
            return
        for name, held in worker.held.items():
            region = self.regions[name]
            if self.connected(worker, region, held):
                region.session = None
            if held.connection is not None:
                held.connection = None
                held.connect_at = self.now + self.rng.randint(*self.p.connect_ms)
        if worker.broker_lost_since is None:
            worker.broker_lost_since = self.now
        if self.now - worker.broker_lost_since >= self.p.broker_giveup_ms and worker.held:
            self.release_all(worker)

    def release_all(self, worker: Worker) -> None:
        try:
            table = self.db(worker)
        except DatabaseUnavailable:
            return
        for name, held in list(worker.held.items()):
            table.release(name, worker.holder, held.epoch, self.now)
            self.stand_by(worker, name)

    def connect(self, worker: Worker, region: Region, held: Held) -> None:
        if self.connected(worker, region, held):
            return
        if held.connection is not None:  # taken over by another connection
            held.connection = None
            held.connect_at = self.now + self.rng.randint(*self.p.connect_ms)
        if self.now < held.connect_at or not self.broker_ok(worker):
            return
        worker.connections += 1
        held.connection = worker.connections
        region.session = (worker.index, held.connection)  # takes the session over
        held.delivered = set()
        held.inbox = []

    def process(self, worker: Worker, region: Region, held: Held) -> None:
        if self.flowing(region):
            for event in region.queue:
                if event not in held.delivered:
                    held.delivered.add(event)
                    held.inbox.append(event)
        if not held.inbox:
            return
        state = len(held.processed)
        decisions: list[tuple[str, int]] = []
        acks: list[str] = []
        decided: set[str] = set()
        for event in held.inbox:
            acks.append(event)
            if event in held.processed or event in decided:
                continue  # a redelivery: acknowledged, not decided again
            decided.add(event)
            decisions.append((event, decide(region.name, event, state, self.now)))
            state += 1
        if worker.freeze_pending and decisions:
            self.freeze_now(worker, Frozen(region.name, decisions, acks))
            return
        self.commit(worker, region, held, decisions, acks)

    def commit(
        self,
        worker: Worker,
        region: Region,
        held: Held,
        decisions: list[tuple[str, int]],
        acks: list[str],
    ) -> None:
        if decisions:
            try:
                table = self.db(worker)
            except DatabaseUnavailable:
                return  # rolled back; the inbox is tried again at the next step
            if self.p.fence and not table.fence(region.name, worker.holder, held.epoch):
                region.fenced += 1
                self.stand_by(worker, region.name)
                return
            store = self.stores[region.name]
            stale = not self.current(worker, region.name, held)
            store.commits += 1
            store.stale_commits += stale
            for event, result in decisions:
                store.processed.add(event)
                store.decisions.setdefault(event, []).append(result)
                held.processed.add(event)
                if not stale and event not in region.first_commit:
                    region.first_commit[event] = self.now
                    arrived = region.queue.get(event)
                    if arrived is not None:
                        region.max_delay = max(region.max_delay, self.now - arrived)
                row = OutRow(f"{event}:out", result, stale)
                store.outbox.append(row)
                held.pending.append(row)
        acked = set(acks)
        held.inbox = [e for e in held.inbox if e not in acked]
        if self.connected(worker, region, held) and self.broker_ok(worker):
            for event in acks:  # acknowledged only now that the commit is durable
                region.queue.pop(event, None)

    def publish(self, worker: Worker, region: Region, held: Held) -> None:
        """Mark what the broker took at the last step as sent, then send what is pending.

        Marking lags publishing by a step, as the service's marker does: a worker that stops
        in between leaves rows the next holder sends again, under the same message id.
        """
        if held.unmarked and not self.mark_sent(worker, region, held):
            return
        if not held.pending or not self.flowing(region) or not self.broker_ok(worker):
            return
        sent = held.pending
        held.pending = []
        fenced = not self.current(worker, region.name, held)
        for row in sent:
            copies = region.published.setdefault(row.msg_id, [])
            if row.payload in copies:
                region.duplicates += 1
            elif copies:
                region.contradictory_messages += 1
            copies.append(row.payload)
            if row.stale:
                region.stale_published += 1
                region.stale_published_by_zombie += fenced
        held.unmarked.extend(sent)

    def mark_sent(self, worker: Worker, region: Region, held: Held) -> bool:
        """A write transaction like any other: fenced. False: the worker stood by."""
        try:
            table = self.db(worker)
        except DatabaseUnavailable:
            return True  # tried again at the next step
        if self.p.fence and not table.fence(region.name, worker.holder, held.epoch):
            region.fenced += 1
            self.stand_by(worker, region.name)
            return False
        for row in held.unmarked:
            row.sent = True
        held.unmarked = []
        return True

    def ready(self) -> list[str]:
        """The workers whose last heartbeat is current and said they can serve."""
        return [h for h, (expiry, able) in self.members.items() if expiry >= self.now and able]

    def fair_share(self) -> int:
        return math.ceil(self.p.regions / max(1, len(self.ready())))

    def take(self, worker: Worker) -> None:
        cap = self.p.cap()
        if len(worker.held) >= cap or not self.broker_ok(worker):
            return
        try:
            table = self.db(worker)
        except DatabaseUnavailable:
            return
        fair = self.fair_share()

        def preference(name: str) -> tuple[bool, int]:
            row = table.rows[name]
            mine_before = row.holder.partition(":")[0] == worker.host
            return (not mine_before, zlib.crc32(f"{worker.host}|{name}".encode()))

        expired = [n for n, row in table.rows.items() if row.expires_at < self.now]
        for name in sorted(expired, key=preference):
            if len(worker.held) >= cap:
                break
            row = table.rows[name]
            if len(worker.held) >= fair and self.now - row.expires_at < 2 * self.p.take_ms:
                continue  # at its fair share: lets a lighter worker take it first
            epoch = table.take(name, worker.holder, self.p.ttl_ms, self.now)
            if epoch is None:
                continue
            store = self.stores[name]
            worker.held[name] = Held(
                epoch=epoch,
                deadline=self.now + self.p.ttl_ms - self.p.margin_ms,
                taken_at=self.now,
                processed=set(store.processed),
                pending=[r for r in store.outbox if not r.sent],
                connect_at=self.now + self.rng.randint(*self.p.connect_ms),
            )
            self.regions[name].takes += 1

    def rebalance(self, worker: Worker) -> None:
        """Above its fair share while a live worker is below it: give one region back."""
        try:
            table = self.db(worker)
        except DatabaseUnavailable:
            return
        fair = self.fair_share()
        if len(worker.held) <= fair:
            return
        counts = dict.fromkeys(self.ready(), 0)
        for row in table.rows.values():
            if row.expires_at >= self.now and row.holder in counts:
                counts[row.holder] += 1
        if not any(count < fair for count in counts.values()):
            return
        settled = self.now - round(self.p.rebalance_s * 1000)
        movable = [  # handed over clean: nothing received, committed or sent left in hand
            n
            for n, h in worker.held.items()
            if h.taken_at <= settled and not (h.inbox or h.pending or h.unmarked)
        ]
        if not movable:
            return  # what it took lately it keeps a while: no handing back and forth
        name = max(movable, key=lambda n: worker.held[n].taken_at)
        table.release(name, worker.holder, worker.held[name].epoch, self.now)
        self.stand_by(worker, name)

    # -- faults

    def fault(self) -> None:
        kind = self.rng.choice(self.p.faults)
        self.faults[kind] += 1
        holding = [w for w in self.workers if w.alive and w.held and self.now >= w.frozen_until]
        candidates = holding or [w for w in self.workers if w.alive]
        if kind in ("crash", "freeze", "db-partition", "broker-partition") and candidates:
            worker = self.rng.choice(candidates)
            if kind == "crash":
                self.crash(worker)
            elif kind == "freeze":
                worker.freeze_pending = self.uniform_ms(self.p.freeze_s)
                worker.freeze_asked_at = self.now
            elif kind == "db-partition":
                until = self.now + self.uniform_ms(self.p.partition_s)
                worker.db_cut_until = max(worker.db_cut_until, until)
            else:
                until = self.now + self.uniform_ms(self.p.partition_s)
                worker.broker_cut_until = max(worker.broker_cut_until, until)
        elif kind == "failover":  # one during another lasts until the later one ends
            until = self.now + self.uniform_ms(self.p.failover_s)
            self.db_down_until = max(self.db_down_until, until)
        elif kind == "node-loss":
            self.node_loss(self.rng.randrange(BROKER_NODES))
        following = self.next_fault(self.now)
        if following < self.end_events - 60_000:
            self.at(following, self.fault)

    def crash(self, worker: Worker) -> None:
        for name, held in worker.held.items():
            region = self.regions[name]
            if self.connected(worker, region, held):
                region.session = None  # the broker sees the connection drop
        worker.alive = False
        worker.held = {}
        worker.freeze_pending = 0  # a stopped process can be killed too: it starts afresh
        worker.frozen_batch = None
        worker.frozen_until = 0

        def restart() -> None:
            worker.incarnation += 1  # a new process: a new pid and random part in its holder id
            self.start_worker(worker)

        self.at(self.now + self.uniform_ms(self.p.crash_restart_s), restart)

    def freeze_now(self, worker: Worker, batch: Frozen | None) -> None:
        worker.frozen_until = self.now + worker.freeze_pending
        worker.freeze_pending = 0
        worker.frozen_batch = batch
        incarnation = worker.incarnation

        def wake() -> None:
            if not worker.alive or worker.incarnation != incarnation:
                return
            frozen, worker.frozen_batch = worker.frozen_batch, None
            if frozen is not None and frozen.region in worker.held:
                # it resumes where it stopped: in the middle of the batch's write transaction
                region = self.regions[frozen.region]
                held = worker.held[frozen.region]
                self.commit(worker, region, held, frozen.decisions, frozen.acks)
                if frozen.region in worker.held and self.connected(worker, region, held):
                    self.publish(worker, region, held)

        self.at(worker.frozen_until, wake)

    def node_loss(self, node: int) -> None:
        """The streams the node led stall until the cluster has elected new leaders; its
        clients reconnect to another node."""
        for region in self.regions.values():
            if region.index % BROKER_NODES == node:  # the streams this node led
                until = self.now + self.uniform_ms(self.p.election_s)
                region.stalled_until = max(region.stalled_until, until)
        for worker in self.workers:
            if worker.index % BROKER_NODES != node:
                continue
            for name, held in worker.held.items():
                region = self.regions[name]
                if self.connected(worker, region, held):
                    region.session = None
                held.connection = None
                held.connect_at = self.now + self.rng.randint(*self.p.connect_ms)

    # -- the measure

    def served(self, region: Region) -> bool:
        if self.now < self.db_down_until or not self.flowing(region):
            return False
        for worker in self.workers:
            held = worker.held.get(region.name)
            if (
                held is not None
                and worker.alive
                and self.now >= worker.frozen_until
                and self.db_ok(worker)
                and self.broker_ok(worker)
                and self.connected(worker, region, held)
                and self.current(worker, region.name, held)
            ):
                return True
        return False

    def probe(self) -> None:
        for region in self.regions.values():
            if self.served(region):
                if region.unserved_since is not None:
                    region.max_gap = max(region.max_gap, self.now - region.unserved_since)
                region.unserved_since = None
                region.measuring = True
            elif region.measuring and region.unserved_since is None:
                region.unserved_since = self.now
        self.at(self.now + PROBE_MS, self.probe)


def simulate(params: Params) -> Figures:
    return Simulation(params).run()


# ---------------------------------------------------------------- the command


def table(figures: Figures) -> str:
    p = figures.params
    header = (
        "region", "events", "takes", "fenced", "max gap s", "max wait s", "lost",
        "twice same", "twice diff", "dup msgs", "stale pub",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    totals = [0] * 9
    for region in figures.regions:
        same, different = figures.decided_twice(region)
        values = [
            region.events, region.takes, region.fenced, region.max_gap, region.max_delay,
            figures.lost(region), same, different, region.duplicates,
        ]  # fmt: skip
        for i, value in enumerate(values):
            totals[i] = max(totals[i], value) if i in (3, 4) else totals[i] + value
        rows.append(
            (
                region.name,
                *(str(v) for v in values[:3]),
                f"{values[3] / 1000:.1f}",
                f"{values[4] / 1000:.1f}",
                *(str(v) for v in values[5:]),
                str(region.stale_published),
            )
        )
    stale = sum(r.stale_published for r in figures.regions)
    rows.append(
        (
            "all",
            *(str(v) for v in totals[:3]),
            f"{totals[3] / 1000:.1f}",
            f"{totals[4] / 1000:.1f}",
            *(str(v) for v in totals[5:]),
            str(stale),
        )
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        f"{p.workers} workers, {p.regions} regions, {p.seconds / 3600:g} h, seed {p.seed}, "
        f"{p.rate:g} events/s per region; lease TTL {p.ttl_ms / 1000:g} s, renew every "
        f"{p.renew_ms / 1000:g} s, take every {p.take_ms / 1000:g} s; at most {p.cap()} "
        f"regions a worker (ceil(M/N) + slack {p.slack_used()}); fence "
        f"{'on' if p.fence else 'OFF'}",
        "faults: " + (", ".join(f"{k} {n}" for k, n in figures.faults.items() if n) or "none"),
        "",
    ]
    for row in rows:
        cells = [
            row[0].ljust(widths[0]),
            *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)),
        ]
        lines.append("  ".join(cells))
    lines.append("")
    lines.append(
        "workers, regions held at the end (most at once): "
        + ", ".join(f"{w.host} {len(w.held)} ({w.max_held})" for w in figures.workers)
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Params:
    parser = argparse.ArgumentParser(
        prog="antifraud bench regions",
        description="N dispatcher workers serving M regions over fenced leases: a deterministic "
        "simulation of docs/scale.md with injected faults.",
    )
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--regions", type=int, default=12)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=1.0, help="events a second per region")
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"comma-separated, of {', '.join(FAULT_KINDS)}; 'none' for none",
    )
    parser.add_argument("--fault-every", type=float, default=120.0, help="mean seconds between")
    parser.add_argument(
        "--spacing",
        type=float,
        default=0.0,
        help="at least this many seconds between two faults (60: one fault at a time)",
    )
    parser.add_argument("--ttl", type=float, default=4.0, help="lease TTL, seconds")
    parser.add_argument("--slack", type=int, default=None)
    parser.add_argument(
        "--no-fence", action="store_true", help="the broken lease: writes not fenced"
    )
    args = parser.parse_args(argv)
    faults = () if args.faults == "none" else tuple(k for k in args.faults.split(",") if k)
    unknown = set(faults) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"--faults: unknown {', '.join(sorted(unknown))}")
    if args.workers < 1 or args.regions < 1 or args.hours <= 0 or args.rate <= 0:
        parser.error("--workers, --regions, --hours and --rate must be positive")
    return Params(
        workers=args.workers,
        regions=args.regions,
        seconds=args.hours * 3600,
        seed=args.seed,
        rate=args.rate,
        faults=faults,
        fault_every_s=args.fault_every,
        fault_spacing_s=args.spacing,
        ttl_ms=round(args.ttl * 1000),
        slack=args.slack,
        fence=not args.no_fence,
    )


def main(argv: list[str] | None = None) -> int:
    params = parse_args(argv)
    figures = simulate(params)
    print(table(figures))
    violations = figures.violations()
    if params.workers > 1 and (params.workers - 1) * params.cap() < params.regions:
        print(
            f"note: with one worker down, {params.workers - 1} × {params.cap()} < {params.regions}"
        )
    if violations:
        print("INVARIANTS VIOLATED:")
        for line in violations:
            print(f"  {line}")
        return 1
    print(
        "invariants hold: no event lost, none decided twice differently, nothing published "
        "from a commit made after fencing, every committed message published"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
