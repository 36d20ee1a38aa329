"""Outbound messages as data: topics, CloudEvents envelopes and what each party may see.

Guards and grid workers get a short text fit for a radio screen or text-to-speech: the address,
the resident's honorific (陈女士) and what to do, **never the resident's phone number or full
name**. Police, quick-police platforms and operators get the full incident.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from dispatcher import texts
from dispatcher.model import (
    Answered,
    Decision,
    Dispatch,
    Effect,
    Incident,
    IncidentChanged,
    IncidentForgotten,
    Notified,
    Offered,
    Publish,
    State,
    StoodDown,
    TimelineEntry,
)
from dispatcher.settings import Settings
from rules.flagged import FlaggedNumbers

SPECVERSION = "1.0"
RADIO_ROLES = frozenset({"guard", "grid_worker"})
RECEIPT = "cn.antifraud.reply.receipt"
REPLY_VERBS = ("accepted", "declined", "arrived", "reported")
_SECONDS: dict[int, str] = {}  # "YYYY-MM-DDTHH:MM:SS" of each whole second formatted lately


def rfc3339(origin: float, at: float) -> str:
    """Clock seconds to an RFC 3339 UTC timestamp with milliseconds (``origin`` is epoch
    seconds at clock 0): what ``datetime.fromtimestamp(origin + at, UTC)`` says, split as it
    splits (whole seconds, microseconds rounded half to even), to the millisecond below.

    A wave of incidents has tens of thousands of moments in play, each formatted again for
    every message of its incident; the whole seconds among them are far fewer, and are the
    only part formatted by ``datetime``."""
    frac, whole = math.modf(origin + at)
    micros = round(frac * 1_000_000)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    head = _SECONDS.get(second)
    if head is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        head = _SECONDS[second] = datetime.fromtimestamp(second, tz=UTC).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
    return f"{head}.{micros // 1000:03d}Z"


CACHED_SUBSCRIBERS = 65536  # subscribers' details rendered and kept at most


def on_the_phone(incident: Incident) -> bool:
    """Whether a call of the incident is still on (none listed counts as on: the calls a
    flood made past the listed ones are not kept)."""
    return not incident.calls or not all(c.ended for c in incident.calls.values())


# the suffix of the session that reads the actions of operators the deployment does not list
OPERATORS_SESSION = "operators"


def operator_session(operator: str) -> str:
    """The suffix of the dispatcher's session for a listed operator's actions."""
    return f"operator-{operator}"


def is_operator_session(suffix: str) -> bool:
    return suffix.startswith("operator-")


def unit_session(unit: str) -> str:
    """The suffix of the dispatcher's session for ``unit``'s replies and status."""
    return f"unit-{unit}"


class Topics:
    """Every topic of SPEC §3 for one deployment's prefix, named once: what the dispatcher
    publishes and subscribes to, and what the console, handsets and benchmarks use."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.operators = f"{prefix}/operators/incidents"
        self.deadletter = f"{prefix}/deadletter"
        self.dispatcher_status = f"{prefix}/dispatcher/status"
        # subscription filters
        self.all_incidents = f"{prefix}/incidents/+"
        self.all_actions = f"{prefix}/operators/+/actions"
        self.all_replies = f"{prefix}/units/+/replies"
        self.all_unit_status = f"{prefix}/units/+/status"

    def calls(self, region: str) -> str:
        return f"{self.prefix}/events/{region}/calls"

    def actions(self, operator: str) -> str:
        return f"{self.prefix}/operators/{operator}/actions"

    def incident(self, incident_id: str) -> str:
        return f"{self.prefix}/incidents/{incident_id}"

    def dispatches(self, unit_id: str) -> str:
        return f"{self.prefix}/units/{unit_id}/dispatches"

    def replies(self, unit_id: str) -> str:
        return f"{self.prefix}/units/{unit_id}/replies"

    def unit_status(self, unit_id: str) -> str:
        return f"{self.prefix}/units/{unit_id}/status"

    def inbound_filters(self, region: str) -> list[str]:
        """What the dispatcher subscribes to."""
        return [self.calls(region), self.all_actions, self.all_replies, self.all_unit_status]

    def session_filters(
        self, region: str, units: Iterable[str], operators: Iterable[str] = ()
    ) -> dict[str, list[str]]:
        """What each of the dispatcher's broker sessions subscribes to, by the suffix of its
        client id (and username), in the order they are connected and read: the call
        warnings; a session for each listed operator, its actions; every operator's actions
        (``OPERATORS_SESSION``: those of an operator the deployment does not list, which a
        broker without the generated ACL lets anyone write; a listed operator's actions
        arrive on it too, and of the two copies only the first is read); the main session
        (``""``), which publishes and reads nothing; then a session for each unit, its
        replies and status. A broker's queue limit is per session: a flooding party can only
        ever fill its own, and never another operator's or unit's, nor the one whose
        acknowledgements the dispatcher's messages wait for (Mosquitto counts a publisher's
        acknowledgements in its session's queue)."""
        sessions = {"calls": [self.calls(region)]}
        for operator in operators:
            sessions[operator_session(operator)] = [self.actions(operator)]
        sessions |= {OPERATORS_SESSION: [self.all_actions], "": []}
        for unit in units:
            sessions[unit_session(unit)] = [self.replies(unit), self.unit_status(unit)]
        return sessions

    def console_filters(self) -> list[str]:
        """What an operator console subscribes to (and the broker's ACL lets it read)."""
        return [
            self.all_incidents,
            self.operators,
            self.all_unit_status,
            self.deadletter,
            self.dispatcher_status,
        ]


