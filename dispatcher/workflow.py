"""The incident workflow: a deterministic state machine driven by events and a given time.

``Workflow.step(event, now)`` takes a validated inbound message, or a fired timer, mutates the
``State`` it owns and returns the effects for the runtime to carry out (persist, publish, log,
schedule). It never awaits, reads a clock, logs or touches IO, so live service, replay, recovery
and tests all run exactly this code. Refusals raise ``InputError`` *before* any state is touched.

Timers are data: ``timers_for(incident)`` derives every pending timer from the incident alone,
which is how a restarted process finds them again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dispatcher import texts
from dispatcher.errors import InputError
from dispatcher.inbound import (
    CallProgress,
    CallStarted,
    Inbound,
    OperatorAcknowledge,
    OperatorCallback,
    OperatorClose,
    UnitReported,
    UnitStatus,
)
from dispatcher.model import (
    AWAITING_REPLY,
    Answered,
    Call,
    ContactSeen,
    Decision,
    Dispatch,
    DispatchStatus,
    Effect,
    Incident,
    IncidentChanged,
    IncidentForgotten,
    IncidentSaved,
    Noted,
    Notified,
    Offered,
    PresenceSeen,
    Publish,
    Slot,
    SlotName,
    State,
    StoodDown,
    TimelineEntry,
    TimerFired,
    TimerSet,
    dispatch_id,
    dispatch_parts,
    incident_of_call,
)
from dispatcher.outbound import RADIO_ROLES, Messages
from dispatcher.settings import Settings, Unit
from rules.conditions import RuleSettings
from rules.engine import SEVERITY_RANK, CallFacts, RuleSet, strongest
from rules.flagged import FlaggedNumbers, FlaggedPattern

SYSTEM = "dispatcher"
# an incident lists at most this many calls, and records repeatable timeline entries (calls
# joining or ending, actions that do not count) only while its timeline is shorter than
# MAX_TIMELINE: what it publishes stays far below a broker's packet limit (decisions.md 62)
MAX_CALLS = 50
MAX_TIMELINE = 100
TIMELINE_FULL = "timeline_full"
TIMER_RANK = {"callback_window": 0, "slot": 1, "arrival": 2, "report": 3, "retention": 4}
CLOSE_OUTCOMES = ("loss", "dissuaded", "false_alarm")
REPORT_TO_OUTCOME = {"loss": "loss", "dissuaded": "prevented", "false_alarm": "false_alarm"}


class ReplyRefused(InputError):
    """A reply the workflow refuses: ``reason`` for the dead-letter topic, and for the
    unit's receipt a stable ``code`` and a short Chinese ``text`` for a radio screen."""

    def __init__(self, reason: str, code: str, text: str) -> None:
        super().__init__(reason)
        self.code = code
        self.text = text


def timer_order(timer: TimerSet) -> tuple[float, str, int, str]:
    """Timers due at the same time fire in this fixed order, so replays are deterministic."""
    incident_id, kind, detail = timer.key
    return (timer.due, incident_id, TIMER_RANK[kind], detail)


class Changes:
    """Collects the effects of one step and which incidents changed, and how."""

    def __init__(self) -> None:
        self.effects: list[Effect | Decision] = []
        self.changed: dict[str, str] = {}  # incident_id -> opened / updated / closed
        self.action_id: str | None = None  # the operator action being handled, if one is

    def mark(self, incident: Incident, kind: str = "updated") -> None:
        current = self.changed.get(incident.id)
        if current in ("opened", "closed") and kind == "updated":
            return
        self.changed[incident.id] = kind


