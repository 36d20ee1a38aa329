"""In-memory stand-ins for the core's ports (dispatcher/ports.py): no file, no broker, no clock.

Each records what happened, for a test to read back: the journal what was queued and what
was committed, the publisher what was handed over, the clock where it stands.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import orjson

from dispatcher.errors import StoreError
from dispatcher.model import Incident, Publish, TimelineEntry
from dispatcher.ports import KeptInbound, OutboxRow, Publisher, QueuedEffects, Snapshot


@dataclass
class Queued(QueuedEffects):
    """What a journal holds: queued since the last commit, or committed."""

    meta: dict[str, str] = field(default_factory=dict)
    incidents: dict[str, Incident] = field(default_factory=dict)
    timeline: list[tuple[str, TimelineEntry]] = field(default_factory=list)
    outbox: list[tuple[int, float, Publish, bool]] = field(default_factory=list)  # seq, at, …
    inbound: list[tuple[str, str, float]] = field(default_factory=list)
    rejected: list[tuple[float, str, str, str]] = field(default_factory=list)
    contacts: list[tuple[str, float, str]] = field(default_factory=list)
    presence: dict[str, tuple[str, float]] = field(default_factory=dict)
    kept: list[KeptInbound] = field(default_factory=list)


class MemoryJournal:
    """A journal in memory: ``queued`` until ``commit()``, then ``committed``. Set
    ``fail_commits`` to make that many commits fail (what they held stays queued)."""

    flush_after_s = 0.0

    def __init__(self) -> None:
        self.queued = Queued()
        self.committed = Queued()
        self.commits = 0
        self.flushes = 0
        self.fail_commits = 0
        self._next_seq = 1

    # ---- reading -----------------------------------------------------------------------

    async def load(
        self,
        now_hint: float | None,
        retention_s: float,
        dedupe_window_s: float,
        contact_horizon_s: float,
    ) -> Snapshot:
        done = self.committed
        latest = float(done.meta.get("clock", "0")) if now_hint is None else now_hint
        incidents = []
        for incident in done.incidents.values():
            if incident.status != "closed" or incident.closed_at + retention_s > latest:
                incidents.append(copy.deepcopy(incident))
        return Snapshot(
            meta=dict(done.meta),
            incidents=incidents,
            incident_ids=set(done.incidents),
            contacts=[c for c in done.contacts if c[1] >= latest - contact_horizon_s],
            presence={unit: state for unit, (state, _) in done.presence.items()},
            inbound=[p for p in done.inbound if p[2] >= latest - dedupe_window_s],
        )

    # ---- queueing ----------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        self.queued.meta[key] = value

    def save_incident(self, incident: Incident, doc: dict[str, Any] | None = None) -> None:
        self.queued.incidents[incident.id] = copy.deepcopy(incident)

    def add_timeline(self, incident_id: str, entry: TimelineEntry) -> None:
        self.queued.timeline.append((incident_id, entry))

    def add_outbox(self, at: float, message: Publish, sent: bool) -> None:
        self.queued.outbox.append((self._next_seq, at, message, sent))
        self._next_seq += 1

    def add_inbound(self, source: str, event_id: str, at: float) -> None:
        self.queued.inbound.append((source, event_id, at))

    def add_rejected(self, at: float, topic: str, reason: str, payload: str) -> None:
        self.queued.rejected.append((at, topic, reason, payload))

    def add_contact(self, subscriber: str, at: float, counterpart: str) -> None:
        self.queued.contacts.append((subscriber, at, counterpart))

    def set_presence(self, unit: str, state: str, at: float) -> None:
        self.queued.presence[unit] = (state, at)

    def keep_inbound(self, message: KeptInbound) -> None:
        self.queued.kept.append(message)

    # ---- committing --------------------------------------------------------------------

    def holds_effects(self) -> bool:
        return self.queued.holds_effects()

    def writes_inline(self, inline: bool = True) -> bool:
        return inline

    async def commit(
        self,
        written: Publisher | None = None,
        flush: bool = True,
        inline: bool = True,
    ) -> list[OutboxRow]:
        if self.fail_commits:
            self.fail_commits -= 1
            raise StoreError("the journal refused this commit")
        batch, self.queued = self.queued, Queued()
        self.committed.absorb(batch)
        self.commits += 1
        pending: list[OutboxRow] = [
            (seq, m.topic, m.qos, m.retain, None if m.payload is None else orjson.dumps(m.payload))
            for seq, _, m, sent in batch.outbox
            if not sent
        ]
        if written is not None and pending:
            written(pending)
        if flush:
            await self.flush()
        return pending

    async def flush(self) -> None:
        self.flushes += 1

    async def prune(
        self,
        before_inbound: float,
        before_contacts: float,
        kept_before: tuple[float, float] | None = None,
    ) -> None:
        done = self.committed
        done.inbound = [p for p in done.inbound if p[2] >= before_inbound]
        done.contacts = [c for c in done.contacts if c[1] >= before_contacts]
        if kept_before is not None:
            closed_before, contacts_before = kept_before
            gone = {
                i.id
                for i in done.incidents.values()
                if i.status == "closed" and i.closed_at < closed_before
            }
            done.kept = [
                k
                for k in done.kept
                if (k.incident_id is None and k.at >= contacts_before)
                or (k.incident_id is not None and k.incident_id not in gone)
            ]

    # ---- for tests ---------------------------------------------------------------------

    def messages(self, queued: bool = False) -> list[tuple[str, str | None]]:
        """(topic, type) of each outbound message committed (or ``queued``), in order."""
        held = self.queued if queued else self.committed
        return [(m.topic, m.type) for _, _, m, _ in held.outbox]


class RecordingPublisher:
    """Takes what each commit hands over and keeps it, one list per hand-over."""

    def __init__(self) -> None:
        self.handed: list[list[OutboxRow]] = []

    def __call__(self, rows: list[OutboxRow], /) -> None:
        self.handed.append(list(rows))

    def payloads(self) -> list[dict[str, Any] | None]:
        return [
            None if payload is None else orjson.loads(payload)
            for rows in self.handed
            for _, _, _, _, payload in rows
        ]


class ManualClock:
    """A clock that stands still until a test moves it."""

    def __init__(self, start: float = 0.0) -> None:
        self.at = start

    def now(self) -> float:
        return self.at

    def real_seconds(self, clock_seconds: float) -> float:
        return 0.0

    def advance(self, seconds: float) -> float:
        self.at += seconds
        return self.at
