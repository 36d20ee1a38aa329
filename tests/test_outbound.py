"""What each party receives: radio-safe text for guards and grid workers, full detail for police."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from scenario import CHEN, INVESTMENT, LIU, PREFIX, Player, Result, Script

from dispatcher.inbound import RFC3339
from dispatcher.outbound import rfc3339
from dispatcher.settings import Settings

RADIO = re.compile(r"/units/(G-|W-)[^/]+/dispatches$")


async def door_knock_cases(play: Player) -> list[Result]:
    """Guards offered, taken and stood down; a village grid worker; notices; a close."""
    estate = Script()
    incident = estate.escalated(0, "C1", sub=CHEN)
    estate.reply(260, "G-YJ-CH-01", "accepted", incident)
    estate.reply(265, "P-YJ-01", "accepted", incident)
    estate.close(400, incident, "prevented")
    village = Script()
    incident = village.escalated(0, "C2", sub=LIU)
    village.progress(300, "C2", LIU, "+85251230002", 300)  # the grid worker's offer expires
    return [await play(estate), await play(village)]


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


async def test_radio_payloads_never_carry_the_residents_number_or_full_name(
    play: Player, settings: Settings
) -> None:
    radio = [
        m for r in await door_knock_cases(play) for m in r.outbox() if RADIO.search(m["topic"])
    ]
    assert {m["type"] for m in radio} >= {
        "cn.antifraud.dispatch.offered",
        "cn.antifraud.dispatch.cancelled",
        "cn.antifraud.dispatch.notice",
    }
    secrets = [
        s for sub in settings.subscribers.values() for s in (sub.msisdn, sub.msisdn[3:], sub.name)
    ]
    for message in radio:
        text = " ".join(strings(message["payload"]))
        for secret in secrets:
            assert secret not in text, (secret, message)


async def test_a_guard_offer_says_where_who_and_what_to_do(play: Player) -> None:
    result = (await door_knock_cases(play))[0]
    offer = next(m for m in result.outbox() if m["topic"].endswith("G-YJ-CH-01/dispatches"))
    data = offer["payload"]["data"]
    assert data["honorific"] == "陈女士"
    assert data["address"] == "衡南县云集街道春晖路18号 春晖小区3栋2单元502"
    assert "陈女士" in data["text"] and "春晖小区3栋2单元502" in data["text"]
    assert data["dispatch_id"] == "INC-C1:G-YJ-CH-01"
    assert data["reply_topic"] == "antifraud/v1/units/G-YJ-CH-01/replies"


async def test_a_police_offer_is_complete(play: Player) -> None:
    result = (await door_knock_cases(play))[0]
    offer = next(m for m in result.outbox() if m["topic"].endswith("P-YJ-01/dispatches"))
    data = offer["payload"]["data"]
    incident = data["incident"]
    assert incident["subscriber"]["name"] == "陈某某"
    assert incident["subscriber"]["msisdn"] == CHEN
    assert incident["counterpart"] == "+85251230002"
    assert incident["category_label"] == "虚假投资理财"
    assert incident["severity"] == "critical" and incident["rule"] == "long_call_flagged"
    assert [e["kind"] for e in incident["timeline"]][:2] == ["opened", "rule_fired"]
    assert "陈某某" in data["text"] and CHEN in data["text"]


async def test_every_published_message_is_a_cloudevent_with_a_unique_id(play: Player) -> None:
    for result in await door_knock_cases(play):
        ids = set()
        for message in result.outbox():
            if message["payload"] is None:
                continue
            event = message["payload"]
            assert event["specversion"] == "1.0"
            assert event["source"] == "antifraud/dispatcher/hengnan"
            assert event["type"] == message["type"]
            assert event["datacontenttype"] == "application/json"
            assert RFC3339.match(event["time"]), event["time"]
            ids.add((message["topic"], event["id"]))
        assert len(ids) == len([m for m in result.outbox() if m["payload"] is not None])


async def test_incident_state_is_retained_and_changes_go_to_the_operators(play: Player) -> None:
    result = (await door_knock_cases(play))[0]
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for message in result.outbox():
        by_topic.setdefault(message["topic"], []).append(message)
    retained = by_topic["antifraud/v1/incidents/INC-C1"]
    operators = by_topic["antifraud/v1/operators/incidents"]
    assert all(m["retain"] for m in retained) and not any(m["retain"] for m in operators)
    assert next(m["type"] for m in operators) == "cn.antifraud.incident.opened"
    assert [m["type"] for m in operators][-1] == "cn.antifraud.incident.closed"
    assert retained[-1]["payload"]["data"]["status"] == "closed"


async def test_event_times_follow_the_recordings_clock(play: Player) -> None:
    s = Script()
    s.escalated(0, "C1")
    result = await play(s)
    offer = next(m for m in result.outbox() if m["type"] == "cn.antifraud.dispatch.offered")
    # the first line's CloudEvent time is 14:00:00+08:00 at clock 0; the offer is at 255 s
    assert offer["payload"]["time"] == "2021-10-15T06:04:15.000Z"


@pytest.mark.parametrize("kind", ["opened", "updated", "closed"])
async def test_operator_payloads_carry_the_full_incident(
    play: Player, kind: str, tmp_path: Path
) -> None:
    result = (await door_knock_cases(play))[0]
    message = next(m for m in result.outbox() if m["type"] == f"cn.antifraud.incident.{kind}")
    data = message["payload"]["data"]
    assert data["incident_id"] == "INC-C1"
    assert data["subscriber"]["display_name"] == "陈女士"
    assert set(data) >= {
        "status",
        "severity",
        "rule",
        "counterpart",
        "duration_s",
        "callback",
        "dispatches",
        "alerts",
        "timeline",
    }
    json.dumps(data)


async def test_an_update_carries_only_the_entries_it_added(play: Player) -> None:
    """An incident message's size does not grow with the incident's history: an update
    carries the entries added since the last message (``timeline_from`` on), opening and
    closing the whole timeline; put together in order they are the timeline the store holds."""
    for result in await door_knock_cases(play):
        messages = [
            m["payload"]
            for m in result.outbox()
            if m["topic"] == "antifraud/v1/operators/incidents" and m["payload"]
        ]
        incident = messages[0]["subject"]
        said = 0
        for event in messages:
            data = event["data"]
            if event["type"] == "cn.antifraud.incident.updated":
                assert data["timeline_from"] == said  # nothing skipped, nothing repeated
                said += len(data["timeline"])
            else:
                assert data["timeline_from"] == 0
                said = len(data["timeline"])
        heard = result.heard(incident)["timeline"]
        updates = [e for e in messages if e["type"] == "cn.antifraud.incident.updated"]
        assert max(len(e["data"]["timeline"]) for e in updates) < len(heard) / 2
        stored = result.entries(incident)
        assert [(e["kind"], e["text"]) for e in heard] == [(e["kind"], e["text"]) for e in stored]


def _datetime_stamp(origin: float, at: float) -> str:
    stamp = datetime.fromtimestamp(origin + at, tz=UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


@hsettings(max_examples=3000, deadline=None)
@given(
    origin=st.one_of(st.just(0.0), st.just(1767225600.0), st.floats(-1e9, 4e9)),
    at=st.one_of(
        st.floats(0, 1e7),
        st.integers(0, 10**7).map(float),
        st.tuples(
            st.integers(0, 10**6), st.sampled_from([0.0005, 0.9995, 0.4999995, 0.9999995])
        ).map(sum),
    ),
)
def test_a_timestamp_says_what_datetime_says(origin: float, at: float) -> None:
    """Stamps are formatted by hand from the whole second (``datetime`` is too slow for a
    wave's moments): to the millisecond, rounding and carrying as ``datetime`` does."""
    assert rfc3339(origin, at) == _datetime_stamp(origin, at)
    assert RFC3339.match(rfc3339(origin, at))


async def test_a_call_ending_is_told_at_once_also_when_it_adds_no_duration(play: Player) -> None:
    """The resident's line is free again: a callback may now get through. The incident's
    message saying so goes out when the call ends, also when it ends below the duration
    last reported (which it never lowers)."""
    s = Script()
    s.started(0, "C-END", CHEN, INVESTMENT)
    s.progress(100, "C-END", CHEN, INVESTMENT, 100)
    s.ended(101, "C-END", CHEN, INVESTMENT, 90)
    r = await play(s)
    told = [
        m for m in r.outbox() if m["topic"] == f"{PREFIX}/operators/incidents" and m["at"] == 101.0
    ]
    assert len(told) == 1, told
    data = told[0]["payload"]["data"]
    assert data["calls"][0]["ended"] is True and data["duration_s"] == 100.0
    assert [e["kind"] for e in data["timeline"]] == ["call_ended"]


async def test_a_door_knock_after_the_call_ended_says_so(play: Player) -> None:
    """Sent while the scam call is on, the guard is to get the resident off the phone; sent
    after it ended, the resident may be on the way to transfer: the offer says which."""
    s = Script()
    s.started(0, "C-ON", CHEN, INVESTMENT)
    s.progress(200, "C-ON", CHEN, INVESTMENT, 200)
    s.escalate(210, "INC-C-ON")
    s.started(0, "C-OFF", LIU, INVESTMENT)
    s.progress(200, "C-OFF", LIU, INVESTMENT, 200)
    s.ended(205, "C-OFF", LIU, INVESTMENT, 205)
    s.escalate(210, "INC-C-OFF")
    r = await play(s)
    texts = {
        m["payload"]["data"]["incident_id"]: m["payload"]["data"]["text"]
        for m in r.outbox()
        if m["type"] in ("cn.antifraud.dispatch.offered", "cn.antifraud.dispatch.notice")
        and "address" in m["payload"]["data"]
    }
    assert "正在接听疑似诈骗电话" in texts["INC-C-ON"], texts
    assert "刚与疑似诈骗电话通完话" in texts["INC-C-OFF"], texts
    assert "正在接听" not in texts["INC-C-OFF"], texts
