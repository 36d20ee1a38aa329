"""``antifraud demo``: the seed case, live, on a real broker, faster than real time.

The demo starts a broker (Mosquitto when it is installed, else an embedded amqtt broker)
unless one is given, runs the dispatcher on a clock ``speed`` times faster than real time, and
brings the case's people to life from its recording:

- the **call-warning source** publishes the recorded call events at their pace;
- a **simulated operator** watches the operator console feed and, once an incident turns
  critical, calls back as recorded (the same results after the same delays);
- **simulated handsets** (every unit of the deployment, each with a persistent session and a
  retained ``online``) show what their radio or app shows and reply as the recorded unit did,
  after the same delays counted from the moment the offer arrives.

It prints one timeline a person can follow (console, radios, apps), then the final report,
and checks it against the recording's replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import aiomqtt

from adapters.broker import local_broker
from adapters.live import Clock, LiveService
from adapters.mqtt import BrokerURL, messages_until, open_client
from adapters.recording import Line, read_lines
from adapters.replay import replay
from adapters.report import build_report
from adapters.store import Store
from dispatcher.inbound import cloudevent, event_epoch
from dispatcher.outbound import Topics
from dispatcher.settings import Settings
from dispatcher.summary import render_summary
from dispatcher.texts import OUTCOME_TEXT
from tools.handset import Handset, Step

DEFAULT_RECORDING = (
    Path(__file__).resolve().parent.parent / "config" / "hengnan" / "recordings" / "chen_case.jsonl"
)


class Timeline:
    """Prints lines stamped with the demo clock (mm:ss since the case started), in the order
    things happened on the dispatcher's clock: each line is held ``HOLD_S`` so that a cause
    seen late (the console's copy of an escalation) is still printed before its effect seen
    early (a radio's offer)."""

    HOLD_S = 0.3

    def __init__(self, clock: Clock, out: TextIO) -> None:
        self.clock, self.out = clock, out
        self.origin = clock.now()
        # (at on the dispatcher's clock, rank, sequence, who, text, seen at, monotonic)
        self._held: list[tuple[float, int, int, str, str, float]] = []
        self._seq = 0
        self._release: asyncio.TimerHandle | None = None

    def say(self, who: str, text: str, at: float | None = None, rank: int = 1) -> None:
        """A line about what happened at ``at`` (default: now); at one moment, lower ranks
        (the dispatcher's own record) print before higher ones (what a radio showed)."""
        self._seq += 1
        when = self.clock.now() if at is None else at
        heapq.heappush(self._held, (when, rank, self._seq, who, text, time.monotonic()))
        with contextlib.suppress(RuntimeError):  # no loop: printed by flush()
            if self._release is None:
                self._release = asyncio.get_running_loop().call_later(self.HOLD_S, self._due)

    def _due(self) -> None:
        self._release = None
        horizon = time.monotonic() - self.HOLD_S
        while self._held and self._held[0][5] <= horizon:
            self._print(heapq.heappop(self._held))
        if self._held:
            self._release = asyncio.get_running_loop().call_later(self.HOLD_S / 3, self._due)

    def flush(self) -> None:
        """Print every line still held."""
        while self._held:
            self._print(heapq.heappop(self._held))

    def _print(self, item: tuple[float, int, int, str, str, float]) -> None:
        at, _rank, _seq, who, text, _seen = item
        minutes, seconds = divmod(max(0.0, at - self.origin), 60)
        self.out.write(f"[{int(minutes):02d}:{int(seconds):02d}] {who:<12} {text}\n")
        self.out.flush()

    def handset(self, line: str) -> None:
        self.say("", line) if line.startswith("    ") else self.say("handset", line)


def _scripts(
    lines: list[Line], expected: dict[str, Any]
) -> tuple[list[Line], dict[str, list[tuple[float, dict[str, Any]]]], dict[str, list[Step]]]:
    """Split a recording into call lines, the operator's script and each unit's script."""
    incidents = {i["id"]: i for i in expected["incidents"]}
    offered = {
        f"{i['id']}:{d['unit']}": d["offered_at"]
        for i in expected["incidents"]
        for d in i["dispatches"]
    }
    calls: list[Line] = []
    operator: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    units: dict[str, list[Step]] = {}
    for line in lines:
        payload = line.payload if isinstance(line.payload, dict) else {}
        data: dict[str, Any] = payload["data"] if isinstance(payload.get("data"), dict) else {}
        if "/events/" in line.topic:
            calls.append(line)
        elif "/operators/" in line.topic and data.get("incident_id") in incidents:
            inc = incidents[data["incident_id"]]
            start = inc["critical_at"] if inc["critical_at"] is not None else inc["opened_at"]
            operator.setdefault(inc["id"], []).append((line.at - start, payload))
        elif "/units/" in line.topic and data.get("dispatch_id") in offered:
            unit = line.topic.split("/")[-2]
            verb = str(payload.get("type", "")).rsplit(".", 1)[-1]
            units.setdefault(unit, []).append(
                Step(verb, line.at - offered[data["dispatch_id"]], data.get("outcome"))
            )
    return calls, operator, units


CALLBACK_TEXT = {
    "no_answer": "无人接听",
    "busy": "占线",
    "answered_safe": "接通，确认安全",
    "answered_at_risk": "接通，仍有风险",
}


def _pressed(payload: dict[str, Any]) -> str:
    """What the simulated operator pressed, as the console's buttons say it."""
    verb = str(payload["type"]).rsplit(".", 1)[-1]
    data = payload["data"]
    if verb == "callback":
        return f"按下：回拨结果 {CALLBACK_TEXT.get(data.get('result'), data.get('result'))}"
    if verb == "escalate":
        return "按下：立即上门"
    if verb == "close":
        return f"按下：结案 {OUTCOME_TEXT.get(data.get('outcome'), data.get('outcome'))}"
    return f"按下：{verb}"


OUTCOME_CODE = re.compile(r"（[a-z_]+）")


class Console:
    """The operator console feed, shown on the timeline, driving the simulated operator."""

    def __init__(
        self,
        settings: Settings,
        broker: BrokerURL,
        timeline: Timeline,
        script: dict[str, list[tuple[float, dict[str, Any]]]],
        speed: float,
    ) -> None:
        self.topics = Topics(settings.service.prefix)
        self.broker, self.timeline, self.script, self.speed = broker, timeline, script, speed
        self.shown: dict[str, int] = {}
        self.status: dict[str, str] = {}
        self.acting: set[str] = set()
        self.ready = asyncio.Event()
        self.all_closed = asyncio.Event()
        self.expected: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        async with open_client(self.broker, "demo-console-op-01") as client:
            await client.subscribe(self.topics.operators, qos=1)
            self.ready.set()
            async for message in messages_until(client, stop):
                self.on_incident(client, message)

    def on_incident(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        data = json.loads(bytes(message.payload))["data"]
        incident = data["incident_id"]
        self.status[incident] = data["status"]
        # each message carries the entries from timeline_from on; show each entry once
        start, shown = data["timeline_from"], self.shown.get(incident, 0)
        for entry in data["timeline"][max(shown - start, 0) :]:
            who = (
                "🖥 console"
                if entry["by"] == "dispatcher"
                else (
                    "👤 operator"
                    if entry["by"].startswith("operator/")
                    else "📞 call"
                    if entry["by"].startswith("+")
                    else f"  {entry['by']}"
                )
            )
            at = event_epoch(entry["at"]) if isinstance(entry["at"], str) else None
            text = OUTCOME_CODE.sub("", entry["text"])  # the code beside a word is for machines
            self.timeline.say(who, f"{incident}  {text}", at=at, rank=0)
        self.shown[incident] = max(shown, start + len(data["timeline"]))
        if self.expected and all(self.status.get(i) == "closed" for i in self.expected):
            self.all_closed.set()
        critical = data["severity"] == "critical" or data["status"] == "escalated"
        if critical and incident in self.script and incident not in self.acting:
            self.acting.add(incident)
            task = asyncio.create_task(self._act(client, self.script[incident]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _act(
        self, client: aiomqtt.Client, actions: list[tuple[float, dict[str, Any]]]
    ) -> None:
        start = time.monotonic()
        for delay, payload in actions:
            wait = start + delay / self.speed - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            pressed = self.timeline.clock.now()  # its effects come after it
            event = cloudevent(
                f"op-01-{uuid.uuid4().hex[:16]}",
                "console/op-01",
                payload["type"],
                payload["data"],
                subject=payload["data"].get("incident_id"),
            )
            await client.publish(
                self.topics.actions("op-01"),
                json.dumps(event, ensure_ascii=False).encode(),
                qos=1,
            )
            self.timeline.say(
                "👤 operator",
                f"{payload['data'].get('incident_id')}  {_pressed(payload)}",
                at=pressed,
                rank=0,
            )


async def _serve_console(
    settings: Settings, broker: BrokerURL, store: Path, port: int, folder: Path, out: TextIO
) -> Any:
    """The operator console beside the demo, with a one-off password for the first operator."""
    import secrets

    from aiohttp import web

    from adapters.console import Console as WebConsole
    from adapters.console import Users

    users = Users(folder / "console-users.json")
    password = secrets.token_urlsafe(9)
    operator = settings.access.operators[0] if settings.access.operators else "op-01"
    users.set_password(operator, password)
    console = WebConsole(settings, broker, store, users)
    runner = web.AppRunner(console.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.wait_for(console.connected.wait(), 10)
    out.write(
        f"operator console: http://127.0.0.1:{port}/  (log in as {operator}, password "
        f"{password}, valid for this demo only)\n"
    )
    return runner


_state = {"stopping": False}


def stopping() -> bool:
    """Whether the demo has begun to stop (its services, then its broker and files)."""
    return _state["stopping"]


async def run_demo(
    settings: Settings,
    recording: Path,
    broker_url: str | None,
    speed: float,
    out: TextIO,
    store_path: Path | None = None,
    console_port: int | None = None,
    linger_s: float = 0.0,
) -> int:
    lines = list(read_lines(recording))
    expected = await replay(recording, settings)
    calls, operator, scripts = _scripts(lines, expected)
    async with contextlib.AsyncExitStack() as stack:
        if broker_url is None:
            url, kind = await stack.enter_async_context(local_broker())
            out.write(f"broker: a private {kind} at {url}\n")
        else:
            url = broker_url
            out.write(f"broker: {url}\n")
        broker = BrokerURL.parse(url)
        if store_path is None:
            store_path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "demo.sqlite3"
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        clock = Clock(speed=speed)
        timeline = Timeline(clock, out)
        stop = asyncio.Event()
        service = LiveService(
            settings, broker, store_path, clock, client_id=f"antifraud-demo-{int(time.time())}"
        )
        console = Console(settings, broker, timeline, operator, speed)
        handsets = [
            Handset(settings, unit, broker, scripts.get(unit), speed, timeline.handset)
            for unit in settings.units
        ]
        tasks = [asyncio.create_task(service.run(stop)), asyncio.create_task(console.run(stop))]
        tasks += [asyncio.create_task(h.run(stop)) for h in handsets]
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    service.ready.wait(),
                    console.ready.wait(),
                    *(h.connected.wait() for h in handsets),
                ),
                20,
            )
            if console_port is not None:
                runner = await _serve_console(
                    settings, broker, store_path, console_port, folder, out
                )
                stack.push_async_callback(runner.cleanup)
                out.write("the case starts in 10 s: open the console now\n")
                await asyncio.sleep(10)
            out.write(
                f"dispatcher, operator console and {len(handsets)} handsets connected; "
                f"playing {recording.name} at {speed:g}x\n\n"
            )
            timeline.origin = clock.now()
            async with open_client(broker) as source:
                start = time.monotonic()
                for line in calls:
                    wait = start + line.at / speed - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    await source.publish(line.topic, json.dumps(line.payload).encode(), qos=1)
            console.expected = {i["id"] for i in expected["incidents"] if i["status"] == "closed"}
            if console.expected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        console.all_closed.wait(), (lines[-1].at - calls[-1].at) / speed + 15
                    )
            await asyncio.sleep(0.3)
            if linger_s:
                out.write(f"the console stays up {linger_s:g} s more\n")
                await asyncio.sleep(linger_s)
        finally:
            _state["stopping"] = True  # a stop asked again from here on would cut the cleanup
            # everything stops together, within 5 s: one by one, each of some twenty tasks
            # that did not see the stop in time would have added its own 5 s
            stop.set()
            _, late = await asyncio.wait(tasks, timeout=5)
            for task in late:
                task.cancel()
            await asyncio.wait(tasks, timeout=5)
        timeline.flush()
        async with Store(store_path) as store:
            report = await build_report(store, settings, base=timeline.origin)
    out.write("\n" + render_summary(report) + "\n")
    same = [(i["id"], i["status"], i["outcome"]) for i in report["incidents"]] == [
        (i["id"], i["status"], i["outcome"]) for i in expected["incidents"]
    ]
    out.write(
        (
            "\nthe live run ends as its replay does: "
            if same
            else "\nthe live run differs from its replay: "
        )
        + ", ".join(f"{i['id']} {i['status']} {i['outcome']}" for i in expected["incidents"])
        + "\n"
    )
    return 0 if same else 1
