"""The runtime around the workflow: validation, dedupe, timers, persistence and logging.

One runtime serves both modes. The caller owns the clock: live service passes the system time,
replay passes each recorded ``at``. ``advance(now)`` fires every timer due at or before ``now``
(at its own due time) and ``handle(topic, payload, now)`` processes one inbound message. Both
only queue writes; ``commit()`` makes them durable, and only then may the caller acknowledge the
messages as processed.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import re
from typing import Any

import orjson
import structlog

from dispatcher import logs
from dispatcher.errors import InputError
from dispatcher.inbound import (
    DISPATCH_ID_RE,
    Inbound,
    TopicRouter,
    event_epoch,
    parse_routed,
)
from dispatcher.limits import RateLimiter
from dispatcher.model import (
    AWAITING_REPLY,
    ContactSeen,
    Effect,
    IncidentCopies,
    IncidentSaved,
    Noted,
    PresenceSeen,
    Publish,
    State,
    TimerFired,
    TimerSet,
    dispatch_parts,
    incident_of_call,
)
from dispatcher.outbound import RECEIPT, REPLY_VERBS, receipt_id
from dispatcher.ports import Journal, KeptInbound, Publisher
from dispatcher.settings import Settings
from dispatcher.texts import INVALID_REPLY, REFUSED_PREFIX
from dispatcher.workflow import Workflow, timer_order
from rules.bounded import forget_while, trim
from rules.contacts import ContactLog
from rules.engine import RuleSet

log = structlog.get_logger("dispatcher")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SEP = "\x1f"  # between the channel and the source of a stored processed pair
UNROUTED = "#unrouted"  # the channel of input on a topic that names nobody
RAW_SOURCE = "#raw"  # dedupe key source for input whose (source, id) cannot be read
DEADLETTER_PAYLOAD_CHARS = 1024
PRUNE_EVERY_S = 3600.0  # how often old dedupe pairs and contacts are deleted from the store
RESEND = "#resend"  # the suffix of a channel's budget for receipts sent again to duplicates
REPLY_TYPES = {f"cn.antifraud.unit.{verb}": verb for verb in REPLY_VERBS}


def _clip(text: str, limit: int = DEADLETTER_PAYLOAD_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _payload_text(payload: bytes | Any) -> str:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload[: DEADLETTER_PAYLOAD_CHARS * 4]).decode("utf-8", "replace")
    try:
        return safe_text(json.dumps(payload, ensure_ascii=False, sort_keys=True))
    except (TypeError, ValueError, RecursionError):
        return safe_text(repr(payload))


def _before(state: State, msg: Inbound) -> IncidentCopies | None:
    """Copies of the incidents a step on ``msg`` may change, taken before it, so that a step
    failing half-way can be undone; None when there is nothing to copy (a call of a
    subscriber with no open incident: the one incident it may open is new)."""
    data = msg.data
    kind = msg.kind
    if kind == "calls":
        joined = state.call_incident.get(data.call_id)
        open_ = state.open_by_subscriber.get(data.subscriber)
        if joined is None and open_ is None:
            return None  # the clean-call path: as cheap as can be
        return state.snapshot({i for i in (joined, open_) if i is not None})
    if kind == "actions":
        return state.snapshot((data.incident_id,))
    if kind == "replies":
        return state.snapshot((dispatch_parts(data.dispatch_id)[0],))
    return None


def _undo(state: State, msg: Inbound, before: IncidentCopies | None) -> None:
    copies = list(before or ())
    if msg.kind == "calls":
        # the incident this call would have opened: a known id is never opened again, and
        # this one was not in memory before (its call would have been indexed to it)
        opened = incident_of_call(msg.data.call_id)
        if all(copy[0] != opened for copy in copies) and opened in state.incidents:
            copies.append((opened, None, False, None, 0))
    state.restore(copies)


def _event_of(payload: bytes | Any) -> Any:
    """The JSON value of a payload as the strict parser reads it, or None."""
    if isinstance(payload, bytes | bytearray):
        try:
            return orjson.loads(payload) if len(payload) <= 1 << 20 else None
        except orjson.JSONDecodeError:
            return None
    return payload


def _received_text(payload: bytes | Any) -> str:
    """A handled message's payload as text, whole: its bytes as received (read by the strict
    parser, so valid UTF-8), or a decoded payload as JSON."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload).decode("utf-8", "replace")
    try:
        return orjson.dumps(payload).decode()
    except TypeError:  # what orjson does not write (an integer beyond 64 bits)
        return safe_text(json.dumps(payload, ensure_ascii=False, default=repr))


