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
from collections.abc import Callable
from typing import Any

import structlog

from adapters.store import OutboxRow, Store
from dispatcher.errors import InputError
from dispatcher.inbound import Inbound, TopicRouter, event_epoch, parse_message
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
from dispatcher.settings import Settings
from dispatcher.workflow import Workflow, timer_order
from rules.contacts import ContactLog
from rules.engine import RuleSet

log = structlog.get_logger("dispatcher")

RAW_SOURCE = "#raw"  # dedupe key source for input whose (source, id) cannot be read
DEADLETTER_PAYLOAD_CHARS = 1024
PRUNE_EVERY_S = 3600.0  # how often old dedupe pairs and contacts are deleted from the store


def _clip(text: str, limit: int = DEADLETTER_PAYLOAD_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _payload_text(payload: bytes | Any) -> str:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload[: DEADLETTER_PAYLOAD_CHARS * 4]).decode("utf-8", "replace")
    try:
        return json.dumps(payload, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError):
        return repr(payload)


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
        if all(i != opened for i, _, _ in copies) and opened in state.incidents:
            copies.append((opened, None, False))
    state.restore(copies)


def _identity(topic: str, payload: bytes | Any) -> tuple[str, str]:
    """(source, id) of a payload if it has readable ones, else a digest of topic and bytes."""
    event = payload
    if isinstance(payload, bytes | bytearray) and len(payload) <= 1 << 20:
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):
            event = None
    if isinstance(event, dict):
        source, event_id = event.get("source"), event.get("id")
        if (
            isinstance(source, str)
            and isinstance(event_id, str)
            and source
            and event_id
            and len(source) <= 256
            and len(event_id) <= 256
        ):
            return source, event_id
    body = payload if isinstance(payload, bytes | bytearray) else _payload_text(payload).encode()
    digest = hashlib.sha256(topic.encode() + b"\0" + bytes(body)).hexdigest()
    return RAW_SOURCE, digest