class Messages:
    """Builds every outbound message of one deployment."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.service.prefix)
        self.source = settings.service.source
        self.flagged = FlaggedNumbers(settings.flagged)
        # each subscriber's details as an incident's messages give them, rendered once and
        # shared by those messages (a message's payload is never changed once built)
        self._subscribers: dict[str, dict[str, Any]] = {}

    def envelope(
        self,
        event_id: str,
        type_: str,
        subject: str,
        at: float,
        origin: float,
        data: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "specversion": SPECVERSION,
            "id": event_id,
            "source": self.source,
            "type": type_,
            "time": rfc3339(origin, at),
            "subject": subject,
            "datacontenttype": "application/json",
            "data": data,
        }

    # ---- decisions into messages -----------------------------------------------------------

    def render(self, effects: list[Effect | Decision], state: State, at: float) -> list[Effect]:
        """The workflow's decisions put into messages, in the order decided; other effects
        pass through. Rendering reads the state and changes nothing."""
        origin, incidents = state.clock_origin, state.incidents
        out: list[Effect] = []
        for effect in effects:
            if isinstance(effect, IncidentChanged):
                out.extend(self.incident_changed(incidents[effect.incident_id], effect, at, origin))
            elif isinstance(effect, Offered):
                incident = incidents[effect.incident_id]
                d = incident.dispatches[effect.dispatch_id]
                out.append(self.offer(incident, d, effect.event_id, at, origin))
            elif isinstance(effect, StoodDown):
                incident = incidents[effect.incident_id]
                d = incident.dispatches[effect.dispatch_id]
                out.append(self.cancelled(incident, d, effect.event_id, at, origin))
            elif isinstance(effect, Notified):
                incident = incidents[effect.incident_id]
                d = incident.dispatches[effect.dispatch_id]
                out.append(self.notice(incident, d, effect.event_id, at, origin, effect.closing))
            elif isinstance(effect, Answered):
                out.append(
                    self.receipt(
                        effect.unit,
                        effect.source,
                        effect.reply_id,
                        effect.dispatch_id,
                        effect.reply,
                        at,
                        origin,
                        text=effect.text,
                    )
                )
            elif isinstance(effect, IncidentForgotten):
                out.append(self.incident_cleared(effect.incident_id))
            else:
                out.append(effect)
        return out

    # ---- incidents -------------------------------------------------------------------------

    def incident_changed(
        self, incident: Incident, change: IncidentChanged, at: float, origin: float
    ) -> list[Publish]:
        """Opened, updated or closed: to the operators and the retained state topic, with the
        timeline entries the change carries."""
        type_ = f"cn.antifraud.incident.{change.kind}"
        event = self.envelope(
            change.event_id,
            type_,
            incident.id,
            at,
            origin,
            self.incident_detail(incident, origin, change.timeline_from, change.timeline),
        )
        return [
            Publish(self.topics.operators, type_, event, incident_id=incident.id),
            Publish(
                self.topics.incident(incident.id),
                type_,
                event,
                retain=True,
                incident_id=incident.id,
            ),
        ]

    def incident_cleared(self, incident_id: str) -> Publish:
        return Publish(
            self.topics.incident(incident_id), None, None, retain=True, incident_id=incident_id
        )

    def subscriber_detail(self, incident: Incident) -> dict[str, Any]:
        """The subscriber as operators and police see it (the same dict for every message of
        the subscriber's: the registries do not change while the process runs)."""
        detail = self._subscribers.get(incident.subscriber)
        if detail is None:
            if len(self._subscribers) >= CACHED_SUBSCRIBERS:
                self._subscribers.clear()
            detail = self._subscribers[incident.subscriber] = self._subscriber(incident)
        return detail

    def _subscriber(self, incident: Incident) -> dict[str, Any]:
        sub = self.settings.subscribers.get(incident.subscriber)
        if sub is None:
            return {"msisdn": incident.subscriber, "known": False}
        estate = self.settings.estates[sub.estate]
        return {
            "msisdn": sub.msisdn,
            "known": True,
            "name": sub.name,
            "display_name": sub.display_name,
            "address": full_address(estate.address, sub.address),
            "estate": estate.id,
            "estate_name": estate.name,
            "grid": sub.grid,
            "vulnerable": sub.vulnerable,
        }

    def incident_detail(
        self,
        incident: Incident,
        origin: float,
        timeline_from: int = 0,
        timeline: list[TimelineEntry] | None = None,
    ) -> dict[str, Any]:
        """The incident as operators and police see it, with its timeline (``timeline``, by
        default the incident's) from entry ``timeline_from`` on (the whole of it by default)."""
        if timeline is None:
            timeline = incident.timeline

        def t(value: float | None) -> str | None:
            return None if value is None else rfc3339(origin, value)

        flag = self.flagged.lookup(incident.counterpart)
        window_end = (
            incident.critical_at + self.settings.callback.window_s
            if incident.critical_at is not None and incident.status == "open"
            else None
        )
        return {
            "incident_id": incident.id,
            "status": incident.status,
            "severity": incident.severity,
            "rule": incident.rule,
            "rule_label": self.settings.rule_name(incident.rule),
            "subscriber": self.subscriber_detail(incident),
            "counterpart": incident.counterpart,
            "category": incident.category,
            "category_label": flag.label if flag else None,
            "duration_s": incident.duration_s,
            "opened_at": t(incident.opened_at),
            "critical_at": t(incident.critical_at),
            "escalated_at": t(incident.escalated_at),
            "closed_at": t(incident.closed_at),
            "outcome": incident.outcome,
            "note": incident.note,
            "callback": {
                "attempts": incident.callback_attempts,
                "max_attempts": self.settings.callback.max_attempts,
                "window_ends_at": t(window_end),
            },
            "calls": [
                {
                    "call_id": c.call_id,
                    "counterpart": c.counterpart,
                    "category": c.category,
                    "duration_s": c.max_duration_s,
                    "ended": c.ended,
                    "rules": list(c.rules),
                }
                for c in incident.calls.values()
            ],
            "dispatches": [
                {
                    "dispatch_id": d.id,
                    "unit": d.unit,
                    "unit_name": self.settings.unit_name(d.unit),
                    "role": d.role,
                    "status": d.status,
                    "offered_at": t(d.offered_at),
                    "expires_at": t(d.expires_at) if d.status == "offered" else None,
                    "accepted_at": t(d.accepted_at),
                    "arrived_at": t(d.arrived_at),
                    "reported_at": t(d.reported_at),
                    "outcome": d.outcome,
                }
                for d in incident.dispatches.values()
            ],
            "alerts": list(incident.alerts),
            "acknowledged": list(incident.acknowledged),
            "timeline": self.timeline_items(timeline[timeline_from:], origin),
            "timeline_from": timeline_from,
        }

    @staticmethod
    def timeline_items(entries: list[TimelineEntry], origin: float) -> list[dict[str, Any]]:
        return [
            {
                "at": rfc3339(origin, e.at),
                "kind": e.kind,
                "by": e.by,
                "text": e.text,
                "dispatch_id": e.dispatch_id,
                "action_id": e.action_id,
            }
            for e in entries
        ]

    # ---- dispatches ------------------------------------------------------------------------

    def radio_address(self, incident: Incident) -> tuple[str, str]:
        """(address, honorific) for a radio screen; the honorific is never the full name."""
        sub = self.settings.subscribers[incident.subscriber]
        estate = self.settings.estates[sub.estate]
        return full_address(estate.address, sub.address), sub.display_name

    def offer(
        self, incident: Incident, dispatch: Dispatch, event_id: str, at: float, origin: float
    ) -> Publish:
        type_ = "cn.antifraud.dispatch.offered"
        data: dict[str, Any] = {
            "dispatch_id": dispatch.id,
            "incident_id": incident.id,
            "role": dispatch.role,
            "expires_at": rfc3339(origin, dispatch.expires_at or at),
            "reply_topic": self.topics.replies(dispatch.unit),
            "replies": ["accepted", "declined", "arrived", "reported"],
        }
        if dispatch.role in RADIO_ROLES:
            address, honorific = self.radio_address(incident)
            data |= {
                "address": address,
                "honorific": honorific,
                "text": texts.door_knock(address, honorific, on_the_phone(incident)),
            }
        else:
            data |= {
                "text": self._full_text(incident),
                "incident": self.incident_detail(incident, origin),
            }
        return self._to_unit(incident, dispatch, event_id, type_, at, origin, data)

    def notice(
        self,
        incident: Incident,
        dispatch: Dispatch,
        event_id: str,
        at: float,
        origin: float,
        closing: bool = False,
    ) -> Publish:
        type_ = "cn.antifraud.dispatch.notice"
        address, honorific = self.radio_address(incident)
        text = texts.notice(address, honorific, closing, on_the_phone(incident))
        data = {
            "dispatch_id": dispatch.id,
            "incident_id": incident.id,
            "role": dispatch.role,
            "address": address,
            "honorific": honorific,
            "reply_expected": False,
            "closed": closing,
            "text": text,
        }
        return self._to_unit(incident, dispatch, event_id, type_, at, origin, data)

    def cancelled(
        self, incident: Incident, dispatch: Dispatch, event_id: str, at: float, origin: float
    ) -> Publish:
        type_ = "cn.antifraud.dispatch.cancelled"
        reason = dispatch.reason or "closed"
        data = {
            "dispatch_id": dispatch.id,
            "incident_id": incident.id,
            "reason": reason,
            "text": texts.CANCEL_TEXT.get(reason, texts.CANCEL_TEXT["closed"]),
        }
        return self._to_unit(incident, dispatch, event_id, type_, at, origin, data)

    def _to_unit(
        self,
        incident: Incident,
        dispatch: Dispatch,
        event_id: str,
        type_: str,
        at: float,
        origin: float,
        data: dict[str, Any],
    ) -> Publish:
        event = self.envelope(event_id, type_, dispatch.id, at, origin, data)
        return Publish(
            self.topics.dispatches(dispatch.unit),
            type_,
            event,
            incident_id=incident.id,
            dispatch_id=dispatch.id,
        )

    def _full_text(self, incident: Incident) -> str:
        sub = self.settings.subscribers.get(incident.subscriber)
        who = texts.police_subject(sub.name, sub.display_name, sub.msisdn) if sub else None
        flag = self.flagged.lookup(incident.counterpart)
        return texts.police_dispatch(
            who or incident.subscriber,
            self.subscriber_detail(incident).get("address", texts.ADDRESS_UNKNOWN),
            incident.counterpart,
            flag.label if flag is not None and flag.label else incident.category,
            incident.duration_s,
            incident.severity,
            self.settings.rule_name(incident.rule),
        )

    # ---- reply receipts --------------------------------------------------------------------

    def receipt(
        self,
        unit: str,
        source: str,
        reply_id: str,
        dispatch: str,
        reply: str,
        at: float,
        origin: float,
        *,
        text: str,
        code: str | None = None,
        reason: str | None = None,
    ) -> Publish:
        """The answer to one reply, on the speaking unit's dispatches topic: ``applied``, or
        ``refused`` with a ``code`` and a short ``reason``. Its CloudEvent id is made of the
        reply's channel and (source, id) alone, so a redelivered reply is answered with the
        same event, which a handset drops as a duplicate if it already has it."""
        data: dict[str, Any] = {
            "reply_id": reply_id,
            "dispatch_id": dispatch,
            "reply": reply,
            "status": "applied" if code is None else "refused",
            "text": text,
        }
        if code is not None:
            data |= {"code": code, "reason": reason}
        event = self.envelope(
            receipt_id(unit, source, reply_id), RECEIPT, dispatch, at, origin, data
        )
        return Publish(self.topics.dispatches(unit), RECEIPT, event, dispatch_id=dispatch)

    # ---- dead letters ----------------------------------------------------------------------

    def rejected(
        self,
        topic: str,
        reason: str,
        source: str | None,
        event_id: str | None,
        raw: str,
        key: str,
        at: float,
        origin: float,
    ) -> Publish:
        type_ = "cn.antifraud.input.rejected"
        data = {"topic": topic, "reason": reason, "source": source, "id": event_id, "payload": raw}
        event = self.envelope(f"rejected/{key}", type_, topic, at, origin, data)
        return Publish(self.topics.deadletter, type_, event)


def receipt_id(unit: str, source: str, reply_id: str) -> str:
    """The CloudEvent id of the receipt of ``unit``'s reply (``source``, ``reply_id``)."""
    return f"receipt/replies/{unit}/{source}/{reply_id}"


def full_address(estate_address: str, unit_address: str) -> str:
    """Join the estate's street address and the home within it, without repeating the estate."""
    return f"{estate_address} {unit_address}"