class Workflow:
    def __init__(self, settings: Settings, state: State) -> None:
        self.settings = settings
        self.state = state
        self.rules = RuleSet(settings.rules)
        self.flagged = FlaggedNumbers(settings.flagged)
        self.messages = Messages(settings)

    # ---- entry point -----------------------------------------------------------------------

    def step(self, event: Inbound | TimerFired, now: float) -> list[Effect]:
        changes = Changes()
        if isinstance(event, TimerFired):
            self._on_timer(event, now, changes)
        elif event.kind == "calls":
            self._on_call(event, now, changes)
        elif event.kind == "actions":
            self._on_action(event, now, changes)
        elif event.kind == "replies":
            self._on_reply(event, now, changes)
        else:
            self._on_status(event, now, changes)
        return self._finish(changes, now)

    def _finish(self, changes: Changes, now: float) -> list[Effect]:
        """The step's decisions, with each changed incident's message, put into messages;
        then what the store keeps of each changed incident."""
        changed = [(self.state.incidents[i], kind) for i, kind in changes.changed.items()]
        for incident, kind in changed:
            # an update carries the entries not yet said (those of this step, and those of
            # steps that changed nothing else); opening and closing, all of them
            start = 0 if kind != "updated" else incident.timeline_said
            event_id = incident.next_id(incident.id)
            changes.effects.append(
                IncidentChanged(incident.id, kind, event_id, start, incident.timeline)
            )
            incident.timeline_said = len(incident.timeline)
        effects = self.messages.render(changes.effects, self.state, now)
        for incident, kind in changed:
            effects.extend(self.timers_for(incident))
            doc = incident.to_json()
            if kind == "closed":
                # said in full once; the store keeps it, and nothing more is added to it
                incident.timeline = []
                self.state.docs.pop(incident.id, None)
            else:
                self.state.docs[incident.id] = doc
            effects.append(IncidentSaved(incident, doc))
        return effects

    # ---- timers ----------------------------------------------------------------------------

    def timers_for(self, incident: Incident) -> list[TimerSet]:
        """Every timer the incident is waiting on, derived from its state alone."""
        timers: list[TimerSet] = []
        if incident.status == "closed":
            if incident.closed_at is not None:
                due = incident.closed_at + self.settings.incident.retention_s
                timers.append(TimerSet(due, (incident.id, "retention", "")))
            return timers
        if incident.status == "open" and incident.critical_at is not None:
            due = incident.critical_at + self.settings.callback.window_s
            timers.append(TimerSet(due, (incident.id, "callback_window", "")))
        for slot in incident.slots.values():
            if slot.expires_at is not None and self._pending(incident, slot.name):
                timers.append(TimerSet(slot.expires_at, (incident.id, "slot", slot.name)))
        for d in incident.dispatches.values():
            if d.status == "accepted" and d.accepted_at is not None and d.overdue_at is None:
                due = d.accepted_at + self._arrive_s(d.role)
                timers.append(TimerSet(due, (incident.id, "arrival", d.id)))
            elif (
                d.status == "arrived"
                and d.arrived_at is not None
                and (d.overdue_at is None or d.overdue_at < d.arrived_at)
            ):
                due = d.arrived_at + self.settings.dispatch.report_s
                timers.append(TimerSet(due, (incident.id, "report", d.id)))
        return timers

    def _arrive_s(self, role: str) -> float:
        dispatch = self.settings.dispatch
        return dispatch.guard_arrive_s if role in RADIO_ROLES else dispatch.police_arrive_s

    def _on_timer(self, fired: TimerFired, now: float, changes: Changes) -> None:
        incident_id, kind, detail = fired.key
        incident = self.state.incidents.get(incident_id)
        if incident is None or TimerSet(fired.due, fired.key) not in self.timers_for(incident):
            return  # the state moved on: this timer no longer applies
        if kind == "callback_window":
            passed = texts.callback_window_passed(self.settings.callback.window_s)
            self._note(incident, now, "callback_window_passed", SYSTEM, passed, changes)
            self._escalate(incident, now, SYSTEM, passed, changes)
        elif kind == "slot":
            slot = incident.slots[detail]
            for d in self._slot_dispatches(incident, slot.name, ("offered",)):
                d.status, d.ended_at = "expired", now
                self._note(
                    incident,
                    now,
                    "offer_expired",
                    SYSTEM,
                    texts.offer_expired(self._unit_label(d.unit)),
                    changes,
                    d.id,
                )
                d.reason = "expired"
                changes.effects.append(StoodDown(incident.id, d.id, incident.next_id(d.id)))
            slot.expires_at = None
            self._fallback(incident, slot, now, changes)
            self._settle_waiting(incident, now, changes)
            self._maybe_close(incident, now, changes)
            changes.mark(incident)
        elif kind == "arrival":
            d = incident.dispatches[detail]
            d.overdue_at = now
            minutes = self._arrive_s(d.role) / 60
            self._alert_again(
                incident,
                now,
                "arrival_overdue",
                texts.arrival_overdue(self._unit_label(d.unit), round(minutes, 1)),
                changes,
            )
        elif kind == "report":
            d = incident.dispatches[detail]
            d.overdue_at = now
            self._alert_again(
                incident,
                now,
                "report_overdue",
                texts.report_overdue(
                    self._unit_label(d.unit), round(self.settings.dispatch.report_s / 60, 1)
                ),
                changes,
            )
        elif kind == "retention":
            changes.effects.append(IncidentForgotten(incident.id))
            self.state.forget(incident.id)

    # ---- call events -----------------------------------------------------------------------

    def _on_call(self, msg: Inbound, now: float, changes: Changes) -> None:
        data = msg.data
        state = self.state
        joined_to = state.call_incident.get(data.call_id)
        if joined_to is not None and state.incidents[joined_to].status == "closed":
            return  # a call whose incident has closed raises nothing more
        flag = self.flagged.lookup(data.counterpart)
        if isinstance(data, CallStarted):
            duration = 0.0
            if flag is not None and data.direction == "inbound":
                state.contacts.record(data.subscriber, data.counterpart, now)
                changes.effects.append(ContactSeen(data.subscriber, data.counterpart, now))
        else:
            assert isinstance(data, CallProgress)
            duration = data.duration_s
        incident_id = state.open_by_subscriber.get(data.subscriber)
        if flag is None and incident_id is None and not self.rules.any_unflagged:
            return  # a clean call of a subscriber with no open incident: nothing to decide
        sub = self.settings.subscribers.get(data.subscriber)
        facts = CallFacts(
            subscriber=data.subscriber,
            counterpart=data.counterpart,
            duration_s=duration,
            vulnerable=sub.vulnerable if sub else False,
            flag=flag,
            at=now,
        )
        matched = self.rules.matching(facts, state.contacts)
        opened_now = incident_id is None
        if incident_id is None:
            if not matched:
                return
            new_id = incident_of_call(data.call_id)
            if new_id in state.known_incident_ids:
                return  # this call already opened an incident, now closed and forgotten
            incident = self._open(
                new_id, data.subscriber, data.counterpart, flag, matched, now, changes
            )
        else:
            incident = state.incidents[incident_id]
        category = flag.category if flag else None
        call = incident.calls.get(data.call_id)
        if call is None:
            # past MAX_CALLS a call still joins (its severity and duration count) without
            # being listed: a resident's or a source's flood of calls cannot grow it
            call = Call(data.call_id, data.counterpart, category, joined_at=now)
            if len(incident.calls) < MAX_CALLS:
                incident.calls[data.call_id] = call
                state.call_incident[data.call_id] = incident.id
            if not opened_now:
                self._note(
                    incident,
                    now,
                    "call_joined",
                    data.subscriber,
                    texts.call_joined(data.counterpart),
                    changes,
                    repeatable=True,
                )
            changes.mark(incident)
        if duration > call.max_duration_s:
            call.max_duration_s = duration
            changes.mark(incident)
        if matched and duration > incident.duration_s:
            incident.duration_s = duration
            changes.mark(incident)
        if msg.verb == "ended" and not call.ended:
            call.ended = True
            self._note(
                incident,
                now,
                "call_ended",
                data.subscriber,
                texts.call_ended(duration),
                changes,
                repeatable=True,
            )
            # the resident's line is free: a callback may now get through (decisions.md 105)
            changes.mark(incident)
        fresh = [r for r in matched if r.id not in call.rules]
        if fresh:
            self._fire(incident, call, fresh, now, changes)

    def _open(
        self,
        incident_id: str,
        subscriber: str,
        counterpart: str,
        flag: FlaggedPattern | None,
        matched: list[RuleSettings],
        now: float,
        changes: Changes,
    ) -> Incident:
        sub = self.settings.subscribers.get(subscriber)
        station = (
            self.settings.estates[sub.estate].station
            if sub
            else self.settings.service.default_station
        )
        first = strongest(matched)
        incident = Incident(
            id=incident_id,
            subscriber=subscriber,
            counterpart=counterpart,
            category=flag.category if flag else None,
            rule=first.id,
            severity="warning",
            status="open",
            opened_at=now,
            known=sub is not None,
            station=station,
        )
        self.state.adopt(incident)
        self._note(
            incident,
            now,
            "opened",
            SYSTEM,
            texts.opened(sub is not None),
            changes,
        )
        if sub is None:
            self._alert(
                incident,
                now,
                "unknown_subscriber",
                texts.unknown_subscriber(self.settings.service.default_station),
                changes,
            )
        changes.mark(incident, "opened")
        return incident

    def _fire(
        self,
        incident: Incident,
        call: Call,
        fresh: list[RuleSettings],
        now: float,
        changes: Changes,
    ) -> None:
        for rule in fresh:
            call.rules.append(rule.id)
            self._note(
                incident,
                now,
                "rule_fired",
                SYSTEM,
                texts.rule_fired(self.settings.rule_name(rule.id), rule.severity),
                changes,
            )
        best = strongest(fresh)
        if SEVERITY_RANK[best.severity] > SEVERITY_RANK[incident.severity]:
            incident.severity = best.severity
            incident.rule = best.id
            if best.severity == "critical":
                incident.critical_at = now
                if incident.status == "open":
                    self._note(
                        incident,
                        now,
                        "callback_requested",
                        SYSTEM,
                        texts.callback_requested(
                            self.settings.callback.max_attempts, self.settings.callback.window_s
                        ),
                        changes,
                    )
        changes.mark(incident)

    # ---- operator actions ------------------------------------------------------------------

    def _open_incident_for(self, incident_id: str) -> Incident:
        incident = self.state.incidents.get(incident_id)
        if incident is None:
            if incident_id in self.state.known_incident_ids:
                raise InputError(f"incident {incident_id} is closed")
            raise InputError(f"unknown incident {incident_id}")
        if incident.status == "closed":
            raise InputError(f"incident {incident_id} is closed")
        return incident

    def _on_action(self, msg: Inbound, now: float, changes: Changes) -> None:
        incident = self._open_incident_for(msg.data.incident_id)
        who = f"operator/{msg.party}"
        # every entry the action leads to names it: the operator's console sees it applied
        changes.action_id = msg.id
        if isinstance(msg.data, OperatorCallback):
            self._on_callback(incident, msg.data.result, who, now, changes)
        elif isinstance(msg.data, OperatorClose):
            self._note(
                incident,
                now,
                "operator_close",
                who,
                texts.operator_close(msg.data.outcome, msg.data.note),
                changes,
            )
            self._close(incident, msg.data.outcome, now, who, changes, note=msg.data.note)
        elif isinstance(msg.data, OperatorAcknowledge):
            self._on_acknowledge(incident, msg.data.alerts, who, now, changes)
        else:
            self._on_escalate(incident, who, now, changes)

    def _on_acknowledge(
        self, incident: Incident, alerts: Sequence[str], who: str, now: float, changes: Changes
    ) -> None:
        """An operator takes the incident's dead ends on by hand: the consoles stop sounding
        their alarm. Only the dead ends the incident has can be acknowledged (what the
        operator saw); a dead end that comes later sounds again."""
        unknown = [a for a in alerts if a not in incident.alerts]
        if unknown:
            raise InputError(
                f"incident {incident.id} has no alert {', '.join(unknown)}: its alerts are "
                + (", ".join(incident.alerts) or "none")
            )
        new = [a for a in dict.fromkeys(alerts) if a not in incident.acknowledged]
        if not new:
            self._note(
                incident,
                now,
                "acknowledge_ignored",
                who,
                texts.ACKNOWLEDGE_IGNORED,
                changes,
                repeatable=True,
            )
            return
        incident.acknowledged.extend(new)
        self._note(
            incident,
            now,
            "acknowledged",
            who,
            texts.acknowledged(new),
            changes,
        )
        changes.mark(incident)

    def _on_callback(
        self, incident: Incident, result: str, who: str, now: float, changes: Changes
    ) -> None:
        counts = incident.severity == "critical" and incident.status == "open"
        if not counts:
            self._note(
                incident,
                now,
                "callback_result",
                who,
                texts.callback_not_counted(result, incident.status == "escalated"),
                changes,
                repeatable=True,
            )
            return
        if result in ("no_answer", "busy"):
            incident.callback_attempts += 1
            n, limit = incident.callback_attempts, self.settings.callback.max_attempts
            self._note(
                incident,
                now,
                "callback_result",
                who,
                texts.callback_counted(result, n, limit),
                changes,
            )
            changes.mark(incident)
            if n >= limit:
                self._escalate(incident, now, SYSTEM, texts.callbacks_failed(n), changes)
        elif result == "answered_safe":
            self._note(
                incident, now, "callback_result", who, texts.callback_result(result), changes
            )
            self._close(incident, "resolved_by_callback", now, who, changes)
        else:
            self._note(
                incident, now, "callback_result", who, texts.callback_result(result), changes
            )
            self._escalate(incident, now, who, texts.CALLBACK_AT_RISK, changes)

    def _on_escalate(self, incident: Incident, who: str, now: float, changes: Changes) -> None:
        if incident.status == "open":
            self._escalate(incident, now, who, texts.OPERATOR_ESCALATED, changes)
            return
        police = incident.slots.get("police")
        if not incident.known and police is None:
            self._note(
                incident, now, "escalate", who, texts.escalate_police(incident.station), changes
            )
            self._start_police(incident, now, changes)
            self._maybe_close(incident, now, changes)
            changes.mark(incident)
        else:
            self._note(
                incident,
                now,
                "escalate_ignored",
                who,
                texts.ESCALATE_IGNORED,
                changes,
                repeatable=True,
            )

    # ---- escalation and dispatch -----------------------------------------------------------

    def _escalate(
        self, incident: Incident, now: float, who: str, reason: str, changes: Changes
    ) -> None:
        incident.status = "escalated"
        incident.escalated_at = now
        self._note(incident, now, "escalated", who, texts.escalated(reason), changes)
        changes.mark(incident)
        sub = self.settings.subscribers.get(incident.subscriber)
        if sub is None:
            if who.startswith("operator/"):
                self._start_police(incident, now, changes)
            else:
                self._alert(
                    incident,
                    now,
                    "no_address",
                    texts.no_address(incident.station),
                    changes,
                )
            return
        estate = self.settings.estates[sub.estate]
        door = incident.slots["door"] = Slot("door", station=estate.station)
        guards = self.settings.guards_by_estate.get(estate.id, [])
        grid_workers = self.settings.grid_workers_by_grid.get(sub.grid, [])
        if guards:
            for worker in grid_workers:
                d = self._add_dispatch(incident, worker, "notice", "notified", now)
                changes.effects.append(Notified(incident.id, d.id, incident.next_id(d.id)))
                self._note(
                    incident,
                    now,
                    "notified",
                    SYSTEM,
                    texts.notified(self._unit_label(worker.id)),
                    changes,
                    d.id,
                )
            self._offer_group(
                incident, door, guards, self.settings.dispatch.guard_accept_s, now, changes
            )
        else:
            self._offer_group(
                incident, door, grid_workers, self.settings.dispatch.guard_accept_s, now, changes
            )
        if not self._pending(incident, "door"):
            self._fallback(incident, door, now, changes)
        self._start_police(incident, now, changes)

    def _start_police(self, incident: Incident, now: float, changes: Changes) -> None:
        slot = incident.slots["police"] = Slot("police", station=incident.station)
        self._next_patrol(incident, slot, now, changes)

    def _next_patrol(self, incident: Incident, slot: Slot, now: float, changes: Changes) -> None:
        for patrol in self.settings.police_by_station.get(slot.station, []):
            if self._offered_before(incident, patrol):
                continue
            if self._available(incident, patrol, now, changes):
                self._offer(
                    incident, slot, patrol, self.settings.dispatch.police_accept_s, now, changes
                )
                return
        self._quick_police(incident, slot, now, changes)

    def _fallback(self, incident: Incident, slot: Slot, now: float, changes: Changes) -> None:
        """The slot's offers are all gone (expired or declined) with nobody accepting."""
        if slot.stage == "primary" and slot.name == "police":
            self._next_patrol(incident, slot, now, changes)
        elif slot.stage == "primary":
            self._quick_police(incident, slot, now, changes)
        elif slot.stage == "quick_police":
            self._after_platforms(incident, slot, now, changes)

    def _quick_police(self, incident: Incident, slot: Slot, now: float, changes: Changes) -> None:
        slot.stage = "quick_police"
        platforms = [
            q
            for q in self.settings.quick_police_by_station.get(slot.station, [])
            if not self._offered_before(incident, q)
        ]
        self._offer_group(
            incident, slot, platforms, self.settings.dispatch.police_accept_s, now, changes
        )
        if not self._pending(incident, slot.name):
            self._after_platforms(incident, slot, now, changes)

    def _after_platforms(
        self, incident: Incident, slot: Slot, now: float, changes: Changes
    ) -> None:
        """The need has come to the quick-police platforms and has no offer of its own left.
        A platform is offered an incident once, so the other need may hold them (decisions.md
        12): one that accepted there goes to the resident and serves this need too; while
        some are still offered there, this need waits on them; else it is a dead end."""
        shared = [
            d
            for d in incident.dispatches.values()
            if d.role == "quick_police" and d.slot != slot.name
        ]
        taker = next((d for d in shared if d.status in ("accepted", "arrived", "reported")), None)
        slot.expires_at = None
        if taker is not None:
            slot.stage = "filled"
            self._note(
                incident,
                now,
                "served_by_other",
                SYSTEM,
                texts.served_by_other(slot.name, self._unit_label(taker.unit)),
                changes,
                taker.id,
            )
            changes.mark(incident)
        elif any(d.status == "offered" for d in shared):
            if slot.stage != "waiting":
                slot.stage = "waiting"
                self._note(
                    incident, now, "waiting", SYSTEM, texts.waiting_on_other(slot.name), changes
                )
                changes.mark(incident)
        else:
            self._exhausted(incident, slot, now, changes)

    def _settle_waiting(self, incident: Incident, now: float, changes: Changes) -> None:
        """A need waiting on the other's platforms follows what became of them."""
        for slot in list(incident.slots.values()):
            if slot.stage == "waiting" and incident.status == "escalated":
                self._after_platforms(incident, slot, now, changes)

    def _exhausted(self, incident: Incident, slot: Slot, now: float, changes: Changes) -> None:
        slot.stage = "exhausted"
        slot.expires_at = None
        self._alert(incident, now, f"{slot.name}_exhausted", texts.exhausted(slot.name), changes)

    def _offer_group(
        self,
        incident: Incident,
        slot: Slot,
        units: Iterable[Unit],
        accept_s: float,
        now: float,
        changes: Changes,
    ) -> None:
        for unit in units:
            if not self._offered_before(incident, unit) and self._available(
                incident, unit, now, changes
            ):
                self._offer(incident, slot, unit, accept_s, now, changes)

    def _offer(
        self,
        incident: Incident,
        slot: Slot,
        unit: Unit,
        accept_s: float,
        now: float,
        changes: Changes,
    ) -> None:
        d = self._add_dispatch(incident, unit, slot.name, "offered", now)
        d.expires_at = slot.expires_at = now + accept_s
        changes.effects.append(Offered(incident.id, d.id, incident.next_id(d.id)))
        self._note(
            incident,
            now,
            "offered",
            SYSTEM,
            texts.offered(self._unit_label(unit.id), accept_s),
            changes,
            d.id,
        )

    def _add_dispatch(
        self,
        incident: Incident,
        unit: Unit,
        slot: SlotName,
        status: DispatchStatus,
        now: float,
    ) -> Dispatch:
        d = Dispatch(
            id=dispatch_id(incident.id, unit.id),
            unit=unit.id,
            role=unit.kind,
            slot=slot,
            status=status,
            offered_at=now,
        )
        incident.dispatches[d.id] = d
        return d

    def _available(self, incident: Incident, unit: Unit, now: float, changes: Changes) -> bool:
        """Offline or busy units get no offer; the skip is written on the incident's timeline."""
        offline = self.state.presence.get(unit.id) == "offline"
        if not offline and unit.id not in self.state.busy:
            return True
        label = self._unit_label(unit.id)
        self._note(incident, now, "skipped", SYSTEM, texts.skipped(label, offline), changes)
        return False

    # ---- unit replies ----------------------------------------------------------------------

    def _on_reply(self, msg: Inbound, now: float, changes: Changes) -> None:
        named: str = msg.data.dispatch_id
        incident_id, unit_id = dispatch_parts(named)
        if unit_id != msg.party:
            raise ReplyRefused(
                f"reply on the topic of unit {msg.party} names dispatch {named} of unit {unit_id}",
                "not_your_dispatch",
                texts.NOT_YOUR_DISPATCH,
            )
        incident = self.state.incidents.get(incident_id)
        if incident is None:
            if incident_id in self.state.known_incident_ids:
                raise ReplyRefused(
                    f"incident {incident_id} is closed", "incident_closed", texts.INCIDENT_CLOSED
                )
            raise ReplyRefused(
                f"unknown dispatch {named} (no incident {incident_id})",
                "unknown_dispatch",
                texts.UNKNOWN_DISPATCH,
            )
        d = incident.dispatches.get(named)
        if d is None:
            raise ReplyRefused(
                f"unknown dispatch {named}", "unknown_dispatch", texts.UNKNOWN_DISPATCH
            )
        if incident.status == "closed":
            raise ReplyRefused(
                f"incident {incident_id} is closed", "incident_closed", texts.INCIDENT_CLOSED
            )
        verb = msg.verb
        self._check_order(d, verb)
        # the answer to the press comes first, before anything the reply causes
        text = texts.APPLIED_TEXT[verb]
        if isinstance(msg.data, UnitReported):
            text = text.format(outcome=texts.OUTCOME_TEXT[msg.data.outcome])
        changes.effects.append(Answered(msg.party, msg.source, msg.id, named, verb, text))
        label = self._unit_label(d.unit)
        slot = incident.slots.get(d.slot)
        if verb == "accepted":
            d.status, d.accepted_at = "accepted", now
            self.state.busy[d.unit] = d.id
            self._note(incident, now, "accepted", d.unit, texts.accepted(label), changes, d.id)
            if slot is not None:
                slot.stage, slot.expires_at = "filled", None
                for other in self._slot_dispatches(incident, d.slot, ("offered",)):
                    other.status, other.ended_at, other.reason = "cancelled", now, "taken"
                    changes.effects.append(
                        StoodDown(incident.id, other.id, incident.next_id(other.id))
                    )
                    self._note(
                        incident,
                        now,
                        "cancelled",
                        SYSTEM,
                        texts.taken_from(self._unit_label(other.unit), label),
                        changes,
                        other.id,
                    )
        elif verb == "declined":
            d.status, d.ended_at = "declined", now
            self._note(incident, now, "declined", d.unit, texts.declined(label), changes, d.id)
            if slot is not None and not self._pending(incident, slot.name):
                slot.expires_at = None
                self._fallback(incident, slot, now, changes)
        elif verb == "arrived":
            d.status, d.arrived_at = "arrived", now
            self._note(incident, now, "arrived", d.unit, texts.arrived(label), changes, d.id)
            least = self.settings.dispatch.min_arrive_s
            if d.accepted_at is not None and now - d.accepted_at < least:
                # too soon to have got there: a press ahead of the walk, or a lost radio
                # saying what report_without_arrival would have caught
                self._alert_again(
                    incident,
                    now,
                    "arrival_too_soon",
                    texts.arrival_too_soon(label, now - d.accepted_at, least),
                    changes,
                )
        else:
            assert isinstance(msg.data, UnitReported)
            unarrived = d.status == "accepted"
            d.status, d.reported_at, d.outcome = "reported", now, msg.data.outcome
            self.state.busy.pop(d.unit, None)
            self._note(
                incident,
                now,
                "reported",
                d.unit,
                texts.reported(label, msg.data.outcome),
                changes,
                d.id,
            )
            if unarrived:
                # SPEC §5 lets a report follow the acceptance; nobody said they were at the
                # door, though: a press missed, or a lost radio standing the others down
                self._alert_again(
                    incident,
                    now,
                    "report_without_arrival",
                    texts.report_without_arrival(label, msg.data.outcome),
                    changes,
                )
        self._settle_waiting(incident, now, changes)
        self._maybe_close(incident, now, changes)
        changes.mark(incident)

    @staticmethod
    def _check_order(d: Dispatch, verb: str) -> None:
        """A unit's replies go accepted or declined, then arrived, then reported."""
        allowed = {
            "accepted": ("offered",),
            "declined": ("offered",),
            "arrived": ("accepted",),
            "reported": ("accepted", "arrived"),
        }[verb]
        if d.status in allowed:
            return
        if d.status == "notified":
            raise ReplyRefused(
                f"dispatch {d.id} is a notice and expects no reply",
                "no_reply_expected",
                texts.NO_REPLY_EXPECTED,
            )
        taken = d.reason == "taken"
        code, text = ("taken", texts.TAKEN) if taken else ("expired", texts.EXPIRED)
        if d.status in ("expired", "cancelled") and verb in ("accepted", "declined"):
            why = "was taken by another unit" if taken else f"has {d.status}"
            raise ReplyRefused(f"{verb} too late: the offer {d.id} {why}", code, text)
        reason = f"{verb} out of order: dispatch {d.id} is {d.status}"
        if d.status in ("expired", "cancelled"):
            raise ReplyRefused(reason, code, text)
        text = (
            texts.DONE_TEXT if d.status == "reported" else texts.OUT_OF_ORDER_TEXT[(d.status, verb)]
        )
        raise ReplyRefused(reason, "out_of_order", text)

    def refusal_receipt(self, msg: Inbound, exc: Exception, now: float) -> Publish:
        """The receipt of a reply the workflow refused (or failed on: ``exc`` is then not an
        ``InputError``), for the speaking unit."""
        if isinstance(exc, ReplyRefused):
            code, text = exc.code, exc.text
        else:
            code, text = (
                texts.INVALID_REPLY if isinstance(exc, InputError) else texts.INTERNAL_ERROR
            )
        return self.messages.receipt(
            msg.party,
            msg.source,
            msg.id,
            msg.data.dispatch_id,
            msg.verb,
            now,
            self.state.clock_origin,
            text=texts.REFUSED_PREFIX + text,
            code=code,
            reason=text,
        )

    # ---- presence --------------------------------------------------------------------------

    def _on_status(self, msg: Inbound, now: float, changes: Changes) -> None:
        assert isinstance(msg.data, UnitStatus)
        if self.state.presence.get(msg.party) == msg.data.state:
            return  # what the dispatcher knew already: nothing to write or log
        self.state.presence[msg.party] = msg.data.state
        changes.effects.append(PresenceSeen(msg.party, msg.data.state, now))

    # ---- closing ---------------------------------------------------------------------------

    def _maybe_close(self, incident: Incident, now: float, changes: Changes) -> None:
        """Close once every accepted dispatch has reported and no offer is pending.

        An incident that nobody has accepted is not closed by this rule: it stays escalated
        with an alert on the console, so a resident nobody reached is never silently closed.
        """
        if incident.status != "escalated":
            return
        reports = [d.outcome for d in incident.dispatches.values() if d.status == "reported"]
        if not reports:
            return
        if any(d.status in AWAITING_REPLY for d in incident.dispatches.values()):
            return
        outcome = next(
            (REPORT_TO_OUTCOME[o] for o in CLOSE_OUTCOMES if o in reports), "unreachable"
        )
        self._close(incident, outcome, now, SYSTEM, changes)

    def _close(
        self,
        incident: Incident,
        outcome: str,
        now: float,
        who: str,
        changes: Changes,
        note: str | None = None,
    ) -> None:
        for d in incident.dispatches.values():
            if d.status in AWAITING_REPLY:
                d.status, d.ended_at, d.reason = "cancelled", now, "closed"
                self.state.busy.pop(d.unit, None)
                changes.effects.append(StoodDown(incident.id, d.id, incident.next_id(d.id)))
                self._note(
                    incident,
                    now,
                    "cancelled",
                    SYSTEM,
                    texts.stood_down(self._unit_label(d.unit)),
                    changes,
                    d.id,
                )
            elif d.status == "notified":
                changes.effects.append(
                    Notified(incident.id, d.id, incident.next_id(d.id), closing=True)
                )
        for slot in incident.slots.values():
            slot.expires_at = None
        incident.status, incident.outcome, incident.closed_at = "closed", outcome, now
        incident.note, incident.closed_by = note, who
        del self.state.open_by_subscriber[incident.subscriber]
        self._note(incident, now, "closed", who, texts.closed(outcome), changes)
        changes.mark(incident, "closed")

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _offered_before(incident: Incident, unit: Unit) -> bool:
        """A unit is never offered the same incident twice (a notice counts as offered)."""
        return dispatch_id(incident.id, unit.id) in incident.dispatches

    def _pending(self, incident: Incident, slot: str) -> bool:
        return any(d.slot == slot and d.status == "offered" for d in incident.dispatches.values())

    @staticmethod
    def _slot_dispatches(
        incident: Incident, slot: str, statuses: tuple[str, ...]
    ) -> list[Dispatch]:
        return [d for d in incident.dispatches.values() if d.slot == slot and d.status in statuses]

    def _unit_label(self, unit_id: str) -> str:
        return texts.unit_label(self.settings.unit_name(unit_id), unit_id)

    def _note(
        self,
        incident: Incident,
        now: float,
        kind: str,
        by: str,
        text: str,
        changes: Changes,
        dispatch_id: str | None = None,
        repeatable: bool = False,
    ) -> None:
        """Record a timeline entry. A ``repeatable`` one changes nothing (another call
        joining, an action that does not count): once the timeline holds ``MAX_TIMELINE``
        entries these are no longer recorded one by one, and one entry says so, so that no
        party can grow an incident, and the messages that carry it, without bound."""
        if repeatable and len(incident.timeline) >= MAX_TIMELINE:
            if any(e.kind == TIMELINE_FULL for e in reversed(incident.timeline)):
                return
            kind, by, text, dispatch_id = (
                TIMELINE_FULL,
                SYSTEM,
                texts.timeline_full(MAX_TIMELINE),
                None,
            )
        entry = TimelineEntry(
            at=now,
            kind=kind,
            by=by,
            text=text,
            dispatch_id=dispatch_id,
            action_id=changes.action_id,
        )
        incident.timeline.append(entry)
        changes.effects.append(Noted(incident.id, entry))
        if changes.action_id is not None:
            # an operator's action is answered at once, also one that changes nothing: the
            # console that sent it learns it was recorded from its entry (decisions.md 97)
            changes.mark(incident)

    def _alert(
        self, incident: Incident, now: float, code: str, text: str, changes: Changes
    ) -> None:
        """A dead end: tell the operators, on the incident and on the timeline."""
        if code not in incident.alerts:
            incident.alerts.append(code)
        self._note(incident, now, "alert", SYSTEM, text, changes)
        changes.mark(incident)

    def _alert_again(
        self, incident: Incident, now: float, code: str, text: str, changes: Changes
    ) -> None:
        """A dead end of one unit that may come again for another: an operator who took on
        the earlier one has not seen this one, so it sounds again."""
        if code in incident.acknowledged:
            incident.acknowledged.remove(code)
        self._alert(incident, now, code, text, changes)
