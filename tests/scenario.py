"""Builds recordings line by line and replays them through the real dispatcher.

Tests read like the specification: a script of call events, operator actions and unit replies
goes in; the SPEC §6 report (plus the stored incident documents, for details the report does
not carry) comes out.
"""

from __future__ import annotations

import io
import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.replay import replay
from adapters.store import OUTBOX_PAYLOAD
from dispatcher import logs
from dispatcher.protocol import validate_outbound
from dispatcher.settings import Settings

PREFIX = "antifraud/v1"
CALLS = f"{PREFIX}/events/hengnan/calls"

# residents of the example deployment (config/hengnan/subscribers.csv)
CHEN = "+8613800000001"  # 春晖小区 (guards G-YJ-CH-01/02, grid worker W-YJ-07), PS-YJ
LIU = "+8613800000002"  # 渡口村, a village: no guards, grid worker W-YJ-12, PS-YJ
WANG = "+8613800000003"  # 锦华苑, vulnerable, guard G-YJ-JH-01, PS-YJ
LI = "+8613800000004"  # 星海花园 (guards G-ST-XH-01/02), PS-ST
ZHAO = "+8613800000005"  # 春晖小区, like Chen
STRANGER = "+8613999999999"  # not in the registry: unknown address
# flagged numbers (config/hengnan/flagged_numbers.csv)
IMPERSONATION = "+85251230001"
INVESTMENT = "+85251230002"
REFUND = "+8617100009999"
LOAN = "+8616500123456"  # matches the prefix +8616500
CLEAN = "+8613711112222"


@dataclass
class Script:
    lines: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0

    # ---- raw lines -------------------------------------------------------------------------

    def line(self, at: float, topic: str, payload: Any) -> Script:
        self.lines.append({"at": at, "topic": topic, "payload": payload})
        return self

    def raw(self, at: float, topic: str, text: str) -> Script:
        self.lines.append({"at": at, "topic": topic, "payload_raw": text})
        return self

    def event(
        self, at: float, topic: str, source: str, type_: str, data: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        self.seq += 1
        payload = {
            "specversion": "1.0",
            "id": f"evt-{self.seq:05d}",
            "source": source,
            "type": type_,
            "time": "2021-10-15T14:00:00+08:00",
            "datacontenttype": "application/json",
            "data": data,
        } | extra
        self.line(at, topic, payload)
        return payload

    # ---- calls -----------------------------------------------------------------------------

    def started(
        self, at: float, call: str, sub: str, other: str, direction: str = "inbound"
    ) -> Script:
        return self._call(at, "started", call, sub, other, direction=direction)

    def progress(self, at: float, call: str, sub: str, other: str, duration: float) -> Script:
        return self._call(at, "progress", call, sub, other, duration_s=duration)

    def ended(self, at: float, call: str, sub: str, other: str, duration: float) -> Script:
        return self._call(at, "ended", call, sub, other, duration_s=duration)

    def _call(self, at: float, verb: str, call: str, sub: str, other: str, **field: Any) -> Script:
        data = {"call_id": call, "subscriber": sub, "counterpart": other} | field
        self.event(at, CALLS, "app-warning/hengnan", f"cn.antifraud.call.{verb}", data)
        return self

    def call(
        self, start: float, call: str, sub: str, other: str, until_s: float, step: float = 30
    ) -> Script:
        """call.started at ``start`` then progress every ``step`` seconds up to ``until_s``."""
        self.started(start, call, sub, other)
        duration = step
        while duration <= until_s:
            self.progress(start + duration, call, sub, other, duration)
            duration += step
        return self

    # ---- operators -------------------------------------------------------------------------

    def action(self, at: float, verb: str, data: dict[str, Any], op: str = "op-01") -> Script:
        self.event(
            at,
            f"{PREFIX}/operators/{op}/actions",
            f"console/{op}",
            f"cn.antifraud.operator.{verb}",
            data,
        )
        return self

    def callback(self, at: float, incident: str, result: str) -> Script:
        return self.action(at, "callback", {"incident_id": incident, "result": result})

    def escalate(self, at: float, incident: str) -> Script:
        return self.action(at, "escalate", {"incident_id": incident})

    def close(self, at: float, incident: str, outcome: str, note: str | None = None) -> Script:
        data: dict[str, Any] = {"incident_id": incident, "outcome": outcome}
        if note is not None:
            data["note"] = note
        return self.action(at, "close", data)

    # ---- units -----------------------------------------------------------------------------

    def reply(
        self,
        at: float,
        unit: str,
        verb: str,
        incident: str,
        outcome: str | None = None,
        topic_unit: str | None = None,
    ) -> Script:
        data: dict[str, Any] = {"dispatch_id": f"{incident}:{unit}"}
        if outcome is not None:
            data["outcome"] = outcome
        speaker = topic_unit or unit
        self.event(
            at,
            f"{PREFIX}/units/{speaker}/replies",
            f"unit/{speaker}",
            f"cn.antifraud.unit.{verb}",
            data,
        )
        return self

    def status(self, at: float, unit: str, state: str) -> Script:
        self.event(
            at,
            f"{PREFIX}/units/{unit}/status",
            f"unit/{unit}",
            "cn.antifraud.unit.status",
            {"state": state},
        )
        return self

    # ---- composite -------------------------------------------------------------------------

    def escalated(self, start: float, call: str, sub: str = CHEN, other: str = INVESTMENT) -> str:
        """A flagged call critical at start+180, three unanswered callbacks, escalated at +255."""
        self.call(start, call, sub, other, until_s=180)
        incident = f"INC-{call}"
        for k in range(3):
            self.callback(start + 195 + 30 * k, incident, "no_answer")
        return incident

    def write(self, path: Path) -> Path:
        """The recording, in time order (lines at the same time keep the order written)."""
        with path.open("w", encoding="utf-8") as handle:
            for line in sorted(self.lines, key=lambda line: line["at"]):
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        return path


@dataclass
class Result:
    report: dict[str, Any]
    store: Path

    def incident(self, incident_id: str) -> dict[str, Any]:
        found = [i for i in self.report["incidents"] if i["id"] == incident_id]
        assert found, (
            f"no incident {incident_id}; have {[i['id'] for i in self.report['incidents']]}"
        )
        return found[0]

    def dispatch(self, incident_id: str, unit: str) -> dict[str, Any]:
        found = [d for d in self.incident(incident_id)["dispatches"] if d["unit"] == unit]
        assert found, f"no dispatch of {unit} in {incident_id}"
        return found[0]

    def units(self, incident_id: str) -> dict[str, str]:
        """unit -> dispatch status, for one incident."""
        return {d["unit"]: d["status"] for d in self.incident(incident_id)["dispatches"]}

    def doc(self, incident_id: str) -> dict[str, Any]:
        """The stored incident document (details the report does not carry)."""
        with sqlite3.connect(self.store) as db:
            row = db.execute("SELECT doc FROM incidents WHERE id = ?", (incident_id,)).fetchone()
        assert row, f"no stored incident {incident_id}"
        return json.loads(row[0])  # type: ignore[no-any-return]

    def entries(self, incident_id: str) -> list[dict[str, Any]]:
        """The incident's timeline as the store holds it, row by row."""
        with sqlite3.connect(self.store) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT at, kind, by, text, dispatch_id, action_id FROM timeline "
                "WHERE incident_id = ? ORDER BY seq",
                (incident_id,),
            ).fetchall()
        return [dict(row) for row in rows]

    def timeline(self, incident_id: str) -> list[str]:
        return [entry["kind"] for entry in self.entries(incident_id)]

    def outbox(self) -> list[dict[str, Any]]:
        with sqlite3.connect(self.store) as db:
            rows = db.execute(
                f"SELECT at, topic, retain, type, {OUTBOX_PAYLOAD} FROM outbox ORDER BY seq"
            ).fetchall()
        return [
            {
                "at": at,
                "topic": topic,
                "retain": bool(retain),
                "type": type_,
                "payload": None if payload is None else json.loads(payload),
            }
            for at, topic, retain, type_, payload in rows
        ]

    def heard(self, incident_id: str) -> dict[str, Any]:
        """The incident as an operator console last heard it on ``operators/incidents``: the
        latest message, with the timeline put together from every message in order (each
        carries its entries from ``timeline_from`` on)."""
        latest: dict[str, Any] | None = None
        timeline: list[dict[str, Any]] = []
        for m in self.outbox():
            payload = m["payload"]
            if m["topic"] != f"{PREFIX}/operators/incidents" or payload is None:
                continue
            if payload["subject"] != incident_id:
                continue
            data = payload["data"]
            assert data["timeline_from"] <= len(timeline), "an update skipped entries"
            timeline = timeline[: data["timeline_from"]] + data["timeline"]
            latest = data
        assert latest is not None, f"no incident message for {incident_id}"
        return {**latest, "timeline": timeline, "timeline_from": 0}

    def reasons(self) -> list[str]:
        return [r["reason"] for r in self.report["rejected"]]


