"""Rejected input: each bad message is dead-lettered with a precise reason and changes nothing.

Each case slips one bad line into the seed case at a chosen moment. The report's incidents and
every stored incident document (timeline included) must equal the clean replay's, the reason
must say what is wrong, and a `cn.antifraud.input.rejected` event must go to the dead-letter
topic.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from adapters.replay import replay
from dispatcher.settings import Settings

DATA = Path(__file__).parent / "data"
SEED_LINES = (DATA / "chen_case.jsonl").read_text(encoding="utf-8").splitlines()
INCIDENT = "INC-C-20211015-0001"
P = "antifraud/v1"
CALLS = f"{P}/events/hengnan/calls"

GOOD_CALL = json.loads(SEED_LINES[8])["payload"]  # a call.progress at 210 s


def event(type_: str, data: dict[str, Any], **envelope: Any) -> dict[str, Any]:
    base = {
        "specversion": "1.0",
        "id": "bad-0001",
        "source": "test/hostile",
        "type": type_,
        "time": "2021-10-15T14:05:00+08:00",
        "datacontenttype": "application/json",
        "data": data,
    }
    return {k: v for k, v in (base | envelope).items() if v is not ...}


def call(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(GOOD_CALL["data"]) | changes
    return event("cn.antifraud.call.progress", {k: v for k, v in data.items() if v is not ...})


def reply(
    unit: str, verb: str, dispatch_unit: str | None = None, **data: Any
) -> tuple[str, dict[str, Any]]:
    body = {"dispatch_id": f"{INCIDENT}:{dispatch_unit or unit}"} | data
    return f"{P}/units/{unit}/replies", event(f"cn.antifraud.unit.{verb}", body)


def action(verb: str, **data: Any) -> tuple[str, dict[str, Any]]:
    return f"{P}/operators/op-09/actions", event(f"cn.antifraud.operator.{verb}", data)


DEEP = '{"a":' * 40 + "1" + "}" * 40
NAN_CALL = json.dumps(call()).replace('"duration_s": 210.0', '"duration_s": NaN')
SURROGATE_CALL = json.dumps(call(call_id="C-1")).replace('"C-1"', '"C-1\\ud800"')


def without(payload: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != key}


# (sentence, at, topic, payload or None, payload_raw or None, reason fragment)
CASES = [
    ("text that is not JSON", 300, CALLS, None, "{not json", "not JSON"),
    ("an empty payload", 300, CALLS, None, "", "empty payload"),
    ("a JSON array instead of an object", 300, CALLS, None, "[1, 2]", "JSON list"),
    ("a JSON number instead of an object", 300, CALLS, 42, None, "JSON int"),
    ("JSON nested 40 levels deep", 300, CALLS, None, DEEP, "nests deeper than 16"),
    ("a payload over the size limit", 300, CALLS, None, " " * 70_000 + "{}", "limit is 65536"),
    ("bytes that are not UTF-8", 300, CALLS, None, '{"a": "\udc80"}', "not UTF-8"),
    (
        "no specversion",
        300,
        CALLS,
        event("cn.antifraud.call.progress", GOOD_CALL["data"], specversion=...),
        None,
        "missing 'specversion'",
    ),
    ("CloudEvents 0.3", 300, CALLS, call() | {"specversion": "0.3"}, None, "not a CloudEvent 1.0"),
    ("no id", 300, CALLS, without(call(), "id"), None, "missing 'id'"),
    ("an id of 300 characters", 300, CALLS, call() | {"id": "x" * 300}, None, "'id'"),
    ("an id with control characters", 300, CALLS, call() | {"id": "a\nb"}, None, "'id'"),
    (
        "a time that is not RFC 3339",
        300,
        CALLS,
        call() | {"time": "yesterday"},
        None,
        "'time': must be an RFC 3339 date-time with an offset, like 2021-10-15T14:00:00+08:00 "
        "(got 'yesterday')",
    ),
    ("a month 13 time", 300, CALLS, call() | {"time": "2021-13-01T00:00:00Z"}, None, "'time'"),
    (
        "datacontenttype text/plain",
        300,
        CALLS,
        call() | {"datacontenttype": "text/plain"},
        None,
        "datacontenttype",
    ),
    (
        "an extension attribute with a bad name",
        300,
        CALLS,
        call() | {"Bad-Name": "x"},
        None,
        "attribute name",
    ),
    (
        "an unknown type",
        300,
        CALLS,
        event("cn.antifraud.call.teleported", GOOD_CALL["data"]),
        None,
        "unknown type",
    ),
    ("a type not a string", 300, CALLS, call() | {"type": 7}, None, "'type'"),
    (
        "an operator action on the calls topic",
        300,
        CALLS,
        action("escalate", incident_id=INCIDENT)[1],
        None,
        "not accepted on topic",
    ),
    ("data that is not an object", 300, CALLS, call() | {"data": "x"}, None, "invalid data"),
    (
        "a duration as a string",
        300,
        CALLS,
        call(duration_s="240"),
        None,
        "invalid data: data.duration_s",
    ),
    ("a duration as a boolean", 300, CALLS, call(duration_s=True), None, "data.duration_s"),
    ("a negative duration", 300, CALLS, call(duration_s=-5), None, "data.duration_s"),
    # NaN is not JSON (RFC 8259): refused by the parser, pointing at where it stands
    ("a NaN duration", 300, CALLS, None, NAN_CALL, "not JSON: unexpected character"),
    # a lone surrogate cannot be written back out as UTF-8: refused before it gets anywhere
    ("a lone UTF-16 surrogate", 300, CALLS, None, SURROGATE_CALL, "not JSON: no low surrogate"),
    ("an unknown data field", 300, CALLS, call(extra="x"), None, "unknown field"),
    ("a missing data field", 300, CALLS, call(counterpart=...), None, "data.counterpart"),
    (
        "a subscriber not in E.164",
        300,
        CALLS,
        call(subscriber="13800000001"),
        None,
        "data.subscriber",
    ),
    (
        "a path-like call id",
        300,
        CALLS,
        call(call_id="../../etc/passwd"),
        None,
        "data.call_id: must be 1 to 64 letters, digits, '.', '_' or '-' (got '../../etc/passwd')",
    ),
    ("a call id of 65 characters", 300, CALLS, call(call_id="c" * 65), None, "data.call_id"),
    ("an unknown topic", 300, f"{P}/foo/bar/baz", call(), None, "unknown topic"),
    (
        "a topic outside the prefix",
        300,
        "other/v1/events/hengnan/calls",
        call(),
        None,
        "unknown topic",
    ),
    ("another region's calls", 300, f"{P}/events/elsewhere/calls", call(), None, "region"),
    (
        "a reply from a unit nobody configured",
        300,
        *reply("X-NOBODY", "accepted"),
        None,
        "unknown unit",
    ),
    (
        "a callback on an unknown incident",
        300,
        *action("callback", incident_id="INC-NOPE", result="no_answer"),
        None,
        "unknown incident INC-NOPE",
    ),
    (
        "an incident id that is not an incident id",
        300,
        *action("escalate", incident_id="../etc"),
        None,
        "data.incident_id",
    ),
    (
        "a close with an outcome nobody defined",
        300,
        *action("close", incident_id=INCIDENT, outcome="great"),
        None,
        "data.outcome",
    ),
    (
        "a reply naming a dispatch that does not exist",
        300,
        *reply("G-YJ-JH-01", "accepted"),
        None,
        "unknown dispatch",
    ),
    (
        "a forged reply: the topic's unit is not the dispatch's unit",
        300,
        *reply("G-YJ-CH-02", "reported", dispatch_unit="G-YJ-CH-01", outcome="loss"),
        None,
        "names dispatch",
    ),
    (
        "an accept after another guard took the offer",
        300,
        *reply("G-YJ-CH-02", "accepted"),
        None,
        "taken by another unit",
    ),
    (
        "an arrival after the offer was cancelled",
        300,
        *reply("G-YJ-CH-02", "arrived"),
        None,
        "out of order",
    ),
    (
        "a decline after accepting",
        300,
        *reply("G-YJ-CH-01", "declined"),
        None,
        "declined out of order: dispatch INC-C-20211015-0001:G-YJ-CH-01 is accepted",
    ),
    ("a second accept", 300, *reply("G-YJ-CH-01", "accepted"), None, "out of order"),
    ("a reply to a notice", 300, *reply("W-YJ-07", "accepted"), None, "expects no reply"),
    ("an arrival after the report", 600, *reply("G-YJ-CH-01", "arrived"), None, "is reported"),
    (
        "an operator action on a closed incident",
        1500,
        *action("callback", incident_id=INCIDENT, result="no_answer"),
        None,
        "is closed",
    ),
    ("a reply on a closed incident", 1500, *reply("P-YJ-01", "arrived"), None, "is closed"),
]


def _insert(lines: list[str], at: float, topic: str, payload: Any, raw: str | None) -> list[str]:
    bad: dict[str, Any] = {"at": at, "topic": topic}
    if raw is not None:
        bad["payload_raw"] = raw
    else:
        bad["payload"] = payload
    index = max(i for i, line in enumerate(lines) if json.loads(line)["at"] <= at) + 1
    return [*lines[:index], json.dumps(bad), *lines[index:]]


def _docs(store: Path) -> dict[str, Any]:
    with sqlite3.connect(store) as db:
        return {i: json.loads(d) for i, d in db.execute("SELECT id, doc FROM incidents")}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> Any:
    tmp = tmp_path_factory.mktemp("baseline")
    recording = tmp / "clean.jsonl"
    recording.write_text("\n".join(SEED_LINES) + "\n", encoding="utf-8")
    report = asyncio.run(replay(recording, settings, tmp / "clean.sqlite3"))
    return report, _docs(tmp / "clean.sqlite3")


@pytest.mark.parametrize(
    ("at", "topic", "payload", "raw", "reason"), [pytest.param(*c[1:], id=c[0]) for c in CASES]
)
async def test_bad_input_is_dead_lettered_and_changes_nothing(
    settings: Settings,
    tmp_path: Path,
    baseline: Any,
    at: float,
    topic: str,
    payload: Any,
    raw: str | None,
    reason: str,
) -> None:
    clean_report, clean_docs = baseline
    recording = tmp_path / "hostile.jsonl"
    recording.write_text(
        "\n".join(_insert(SEED_LINES, at, topic, payload, raw)) + "\n", encoding="utf-8"
    )
    store = tmp_path / "hostile.sqlite3"
    report = await replay(recording, settings, store)

    assert len(report["rejected"]) == 1, report["rejected"]
    rejected = report["rejected"][0]
    assert reason in rejected["reason"]
    assert (rejected["at"], rejected["topic"]) == (at, topic)
    dead = [p for p in report["published"] if p["topic"] == f"{P}/deadletter"]
    assert dead == [{"at": at, "topic": f"{P}/deadletter", "type": "cn.antifraud.input.rejected"}]
    assert report["incidents"] == clean_report["incidents"]
    assert _docs(store) == clean_docs


async def test_the_dead_letter_event_carries_reason_topic_and_payload(
    settings: Settings, tmp_path: Path
) -> None:
    topic, payload = reply("G-YJ-CH-02", "accepted")
    recording = tmp_path / "one.jsonl"
    recording.write_text(
        "\n".join(_insert(SEED_LINES, 300, topic, payload, None)) + "\n", encoding="utf-8"
    )
    store = tmp_path / "one.sqlite3"
    await replay(recording, settings, store)
    with sqlite3.connect(store) as db:
        (text,) = db.execute(
            "SELECT payload FROM outbox WHERE type = 'cn.antifraud.input.rejected'"
        ).fetchone()
    dead = json.loads(text)
    assert dead["type"] == "cn.antifraud.input.rejected"
    assert dead["data"]["topic"] == topic
    assert dead["data"]["source"] == "test/hostile"
    assert dead["data"]["id"] == "bad-0001"
    assert "taken by another unit" in dead["data"]["reason"]
    assert (
        json.loads(dead["data"]["payload"])["data"]["dispatch_id"] == payload["data"]["dispatch_id"]
    )


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ([("accepted", 0)], None),
        ([("arrived", 0)], "arrived out of order: dispatch INC-C1:G-YJ-CH-01 is offered"),
        ([("reported", 0)], "reported out of order"),
        ([("accepted", 0), ("reported", 1)], None),
        ([("accepted", 0), ("arrived", 1), ("reported", 2)], None),
        ([("declined", 0), ("arrived", 1)], "arrived out of order"),
        ([("accepted", 0), ("arrived", 1), ("arrived", 2)], "arrived out of order"),
    ],
)
async def test_a_units_replies_go_accepted_then_arrived_then_reported(
    play: Any, script: list[tuple[str, int]], reason: str | None
) -> None:
    from scenario import Script

    s = Script()
    incident = s.escalated(0, "C1")
    for verb, offset in script:
        s.reply(
            256 + offset,
            "G-YJ-CH-01",
            verb,
            incident,
            outcome="dissuaded" if verb == "reported" else None,
        )
    r = await play(s)
    assert r.reasons() == ([] if reason is None else [pytest.approx(r.reasons()[0])])
    if reason is not None:
        assert reason in r.reasons()[0]


def _kept(lines: list[str], marker: str) -> list[str]:
    """The line holding ``marker`` as the broker delivers a message it kept."""
    index = next(i for i, line in enumerate(lines) if marker in line)
    return [*lines[:index], json.dumps(json.loads(lines[index]) | {"retained": True}),
            *lines[index + 1 :]]  # fmt: skip


async def test_a_retained_reply_is_refused_unanswered_and_a_retained_status_is_taken(
    settings: Settings, tmp_path: Path, baseline: Any
) -> None:
    """A reply the broker kept (a lost radio's, say) would accept the next offer made to its
    unit, on every reconnect: only presence is retained on purpose (decisions.md 94)."""
    clean_report, _ = baseline
    topic, payload = reply("G-YJ-CH-01", "accepted")
    lines = _kept(_insert(SEED_LINES, 256, topic, payload | {"id": "kept-accept"}, None), "kept-")
    status = event("cn.antifraud.unit.status", {"state": "online"}, id="kept-status")
    lines = _kept(_insert(lines, 10, f"{P}/units/P-YJ-02/status", status, None), "kept-status")
    recording = tmp_path / "kept.jsonl"
    recording.write_text("\n".join(lines) + "\n", encoding="utf-8")
    store = tmp_path / "kept.sqlite3"
    report = await replay(recording, settings, store)
    assert [(r["at"], r["topic"]) for r in report["rejected"]] == [(256, topic)]
    assert "a retained message" in report["rejected"][0]["reason"]
    receipt = "cn.antifraud.reply.receipt"
    receipts = [p for p in report["published"] if p["type"] == receipt]
    assert receipts == [p for p in clean_report["published"] if p["type"] == receipt]
    assert report["incidents"] == clean_report["incidents"]
    with sqlite3.connect(store) as db:
        presence = db.execute("SELECT state FROM presence WHERE unit = 'P-YJ-02'").fetchall()
    assert presence == [("online",)]
