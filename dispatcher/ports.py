"""What the core needs from the world, as small protocols that ``adapters/`` implement.

- ``Journal``: where the effects of each step are queued and, by ``commit()``, made durable
  together; at start it hands back a ``Snapshot`` to continue from. The SQLite ``Store``
  (adapters/store.py) is one; the tests' in-memory journal is another (tests/fakes.py).
- ``Publisher``: takes the outbound messages of a commit as soon as it is written.
- ``Clock``: the runtime's seconds. The runtime itself never reads a clock: its caller reads
  one and passes ``now`` (the live service the system clock, replay each recorded ``at``).

The types that cross a port live here too: ``OutboxRow``, ``KeptInbound`` and ``Snapshot``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from dispatcher.model import Incident, Publish, TimelineEntry

OutboxRow = tuple[int, str, int, bool, bytes | None]  # seq, topic, qos, retain, payload


class KeptInbound(NamedTuple):
    """An inbound message kept for export: the incident it touched (None for a flagged
    contact that touched none), the subscriber and call of a call, whether it was a
    flagged contact, its arrival time on the store's clock, its topic and its payload as
    received (text)."""

    incident_id: str | None
    subscriber: str | None
    call_id: str | None
    contact: bool
    at: float
    topic: str
    payload: str


class QueuedEffects:
    """What a journal holds between commits, as both journals keep it: ``meta`` and
    ``presence`` (the newest value wins), ``incidents`` (by id), and rows appended in order
    (``timeline``, ``outbox``, ``inbound``, ``rejected``, ``contacts``, ``kept``)."""

    APPENDED = ("timeline", "outbox", "inbound", "rejected", "contacts", "kept")
    meta: dict[str, str]
    incidents: dict[str, Any]
    presence: dict[str, Any]
    timeline: list[Any]
    outbox: list[Any]
    rejected: list[Any]
    contacts: list[Any]
    kept: list[Any]

    def absorb(self, newer: QueuedEffects) -> None:
        """Append a newer batch to this one (its values win where both set one)."""
        self.meta.update(newer.meta)
        self.incidents.update(newer.incidents)
        self.presence.update(newer.presence)
        for name in self.APPENDED:
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


@dataclass
class Snapshot:
    """What a starting process needs from the store to continue where the last one stopped."""

    meta: dict[str, str]
    incidents: list[Incident]  # open ones, and closed ones still within retention
    incident_ids: set[str]
    contacts: list[tuple[str, float, str]]
    presence: dict[str, str]
    inbound: list[tuple[str, str, float]]
    receipts: list[tuple[float, str, str]] = field(default_factory=list)  # at, topic, payload


class Publisher(Protocol):
    """Called with a commit's outbound messages that wait for a publisher, in outbox order,
    as soon as the commit is written (before it is flushed to the disk)."""

    def __call__(self, rows: list[OutboxRow], /) -> None: ...


class Clock(Protocol):
    """The runtime's seconds: the system time, or time running faster (the demo)."""

    def now(self) -> float: ...

    def real_seconds(self, clock_seconds: float) -> float:
        """How long ``clock_seconds`` of this clock take in real seconds."""
        ...


class Journal(Protocol):
    """The runtime's durable state: writes are queued as steps produce effects and made
    durable together by ``commit()`` (all or nothing); ``load()`` reads them back at start."""

    async def load(
        self,
        now_hint: float | None,
        retention_s: float,
        dedupe_window_s: float,
        contact_horizon_s: float,
    ) -> Snapshot:
        """The state to continue from: open incidents and closed ones within ``retention_s``,
        processed pairs within ``dedupe_window_s``, contacts within ``contact_horizon_s``
        (all counted back from ``now_hint``, or from the stored clock when it is None)."""
        ...

    # ---- queueing (synchronous, in memory) ---------------------------------------------

    def set_meta(self, key: str, value: str) -> None: ...

    def save_incident(self, incident: Incident, doc: str | None = None) -> None:
        """Upsert ``incident``; ``doc``, if given, is its ``to_json()`` as of now."""

    def add_timeline(self, incident_id: str, entry: TimelineEntry) -> None: ...

    def add_outbox(self, at: float, message: Publish, sent: bool) -> None:
        """Queue an outbound message; ``sent``: it counts as published once committed."""
        ...

    def add_inbound(self, source: str, event_id: str, at: float) -> None:
        """Queue a processed ``(source, id)`` pair (``source`` names its channel too)."""
        ...

    def add_rejected(self, at: float, topic: str, reason: str, payload: str) -> None: ...

    def add_contact(self, subscriber: str, at: float, counterpart: str) -> None: ...

    def keep_inbound(self, message: KeptInbound) -> None:
        """Queue an inbound message as received, against the incident it touched (or, for
        a flagged contact that touched none, its subscriber): what ``antifraud export``
        writes back as a recording."""
        ...

    def set_presence(self, unit: str, state: str, at: float) -> None: ...

    # ---- committing --------------------------------------------------------------------

    def holds_effects(self) -> bool:
        """Whether anything queued is more than bookkeeping (processed pairs, the clock)."""
        ...

    # the least time between writing a commit and starting its flush while the service
    # keeps up (0: the caller's own delay); inbound messages wait for the flush either way
    flush_after_s: float

    def writes_inline(self, inline: bool = True) -> bool:
        """Whether ``commit(inline=inline)`` would write what is queued on the event loop."""
        ...

    async def commit(
        self,
        written: Publisher | None = None,
        flush: bool = True,
        inline: bool = True,
    ) -> list[OutboxRow]:
        """Write everything queued at once (a failed commit keeps it queued), hand the
        messages waiting for a publisher to ``written`` once written, then flush unless
        ``flush`` is false. Returns those messages."""
        ...

    async def flush(self) -> None:
        """Return once every commit written so far is on the disk."""
        ...

    async def prune(
        self,
        before_inbound: float,
        before_contacts: float,
        kept_before: tuple[float, float] | None = None,
    ) -> None:
        """Forget processed pairs and contacts older than these times; with ``kept_before``
        (closed, contacts), the kept inbound messages of incidents closed before the first
        and the kept flagged contacts of no incident older than the second."""
        ...
