"""SPEC §4, reply receipts: every reply a unit publishes gets an answer on its dispatches topic.

Each case is a recording whose last reply (the one under test) is named by its CloudEvent id;
the check says what receipt that reply got, on which unit's topic. Every message published,
receipts included, is validated against its schema by the player.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scenario import CHEN, INVESTMENT, PREFIX, Player, Result, Script

from adapters.replay import replay
from dispatcher.settings import Settings

RECEIPT = "cn.antifraud.reply.receipt"
SEED = Path(__file__).parent / "data" / "chen_case.jsonl"
INC = "INC-C1"
CH1, CH2, POLICE = "G-YJ-CH-01", "G-YJ-CH-02", "P-YJ-01"


def receipts(r: Result, unit: str | None = None) -> list[dict[str, Any]]:
    """The receipts published, in order (for ``unit``'s dispatches topic only, if given)."""
    return [
        m["payload"]
        for m in r.outbox()
        if m["type"] == RECEIPT
        and (unit is None or m["topic"] == f"{PREFIX}/units/{unit}/dispatches")
    ]


def receipt_of(r: Result, reply_id: str, unit: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        e["data"] for e in receipts(r, unit) if e["data"]["reply_id"] == reply_id
    ]
    assert len(found) == 1, f"{len(found)} receipts for {reply_id} on {unit}: {receipts(r)}"
    return found[0]


def last_id(s: Script) -> str:
    return f"evt-{s.seq:05d}"


# (id, script builder returning (reply id, speaking unit), expected receipt data subset)
Build = Callable[[Script], tuple[str, str]]
CASES: list[Any] = []


def case(name: str, expected: dict[str, Any]) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        CASES.append(pytest.param(build, expected, id=name))
        return build

    return register


def escalated(s: Script) -> None:
    """C1 of Chen escalated at 255: guards CH-01 and CH-02 offered until 285, patrol P-YJ-01."""
    s.escalated(0, "C1", CHEN, INVESTMENT)


@case(
    "accepted, applied: the job is the unit's",
    {"reply": "accepted", "status": "applied", "text": "接警成功：此任务由您负责，请立即上门"},
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "accepted", INC)
    return last_id(s), CH1


@case(
    "declined, applied",
    {"reply": "declined", "status": "applied", "text": "已拒绝：任务将转派他人"},
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "declined", INC)
    return last_id(s), CH1


@case(
    "arrived, applied",
    {"reply": "arrived", "status": "applied", "text": "已记录到达：请立即敲门劝阻"},
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "accepted", INC).reply(300, CH1, "arrived", INC)
    return last_id(s), CH1


@case(
    "reported, applied",
    {"reply": "reported", "status": "applied", "text": "已反馈处置结果：已劝阻，任务完成"},
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "accepted", INC).reply(300, CH1, "reported", INC, "dissuaded")
    return last_id(s), CH1


@case(
    "refused: the incident is closed",
    {
        "reply": "arrived",
        "status": "refused",
        "code": "incident_closed",
        "reason": "事件已结案，无需前往",
    },
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "accepted", INC).close(280, INC, "prevented")
    s.reply(300, CH1, "arrived", INC)
    return last_id(s), CH1


@case(
    "refused: another guard took it first",
    {"reply": "accepted", "status": "refused", "code": "taken", "reason": "该任务已由他人接警"},
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "accepted", INC).reply(262, CH2, "accepted", INC)
    return last_id(s), CH2


@case(
    "refused: another unit's dispatch, answered on the speaker's own topic",
    {
        "reply": "accepted",
        "status": "refused",
        "code": "not_your_dispatch",
        "reason": "此任务不是派给本机的",
        "dispatch_id": f"{INC}:{CH1}",
    },
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "accepted", INC, topic_unit=CH2)
    return last_id(s), CH2


@case(
    "refused: arrived before accepted is out of order",
    {
        "reply": "arrived",
        "status": "refused",
        "code": "out_of_order",
        "reason": "请先确认接警再报到达",
    },
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "arrived", INC)
    return last_id(s), CH1


@case(
    "refused: an unknown dispatch",
    {
        "reply": "accepted",
        "status": "refused",
        "code": "unknown_dispatch",
        "reason": "没有这个任务，请核对",
        "dispatch_id": "INC-NOPE:G-YJ-CH-01",
    },
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "accepted", "INC-NOPE")
    return last_id(s), CH1


@case(
    "refused: accepted after the offer expired",
    {
        "reply": "accepted",
        "status": "refused",
        "code": "expired",
        "reason": "接警已超时，任务已转派",
    },
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(290, CH1, "accepted", INC)  # the guards' offers expired at 285
    return last_id(s), CH1


@case(
    "refused: a report without its outcome is invalid, yet its dispatch and id are read",
    {"reply": "reported", "status": "refused", "code": "invalid"},
)
def _(s: Script) -> tuple[str, str]:
    escalated(s)
    s.reply(260, CH1, "accepted", INC).reply(300, CH1, "reported", INC)  # no outcome
    return last_id(s), CH1


@pytest.mark.parametrize(("build", "expected"), CASES)
async def test_every_reply_gets_its_receipt(
    play: Player, build: Build, expected: dict[str, Any]
) -> None:
    s = Script()
    reply_id, unit = build(s)
    r = await play(s)
    got = receipt_of(r, reply_id, unit)
    assert {k: got.get(k) for k in expected} == expected
    assert got["dispatch_id"] == expected.get("dispatch_id", f"{INC}:{unit}")
    if got["status"] == "refused":
        assert got["text"] == f"操作被拒绝：{got['reason']}"
        assert len(got["reason"]) <= 20  # short, for a radio screen or text-to-speech
        # a refusal still goes to the dead-letter topic, with its reason for operations
        dead = [m for m in r.outbox() if m["type"] == "cn.antifraud.input.rejected"]
        assert [d["payload"]["data"]["id"] for d in dead] == [reply_id]
    else:
        assert "code" not in got and "reason" not in got


async def test_the_receipt_comes_first_and_its_id_names_the_reply(play: Player) -> None:
    """The guard hears the answer to his press before anything else it causes; the
    receipt's CloudEvent id is made of the reply's channel and (source, id)."""
    s = Script()
    escalated(s)
    s.reply(260, CH1, "accepted", INC)
    reply_id = last_id(s)
    r = await play(s)
    at_260 = [m for m in r.outbox() if m["at"] == 260.0]
    assert at_260[0]["type"] == RECEIPT
    assert at_260[0]["topic"] == f"{PREFIX}/units/{CH1}/dispatches"
    event = at_260[0]["payload"]
    assert event["id"] == f"receipt/replies/{CH1}/unit/{CH1}/{reply_id}"
    assert event["subject"] == f"{INC}:{CH1}"
    cancelled = [m for m in at_260 if m["type"] == "cn.antifraud.dispatch.cancelled"]
    assert [m["topic"] for m in cancelled] == [f"{PREFIX}/units/{CH2}/dispatches"]


async def test_a_redelivered_reply_gets_the_same_receipt_again(play: Player) -> None:
    """The same (source, id) on the same channel: handled once, answered each time with
    the identical receipt (same id, same time, same content), applied or refused alike."""
    s = Script()
    escalated(s)
    s.reply(260, CH1, "accepted", INC)
    accepted = s.lines[-1]
    s.reply(262, CH2, "accepted", INC)  # refused: taken
    taken = s.lines[-1]
    s.line(270, accepted["topic"], accepted["payload"])
    s.line(271, taken["topic"], taken["payload"])
    r = await play(s)
    first, again = receipts(r, CH1)
    assert first == again and first["data"]["status"] == "applied"
    refused, refused_again = receipts(r, CH2)[-2:]
    assert refused == refused_again and refused["data"]["code"] == "taken"
    assert r.units(INC)[CH1] == "accepted"
    # the repeat is no new refusal: one dead letter, one rejected row
    assert len(r.report["rejected"]) == 1
    # and the report lists each receipt once: a duplicated line changes nothing in it
    listed = [p for p in r.report["published"] if p["type"] == RECEIPT]
    assert len(listed) == 2


async def test_a_reply_that_cannot_be_read_gets_only_a_dead_letter(play: Player) -> None:
    """Without a readable (source, id) and dispatch id there is nobody's reply to answer."""
    s = Script()
    escalated(s)
    topic = f"{PREFIX}/units/{CH1}/replies"
    s.raw(260, topic, "{not json")
    good = s.event(261, topic, f"unit/{CH1}", "cn.antifraud.unit.accepted", {"x": 1})
    s.event(262, topic, f"unit/{CH1}", "cn.antifraud.unit.accepted", {"dispatch_id": 7})
    r = await play(s)
    assert receipts(r) == []
    assert len(r.report["rejected"]) == 3
    assert good["id"] not in json.dumps(receipts(r))


async def test_a_flood_of_refused_replies_gets_receipts_only_within_the_refusal_budget(
    play: Player, settings: Settings
) -> None:
    """Past a channel's refusal budget a refusal is counted, not answered: a flood stays
    cheap, and the flooder's own topic is all it could ever fill."""
    s = Script()
    escalated(s)
    for k in range(200):
        s.reply(260 + k * 0.01, CH1, "arrived", INC)  # out of order, each a fresh id
    r = await play(s)
    budget = settings.limits.refusals_per_period
    got = receipts(r, CH1)
    assert len(got) == budget
    assert all(e["data"]["code"] == "out_of_order" for e in got)
    dead = [m for m in r.outbox() if m["type"] == "cn.antifraud.input.rejected"]
    assert len(dead) == budget


async def test_a_duplicate_flood_is_answered_only_within_a_budget(play: Player) -> None:
    """A radio repeating one reply over and over gets its receipt again within a budget of
    its own (20 a minute), not once per repeat."""
    s = Script()
    escalated(s)
    s.reply(260, CH1, "accepted", INC)
    line = s.lines[-1]
    for k in range(100):
        s.line(261 + k * 0.01, line["topic"], line["payload"])
    r = await play(s)
    got = receipts(r, CH1)
    assert 2 <= len(got) <= 21
    assert all(e == got[0] for e in got)


async def test_the_seed_case_answers_every_reply_and_keeps_its_report(
    settings: Settings, tmp_path: Path
) -> None:
    replies = [
        json.loads(line)
        for line in SEED.read_text(encoding="utf-8").splitlines()
        if "/replies" in line
    ]
    store = tmp_path / "seed.sqlite3"
    await replay(SEED, settings, store)
    r = Result({}, store)
    got = {(e["data"]["reply_id"], e["data"]["status"]) for e in receipts(r)}
    assert got == {(line["payload"]["id"], "applied") for line in replies}
    for line in replies:
        unit = line["topic"].split("/")[-2]
        assert (
            receipt_of(r, line["payload"]["id"], unit)["dispatch_id"]
            == (line["payload"]["data"]["dispatch_id"])
        )


async def test_a_reply_redelivered_after_a_restart_gets_its_receipt_again(
    play: Player, tmp_path: Path
) -> None:
    """The receipts of the dedupe window are read back from the store on start."""
    s = Script()
    escalated(s)
    s.reply(260, CH1, "accepted", INC)
    line = s.lines[-1]
    s.line(300, line["topic"], line["payload"])
    store = tmp_path / "resumed.sqlite3"
    await play(s, until=280.0, store=store)
    r = await play(s, store=store)
    first, again = receipts(r, CH1)
    assert first == again and first["data"]["status"] == "applied"
    assert r.report == (await play(s)).report
