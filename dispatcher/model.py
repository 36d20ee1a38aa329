"""The dispatcher's state and the effects the workflow asks the runtime to carry out.

Everything here is plain data: the workflow mutates a ``State`` and returns ``Effect`` values;
the runtime persists, publishes and logs them. An ``Incident`` round-trips through
``to_json``/``from_doc`` so the store can rebuild the exact state after a restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, Literal

import orjson

from rules.contacts import ContactLog

IncidentStatus = Literal["open", "escalated", "closed"]
DispatchStatus = Literal[
    "offered", "accepted", "declined", "expired", "cancelled", "arrived", "reported", "notified"
]
SlotName = Literal["door", "police", "notice"]
ENGAGED: frozenset[str] = frozenset({"accepted", "arrived"})  # busy: accepted, not reported
AWAITING_REPLY: frozenset[str] = ENGAGED | {"offered"}  # the unit has yet to answer or report
# (incident id, its document then (``to_json``, None when not in memory), whether it was known,
# its timeline list and its length then)
IncidentCopies = list[tuple[str, str | None, bool, list[Any] | None, int]]


def incident_of_call(call_id: str) -> str:
    """SPEC §4: ``"INC-" + call_id`` of the call that opened the incident."""
    return f"INC-{call_id}"


def dispatch_id(incident_id: str, unit_id: str) -> str:
    """SPEC §4: ``incident_id + ":" + unit_id`` (an incident id holds no colon: call ids
    match ``[A-Za-z0-9._-]``)."""
    return f"{incident_id}:{unit_id}"


def dispatch_parts(dispatch: str) -> tuple[str, str]:
    """(incident id, unit id) of a dispatch id."""
    incident_id, _, unit_id = dispatch.partition(":")
    return incident_id, unit_id


@dataclass(slots=True)
class Dispatch:
    id: str
    unit: str
    role: str
    slot: SlotName
    status: DispatchStatus
    offered_at: float
    expires_at: float | None = None
    accepted_at: float | None = None
    arrived_at: float | None = None
    reported_at: float | None = None
    ended_at: float | None = None  # declined, expired or cancelled at
    outcome: str | None = None
    reason: str | None = None  # why it was cancelled: taken, closed
    # when the unit's lateness was last announced: accepted and not there in time, or there
    # (arrived_at before this) and no outcome in time
    overdue_at: float | None = None


@dataclass(slots=True)
class Call:
    call_id: str
    counterpart: str
    category: str | None
    joined_at: float
    max_duration_s: float = 0.0
    ended: bool = False
    rules: list[str] = field(default_factory=list)  # rules fired by this call, in order


@dataclass(slots=True)
class Slot:
    """One need of an escalated incident: the door-knock, or the police patrol."""

    name: SlotName
    # waiting: at the quick-police platforms with none left to offer, while the other
    # need's offers to them are still open (decisions.md 123)
    stage: Literal["primary", "quick_police", "waiting", "filled", "exhausted"] = "primary"
    station: str = ""
    expires_at: float | None = None


@dataclass(slots=True)
class TimelineEntry:
    at: float
    kind: str
    by: str
    text: str
    dispatch_id: str | None = None
    action_id: str | None = None  # the operator action this entry records, by its event id


@dataclass(slots=True)
class Incident:
    id: str
    subscriber: str
    counterpart: str
    category: str | None
    rule: str
    severity: Literal["warning", "critical"]
    status: IncidentStatus
    opened_at: float
    known: bool
    station: str
    critical_at: float | None = None
    escalated_at: float | None = None
    closed_at: float | None = None
    outcome: str | None = None
    note: str | None = None
    closed_by: str | None = None
    duration_s: float = 0.0
    callback_attempts: int = 0
    calls: dict[str, Call] = field(default_factory=dict)
    dispatches: dict[str, Dispatch] = field(default_factory=dict)
    slots: dict[str, Slot] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)  # alerts an operator took on
    timeline: list[TimelineEntry] = field(default_factory=list)
    timeline_said: int = 0  # entries the incident's messages have carried so far
    seq: int = 0  # messages published for this incident: the tail of their CloudEvent ids

    def to_json(self) -> str:
        """The incident as the store keeps it: JSON text of every field but the timeline
        (which the store keeps row by row), as ``dataclasses.asdict`` would give it. orjson
        writes the calls, dispatches and slots from the dataclasses themselves, in C: this
        runs for every change of an incident, and is its undo copy too."""
        doc = dict(zip(_INCIDENT_SCALARS, _incident_scalars(self), strict=True))
        doc["calls"] = self.calls
        doc["dispatches"] = self.dispatches
        doc["slots"] = self.slots
        doc["alerts"] = self.alerts
        doc["acknowledged"] = self.acknowledged
        return orjson.dumps(doc).decode("utf-8")

    @classmethod
    def from_doc(cls, doc: dict[str, Any], timeline: list[TimelineEntry] | None = None) -> Incident:
        """The incident of ``doc`` (``to_json`` read back), with ``timeline``: the timeline is
        kept apart, row by row, so that a change writes only what it added (a document written
        before that still holds one, which the rows repeat: it is ignored)."""
        doc = dict(doc)
        doc.pop("timeline", None)
        doc["calls"] = {k: Call(**v) for k, v in doc["calls"].items()}
        raw_dispatches = doc["dispatches"]
        doc["dispatches"] = {k: Dispatch(**v) for k, v in raw_dispatches.items()}
        if "arrival_overdue" in doc.get("alerts", ()) and not any(
            "overdue_at" in v for v in raw_dispatches.values()
        ):
            # written when one lateness was announced an incident, not which unit's: each
            # unit accepted by then counts as announced (none is announced twice)
            for d in doc["dispatches"].values():
                if d.accepted_at is not None:
                    d.overdue_at = d.accepted_at
        doc["slots"] = {k: Slot(**v) for k, v in doc["slots"].items()}
        doc["timeline"] = timeline if timeline is not None else []
        return cls(**doc)

    def next_id(self, stem: str) -> str:
        self.seq += 1
        return f"{stem}/{self.seq}"


@dataclass
class State:
    """Everything the workflow decides on. Rebuilt from the store on start."""

    contacts: ContactLog
    clock_origin: float = 0.0  # epoch seconds at clock 0, for CloudEvent `time`
    incidents: dict[str, Incident] = field(default_factory=dict)  # open, and closed in retention
    open_by_subscriber: dict[str, str] = field(default_factory=dict)
    call_incident: dict[str, str] = field(default_factory=dict)  # call_id -> incident it joined
    known_incident_ids: set[str] = field(default_factory=set)  # every incident ever opened
    presence: dict[str, str] = field(default_factory=dict)  # unit -> online/offline
    busy: dict[str, str] = field(default_factory=dict)  # unit -> accepted dispatch not reported
    # incident_id -> its document (``to_json``) as the last step that changed it left it (open
    # incidents): the next step's undo copy, with no second serialisation
    docs: dict[str, str] = field(default_factory=dict)

    def adopt(self, incident: Incident) -> None:
        """Index an incident loaded from the store (or just opened)."""
        self.incidents[incident.id] = incident
        self.known_incident_ids.add(incident.id)
        for call_id in incident.calls:
            self.call_incident[call_id] = incident.id
        if incident.status != "closed":
            self.open_by_subscriber[incident.subscriber] = incident.id
            for d in incident.dispatches.values():
                if d.status in ENGAGED:
                    self.busy[d.unit] = d.id

    def snapshot(self, incident_ids: Iterable[str]) -> IncidentCopies:
        """Copies of these incidents as they are now (None: not in memory), for ``restore``."""
        incidents, known = self.incidents, self.known_incident_ids
        copies: IncidentCopies = []
        for i in incident_ids:
            incident = incidents.get(i)
            if incident is None:
                copies.append((i, None, i in known, None, 0))
            else:  # the timeline only grows (or is let go at close): its length is its copy
                timeline = incident.timeline
                doc = self.docs.get(i) or incident.to_json()
                copies.append((i, doc, True, timeline, len(timeline)))
        return copies

    def restore(self, snapshot: IncidentCopies) -> None:
        """Put these incidents, and every index over them, back as ``snapshot`` found them:
        undoes a step that failed half-way."""
        for incident_id, doc, known, timeline, length in snapshot:
            current = self.incidents.pop(incident_id, None)
            if current is not None:
                for call_id in current.calls:
                    if self.call_incident.get(call_id) == incident_id:
                        del self.call_incident[call_id]
                if self.open_by_subscriber.get(current.subscriber) == incident_id:
                    del self.open_by_subscriber[current.subscriber]
                for d in current.dispatches.values():
                    if self.busy.get(d.unit) == d.id:
                        del self.busy[d.unit]
            self.docs.pop(incident_id, None)
            if doc is not None:
                assert timeline is not None
                del timeline[length:]
                self.adopt(Incident.from_doc(orjson.loads(doc), timeline))
            elif not known:
                self.known_incident_ids.discard(incident_id)

    def forget(self, incident_id: str) -> None:
        """Drop a closed incident from memory once its retention has passed (the store keeps it)."""
        incident = self.incidents.pop(incident_id, None)
        self.docs.pop(incident_id, None)
        if incident is None:
            return
        for call_id in incident.calls:
            if self.call_incident.get(call_id) == incident_id:
                del self.call_incident[call_id]


# ---- effects -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """An outbound MQTT message. ``payload`` None clears a retained topic."""

    topic: str
    type: str | None
    payload: dict[str, Any] | None
    retain: bool = False
    qos: int = 1
    incident_id: str | None = None
    dispatch_id: str | None = None


@dataclass(frozen=True, slots=True)
class Noted:
    """A timeline entry: one state change of an incident, for the store and the log."""

    incident_id: str
    entry: TimelineEntry


@dataclass(frozen=True, slots=True)
class IncidentSaved:
    """The incident changed; the store upserts its snapshot (and its dispatches). ``doc`` is
    the incident's document after the step (``Incident.to_json``), made once for both the
    store and the next step's undo copy."""

    incident: Incident
    doc: str | None = None


