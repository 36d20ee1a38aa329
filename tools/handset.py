"""A terminal handset for a guard's radio, a patrol's or a grid worker's app.

It keeps a persistent session (its client id is its unit id, which is also its broker
username) so offers published while it was out of coverage arrive when it comes back;
announces itself with a retained ``online`` on its ``status`` topic, with ``offline`` as
its will; shows each message as the radio or app would; drops duplicates by CloudEvent
``(source, id)``; and replies with single keys (1 accept, 2 decline, 3 arrived, 4 report,
then the outcome) or by itself after set delays.

A key never fails or waits for the network: each reply is queued and kept until its
receipt arrives from the dispatcher; one made while cut off, lost with its connection, or
acknowledged by the broker but not yet answered, goes out (the same event) over the next
connection, in order (decisions.md 52, 62). Receipts, the link and the seconds left to
accept an offer are shown in Chinese; the handset's own log never goes to the screen.

Two offers can be open at once (two residents of one estate in the same minutes): every
prompt, countdown and echoed reply names the address it is about, a second offer is
announced with the count, and [0] switches the keys between them (decisions.md 96).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiomqtt
import structlog

from adapters.mqtt import (
    Backoff,
    BrokerURL,
    messages_until,
    node_of,
    open_client,
    publish_acknowledged,
)
from dispatcher.errors import BrokerError
from dispatcher.inbound import cloudevent
from dispatcher.outbound import Topics
from dispatcher.settings import Settings, Unit
from dispatcher.texts import OUTCOME_TEXT, SEVERITY_TEXT

# a reply as the guard's screen echoes it once the broker has it
PRESSED = {"accepted": "接受", "declined": "拒绝", "arrived": "已到达", "reported": "反馈结果"}

log = structlog.get_logger("handset")

OUTCOME_KEYS = {"d": "dissuaded", "n": "not_home", "l": "loss", "f": "false_alarm"}
VERB_KEYS = {"1": "accepted", "2": "declined", "3": "arrived", "4": "reported"}
SWITCH_KEY = "0"  # with several offers open: the keys act on the next one
GOODBYE_S = 5.0  # at a clean exit, how long replies still queued may take to leave
COUNTDOWN_EVERY_S = 10.0  # how often the seconds left to accept a pending offer are shown
RECEIPT = "cn.antifraud.reply.receipt"
LINK_UP = "📶 已连接"
LINK_DOWN = "⚠ 连接中断，正在重连…"
KEYS_HELP = "    [1] 接受  [2] 拒绝  [3] 已到达  [4] 反馈结果"
OUTCOME_HELP = "    结果：[d] 已劝阻 [n] 无人在家 [l] 已被骗 [f] 误报"
# a report with no arrival before it alerts the operators (decisions.md 112): say so, and
# let [3] still say the arrival first
NOT_ARRIVED_HINT = "    ⚠ 尚未报到达：已到门口请先按3，再选结果；未上门就反馈，调度台会来电核实"


def offer_place(data: dict[str, Any], estate_address: str | None = None) -> str:
    """Where an offer sends the unit, in a few words: who and which door. A radio's offer
    names the resident's honorific and address (the unit's own estate's street, which every
    offer of a guard repeats, left out), a police app's carries the incident's resident."""
    address, who = data.get("address"), data.get("honorific")
    if not address:
        sub = (data.get("incident") or {}).get("subscriber") or {}
        address, who = sub.get("address"), sub.get("display_name")
    if not address:
        return str(data.get("incident_id") or data.get("dispatch_id") or "?")
    address = str(address)
    if estate_address and address.startswith(estate_address + " "):
        address = address[len(estate_address) + 1 :]
    return f"{who} {address}" if who else address


@dataclass(frozen=True)
class Step:
    """Reply ``verb`` ``after_s`` clock seconds after the offer arrived."""

    verb: str
    after_s: float
    outcome: str | None = None


def auto_script(
    accept_after: float | None,
    arrive_after: float | None,
    report_after: float | None,
    outcome: str,
    decline: bool = False,
) -> list[Step]:
    """Accept (or decline), arrive and report, each delay counted from the previous step."""
    if decline:
        return [Step("declined", accept_after or 0.0)]
    steps, at = [], 0.0
    if accept_after is not None:
        at += accept_after
        steps.append(Step("accepted", at))
        if arrive_after is not None:
            at += arrive_after
            steps.append(Step("arrived", at))
        if report_after is not None:
            at += report_after
            steps.append(Step("reported", at, outcome))
    return steps


def unit_event(unit: str, type_: str, data: dict[str, Any]) -> bytes:
    """A message from a unit's handset, with a fresh id."""
    event = cloudevent(
        f"{unit}-{uuid.uuid4().hex[:16]}",
        f"unit/{unit}",
        type_,
        data,
        subject=data.get("dispatch_id", unit),
    )
    return json.dumps(event, ensure_ascii=False).encode("utf-8")


