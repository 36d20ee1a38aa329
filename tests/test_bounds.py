"""No party can grow an incident, or the messages that carry it, without bound.

A call-warning source's flood of calls for one resident, or an operator's flood of actions
that change nothing, used to grow the incident's calls and timeline until the incident's
messages were larger than the broker's packet limit: the broker then disconnected the
dispatcher on every attempt, and the ordered outbox stood still for everyone.
"""

from __future__ import annotations

import json
from pathlib import Path

from scenario import CHEN, INVESTMENT, Player, Script

from adapters.store import MAX_MESSAGE_BYTES, Store
from dispatcher.model import Publish
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from dispatcher.workflow import MAX_CALLS, MAX_TIMELINE, TIMELINE_FULL

REPEATABLE = {"call_joined", "call_ended", "escalate_ignored"}


def largest_incident_message(result: object) -> int:
    return max(
        len(json.dumps(m["payload"], ensure_ascii=False).encode())
        for m in result.outbox()  # type: ignore[attr-defined]
        if m["type"].startswith("cn.antifraud.incident.")
    )


async def test_a_flood_of_calls_for_one_resident_leaves_the_incident_bounded(
    play: Player,
) -> None:
    s = Script()
    incident = s.escalated(0, "C0")
    for k in range(1, 700):  # new calls of the same resident, each joining the incident
        s.started(300 + k * 0.01, f"J{k}", CHEN, INVESTMENT)
        s.ended(300 + k * 0.01, f"J{k}", CHEN, INVESTMENT, 1)
    r = await play(s)
    doc = r.doc(incident)
    assert len(doc["calls"]) == MAX_CALLS
    kinds = r.timeline(incident)
    assert kinds.count(TIMELINE_FULL) == 1
    full = kinds.index(TIMELINE_FULL)
    assert full <= MAX_TIMELINE
    assert not set(kinds[full:]) & REPEATABLE  # only what changed the incident came after
    assert largest_incident_message(r) < MAX_MESSAGE_BYTES / 4
    # 1,400 call events of one resident in 7 s: past a burst, refused as too fast
    assert any("rate limit: calls of" in reason for reason in r.reasons())


async def test_an_operators_flood_of_actions_that_change_nothing_is_bounded(
    play: Player,
) -> None:
    s = Script()
    incident = s.escalated(0, "C0")
    for k in range(150):  # callbacks on an escalated incident, and escalations of it
        s.callback(300 + k * 0.05, incident, "no_answer")
        s.escalate(300 + k * 0.05, incident)
    r = await play(s)
    kinds = r.timeline(incident)
    assert kinds.count(TIMELINE_FULL) == 1
    full = kinds.index(TIMELINE_FULL)
    assert full <= MAX_TIMELINE
    assert not set(kinds[full:]) & REPEATABLE
    assert largest_incident_message(r) < MAX_MESSAGE_BYTES / 4
    # what changes the incident is still recorded after the timeline is full
    s.close(600, incident, "prevented")
    r = await play(s)
    assert r.timeline(incident)[-1] == "closed"


async def test_a_message_over_the_packet_limit_is_set_aside_not_left_to_stop_the_outbox(
    tmp_path: Path,
) -> None:
    async with Store(tmp_path / "s.sqlite3") as store:
        huge = Publish("t/huge", "cn.x", {"data": "x" * (MAX_MESSAGE_BYTES + 1)})
        small = Publish("t/small", "cn.y", {"data": "y"})
        store.add_outbox(1.0, huge, sent=False)
        store.add_outbox(1.0, small, sent=False)
        handed: list[object] = []
        await store.commit(handed.extend)
        assert [row[1] for row in handed] == ["t/small"]  # type: ignore[index]
        assert [row[1] for row in await store.unsent(10)] == ["t/small"]


async def test_a_unit_repeating_its_presence_writes_and_logs_it_once(
    settings: Settings, tmp_path: Path
) -> None:
    """A radio flapping the same status, within its budget, cost a store write and a log
    line each time."""
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        for k in range(50):
            status = {
                "specversion": "1.0",
                "id": f"s{k}",
                "source": "unit/G-YJ-CH-01",
                "type": "cn.antifraud.unit.status",
                "data": {"state": "online"},
            }
            runtime.handle(
                "antifraud/v1/units/G-YJ-CH-01/status", json.dumps(status).encode(), 1.0 + k
            )
        await runtime.commit()
        rows = await store.fetchall("SELECT unit, state, at FROM presence")
    assert rows == [("G-YJ-CH-01", "online", 1.0)]