@dataclass(frozen=True, slots=True)
class ContactSeen:
    subscriber: str
    counterpart: str
    at: float


@dataclass(frozen=True, slots=True)
class PresenceSeen:
    unit: str
    state: str
    at: float


@dataclass(frozen=True, slots=True)
class TimerSet:
    """Fire ``key`` at ``due``: the workflow will be stepped with ``TimerFired(key)`` then."""

    due: float
    key: tuple[str, str, str]  # (incident_id, kind, detail)


# ---- decisions: what the workflow decided to tell whom, before it is put into words -------
# Each names the CloudEvent id its message will carry, assigned when it was decided, in the
# incident's own sequence (ids must not depend on how a message is rendered).


@dataclass(frozen=True, slots=True)
class Offered:
    """Offer the dispatch to its unit."""

    incident_id: str
    dispatch_id: str
    event_id: str


@dataclass(frozen=True, slots=True)
class StoodDown:
    """Tell the dispatch's unit it is no longer needed (the dispatch's ``reason`` says why)."""

    incident_id: str
    dispatch_id: str
    event_id: str


@dataclass(frozen=True, slots=True)
class Notified:
    """Tell a unit with no reply expected (a grid worker where guards go); ``closing``: that
    the incident has ended."""

    incident_id: str
    dispatch_id: str
    event_id: str
    closing: bool = False