def _readable_reply(payload: bytes | Any) -> tuple[str, str] | None:
    """(reply, dispatch id) of a reply refused unread as one, when both can be read: a
    reply type and a dispatch id of the form SPEC §4 gives; otherwise None."""
    event = _event_of(payload)
    if not isinstance(event, dict):
        return None
    verb, data = REPLY_TYPES.get(event.get("type")), event.get("data")  # type: ignore[arg-type]
    if verb is None or not isinstance(data, dict):
        return None
    named = data.get("dispatch_id")
    if not isinstance(named, str) or not DISPATCH_ID_RE.match(named):
        return None
    return verb, named


def _identity(topic: str, payload: bytes | Any) -> tuple[str, str]:
    """(source, id) of a payload if it has readable ones, else a digest of topic and bytes.

    Bytes are read with the same strict parser as the inbound path: text Python's own
    parser would take (lone surrogates, escaped or raw) has no readable (source, id), and
    none of it may reach the store or a log line."""
    event = _event_of(payload)
    if isinstance(event, dict):
        source, event_id = event.get("source"), event.get("id")
        if (
            isinstance(source, str)
            and isinstance(event_id, str)
            and 0 < len(source) <= 256
            and 0 < len(event_id) <= 256
            and _printable(source)
            and _printable(event_id)
        ):
            return source, event_id
    body = payload if isinstance(payload, bytes | bytearray) else _payload_text(payload).encode()
    digest = hashlib.sha256(safe_text(topic).encode() + b"\0" + bytes(body)).hexdigest()
    return RAW_SOURCE, digest


def _printable(text: str) -> bool:
    """Text fit for the store and the logs: valid UTF-8 (no lone surrogate), no control
    characters (which the dedupe keys use as separators)."""
    return _CONTROL.search(text) is None and _encodes(text)


