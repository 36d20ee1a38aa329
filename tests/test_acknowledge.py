"""An operator acknowledges a dead end (``cn.antifraud.operator.acknowledge``): the dispatcher
records who took which alert on, in the incident's timeline and its messages; every entry an
action leads to names the action, so the console that sent it sees it applied."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp import ClientSession, CookieJar
from scenario import CHEN, INVESTMENT, PREFIX, STRANGER, Player, Script
from test_console import login, serving

from adapters.broker import Mosquitto
from adapters.mqtt import BrokerURL, open_client
from dispatcher.settings import Settings


def acknowledge(s: Script, at: float, incident: str, alerts: list[str], op: str = "op-01") -> str:
    """An operator's acknowledgement; its CloudEvent id."""
    event = s.event(
        at,
        f"{PREFIX}/operators/{op}/actions",
        f"console/{op}",
        "cn.antifraud.operator.acknowledge",
        {"incident_id": incident, "alerts": alerts},
    )
    return str(event["id"])


async def test_an_acknowledgement_is_recorded_with_who_and_a_later_dead_end_sounds_again(
    play: Player,
) -> None:
    s = Script().call(0, "C-ACK", STRANGER, INVESTMENT, until_s=200)
    ack = acknowledge(s, 210, "INC-C-ACK", ["unknown_subscriber"], op="op-02")
    again = acknowledge(s, 215, "INC-C-ACK", ["unknown_subscriber"])  # a second operator
    s.escalate(220, "INC-C-ACK")  # police of the default station: nobody will answer
    s.status(2000, "G-YJ-CH-01", "online")  # time passes: every police offer expires
    r = await play(s)

    detail = r.heard("INC-C-ACK")
    assert detail["acknowledged"] == ["unknown_subscriber"]
    assert "police_exhausted" in detail["alerts"]  # a new dead end: not acknowledged
    by_action = {e["action_id"]: e for e in detail["timeline"] if e["action_id"]}
    assert by_action[ack]["kind"] == "acknowledged"
    assert by_action[ack]["by"] == "operator/op-02"
    assert by_action[ack]["text"] == "接线员确认警报，转人工处置：未登记用户"
    assert by_action[again]["kind"] == "acknowledge_ignored"  # it changed nothing
    assert r.doc("INC-C-ACK")["acknowledged"] == ["unknown_subscriber"]
    assert r.report["rejected"] == []
    # the entries that came of no action (the calls, the timers) name none
    first = next(i for i, e in enumerate(detail["timeline"]) if e["action_id"])
    assert first > 0 and all(e["action_id"] is None for e in detail["timeline"][:first])
    exhausted = [e for e in detail["timeline"] if e["kind"] == "alert"][-1]
    assert "民警" in exhausted["text"] and exhausted["action_id"] is None


async def test_an_acknowledgement_of_an_alert_the_incident_lacks_or_of_a_closed_one_is_refused(
    play: Player,
) -> None:
    s = Script().call(0, "C-ACK", STRANGER, INVESTMENT, until_s=200)
    s.call(0, "C-CHEN", CHEN, INVESTMENT, until_s=200)
    acknowledge(s, 210, "INC-C-ACK", ["door_exhausted"])  # what the operator did not see
    acknowledge(s, 211, "INC-C-CHEN", ["unknown_subscriber"])  # Chen has no dead end
    s.close(212, "INC-C-ACK", "false_alarm")
    acknowledge(s, 213, "INC-C-ACK", ["unknown_subscriber"])
    s.action(214, "acknowledge", {"incident_id": "INC-C-CHEN", "alerts": []})
    s.action(215, "acknowledge", {"incident_id": "INC-C-CHEN", "alerts": ["made_up"]})
    r = await play(s)
    reasons = r.reasons()
    assert reasons[0].startswith("incident INC-C-ACK has no alert door_exhausted"), reasons
    assert reasons[1].startswith("incident INC-C-CHEN has no alert unknown_subscriber"), reasons
    assert reasons[2] == "incident INC-C-ACK is closed", reasons
    assert reasons[3].startswith("invalid data: data.alerts"), reasons
    assert reasons[4].startswith("invalid data: data.alerts"), reasons
    assert len(reasons) == 5
    assert "acknowledged" not in r.timeline("INC-C-ACK")
    assert r.doc("INC-C-CHEN")["acknowledged"] == []


async def test_every_entry_an_action_leads_to_names_it(play: Player) -> None:
    s = Script().call(0, "C1", CHEN, INVESTMENT, until_s=200)
    first = s.event(
        200,
        f"{PREFIX}/operators/op-01/actions",
        "console/op-01",
        "cn.antifraud.operator.callback",
        {"incident_id": "INC-C1", "result": "answered_at_risk"},
    )
    r = await play(s)
    named = [e for e in r.heard("INC-C1")["timeline"] if e["action_id"] == first["id"]]
    # the result, the escalation it caused and the offers that went out
    kinds = [e["kind"] for e in named]
    assert kinds[0] == "callback_result" and "escalated" in kinds and "offered" in kinds, kinds