@dataclass(frozen=True, slots=True)
class Answered:
    """A unit's reply was applied: its receipt says so, in ``text``."""

    unit: str
    source: str
    reply_id: str
    dispatch_id: str
    reply: str
    text: str


@dataclass(frozen=True, slots=True)
class IncidentChanged:
    """Tell the operators (and the incident's retained topic) that it opened, changed or
    closed, with the ``timeline`` entries from ``timeline_from`` on."""

    incident_id: str
    kind: str
    event_id: str
    timeline_from: int
    timeline: list[TimelineEntry]


@dataclass(frozen=True, slots=True)
class IncidentForgotten:
    """The incident's retention has passed: clear its retained topic."""

    incident_id: str


Decision = Offered | StoodDown | Notified | Answered | IncidentChanged | IncidentForgotten
Effect = Publish | Noted | IncidentSaved | ContactSeen | PresenceSeen | TimerSet


@dataclass(frozen=True, slots=True)
class TimerFired:
    key: tuple[str, str, str]
    due: float


_CONTAINERS = ("calls", "dispatches", "slots", "alerts", "acknowledged", "timeline")
_INCIDENT_SCALARS = tuple(f.name for f in fields(Incident) if f.name not in _CONTAINERS)
# reads those attributes at once, as a tuple (in C: ``to_json`` runs for every change)
_incident_scalars = attrgetter(*_INCIDENT_SCALARS)