def _encodes(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def safe_text(text: str) -> str:
    """``text`` as valid UTF-8 for the store and the logs: a lone surrogate (which Python
    strings may hold, from a recording or a lenient parser) is written as its escape."""
    if _encodes(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


RETAINED_INPUT = (
    "a retained message: only a unit's status may be kept by the broker; a kept call, action "
    "or reply is not live input (clear it with an empty retained message on its topic)"
)


class Runtime:
    def __init__(self, settings: Settings, store: Journal, *, outbox: bool = False) -> None:
        """``store``: the journal the runtime's writes go to (dispatcher/ports.py), the SQLite
        store in service. ``outbox``: outbound messages wait in the store for a publisher
        (live service); otherwise they count as published when committed (replay)."""
        self.settings = settings
        self.store = store
        self.router = TopicRouter(settings)
        rules = RuleSet(settings.rules)
        self.state = State(
            contacts=ContactLog(
                rules.contact_horizon_s,
                settings.limits.contacts_per_subscriber,
                settings.limits.max_contact_subscribers,
            )
        )
        self.workflow = Workflow(settings, self.state)
        self.messages = self.workflow.messages
        self.clock = 0.0
        self.meta: dict[str, str] = {}  # the store's meta, as loaded by start()
        self._timers: list[tuple[tuple[float, str, int, str], TimerSet]] = []
        self._scheduled: set[TimerSet] = set()
        # processed pairs by channel, each as "source\0id" -> time: plain strings keep these
        # large dicts out of the garbage collector's way (ids never contain control
        # characters). At most ``max_dedupe_entries`` in all, and past that the channel
        # holding the most forgets its oldest: one party's flood forgets its own pairs, not
        # everyone's (a radio at its budget would have filled a shared memory in 11 hours)
        self._seen: dict[str, dict[str, float]] = {}
        self._seen_count = 0
        # when each channel's oldest pair was made, as far as the sweep knows (never later
        # than it is), and the same as a heap: a sweep visits the channels that have pairs
        # to forget, not every channel there is (a wave's thousands of radios)
        self._seen_front: dict[str, float] = {}
        self._seen_fronts: list[tuple[float, str]] = []
        # pairs a store written before pairs were kept per channel holds, as "source\0id":
        # they count on every channel until they leave the dedupe window
        self._legacy_seen: dict[str, float] = {}
        # the receipt of each reply within the dedupe window, by its CloudEvent id, with
        # when it was made: a redelivered reply is answered with it again
        # receipt id -> (when, topic, the receipt as JSON in UTF-8): kept compact, a day of
        # them is many
        self._receipts: dict[str, tuple[float, str, bytes]] = {}
        self._expire_countdown = 0
        limits = settings.limits
        # every channel's budget, spent as its messages arrive, before they are read. The
        # call topic's is wide (a scam wave, a backlog after an outage) and it is over its
        # limit only when it is over on both clocks: as its messages arrive, and as its
        # source stamped them (a backlog delivered at once arrives fast but was sent at an
        # ordinary pace; a source whose clock stands still stamps fast but arrives at an
        # ordinary pace). A unit's or an operator's is narrow, on arrival alone: nobody but
        # that party may write on its topic, and nobody presses buttons that fast.
        self.call_limiter = RateLimiter(
            limits.rate_per_source, limits.burst_per_source, limits.max_sources
        )
        self.sent_limiter = RateLimiter(
            limits.rate_per_source, limits.burst_per_source, limits.max_sources
        )
        self.party_limiter = RateLimiter(
            limits.rate_per_party, limits.burst_per_party, limits.max_sources
        )
        self.subscriber_limiter = RateLimiter(
            limits.rate_per_subscriber, limits.burst_per_subscriber, limits.max_sources
        )
        # refusals a channel may have stored and dead-lettered; past that they are counted
        self.refusals = RateLimiter(
            limits.refusals_per_period / limits.refusal_period_s,
            limits.refusals_per_period,
            limits.max_sources,
        )
        # channel -> [suppressed count, since, a topic of it] until its summary is written
        self._suppressed: dict[str, list[Any]] = {}
        self._suppressed_changed = False  # kept in the store's meta with each commit
        self._committing: asyncio.Future[None] | None = None
        self._pruned_at = 0.0
        self.outbox = outbox
        # called with the outbound messages of each commit that wait for a publisher, as soon
        # as the commit is written (a crash of the process can no longer lose it), before the
        # commit is flushed to the disk and its inbound messages may be acknowledged
        self.on_written: Publisher | None = None
        self.counts = {
            "handled": 0,
            "rejected": 0,
            "suppressed": 0,
            "duplicates": 0,
            "timers": 0,
            "published": 0,
        }

    # ---- start-up --------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the state from the store: open incidents, dispatches, timers, dedupe pairs."""
        limits = self.settings.limits
        snap = await self.store.load(
            None,
            self.settings.incident.retention_s,
            limits.dedupe_window_s,
            self.state.contacts.horizon_s,
        )
        self.clock = float(snap.meta.get("clock", "0"))
        self.state.clock_origin = float(snap.meta.get("clock_origin", "0"))
        for incident in snap.incidents:
            self.state.adopt(incident)
            for timer in self.workflow.timers_for(incident):
                self._schedule(timer)
        self.state.known_incident_ids |= snap.incident_ids
        for subscriber, at, counterpart in snap.contacts:
            self.state.contacts.record(subscriber, counterpart, at)
        self.state.presence.update(snap.presence)
        for stored, event_id, at in snap.inbound:
            if SEP in stored:
                channel, _, source = stored.partition(SEP)
                self._remember_pair(channel, f"{source}\0{event_id}", at)
            else:
                self._legacy_seen[f"{stored}\0{event_id}"] = at
        for at, topic, payload in snap.receipts:
            self._remember(Publish(topic, RECEIPT, orjson.loads(payload)), at)
        self.meta = snap.meta
        self._suppressed = json.loads(snap.meta.get("suppressed", "{}"))
        log.info(
            "state_loaded",
            incidents=len(snap.incidents),
            timers=len(self._timers),
            dedupe=self._seen_count + len(self._legacy_seen),
            clock=self.clock,
        )
        for incident in snap.incidents:
            for d in incident.dispatches.values():
                if d.unit not in self.settings.units and d.status in AWAITING_REPLY:
                    log.warning(
                        "unit_not_configured",
                        incident_id=incident.id,
                        dispatch_id=d.id,
                        status=d.status,
                        hint="the unit is no longer in units.csv: its replies are refused; put "
                        "it back until the incident is closed, or close the incident by hand",
                    )

    def set_clock_origin(self, origin: float) -> None:
        self.state.clock_origin = origin
        self.store.set_meta("clock_origin", repr(origin))

    # ---- time ------------------------------------------------------------------------------

    def advance(self, now: float, late_after: float | None = None) -> None:
        """Fire, in order, every timer due at or before ``now``; each fires at its due time
        (a replay's virtual clock), or, with ``late_after``, at ``now`` when it is more than
        that late: the live service was not running when it fell due (a restart, a takeover),
        and what it starts — an escalation's offers, a fallback's — must run its full time
        from when it is actually sent, not from a moment already past (decisions.md 91)."""
        while self._timers and self._timers[0][1].due <= now:
            _, timer = heapq.heappop(self._timers)
            self._scheduled.discard(timer)
            at = timer.due
            if late_after is not None and now - at > late_after:
                log.warning(
                    "timer_late",
                    incident_id=timer.key[0],
                    timer=timer.key[1],
                    due=at,
                    late_s=round(now - at, 3),
                    hint="fired now: what it starts runs its full time from now",
                )
                at = now
            self.clock = max(self.clock, at)
            self.counts["timers"] += 1
            before = self.state.snapshot((timer.key[0],))
            try:
                effects = self.workflow.step(TimerFired(timer.key, timer.due), at)
            except Exception:  # a defect: a timer that fails must not stop every other one
                self.state.restore(before)
                log.exception(
                    "internal_error", incident_id=timer.key[0], timer=timer.key[1], due=timer.due
                )
                continue
            self._apply(effects, at)
        if now > self.clock:
            self.clock = now
        if self._suppressed:
            self.report_suppressed(self.clock)
        self._expire_countdown -= 1
        if self._expire_countdown <= 0:
            self._expire_countdown = 1024
            self._expire_seen(self.clock)
            self.state.contacts.prune(self.clock)

    def next_due(self) -> float | None:
        """When ``advance`` next has something to do: the earliest timer, or the summary of
        a channel's suppressed messages (``report_suppressed``), which is said when its
        period is over even if nothing more arrives."""
        due = self._timers[0][1].due if self._timers else None
        if self._suppressed:
            period = self.settings.limits.refusal_period_s
            summary = min(pending[1] for pending in self._suppressed.values()) + period
            due = summary if due is None else min(due, summary)
        return due

    def _schedule(self, timer: TimerSet) -> None:
        if timer not in self._scheduled:
            self._scheduled.add(timer)
            heapq.heappush(self._timers, (timer_order(timer), timer))

    # ---- inbound ---------------------------------------------------------------------------

    def handle(
        self,
        topic: str,
        payload: bytes | Any,
        now: float,
        strict: bool = False,
        retained: bool = False,
    ) -> None:
        """Process one inbound message received at ``now``. Never raises for bad input.

        The topic names who speaks (its channel: the region's calls, an operator's actions, a
        unit's replies or status); each channel has a budget, spent before anything of the
        message is read, so that one party's flood costs little and touches nobody else's
        messages, and (source, id) pairs are remembered per channel. ``strict``: a decoded
        ``payload`` came from the strict parser (a recording's reader says so). ``retained``:
        the broker delivered a message it kept (decisions.md 94)."""
        try:
            kind, party, channel = self.router.channel(topic)
        except InputError as exc:
            channel = UNROUTED
            if not self.party_limiter.allow(channel, now):
                self._over_rate(channel, topic, payload, now)
                return
            self._refuse(channel, topic, exc.reason, payload, now, None)
            return
        limiter = self.call_limiter if kind == "calls" else self.party_limiter
        over = not limiter.allow(channel, now)
        if over and kind != "calls":
            self._over_rate(channel, topic, payload, now)
            return
        if retained and kind != "status":
            # only presence is kept by the broker on purpose: a kept call, action or reply
            # is sent again on every subscription, long after it was meant (a reply left by
            # a lost radio would accept an offer made days later): refused, never answered
            if over:
                self._over_rate(channel, topic, payload, now)
            else:
                self._refuse(channel, topic, RETAINED_INPUT, payload, now, None)
            return
        try:
            msg = parse_routed(kind, party, topic, payload, self.settings, strict)
        except InputError as exc:
            if over:
                self._over_rate(channel, topic, payload, now)
                return
            self._refuse(
                channel, topic, exc.reason, payload, now, party if kind == "replies" else None
            )
            return
        key = (msg.source, msg.id)
        if kind == "calls" and (
            not self.sent_limiter.allow(channel, self._sent_at(msg, now)) and over
        ):
            # the call topic only: a source's backlog delivered at once after an outage
            # arrives fast but was stamped at an ordinary pace, and only the source itself
            # may write on its topic
            self._over_rate(channel, topic, payload, now)
            return
        if kind == "calls" and not self.subscriber_limiter.allow(msg.data.subscriber, now):
            # one resident's calls cost more the longer the incident they join: a flood of
            # them would slow everyone's messages
            limits = self.settings.limits
            self._over_rate(
                channel,
                topic,
                payload,
                now,
                f"rate limit: calls of {msg.data.subscriber} arrived faster than "
                f"{limits.rate_per_subscriber:g}/s (bursts of {limits.burst_per_subscriber})",
            )
            return
        if self._duplicate(channel, key, now):
            return
        before = _before(self.state, msg)
        try:
            effects = self.workflow.step(msg, now)
        except InputError as exc:
            _undo(self.state, msg, before)
            self._reject(channel, topic, exc.reason, payload, key, now, msg, exc)
            return
        except Exception as exc:  # a defect must not stop the service: dead-letter and go on
            # whatever the step changed before it failed is undone: the state must stay what
            # was announced and stored, not half of a step nobody heard about
            _undo(self.state, msg, before)
            log.exception("internal_error", topic=_clip(topic, 200), source=key[0], event_id=key[1])
            reason = f"internal error: {type(exc).__name__}: {exc}"
            self._reject(channel, topic, reason, payload, key, now, msg, exc)
            return
        self.counts["handled"] += 1
        self._apply(effects, now)
        self._keep(msg, topic, payload, effects, now)

    def _keep(
        self, msg: Inbound, topic: str, payload: bytes | Any, effects: list[Effect], now: float
    ) -> None:
        """Keep ``payload``, as received, against each incident its step changed; a flagged
        contact that changed none is kept against its subscriber (a later incident's rules
        count it): what ``antifraud export`` writes back as a recording."""
        touched: list[str | None] = [e.incident.id for e in effects if isinstance(e, IncidentSaved)]
        contact = any(isinstance(e, ContactSeen) for e in effects)
        if not touched and not contact:
            return
        call = msg.kind == "calls"
        subscriber, call_id = (msg.data.subscriber, msg.data.call_id) if call else (None, None)
        topic, text = safe_text(topic), _received_text(payload)
        for incident_id in touched or [None]:
            self.store.keep_inbound(
                KeptInbound(incident_id, subscriber, call_id, contact, now, topic, text)
            )

    def _over_rate(
        self, channel: str, topic: str, payload: bytes | Any, now: float, reason: str = ""
    ) -> None:
        """A message over its channel's rate: refused unread, and not remembered as seen (it
        may be sent again later)."""
        call = channel.startswith("calls/")
        limits = self.settings.limits
        rate = limits.rate_per_source if call else limits.rate_per_party
        burst = limits.burst_per_source if call else limits.burst_per_party
        if self._past_refusal_budget(channel, topic, now):
            return
        reason = (
            reason
            or f"rate limit: {channel} sent more than {rate:g} messages/s (bursts of {burst})"
        )
        self._dead_letter(channel, topic, reason, payload, _identity(topic, payload), now)

    def _refuse(
        self,
        channel: str,
        topic: str,
        reason: str,
        payload: bytes | Any,
        now: float,
        unit: str | None,
    ) -> None:
        """Refuse input that is not a valid message, once per channel and content. On a
        unit's replies topic (``unit``), a reply whose (source, id), type and dispatch id can
        be read is answered with an ``invalid`` receipt; anything less gets none."""
        if self._past_refusal_budget(channel, topic, now):
            return
        key = _identity(topic, payload)
        if self._duplicate(channel, key, now):
            return
        readable = None if unit is None or key[0] == RAW_SOURCE else _readable_reply(payload)
        if unit is not None and readable is not None:
            code, text = INVALID_REPLY
            receipt = self.messages.receipt(
                unit,
                key[0],
                key[1],
                readable[1],
                readable[0],
                now,
                self.state.clock_origin,
                text=REFUSED_PREFIX + text,
                code=code,
                reason=text,
            )
            self._apply([receipt], now)
        self._dead_letter(channel, topic, reason, payload, key, now)

    def _sent_at(self, msg: Inbound, now: float) -> float:
        """When the source says it sent ``msg`` (its CloudEvent ``time``), never later than its
        arrival: the rate limit's second clock."""
        if msg.time is not None:
            sent = event_epoch(msg.time)
            if sent is not None and sent - self.state.clock_origin < now:
                return sent - self.state.clock_origin
        return now

    def _duplicate(self, channel: str, key: tuple[str, str], now: float) -> bool:
        pair = f"{key[0]}\0{key[1]}"
        seen = self._seen.get(channel)
        at = seen.get(pair) if seen is not None else None
        if at is None and self._legacy_seen:
            at = self._legacy_seen.get(pair)
        # remembered for the dedupe window exactly, whenever the memory is next swept
        # (``_expire_seen``): a run resumed from the store decides as one straight through
        if at is not None and now - at > self.settings.limits.dedupe_window_s:
            at = None
            if seen is not None and seen.pop(pair, None) is not None:
                self._seen_count -= 1  # new again: it goes to the back, in arrival order
        if at is not None:
            self.counts["duplicates"] += 1
            log.info("duplicate_dropped", channel=channel, source=key[0], event_id=key[1])
            if channel.startswith("replies/"):
                self._answer_again(channel, key, now)
            return True
        self._remember_pair(channel, pair, now)
        self.store.add_inbound(f"{channel}{SEP}{key[0]}", key[1], now)
        return False

    def _remember_pair(self, channel: str, pair: str, at: float) -> None:
        """Keep a processed pair; past the cap, the channel holding the most forgets its
        oldest (a 1,024th of the cap at once, ``trim``)."""
        seen = self._seen.get(channel)
        if seen is None:
            seen = self._seen[channel] = {}
            self._seen_front[channel] = at
            heapq.heappush(self._seen_fronts, (at, channel))
        if pair not in seen:
            self._seen_count += 1
        seen[pair] = at
        cap = self.settings.limits.max_dedupe_entries
        if self._seen_count > cap:
            fullest = max(self._seen, key=lambda c: len(self._seen[c]))
            held = self._seen[fullest]
            before = len(held)
            trim(held, max(len(held) - (self._seen_count - cap), 0))
            self._seen_count -= before - len(held)
            if not held:
                del self._seen[fullest]
                del self._seen_front[fullest]

    def _answer_again(self, channel: str, key: tuple[str, str], now: float) -> None:
        """A redelivered reply gets its receipt again: the same event, queued anew in the
        outbox, within a budget of its channel's own (a radio repeating one reply
        endlessly must not make the dispatcher repeat itself endlessly)."""
        found = self._receipts.get(receipt_id(channel.partition("/")[2], *key))
        if found is None or not self.refusals.allow(channel + RESEND, now):
            return
        self.counts["published"] += 1
        _, topic, text = found
        self.store.add_outbox(
            now, Publish(topic, RECEIPT, orjson.loads(text)), sent=not self.outbox
        )

    def _remember(self, receipt: Publish, at: float) -> None:
        assert receipt.payload is not None
        receipts = self._receipts
        # copied: orjson's bytes keep a 4 KiB buffer whatever their length; UTF-8, not text:
        # a receipt's Chinese words would make Python hold all of its text two bytes a letter
        receipts[receipt.payload["id"]] = (
            at,
            receipt.topic,
            bytes(memoryview(orjson.dumps(receipt.payload))),
        )
        trim(receipts, self.settings.limits.max_dedupe_entries)

    def _expire_seen(self, now: float) -> None:
        """Forget pairs (and receipts) older than the dedupe window (the dicts are in
        arrival order)."""
        horizon = now - self.settings.limits.dedupe_window_s
        # at a cost that grows with what is forgotten (rules/bounded.py): a flood's pairs
        # leaving at once, one by one from the front, took 1.5 s for 100,000
        fronts, heap = self._seen_front, self._seen_fronts
        while heap and heap[0][0] < horizon:
            at, channel = heapq.heappop(heap)
            if fronts.get(channel) != at:
                continue  # the channel was swept or emptied since: a later entry stands
            seen = self._seen[channel]
            before = len(seen)
            forget_while(seen, lambda at: at < horizon)
            self._seen_count -= before - len(seen)
            if seen:
                fronts[channel] = front = next(iter(seen.values()))
                heapq.heappush(heap, (front, channel))
            else:
                del self._seen[channel]
                del fronts[channel]
        forget_while(self._legacy_seen, lambda at: at < horizon)
        forget_while(self._receipts, lambda receipt: receipt[0] < horizon)

    def _past_refusal_budget(self, channel: str, topic: str, now: float) -> bool:
        """Whether the channel has spent its refusals for the period: this one is then
        counted (``_suppress``), not stored or dead-lettered."""
        if self.refusals.allow(channel, now):
            return False
        self._suppress(channel, topic, now)
        return True

    def _suppress(self, channel: str, topic: str, now: float) -> None:
        """A message over its channel's budget: counted, not read, stored or dead-lettered.
        What was suppressed is said once a period (``report_suppressed``)."""
        self.counts["suppressed"] += 1
        self._suppressed_changed = True
        pending = self._suppressed.get(channel)
        if pending is None:
            self._suppressed[channel] = [1, now, _clip(safe_text(topic), 200)]
            log.warning(
                "input_suppressed",
                channel=channel,
                topic=_clip(safe_text(topic), 200),
                hint="over its channel's budget: counted, not processed; a summary follows",
            )
        else:
            pending[0] += 1

    def report_suppressed(self, now: float, force: bool = False) -> None:
        """Once a refusal period has passed since a channel's first suppressed message: one
        log line and one ``rejected`` row with the count (the report shows it)."""
        period = self.settings.limits.refusal_period_s
        for channel, (count, since, topic) in list(self._suppressed.items()):
            if force or now - since >= period:
                del self._suppressed[channel]
                reason = (
                    f"over budget: {count} messages on this channel since {since:.3f} "
                    "were counted and not processed"
                )
                log.warning("input_suppressed_summary", channel=channel, count=count, since=since)
                self.store.add_rejected(now, topic, reason, "")
        self._suppressed_changed = True

    def _reject(
        self,
        channel: str,
        topic: str,
        reason: str,
        payload: bytes | Any,
        key: tuple[str, str],
        now: float,
        msg: Inbound | None = None,
        exc: Exception | None = None,
    ) -> None:
        """Refuse a message, within its channel's refusal budget: past it a channel's
        refusals are only counted, as a flood of bad input must not grow the store or the
        dead-letter topic. A reply refused within the budget is answered with a receipt
        (before its dead letter); past it, with nothing."""
        if self._past_refusal_budget(channel, topic, now):
            return
        if msg is not None and exc is not None and msg.kind == "replies":
            self._apply([self.workflow.refusal_receipt(msg, exc, now)], now)
        self._dead_letter(channel, topic, reason, payload, key, now)

    def _dead_letter(
        self,
        channel: str,
        topic: str,
        reason: str,
        payload: bytes | Any,
        key: tuple[str, str],
        now: float,
    ) -> None:
        self.counts["rejected"] += 1
        topic, reason = safe_text(topic), safe_text(reason)
        text = _clip(_payload_text(payload))
        source, event_id = (None, None) if key[0] == RAW_SOURCE else key
        log.warning(
            "input_rejected",
            topic=_clip(topic, 200),
            reason=reason,
            source=source,
            event_id=event_id,
        )
        self.store.add_rejected(now, topic, reason, text)
        dead = self.messages.rejected(
            topic,
            reason,
            source,
            event_id,
            text,
            f"{channel}/{key[0]}/{key[1]}",
            now,
            self.state.clock_origin,
        )
        self._apply([dead], now)

    # ---- effects ---------------------------------------------------------------------------

    def _apply(self, effects: list[Effect], now: float) -> None:
        store = self.store
        noting = logs.info_enabled()
        for effect in effects:
            if isinstance(effect, Publish):
                self.counts["published"] += 1
                store.add_outbox(now, effect, sent=not self.outbox)
                if effect.type == RECEIPT:
                    self._remember(effect, now)
            elif isinstance(effect, Noted):
                entry = effect.entry
                store.add_timeline(effect.incident_id, entry)
                if noting:
                    log.info(
                        entry.kind,
                        incident_id=effect.incident_id,
                        dispatch_id=entry.dispatch_id,
                        by=entry.by,
                        at=entry.at,
                        text=entry.text,
                    )
            elif isinstance(effect, IncidentSaved):
                store.save_incident(effect.incident, effect.doc)
            elif isinstance(effect, TimerSet):
                self._schedule(effect)
            elif isinstance(effect, ContactSeen):
                store.add_contact(effect.subscriber, effect.at, effect.counterpart)
            elif isinstance(effect, PresenceSeen):
                store.set_presence(effect.unit, effect.state, effect.at)
                log.info("presence", unit=effect.unit, state=effect.state, at=effect.at)

    async def commit(self, flush: bool = True, inline: bool = True) -> None:
        """Make everything handled so far durable, with the clock it was handled at (with
        ``flush`` false: written, safe from a crash of the process; ``store.flush()`` then
        says when it is safe from a power cut too). ``inline``: see ``Journal.commit``.

        A commit the store writes on the event loop is written from this call, with no
        pass of the loop in between. It needs no shield: the write itself waits for nothing
        (a cancelled wait for the store's write lock, before it, puts the batch back), and
        the flush after it is shared and shielded by the store. Any other commit runs as a
        task of its own, which a caller being cancelled never cancels half-way."""
        await self._before_commit()
        if self.store.writes_inline(inline):
            await self.store.commit(self.on_written, flush, inline)
            return
        self._committing = asyncio.ensure_future(self._commit_and_hand_over(flush, inline))
        await self.wait_committed()

    async def commit_soon(self, flush: bool = True, inline: bool = True) -> None:
        """Start committing what is queued and return; handling goes on meanwhile.

        Commits stay in order: this first waits for the previous one. Only what
        ``wait_committed`` has seen through may be acknowledged as processed.
        """
        await self._before_commit()
        self._committing = asyncio.ensure_future(self._commit_and_hand_over(flush, inline))

    async def _before_commit(self) -> None:
        """Wait for the commit in flight; prune the store when due; note the clock."""
        await self.wait_committed()
        if self.clock - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = self.clock
            retention = self.settings.incident.retention_s
            horizon = self.state.contacts.horizon_s
            await self.store.prune(
                self.clock - self.settings.limits.dedupe_window_s,
                self.clock - horizon,
                # an incident is exportable while it is retained, with the flagged contacts
                # before its opening that its rules counted (docs/operations.md)
                (self.clock - retention, self.clock - retention - horizon),
            )
        self.store.set_meta("clock", repr(self.clock))
        if self._suppressed_changed:
            self._suppressed_changed = False
            self.store.set_meta("suppressed", json.dumps(self._suppressed))

    async def _commit_and_hand_over(self, flush: bool, inline: bool) -> None:
        await self.store.commit(self.on_written, flush, inline)

    async def wait_committed(self) -> None:
        """Wait for the commit in flight. It is shielded: a caller being cancelled (a
        shutdown) never cancels a commit half-way; the next ``commit()`` waits for it."""
        task = self._committing
        if task is not None:
            await asyncio.shield(task)
            if self._committing is task:
                self._committing = None