class Player:
    """Replays scripts through the real dispatcher, each on a fresh store."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.runs = 0

    async def __call__(
        self,
        script: Script,
        until: float | None = None,
        store: Path | None = None,
        settings: Settings | None = None,
    ) -> Result:
        self.runs += 1
        recording = script.write(self.tmp_path / f"recording-{self.runs}.jsonl")
        store = store or self.tmp_path / f"store-{self.runs}.sqlite3"
        log = io.StringIO()
        logs.configure("info", log)
        try:
            report = await replay(recording, settings or self.settings, store, until)
        finally:
            logs.configure("warning")
        result = Result(report, store)
        for message in result.outbox():  # every message published matches the protocol
            if message["payload"] is not None:
                validate_outbound(message["payload"])
        check_privacy(settings or self.settings, result, log.getvalue())
        return result


RADIO_TOPIC = re.compile(r"/units/(G|W)-[^/]+/dispatches$")  # guards' radios, grid workers


def check_privacy(settings: Settings, result: Result, log_text: str) -> None:
    """No radio payload and no log line carries a resident's full number or full name."""
    secrets = [(s.msisdn, s.name) for s in settings.subscribers.values()]
    radio = " ".join(
        json.dumps(m["payload"], ensure_ascii=False)
        for m in result.outbox()
        if RADIO_TOPIC.search(m["topic"]) and m["payload"] is not None
    )
    for msisdn, name in secrets:
        assert msisdn not in radio and msisdn[1:] not in radio, f"{msisdn} on a radio"
        assert name not in radio, f"{name} on a radio"
        assert msisdn not in log_text and msisdn[1:] not in log_text, f"{msisdn} in the log"
        assert name not in log_text, f"{name} in the log"