async def test_the_console_sends_an_acknowledgement_as_the_operators_action(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """The console publishes ``operator.acknowledge`` on the operator's own actions topic,
    with the dead ends the page showed; it refuses what no dispatcher could take."""
    async with (
        serving(settings, broker, tmp_path) as (base, _console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
        open_client(BrokerURL.parse(broker.url), "listener") as listener,
    ):
        await listener.subscribe(f"{PREFIX}/operators/op-01/actions", qos=1)
        state = await login(http, base)
        headers = {"X-CSRF-Token": state["csrf"]}
        url = f"{base}/api/incidents/INC-C-ACK/acknowledge"
        async with http.post(url, json={"alerts": ["unknown_subscriber"]}) as response:
            assert response.status == 403  # the CSRF token is needed, as for every action
        for body in ({}, {"alerts": []}, {"alerts": ["made_up"]}, {"alerts": "no_address"}):
            async with http.post(url, json=body, headers=headers) as response:
                assert response.status == 400, body
                assert "alerts" in await response.text()
        body = {"alerts": ["unknown_subscriber", "no_address", "unknown_subscriber"]}
        async with http.post(url, json=body, headers=headers) as response:
            assert response.status == 200
            action_id = (await response.json())["action_id"]
        message = await asyncio.wait_for(anext(aiter(listener.messages)), 10)
    event = json.loads(bytes(message.payload))  # type: ignore[arg-type]
    assert event["id"] == action_id
    assert event["type"] == "cn.antifraud.operator.acknowledge"
    assert event["source"] == "console/op-01"
    assert event["data"] == {
        "incident_id": "INC-C-ACK",
        "alerts": ["no_address", "unknown_subscriber"],
    }


async def test_an_action_that_changes_nothing_is_answered_at_once_with_its_entry(
    play: Player,
) -> None:
    """A repeated acknowledgement, an escalation of an escalated incident and a callback
    result after the escalation change nothing; each is still answered by an incident message
    carrying the entry that records it, at the moment it was handled (not with whatever
    changes the incident next), so the console that sent it can say it was recorded."""
    s = Script().call(0, "C-ACK", STRANGER, INVESTMENT, until_s=200)
    acknowledge(s, 205, "INC-C-ACK", ["unknown_subscriber"])
    incident = s.escalated(0, "C1")

    def act(at: float, verb: str, data: dict[str, object]) -> str:
        event = s.event(
            at, f"{PREFIX}/operators/op-01/actions", "console/op-01", f"cn.antifraud.{verb}", data
        )
        return str(event["id"])

    expected = {
        acknowledge(s, 206, "INC-C-ACK", ["unknown_subscriber"]): (
            "INC-C-ACK",
            206.0,
            "acknowledge_ignored",
        ),
        act(270, "operator.escalate", {"incident_id": incident}): (
            incident,
            270.0,
            "escalate_ignored",
        ),
        act(271, "operator.callback", {"incident_id": incident, "result": "no_answer"}): (
            incident,
            271.0,
            "callback_result",
        ),
    }
    r = await play(s)
    sent = [m for m in r.outbox() if m["topic"] == f"{PREFIX}/operators/incidents"]
    for action_id, (incident_id, at, kind) in expected.items():
        answers = [
            m
            for m in sent
            if m["payload"]["subject"] == incident_id
            and any(e["action_id"] == action_id for e in m["payload"]["data"]["timeline"])
        ]
        assert answers, (action_id, kind)
        assert answers[0]["at"] == at, (kind, answers[0]["at"])
        entry = next(
            e for e in answers[0]["payload"]["data"]["timeline"] if e["action_id"] == action_id
        )
        assert entry["kind"] == kind
    assert r.report["rejected"] == []


def test_every_alert_code_can_be_acknowledged_at_once() -> None:
    """An incident may hold every code the vocabulary has; one press takes them all on."""
    from typing import get_args

    import pydantic

    from dispatcher.inbound import AlertCode, OperatorAcknowledge

    codes = list(get_args(AlertCode))
    assert len(codes) == 8
    OperatorAcknowledge.model_validate({"incident_id": "INC-C1", "alerts": codes})
    try:
        OperatorAcknowledge.model_validate({"incident_id": "INC-C1", "alerts": [*codes, codes[0]]})
    except pydantic.ValidationError:
        pass
    else:
        raise AssertionError("more alerts than there are codes were accepted")