class Runtime:
    def __init__(self, settings: Settings, store: Store, *, outbox: bool = False) -> None:
        """``outbox``: outbound messages wait in the store for a publisher (live service);
        otherwise they count as published when committed (replay)."""
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
        # processed (source, id) pairs as "source\0id" -> time: plain strings keep this large
        # dict out of the garbage collector's way (ids never contain control characters)
        self._seen: dict[str, float] = {}
        self._expire_countdown = 0
        limits = settings.limits
        # a source is over its rate limit only when it is over on both clocks: as its
        # messages arrive, and as it stamped them (a backlog delivered at once after an
        # outage arrives fast but was sent at an ordinary pace; a source whose clock stands
        # still stamps fast but arrives at an ordinary pace)
        self.limiter = RateLimiter(
            limits.rate_per_source, limits.burst_per_source, limits.max_sources
        )
        self.sent_limiter = RateLimiter(
            limits.rate_per_source, limits.burst_per_source, limits.max_sources
        )
        self._committing: asyncio.Future[None] | None = None
        self._pruned_at = 0.0
        self.outbox = outbox
        # called with the outbound messages of each commit that wait for a publisher, as soon
        # as the commit is written (a crash of the process can no longer lose it), before the
        # commit is flushed to the disk and its inbound messages may be acknowledged
        self.on_written: Callable[[list[OutboxRow]], None] | None = None
        self.counts = {"handled": 0, "rejected": 0, "duplicates": 0, "timers": 0, "published": 0}

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
        for source, event_id, at in snap.inbound:
            self._seen[f"{source}\0{event_id}"] = at
        self.meta = snap.meta
        log.info(
            "state_loaded",
            incidents=len(snap.incidents),
            timers=len(self._timers),
            dedupe=len(self._seen),
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

    def advance(self, now: float) -> None:
        """Fire, in order, every timer due at or before ``now``; each fires at its due time."""
        while self._timers and self._timers[0][1].due <= now:
            _, timer = heapq.heappop(self._timers)
            self._scheduled.discard(timer)
            self.clock = max(self.clock, timer.due)
            self.counts["timers"] += 1
            before = self.state.snapshot((timer.key[0],))
            try:
                effects = self.workflow.step(TimerFired(timer.key, timer.due), timer.due)
            except Exception:  # a defect: a timer that fails must not stop every other one
                self.state.restore(before)
                log.exception(
                    "internal_error", incident_id=timer.key[0], timer=timer.key[1], due=timer.due
                )
                continue
            self._apply(effects, timer.due)
        if now > self.clock:
            self.clock = now
        self._expire_countdown -= 1
        if self._expire_countdown <= 0:
            self._expire_countdown = 1024
            self._expire_seen(self.clock)
            self.state.contacts.prune(self.clock)

    def next_due(self) -> float | None:
        return self._timers[0][1].due if self._timers else None

    def _schedule(self, timer: TimerSet) -> None:
        if timer not in self._scheduled:
            self._scheduled.add(timer)
            heapq.heappush(self._timers, (timer_order(timer), timer))

    # ---- inbound ---------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes | Any, now: float) -> None:
        """Process one inbound message received at ``now``. Never raises for bad input."""
        try:
            msg = parse_message(self.router, topic, payload, self.settings)
        except InputError as exc:
            key = _identity(topic, payload)
            if self._duplicate(key, now):
                return
            self._reject(topic, exc.reason, payload, key, now)
            return
        key = (msg.source, msg.id)
        arrived_ok = self.limiter.allow(msg.source, now)
        if not self.sent_limiter.allow(msg.source, self._sent_at(msg, now)) and not arrived_ok:
            # not remembered as seen: the sender may try the same message again later
            limits = self.settings.limits
            self._reject(
                topic,
                f"rate limit: source {msg.source!r} sent more than "
                f"{limits.rate_per_source:g} messages/s (bursts of "
                f"{limits.burst_per_source})",
                payload,
                key,
                now,
            )
            return
        if self._duplicate(key, now):
            return
        before = _before(self.state, msg)
        try:
            effects = self.workflow.step(msg, now)
        except InputError as exc:
            _undo(self.state, msg, before)
            self._reject(topic, exc.reason, payload, key, now)
            return
        except Exception as exc:  # a defect must not stop the service: dead-letter and go on
            # whatever the step changed before it failed is undone: the state must stay what
            # was announced and stored, not half of a step nobody heard about
            _undo(self.state, msg, before)
            log.exception("internal_error", topic=_clip(topic, 200), source=key[0], event_id=key[1])
            self._reject(topic, f"internal error: {type(exc).__name__}: {exc}", payload, key, now)
            return
        self.counts["handled"] += 1
        self._apply(effects, now)

    def _sent_at(self, msg: Inbound, now: float) -> float:
        """When the source says it sent ``msg`` (its CloudEvent ``time``), never later than its
        arrival: the rate limit's second clock."""
        if msg.time is not None:
            sent = event_epoch(msg.time)
            if sent is not None and sent - self.state.clock_origin < now:
                return sent - self.state.clock_origin
        return now

    def _duplicate(self, key: tuple[str, str], now: float) -> bool:
        seen_key = f"{key[0]}\0{key[1]}"
        if seen_key in self._seen:
            self.counts["duplicates"] += 1
            log.info("duplicate_dropped", source=key[0], event_id=key[1])
            return True
        self._seen[seen_key] = now
        if len(self._seen) > self.settings.limits.max_dedupe_entries:
            del self._seen[next(iter(self._seen))]  # under a flood: forget the oldest first
        self.store.add_inbound(key[0], key[1], now)
        return False

    def _expire_seen(self, now: float) -> None:
        """Forget pairs older than the dedupe window (the dict is in arrival order)."""
        horizon = now - self.settings.limits.dedupe_window_s
        seen = self._seen
        while seen:
            key = next(iter(seen))
            if seen[key] >= horizon:
                break
            del seen[key]

    def _reject(
        self, topic: str, reason: str, payload: bytes | Any, key: tuple[str, str], now: float
    ) -> None:
        self.counts["rejected"] += 1
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
            f"{key[0]}/{key[1]}",
            now,
            self.state.clock_origin,
        )
        self._apply([dead], now)

    # ---- effects ---------------------------------------------------------------------------

    def _apply(self, effects: list[Effect], now: float) -> None:
        store = self.store
        for effect in effects:
            if isinstance(effect, Publish):
                self.counts["published"] += 1
                store.add_outbox(now, effect, sent=not self.outbox)
            elif isinstance(effect, Noted):
                entry = effect.entry
                store.add_timeline(effect.incident_id, entry)
                log.info(
                    entry.kind,
                    incident_id=effect.incident_id,
                    dispatch_id=entry.dispatch_id,
                    by=entry.by,
                    at=entry.at,
                    text=entry.text,
                )
            elif isinstance(effect, IncidentSaved):
                store.save_incident(effect.incident)
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
        says when it is safe from a power cut too). ``inline``: see ``Store.commit``.

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
            await self.store.prune(
                self.clock - self.settings.limits.dedupe_window_s,
                self.clock - self.state.contacts.horizon_s,
            )
        self.store.set_meta("clock", repr(self.clock))

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