def epoch(stamp: object) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp, or None."""
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(
            stamp.replace("Z", "+00:00").replace("z", "+00:00")
        ).timestamp()
    except ValueError:
        return None


def _seconds(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def render(unit: Unit, event: dict[str, Any]) -> list[str]:
    """What the radio screen (guard, grid worker) or the app (police) shows for a message."""
    data = event.get("data", {})
    kind = event.get("type", "").rsplit(".", 1)[-1]
    radio = unit.kind in ("guard", "grid_worker")
    icon = "📻" if radio else "📱"
    head = f"{icon} {unit.id} {unit.name}"
    if kind == "offered" and radio:
        return [
            f"{head} ◀ 派单 {data.get('dispatch_id')}",
            f"    {data.get('text')}",
            KEYS_HELP,
        ]
    if kind == "offered":
        inc = data.get("incident", {})
        sub = inc.get("subscriber", {})
        who = (
            f"{sub.get('name', '?')}（{sub.get('display_name', '')}）"
            if sub.get("known", True)
            else "未登记用户"
        )
        return [
            f"{head} ◀ 出警单 {data.get('dispatch_id')}",
            f"    居民 {who} {sub.get('msisdn', '')}  {sub.get('address', '地址不详')}",
            f"    涉诈号码 {inc.get('counterpart')}（{inc.get('category_label') or '未分类'}）"
            f"  风险 {SEVERITY_TEXT.get(inc.get('severity'), inc.get('severity'))} / "
            f"{inc.get('rule_label') or inc.get('rule')}  通话{_seconds(inc.get('duration_s'))}秒",
            KEYS_HELP,
        ]
    if kind in ("cancelled", "notice"):
        return [f"{head} ◀ {data.get('text')}"]
    if event.get("type") == RECEIPT:
        mark = "✔" if data.get("status") == "applied" else "✖"
        return [f"{head} ◀ {mark} {data.get('text')}"]
    return [f"{head} ◀ {event.get('type')}"]


class Handset:
    def __init__(
        self,
        settings: Settings,
        unit_id: str,
        broker: BrokerURL,
        script: list[Step] | None = None,
        speed: float = 1.0,
        show: Callable[[str], None] = print,
    ) -> None:
        self.unit = settings.units[unit_id]
        self.broker = broker
        self.topics = Topics(settings.service.prefix)
        self.script = script
        self.speed = speed
        self.show = show
        self.status_topic = self.topics.unit_status(unit_id)
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.received: list[dict[str, Any]] = []
        # dispatches offered to this unit and not yet over for it (stood down, declined or
        # reported), oldest first: the keys act on the one chosen with [0], else the newest
        self._open: list[str] = []
        self._chosen: str | None = None
        self._place: dict[str, str] = {}  # dispatch id -> where it sends the unit
        estate = settings.estates.get(self.unit.estate) if self.unit.estate else None
        self._estate_address = estate.address if estate is not None else None
        self._outcome_for: str | None = None  # [4] pressed: the dispatch its outcome reports
        self._seen: deque[tuple[str, str]] = deque(maxlen=1000)
        self._tasks: set[asyncio.Task[None]] = set()
        # replies to send over the next connection, oldest first: (id, topic, payload, label)
        self._unsent: deque[tuple[str, str, bytes, str]] = deque()
        # replies the broker acknowledged whose receipt has not come yet, by id, in order:
        # sent again after a reconnect
        self._unanswered: dict[str, tuple[str, str, bytes, str]] = {}
        self._answered: set[str] = set()  # dispatches accepted or declined from this handset
        self._arrived: set[str] = set()  # dispatches whose arrival was keyed on this handset
        self._answered_replies: deque[str] = deque(maxlen=1000)  # replies with a receipt
        self._changed = asyncio.Event()  # a reply queued or acknowledged, or the sender ended

    @property
    def current(self) -> str | None:
        """The dispatch the keys act on: the one chosen with [0] while it is open, else the
        newest one still open for this unit."""
        if self._chosen in self._open:
            return self._chosen
        return self._open[-1] if self._open else None

    def place(self, dispatch_id: str | None) -> str:
        """Where the dispatch sends the unit, as its offer said."""
        return self._place.get(str(dispatch_id), str(dispatch_id))

    def _close(self, dispatch_id: object) -> None:
        if dispatch_id == self._outcome_for:
            self._outcome_for = None
            self.show(f"    结果未发送：此单已结束，无需再报（{self.place(str(dispatch_id))}）")
        was_current = dispatch_id == self.current
        if dispatch_id in self._open:
            self._open.remove(str(dispatch_id))
            if was_current and self._open:  # the keys move on: say to which
                self._show_current()

    def _show_current(self) -> None:
        """The offer the keys act on, with （第i/n张，按0切换） while more than one is open."""
        current = self.current
        position = ""
        if len(self._open) > 1 and current is not None:
            position = f"（第{self._open.index(current) + 1}/{len(self._open)}张，按0切换）"
        self.show(f"    当前出警单：{self.place(current)}{position}")

    # ---- connection ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff(cap=10.0)
        link_shown = False  # the link's state last shown: up (True) or down
        while not stop.is_set():
            will = aiomqtt.Will(
                self.status_topic,
                unit_event(self.unit.id, "cn.antifraud.unit.status", {"state": "offline"}),
                qos=1,
                retain=True,
            )
            try:
                async with open_client(
                    self.broker, self.unit.id, persistent=True, will=will
                ) as client:
                    await client.subscribe(self.topics.dispatches(self.unit.id), qos=1)
                    await self._say(client, "online")
                    self.client = client
                    self.connected.set()
                    self.show(LINK_UP)
                    log.info("handset_connected", unit=self.unit.id, broker=node_of(client))
                    link_shown = True
                    backoff.reset()
                    self._resend_unanswered()
                    sender = asyncio.create_task(self._send(client))
                    sender.add_done_callback(lambda _: self._changed.set())
                    try:
                        await self._receive(client, stop)
                        if stop.is_set():  # a clean goodbye: the replies, then offline
                            await self._sent_all(sender)
                            await self._say(client, "offline")
                    finally:
                        sender.cancel()
                        with contextlib.suppress(asyncio.CancelledError, BrokerError):
                            await sender
            except BrokerError as exc:
                log.warning("handset_disconnected", unit=self.unit.id, error=str(exc))
            finally:
                self.client = None
                self.connected.clear()
            if not stop.is_set():
                if link_shown:
                    self.show(LINK_DOWN)
                    link_shown = False
                await asyncio.sleep(backoff.next_delay())
        for task in self._tasks:
            task.cancel()
        if self._unsent:
            for _id, _topic, _payload, label in self._unsent:
                self.show(f"    ⚠ 未能发出：{label.strip()}")
            log.warning("handset_replies_unsent", unit=self.unit.id, count=len(self._unsent))

    async def _say(self, client: aiomqtt.Client, state: str) -> None:
        """Announce this unit's presence, retained (``BrokerError`` as soon as the connection
        is lost: the next attempt starts at once, not after a 10 s timeout)."""
        status = unit_event(self.unit.id, "cn.antifraud.unit.status", {"state": state})
        await publish_acknowledged(client, [(self.status_topic, status, 1, True)])

    async def _receive(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        async for message in messages_until(client, stop):
            self.on_message(message)

    def on_message(self, message: aiomqtt.Message) -> None:
        try:
            event = json.loads(bytes(message.payload))
        except (TypeError, ValueError):
            return
        key = (str(event.get("source")), str(event.get("id")))
        if key in self._seen:
            return  # a redelivery: already shown and handled
        self._seen.append(key)
        self.received.append(event)
        data = event.get("data", {})
        lines = render(self.unit, event)
        if event.get("type") in (RECEIPT, "cn.antifraud.dispatch.cancelled"):
            named = str(data.get("dispatch_id"))
            if named in self._place:  # which of the offers it is about
                lines[-1] += f" · {self._place[named]}"
        for line in lines:
            self.show(line)
        if event.get("type") == RECEIPT:
            self._receipt(data)
        if event.get("type") == "cn.antifraud.dispatch.cancelled":
            self._close(data.get("dispatch_id"))  # a key pressed now must not act on it
        if event.get("type") == "cn.antifraud.dispatch.offered":
            dispatch_id = str(data.get("dispatch_id"))
            if dispatch_id not in self._open:
                self._place[dispatch_id] = offer_place(data, self._estate_address)
                self._open.append(dispatch_id)
                self._chosen = None  # the keys act on the newest offer, as the screen says
                if len(self._open) > 1:
                    self.show(
                        f"    ⚠ 共有{len(self._open)}张出警单：按键作用于最新一张"
                        f"（{self.place(dispatch_id)}），按0切换"
                    )
                self._count_down(dispatch_id, event)
            if self.script:
                task = asyncio.create_task(self._play(dispatch_id, self.script))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _receipt(self, data: dict[str, Any]) -> None:
        """The dispatcher has the reply: it is never sent again. A refused accept or
        decline leaves the dispatch as the dispatcher has it (an offer taken by another,
        closed, or expired is over for this unit)."""
        reply_id = str(data.get("reply_id"))
        self._unanswered.pop(reply_id, None)
        for entry in list(self._unsent):
            if entry[0] == reply_id:  # also one being sent: if it is lost, it stays lost
                self._unsent.remove(entry)
        self._answered_replies.append(reply_id)
        if data.get("status") == "refused" and data.get("code") in (
            "incident_closed",
            "taken",
            "expired",
            "not_your_dispatch",
            "unknown_dispatch",
        ):
            self._close(data.get("dispatch_id"))
        self._changed.set()

    def _resend_unanswered(self) -> None:
        """Replies the broker took whose receipt never came go again, first, in order."""
        queued = {entry[0] for entry in self._unsent}
        again = [entry for rid, entry in self._unanswered.items() if rid not in queued]
        self._unanswered.clear()
        self._unsent.extendleft(reversed(again))
        if again:
            self._changed.set()

    def _count_down(self, dispatch_id: str, offer: dict[str, Any]) -> None:
        """Show the seconds left to accept the offer, counted from its ``expires_at``,
        until it is answered, stood down or over."""
        data = offer.get("data") or {}
        expires, sent = epoch(data.get("expires_at")), epoch(offer.get("time"))
        if expires is None:
            return
        # on the dispatcher's own clock (which a demo speeds up), from when it sent the
        # offer; on a real clock also no later than the wall clock says, for an offer
        # delivered late
        left = expires - sent if sent is not None else expires - time.time()
        if self.speed == 1.0:
            left = min(left, expires - time.time())
        left = max(left, 0.0)
        task = asyncio.get_running_loop().create_task(self._tick(dispatch_id, left))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pending(self, dispatch_id: str) -> bool:
        return dispatch_id in self._open and dispatch_id not in self._answered

    async def _tick(self, dispatch_id: str, left: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + left / self.speed
        while self._pending(dispatch_id):
            remaining = round((deadline - loop.time()) * self.speed)
            where = self.place(dispatch_id)
            if remaining <= 0:
                self.show(f"    ⌛ 接警时限已过：{where}")
                return
            keys = (
                "按1接受，按2拒绝"
                if dispatch_id == self.current
                else "先按0切换到此单，再按1接受或按2拒绝"
            )
            self.show(f"    ⏳ {where}：请在{remaining}秒内接警（{keys}）")
            step = min(COUNTDOWN_EVERY_S, float(remaining)) / self.speed
            await asyncio.sleep(step)

    # ---- replies ---------------------------------------------------------------------------

    async def reply(self, dispatch_id: str, verb: str, outcome: str | None = None) -> None:
        """Send a reply. It is kept until the broker has acknowledged it: made while the
        connection is down, or lost with it, it goes out over the next connection, with the
        same CloudEvent id (the dispatcher handles a repeat once). Replies leave in the order
        they were made; each is shown once the broker has it."""
        data: dict[str, Any] = {"dispatch_id": dispatch_id}
        if outcome:
            data["outcome"] = outcome
        said = PRESSED.get(verb, verb) + (
            f"：{OUTCOME_TEXT.get(outcome, outcome)}" if outcome else ""
        )
        icon = "📻" if self.unit.channel == "radio" else "📱"
        label = f"{icon} {self.unit.id} ▶ {said} · {self.place(dispatch_id)}"
        payload = unit_event(self.unit.id, f"cn.antifraud.unit.{verb}", data)
        reply_id = json.loads(payload)["id"]
        self._unsent.append((reply_id, self.topics.replies(self.unit.id), payload, label))
        self._changed.set()
        if not self.connected.is_set():
            where = self.place(dispatch_id)
            self.show(f"    {PRESSED.get(verb, verb)}：未连接，恢复连接后自动发送 · {where}")
        if verb in ("accepted", "declined"):
            self._answered.add(dispatch_id)
        if verb in ("declined", "reported"):
            self._close(dispatch_id)

    async def _send(self, client: aiomqtt.Client) -> None:
        """Send the queued replies over this connection, in order, each dropped from the queue
        only once the broker has acknowledged it. Raises ``BrokerError`` when the connection
        is lost: what is left waits for the next one."""
        while True:
            if not self._unsent:
                self._changed.clear()
                await self._changed.wait()
                continue
            entry = self._unsent[0]
            reply_id, topic, payload, label = entry
            await publish_acknowledged(client, [(topic, payload, 1, False)])
            if self._unsent and self._unsent[0] is entry:
                self._unsent.popleft()
            if reply_id not in self._answered_replies:
                self._unanswered[reply_id] = entry  # until its receipt comes
            self._changed.set()
            self.show(label)

    async def _sent_all(self, sender: asyncio.Task[None]) -> None:
        """Wait, at most ``GOODBYE_S``, until every queued reply is acknowledged (or the
        sender has ended: the connection is gone)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GOODBYE_S):
                while self._unsent and not sender.done():
                    self._changed.clear()
                    await self._changed.wait()

    async def _play(self, dispatch_id: str, script: list[Step]) -> None:
        start = asyncio.get_running_loop().time()
        for step in script:
            delay = start + step.after_s / self.speed - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.reply(dispatch_id, step.verb, step.outcome)

    async def keys(self, stop: asyncio.Event) -> None:
        """Single-key replies from the terminal: 1 accept, 2 decline, 3 arrived, 4 report, q."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str] = asyncio.Queue()
        fd = sys.stdin.fileno()
        restore = None
        if sys.stdin.isatty():
            import termios
            import tty

            restore = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        loop.add_reader(fd, lambda: queue.put_nowait(sys.stdin.read(1)))
        try:
            while not stop.is_set():
                key = (await queue.get()).strip().lower()
                if key == "q":
                    stop.set()
                elif key:
                    await self.on_key(key)
        finally:
            loop.remove_reader(fd)
            if restore is not None:
                import termios

                termios.tcsetattr(fd, termios.TCSADRAIN, restore)

    async def on_key(self, key: str) -> None:
        if self._outcome_for is not None:
            # the outcome reports the dispatch [4] was pressed for, whatever came since
            outcome = OUTCOME_KEYS.get(key)
            if key == "3" and self._outcome_for not in self._arrived:
                await self._arrive(self._outcome_for)
                self._ask_outcome(self._outcome_for)  # arrived now: the choices alone
                return
            if outcome is None:
                self._ask_outcome(self._outcome_for)
                return
            target, self._outcome_for = self._outcome_for, None
            await self.reply(target, "reported", outcome)
            return
        current = self.current
        if key == SWITCH_KEY and len(self._open) > 1 and current is not None:
            self._chosen = self._open[(self._open.index(current) + 1) % len(self._open)]
            self._show_current()
            return
        verb = VERB_KEYS.get(key)
        if verb is None:
            more = "  [0] 切换" if len(self._open) > 1 else ""
            self.show(f"{KEYS_HELP}{more}  [q] 退出")
            return
        if current is None:  # nothing offered, or it was stood down meanwhile
            self.show("    当前没有待处理的出警单  [q] 退出")
            return
        if verb == "reported":
            self._outcome_for = current
            self._ask_outcome(current)
            return
        if verb == "arrived":
            await self._arrive(current)
            return
        await self.reply(current, verb)

    async def _arrive(self, dispatch_id: str) -> None:
        self._arrived.add(dispatch_id)
        await self.reply(dispatch_id, "arrived")

    def _ask_outcome(self, dispatch_id: str) -> None:
        if dispatch_id not in self._arrived:
            self.show(NOT_ARRIVED_HINT)
        self.show(f"{OUTCOME_HELP}（{self.place(dispatch_id)}）")


async def run_handset(handset: Handset, interactive: bool) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(handset.run(stop))]
    if interactive:
        tasks.append(asyncio.create_task(handset.keys(stop)))
    try:
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
