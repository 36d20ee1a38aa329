"""SPEC §5, sentence by sentence: each case is a recording and what its report must say.

Every case runs the real dispatcher (validation, rules, workflow, store, replay) on the example
deployment `config/hengnan.toml`. Its id is the sentence it proves.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from scenario import (
    CHEN,
    CLEAN,
    IMPERSONATION,
    INVESTMENT,
    LI,
    LIU,
    LOAN,
    REFUND,
    STRANGER,
    WANG,
    ZHAO,
    Player,
    Result,
    Script,
)

Check = Callable[[Result], None]
CASES: list[object] = []


def case(sentence: str) -> Callable[[Callable[[Script], Check]], Callable[[Script], Check]]:
    def register(build: Callable[[Script], Check]) -> Callable[[Script], Check]:
        CASES.append(pytest.param(build, id=sentence))
        return build

    return register


@pytest.mark.parametrize("build", CASES)
async def test_spec_sentence(play: Player, build: Callable[[Script], Check]) -> None:
    script = Script()
    check = build(script)
    check(await play(script))


# ---- flagged numbers and rules -------------------------------------------------------------


@case("a flagged number on the line for 30 s opens a warning incident (flagged_call_watch)")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=60)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["severity"], inc["rule"], inc["status"]) == (
            "warning",
            "flagged_call_watch",
            "open",
        )
        assert (inc["opened_at"], inc["critical_at"], inc["counterpart"]) == (
            30.0,
            None,
            INVESTMENT,
        )

    return check


@case("a warning is for the operator console only: no callback window, no dispatch")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=150).ended(2000, "C1", CHEN, INVESTMENT, 150)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["escalated_at"], inc["dispatches"]) == ("open", None, [])
        assert "callback_requested" not in r.timeline("INC-C1")

    return check


@case("a rule fires on the first event that satisfies it: 180 s of a flagged call is critical")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=210)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["opened_at"], inc["critical_at"], inc["rule"]) == (
            30.0,
            180.0,
            "long_call_flagged",
        )
        assert "callback_requested" in r.timeline("INC-C1")

    return check


@case("a flagged-category rule: impersonation for 120 s is critical")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, IMPERSONATION, until_s=150)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["critical_at"], inc["rule"]) == (120.0, "impersonation_long_call")

    return check


@case("a vulnerable resident with a flagged number for 60 s is critical")
def _(s: Script) -> Check:
    s.call(0, "C1", WANG, REFUND, until_s=90)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["opened_at"], inc["critical_at"], inc["rule"]) == (
            30.0,
            60.0,
            "vulnerable_long_call",
        )

    return check


@case("a number under a flagged prefix is flagged")
def _(s: Script) -> Check:
    s.call(0, "C1", LI, LOAN, until_s=60)

    def check(r: Result) -> None:
        assert r.incident("INC-C1")["opened_at"] == 30.0

    return check


@case("a clean number never opens an incident, however long the call")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, CLEAN, until_s=900).ended(930, "C1", CHEN, CLEAN, 930)

    def check(r: Result) -> None:
        assert r.report["incidents"] == []

    return check


@case("a call event rules are evaluated on includes call.ended: a 200 s call seen only at its end")
def _(s: Script) -> Check:
    s.started(0, "C1", CHEN, INVESTMENT).ended(200, "C1", CHEN, INVESTMENT, 200)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["opened_at"], inc["critical_at"], inc["rule"]) == (
            200.0,
            200.0,
            "long_call_flagged",
        )

    return check


@case("three distinct flagged numbers within 24 h warn on the third call.started")
def _(s: Script) -> Check:
    s.started(0, "C1", LI, IMPERSONATION).ended(10, "C1", LI, IMPERSONATION, 10)
    s.started(3600, "C2", LI, INVESTMENT).ended(3610, "C2", LI, INVESTMENT, 10)
    s.started(7200, "C3", LI, LOAN)

    def check(r: Result) -> None:
        inc = r.incident("INC-C3")
        assert (inc["severity"], inc["rule"], inc["opened_at"]) == (
            "warning",
            "repeated_flagged_contact",
            7200.0,
        )
        assert len(r.report["incidents"]) == 1

    return check


@case("the same flagged number calling three times is one distinct number: no warning")
def _(s: Script) -> Check:
    for k in range(3):
        s.started(100 * k, f"C{k}", LI, INVESTMENT).ended(100 * k + 10, f"C{k}", LI, INVESTMENT, 10)

    def check(r: Result) -> None:
        assert r.report["incidents"] == []

    return check


@case("a contact older than the 24 h window no longer counts")
def _(s: Script) -> Check:
    s.started(0, "C1", LI, IMPERSONATION).ended(10, "C1", LI, IMPERSONATION, 10)
    s.started(100, "C2", LI, INVESTMENT).ended(110, "C2", LI, INVESTMENT, 10)
    s.started(86400 + 50, "C3", LI, LOAN)

    def check(r: Result) -> None:
        assert r.report["incidents"] == []

    return check


@case("a contact is a flagged number calling the subscriber: outbound calls do not count")
def _(s: Script) -> Check:
    for k, other in enumerate([IMPERSONATION, INVESTMENT, LOAN]):
        s.started(100 * k, f"C{k}", LI, other, direction="outbound")

    def check(r: Result) -> None:
        assert r.report["incidents"] == []

    return check


# ---- one open incident per subscriber ------------------------------------------------------


@case("every call of a subscriber with an open incident joins it")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=60)
    s.call(100, "C2", CHEN, REFUND, until_s=60)

    def check(r: Result) -> None:
        assert [i["id"] for i in r.report["incidents"]] == ["INC-C1"]
        assert list(r.doc("INC-C1")["calls"]) == ["C1", "C2"]

    return check


@case("severity only goes up: a later warning match leaves the incident critical and its rule")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=180)
    s.call(200, "C2", CHEN, REFUND, until_s=30)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["severity"], inc["rule"], inc["critical_at"]) == (
            "critical",
            "long_call_flagged",
            180.0,
        )
        assert r.doc("INC-C1")["calls"]["C2"]["rules"] == ["flagged_call_watch"]

    return check


@case("the longest duration seen is kept: out-of-order progress never lowers it")
def _(s: Script) -> Check:
    s.started(0, "C1", CHEN, INVESTMENT)
    s.progress(30, "C1", CHEN, INVESTMENT, 30).progress(90, "C1", CHEN, INVESTMENT, 190)
    s.progress(95, "C1", CHEN, INVESTMENT, 60)

    def check(r: Result) -> None:
        assert r.doc("INC-C1")["duration_s"] == 190
        assert r.incident("INC-C1")["severity"] == "critical"

    return check


@case("a call whose incident has closed raises nothing more")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=60)
    s.close(70, "INC-C1", "false_alarm")
    s.progress(300, "C1", CHEN, INVESTMENT, 300)

    def check(r: Result) -> None:
        assert [i["id"] for i in r.report["incidents"]] == ["INC-C1"]
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["severity"], inc["outcome"]) == (
            "closed",
            "warning",
            "false_alarm",
        )

    return check


@case("a later call may open a new incident once the first has closed")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=60)
    s.close(70, "INC-C1", "false_alarm")
    s.call(100, "C2", CHEN, REFUND, until_s=30)

    def check(r: Result) -> None:
        assert [i["id"] for i in r.report["incidents"]] == ["INC-C1", "INC-C2"]
        assert r.incident("INC-C2")["opened_at"] == 130.0

    return check


# ---- callback phase ------------------------------------------------------------------------


@case("max_attempts results of no_answer or busy escalate (busy counts)")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=180)
    s.callback(195, "INC-C1", "no_answer").callback(225, "INC-C1", "busy")
    s.callback(255, "INC-C1", "no_answer")

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["escalated_at"]) == ("escalated", 255.0)
        assert r.doc("INC-C1")["callback_attempts"] == 3

    return check


@case("two unanswered callbacks are not yet enough")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=180)
    s.callback(195, "INC-C1", "no_answer").callback(225, "INC-C1", "busy")

    def check(r: Result) -> None:
        assert r.incident("INC-C1")["status"] == "open"

    return check


@case("callback.window_s passing without an answer escalates at critical_at + window")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=180)
    s.callback(200, "INC-C1", "no_answer")
    s.progress(400, "C1", CHEN, INVESTMENT, 400)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["escalated_at"]) == ("escalated", 300.0)
        assert r.dispatch("INC-C1", "G-YJ-CH-01")["offered_at"] == 300.0

    return check


@case("answered_at_risk escalates at once")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=180)
    s.callback(200, "INC-C1", "answered_at_risk")

    def check(r: Result) -> None:
        assert r.incident("INC-C1")["escalated_at"] == 200.0

    return check


@case("operator.escalate escalates at any severity, a warning too")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=60)
    s.escalate(70, "INC-C1")

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["severity"], inc["escalated_at"]) == (
            "escalated",
            "warning",
            70.0,
        )
        assert r.units("INC-C1")["G-YJ-CH-01"] == "offered"

    return check


@case("answered_safe closes the incident resolved_by_callback, with no dispatch")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=180)
    s.callback(200, "INC-C1", "answered_safe")
    s.progress(500, "C1", CHEN, INVESTMENT, 500)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["outcome"], inc["closed_at"]) == (
            "closed",
            "resolved_by_callback",
            200.0,
        )
        assert (inc["escalated_at"], inc["dispatches"]) == (None, [])

    return check


@case("callback results on a warning incident are recorded and change nothing")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=60)
    for k in range(3):
        s.callback(70 + k, "INC-C1", "no_answer")
    s.callback(80, "INC-C1", "answered_safe")

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["escalated_at"], inc["closed_at"]) == ("open", None, None)
        assert r.timeline("INC-C1").count("callback_result") == 4
        assert r.report["rejected"] == []

    return check


@case("callback results after escalation are recorded and change nothing")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.callback(270, incident, "answered_safe")

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["outcome"]) == ("escalated", None)
        assert r.timeline("INC-C1").count("callback_result") == 4
        assert r.report["rejected"] == []

    return check


@case("operator.escalate on an escalated incident changes nothing")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.escalate(260, incident)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert inc["escalated_at"] == 255.0
        assert len(inc["dispatches"]) == 4
        assert r.report["rejected"] == []

    return check


# ---- door-knock dispatch -------------------------------------------------------------------


@case("escalation offers every guard, notifies the grid worker and offers the first patrol at once")
def _(s: Script) -> Check:
    s.escalated(0, "C1")

    def check(r: Result) -> None:
        assert r.units("INC-C1") == {
            "G-YJ-CH-01": "offered",
            "G-YJ-CH-02": "offered",
            "P-YJ-01": "offered",
            "W-YJ-07": "notified",
        }
        assert {d["offered_at"] for d in r.incident("INC-C1")["dispatches"]} == {255.0}
        assert {d["role"] for d in r.incident("INC-C1")["dispatches"]} == {
            "guard",
            "police",
            "grid_worker",
        }

    return check


@case("the first guard to accept takes it and the other guard offers are cancelled (taken)")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-02", "accepted", incident)

    def check(r: Result) -> None:
        assert r.units("INC-C1")["G-YJ-CH-02"] == "accepted"
        assert r.units("INC-C1")["G-YJ-CH-01"] == "cancelled"
        sent = [m for m in r.outbox() if m["topic"].endswith("/units/G-YJ-CH-01/dispatches")]
        assert sent[-1]["type"] == "cn.antifraud.dispatch.cancelled"
        assert sent[-1]["payload"]["data"]["reason"] == "taken"

    return check


@case("a village has no guards: its grid worker is offered instead of notified")
def _(s: Script) -> Check:
    s.escalated(0, "C1", sub=LIU)

    def check(r: Result) -> None:
        assert r.units("INC-C1") == {"P-YJ-01": "offered", "W-YJ-12": "offered"}

    return check


@case("no guard available: the station's quick-police platforms are offered at once")
def _(s: Script) -> Check:
    s.status(0, "G-YJ-CH-01", "offline").status(1, "G-YJ-CH-02", "offline")
    s.escalated(10, "C1")

    def check(r: Result) -> None:
        assert r.units("INC-C1") == {
            "P-YJ-01": "offered",
            "Q-YJ-YL": "offered",
            "Q-YJ-LF": "offered",
            "W-YJ-07": "notified",
        }

    return check


@case("a unit whose last presence is offline gets no offer; one back online does")
def _(s: Script) -> Check:
    s.status(0, "G-YJ-CH-01", "offline").status(5, "G-YJ-CH-01", "online")
    s.status(6, "G-YJ-CH-02", "offline")
    s.escalated(10, "C1")

    def check(r: Result) -> None:
        units = r.units("INC-C1")
        assert units["G-YJ-CH-01"] == "offered"
        assert "G-YJ-CH-02" not in units
        assert "skipped" in r.timeline("INC-C1")

    return check


@case("a unit with an accepted dispatch that has not reported is busy and gets no new offer")
def _(s: Script) -> Check:
    first = s.escalated(0, "C1", sub=CHEN)
    s.reply(260, "G-YJ-CH-01", "accepted", first).reply(265, "P-YJ-01", "accepted", first)
    s.escalated(300, "C2", sub=ZHAO)

    def check(r: Result) -> None:
        units = r.units("INC-C2")
        assert "G-YJ-CH-01" not in units and "P-YJ-01" not in units
        assert units["G-YJ-CH-02"] == "offered" and units["P-YJ-02"] == "offered"

    return check


@case("a unit that has reported is available again")
def _(s: Script) -> Check:
    first = s.escalated(0, "C1", sub=CHEN)
    s.reply(260, "G-YJ-CH-01", "accepted", first)
    s.reply(400, "G-YJ-CH-01", "reported", first, outcome="dissuaded")
    s.escalated(500, "C2", sub=ZHAO)

    def check(r: Result) -> None:
        assert r.units("INC-C2")["G-YJ-CH-01"] == "offered"

    return check


@case("guard offers expire after guard_accept_s and the quick-police platforms are offered")
def _(s: Script) -> Check:
    s.escalated(0, "C1")
    s.progress(300, "C1", CHEN, INVESTMENT, 300)

    def check(r: Result) -> None:
        units = r.units("INC-C1")
        assert units["G-YJ-CH-01"] == units["G-YJ-CH-02"] == "expired"
        assert r.dispatch("INC-C1", "Q-YJ-YL")["offered_at"] == 285.0
        assert r.dispatch("INC-C1", "Q-YJ-LF")["status"] == "offered"
        assert units["P-YJ-01"] == "offered"  # its own 60 s have not passed

    return check


@case("a police offer not accepted within police_accept_s expires; the next patrol is offered")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.progress(320, "C1", CHEN, INVESTMENT, 320)

    def check(r: Result) -> None:
        assert r.units("INC-C1")["P-YJ-01"] == "expired"
        assert r.dispatch("INC-C1", "P-YJ-02")["offered_at"] == 315.0

    return check


@case("with no next patrol, the station's quick-police platforms are offered")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.progress(380, "C1", CHEN, INVESTMENT, 380)

    def check(r: Result) -> None:
        units = r.units("INC-C1")
        assert units["P-YJ-02"] == "expired"
        assert units["Q-YJ-YL"] == units["Q-YJ-LF"] == "offered"
        assert r.dispatch("INC-C1", "Q-YJ-YL")["offered_at"] == 375.0

    return check


@case(
    "quick-police platforms offered together: the first to accept takes it, the others stand down"
)
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.reply(390, "Q-YJ-LF", "accepted", incident)

    def check(r: Result) -> None:
        units = r.units("INC-C1")
        assert (units["Q-YJ-LF"], units["Q-YJ-YL"]) == ("accepted", "cancelled")

    return check


@case("quick-police offers expire after police_accept_s and the dead end alerts the operators")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.progress(440, "C1", CHEN, INVESTMENT, 440)

    def check(r: Result) -> None:
        units = r.units("INC-C1")
        assert units["Q-YJ-LF"] == units["Q-YJ-YL"] == "expired"
        assert "police_exhausted" in r.doc("INC-C1")["alerts"]
        assert r.incident("INC-C1")["status"] == "escalated"

    return check


@case("a unit that accepted and has not arrived within its time alerts the operators")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)  # a lost radio's accept, say
    s.reply(270, "P-YJ-01", "accepted", incident)
    s.reply(340, "P-YJ-01", "arrived", incident)
    s.progress(859, "C1", CHEN, INVESTMENT, 859)  # guard_arrive_s (600) not yet over
    s.progress(861, "C1", CHEN, INVESTMENT, 861)

    def check(r: Result) -> None:
        assert "arrival_overdue" in r.doc("INC-C1")["alerts"]
        (alert,) = [e for e in r.entries("INC-C1") if e["kind"] == "alert"]
        assert alert["at"] == 860.0
        assert "G-YJ-CH-01" in alert["text"] and "10分钟仍未到达" in alert["text"]
        assert r.units("INC-C1")["G-YJ-CH-01"] == "accepted"  # it is the operators' call

    return check


@case("each unit late is announced, and one after an acknowledged lateness sounds again")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.reply(270, "P-YJ-01", "accepted", incident)
    s.progress(861, "C1", CHEN, INVESTMENT, 861)  # the guard: 600 s over
    s.action(900, "acknowledge", {"incident_id": incident, "alerts": ["arrival_overdue"]})
    s.progress(2071, "C1", CHEN, INVESTMENT, 2071)  # the patrol: 1800 s over

    def check(r: Result) -> None:
        alerts = [e for e in r.entries("INC-C1") if e["kind"] == "alert"]
        assert [(e["at"], "G-YJ-CH-01" in e["text"]) for e in alerts] == [
            (860.0, True),
            (2070.0, False),
        ]
        assert "P-YJ-01" in alerts[1]["text"] and "30分钟" in alerts[1]["text"]
        doc = r.doc("INC-C1")
        assert doc["alerts"] == ["arrival_overdue"]
        assert "arrival_overdue" not in doc["acknowledged"]  # the patrol's lateness is news

    return check


@case("a unit that arrived and has given no outcome within dispatch.report_s alerts once")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.reply(400, "G-YJ-CH-01", "arrived", incident)  # and then nothing: a lost radio, say
    s.progress(3999, "C1", CHEN, INVESTMENT, 3999)  # report_s (3600) not yet over
    s.progress(4001, "C1", CHEN, INVESTMENT, 4001)
    s.progress(9000, "C1", CHEN, INVESTMENT, 9000)

    def check(r: Result) -> None:
        alerts = [e for e in r.entries("INC-C1") if e["kind"] == "alert"]
        texts = [(e["at"], e["text"]) for e in alerts if "到达后60分钟仍未反馈" in e["text"]]
        assert len(texts) == 1 and texts[0][0] == 4000.0 and "G-YJ-CH-01" in texts[0][1]
        assert "report_overdue" in r.doc("INC-C1")["alerts"]
        assert r.units("INC-C1")["G-YJ-CH-01"] == "arrived"  # it is the operators' call

    return check


@case("a unit late to arrive is announced again if, there at last, it gives no outcome")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.progress(861, "C1", CHEN, INVESTMENT, 861)  # 600 s late: arrival_overdue
    s.reply(900, "G-YJ-CH-01", "arrived", incident)
    s.progress(4501, "C1", CHEN, INVESTMENT, 4501)  # 3600 s there without an outcome

    def check(r: Result) -> None:
        entries = r.entries("INC-C1")
        guard = [e["at"] for e in entries if e["kind"] == "alert" and "G-YJ-CH-01" in e["text"]]
        assert guard == [860.0, 4500.0]
        alerts = r.doc("INC-C1")["alerts"]
        assert "arrival_overdue" in alerts and "report_overdue" in alerts

    return check


@case("a unit that arrives in time raises no arrival alert")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.reply(850, "G-YJ-CH-01", "arrived", incident)
    s.reply(270, "P-YJ-01", "accepted", incident)
    s.progress(2200, "C1", CHEN, INVESTMENT, 2200)  # the patrol: police_arrive_s (1800) over

    def check(r: Result) -> None:
        alerts = [e["text"] for e in r.entries("INC-C1") if e["kind"] == "alert"]
        assert len(alerts) == 1 and "P-YJ-01" in alerts[0] and "30分钟" in alerts[0]

    return check


@case("a report with no arrival before it alerts the operators, and the report still counts")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)  # a lost radio: accept, report at once
    s.reply(262, "G-YJ-CH-01", "reported", incident, outcome="false_alarm")

    def check(r: Result) -> None:
        doc = r.doc("INC-C1")
        assert doc["alerts"] == ["report_without_arrival"]
        (alert,) = [e for e in r.entries("INC-C1") if e["kind"] == "alert"]
        assert alert["at"] == 262.0
        assert "G-YJ-CH-01" in alert["text"] and "未报到达即反馈「误报" in alert["text"]
        units = r.units("INC-C1")
        assert units["G-YJ-CH-01"] == "reported" and units["G-YJ-CH-02"] == "cancelled"
        assert units["P-YJ-01"] == "offered"
        assert r.incident("INC-C1")["status"] == "escalated"  # the patrol is still asked

    return check


@case("a second unit reporting unseen sounds again after the first was acknowledged")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident).reply(265, "P-YJ-01", "accepted", incident)
    s.reply(270, "G-YJ-CH-01", "reported", incident, outcome="dissuaded")
    s.action(280, "acknowledge", {"incident_id": incident, "alerts": ["report_without_arrival"]})
    s.reply(290, "P-YJ-01", "reported", incident, outcome="dissuaded")

    def check(r: Result) -> None:
        alerts = [e for e in r.entries("INC-C1") if e["kind"] == "alert"]
        assert [(e["at"], "G-YJ-CH-01" in e["text"], "P-YJ-01" in e["text"]) for e in alerts] == [
            (270.0, True, False),
            (290.0, False, True),
        ]
        doc = r.doc("INC-C1")
        assert "report_without_arrival" not in doc["acknowledged"]
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["outcome"]) == ("closed", "prevented")  # SPEC §5's rule

    return check


@case("an arrival said sooner than dispatch.min_arrive_s after accepting alerts the operators")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)  # a lost radio that knows the protocol
    s.reply(261, "G-YJ-CH-01", "arrived", incident)
    s.reply(262, "G-YJ-CH-01", "reported", incident, outcome="dissuaded")

    def check(r: Result) -> None:
        assert r.doc("INC-C1")["alerts"] == ["arrival_too_soon"]
        (alert,) = [e for e in r.entries("INC-C1") if e["kind"] == "alert"]
        assert alert["at"] == 261.0
        assert (
            "G-YJ-CH-01" in alert["text"] and "接警后1秒即报到达（到场至少需60秒）" in alert["text"]
        )
        assert r.units("INC-C1")["G-YJ-CH-01"] == "reported"  # it still counts

    return check


@case("an arrival a minute or more after accepting raises no alert")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.reply(320, "G-YJ-CH-01", "arrived", incident)

    def check(r: Result) -> None:
        assert r.doc("INC-C1")["alerts"] == []

    return check


@case("a unit that arrived and then reported raises no alert")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident).reply(265, "P-YJ-01", "accepted", incident)
    s.reply(330, "G-YJ-CH-01", "arrived", incident)
    s.reply(340, "G-YJ-CH-01", "reported", incident, outcome="dissuaded")

    def check(r: Result) -> None:
        assert r.doc("INC-C1")["alerts"] == []
        assert not [e for e in r.entries("INC-C1") if e["kind"] == "alert"]

    return check


@case("with every guard offline, the grid worker's notice does not say guards are on it")
def _(s: Script) -> Check:
    s.status(0, "G-YJ-CH-01", "offline")
    s.status(0, "G-YJ-CH-02", "offline")
    s.escalated(10, "C1")

    def check(r: Result) -> None:
        units = r.units("INC-C1")
        assert units["W-YJ-07"] == "notified" and units["Q-YJ-LF"] == "offered"
        (notice,) = [m for m in r.outbox() if m["type"] == "cn.antifraud.dispatch.notice"]
        assert "保安" not in notice["payload"]["data"]["text"]

    return check


@case("every guard declining runs the fallback at once")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(258, "G-YJ-CH-01", "declined", incident).reply(259, "G-YJ-CH-02", "declined", incident)

    def check(r: Result) -> None:
        units = r.units("INC-C1")
        assert units["G-YJ-CH-01"] == units["G-YJ-CH-02"] == "declined"
        assert r.dispatch("INC-C1", "Q-YJ-YL")["offered_at"] == 259.0

    return check


@case("one guard declining while another is still offered waits for that one")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(258, "G-YJ-CH-01", "declined", incident)

    def check(r: Result) -> None:
        units = r.units("INC-C1")
        assert (units["G-YJ-CH-01"], units["G-YJ-CH-02"]) == ("declined", "offered")
        assert "Q-YJ-YL" not in units

    return check


@case("a declined police offer offers the next patrol at once")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "P-YJ-01", "declined", incident)

    def check(r: Result) -> None:
        assert r.units("INC-C1")["P-YJ-01"] == "declined"
        assert r.dispatch("INC-C1", "P-YJ-02")["offered_at"] == 260.0

    return check


@case("a unit is never offered the same incident twice; running out alerts the operators")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.progress(286, "C1", CHEN, INVESTMENT, 286)  # guards expired at 285: quick police offered
    s.reply(290, "P-YJ-01", "declined", incident).reply(295, "P-YJ-02", "declined", incident)
    # the police need waits on the door-knock's platforms, which run out at 345
    s.progress(350, "C1", CHEN, INVESTMENT, 350)

    def check(r: Result) -> None:
        units = [d["unit"] for d in r.incident("INC-C1")["dispatches"]]
        assert len(units) == len(set(units))
        assert {"door_exhausted", "police_exhausted"} <= set(r.doc("INC-C1")["alerts"])

    return check


@case(
    "a need that finds the quick-police platforms offered by the other waits on them, and one "
    "accepting there serves both"
)
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.progress(286, "C1", CHEN, INVESTMENT, 286)  # guards expired at 285: quick police offered
    s.reply(290, "P-YJ-01", "declined", incident).reply(295, "P-YJ-02", "declined", incident)
    s.reply(300, "Q-YJ-LF", "accepted", incident)

    def check(r: Result) -> None:
        doc = r.doc("INC-C1")
        assert "police_exhausted" not in doc["alerts"]
        kinds = r.timeline("INC-C1")
        assert kinds.index("waiting") < kinds.index("served_by_other")
        assert doc["slots"]["police"]["stage"] == doc["slots"]["door"]["stage"] == "filled"
        assert r.units("INC-C1")["Q-YJ-LF"] == "accepted"

    return check


@case("the door-knock finding the platforms offered for the police waits, and is served by them")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(256, "P-YJ-01", "declined", incident).reply(257, "P-YJ-02", "declined", incident)
    s.progress(286, "C1", CHEN, INVESTMENT, 286)  # guards expired at 285: no platform left
    s.reply(290, "Q-YJ-YL", "accepted", incident)

    def check(r: Result) -> None:
        doc = r.doc("INC-C1")
        assert "door_exhausted" not in doc["alerts"]
        assert r.dispatch("INC-C1", "Q-YJ-YL")["offered_at"] == 257.0
        assert doc["slots"]["door"]["stage"] == "filled"
        assert r.timeline("INC-C1").count("served_by_other") == 1

    return check


@case("a need waiting on the other's platforms raises no dead end while they are offered")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.progress(286, "C1", CHEN, INVESTMENT, 286)
    s.reply(290, "P-YJ-01", "declined", incident).reply(295, "P-YJ-02", "declined", incident)
    s.progress(340, "C1", CHEN, INVESTMENT, 340)  # the platforms' offers end at 345

    def check(r: Result) -> None:
        doc = r.doc("INC-C1")
        assert doc["alerts"] == []
        assert doc["slots"]["police"]["stage"] == "waiting"

    return check


@case("no guard and no quick-police platform available is a dead end that alerts the operators")
def _(s: Script) -> Check:
    for unit in ("G-ST-XH-01", "G-ST-XH-02", "Q-ST-XH"):
        s.status(0, unit, "offline")
    s.escalated(10, "C1", sub=LI)

    def check(r: Result) -> None:
        assert r.units("INC-C1") == {"P-ST-01": "offered", "W-ST-02": "notified"}
        assert "door_exhausted" in r.doc("INC-C1")["alerts"]

    return check


# ---- unknown subscriber --------------------------------------------------------------------


@case("an unknown subscriber's incident opens with an alert; escalation brings no door-knock")
def _(s: Script) -> Check:
    s.escalated(0, "C1", sub=STRANGER)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["dispatches"]) == ("escalated", [])
        assert {"unknown_subscriber", "no_address"} <= set(r.doc("INC-C1")["alerts"])

    return check


@case("an unknown subscriber: the default station's police are offered on operator escalation")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1", sub=STRANGER)
    s.escalate(260, incident)

    def check(r: Result) -> None:
        assert r.units("INC-C1") == {"P-YJ-01": "offered"}
        assert r.dispatch("INC-C1", "P-YJ-01")["offered_at"] == 260.0

    return check


@case("an unknown subscriber: an operator escalating the open incident offers police at once")
def _(s: Script) -> Check:
    s.call(0, "C1", STRANGER, INVESTMENT, until_s=60)
    s.escalate(70, "INC-C1")

    def check(r: Result) -> None:
        assert r.units("INC-C1") == {"P-YJ-01": "offered"}

    return check


# ---- closing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("guard", "police", "outcome"),
    [
        ("dissuaded", "loss", "loss"),
        ("dissuaded", "not_home", "prevented"),
        ("false_alarm", "not_home", "false_alarm"),
        ("not_home", "not_home", "unreachable"),
        ("false_alarm", "dissuaded", "prevented"),
    ],
)
async def test_closes_with_outcome_from_reports(
    play: Player, guard: str, police: str, outcome: str
) -> None:
    """Every accepted dispatch reported, none pending: loss > dissuaded > false_alarm > else."""
    s = Script()
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident).reply(265, "P-YJ-01", "accepted", incident)
    s.reply(300, "G-YJ-CH-01", "arrived", incident)
    s.reply(310, "G-YJ-CH-01", "reported", incident, outcome=guard)
    s.reply(400, "P-YJ-01", "reported", incident, outcome=police)  # reported right after accepted
    r = await play(s)
    inc = r.incident("INC-C1")
    assert (inc["status"], inc["outcome"], inc["closed_at"]) == ("closed", outcome, 400.0)


@case("it does not close while an accepted unit has not reported")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident).reply(265, "P-YJ-01", "accepted", incident)
    s.reply(310, "G-YJ-CH-01", "reported", incident, outcome="dissuaded")

    def check(r: Result) -> None:
        assert r.incident("INC-C1")["status"] == "escalated"

    return check


@case("it does not close while an offer is pending")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.reply(270, "G-YJ-CH-01", "reported", incident, outcome="dissuaded")

    def check(r: Result) -> None:
        assert r.incident("INC-C1")["status"] == "escalated"
        assert r.units("INC-C1")["P-YJ-01"] == "offered"

    return check


@case("operator.close closes at once with its outcome and stands every unreported unit down")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(260, "G-YJ-CH-01", "accepted", incident)
    s.close(300, incident, "prevented", note="居民已挂断电话")

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["outcome"], inc["closed_at"]) == ("closed", "prevented", 300.0)
        assert r.units("INC-C1") == {
            "G-YJ-CH-01": "cancelled",
            "G-YJ-CH-02": "cancelled",
            "P-YJ-01": "cancelled",
            "W-YJ-07": "notified",
        }
        told = {
            m["topic"].split("/")[3]
            for m in r.outbox()
            if m["at"] == 300.0 and m["type"] == "cn.antifraud.dispatch.cancelled"
        }
        assert told == {"G-YJ-CH-01", "P-YJ-01"}
        assert r.doc("INC-C1")["note"] == "居民已挂断电话"

    return check


@case("a call ending never closes an incident")
def _(s: Script) -> Check:
    s.call(0, "C1", CHEN, INVESTMENT, until_s=180).ended(200, "C1", CHEN, INVESTMENT, 200)

    def check(r: Result) -> None:
        assert r.incident("INC-C1")["status"] == "open"

    return check


@case("nobody accepting never closes the incident silently: it stays escalated, alerted")
def _(s: Script) -> Check:
    s.escalated(0, "C1")
    s.progress(1000, "C1", CHEN, INVESTMENT, 1000)

    def check(r: Result) -> None:
        inc = r.incident("INC-C1")
        assert (inc["status"], inc["outcome"]) == ("escalated", None)
        assert {"door_exhausted", "police_exhausted"} <= set(r.doc("INC-C1")["alerts"])

    return check


# ---- timers in virtual time ----------------------------------------------------------------


@case("a timer due exactly at a line's time fires before that line")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.reply(285, "G-YJ-CH-01", "accepted", incident)  # the guards' 30 s end at 285

    def check(r: Result) -> None:
        assert r.units("INC-C1")["G-YJ-CH-01"] == "expired"
        assert any("too late" in reason for reason in r.reasons())

    return check


@case("the report is as of the last line: timers due later have not fired")
def _(s: Script) -> Check:
    s.escalated(0, "C1")

    def check(r: Result) -> None:
        assert r.units("INC-C1")["G-YJ-CH-01"] == "offered"

    return check


# ---- decisions where the contract is silent (docs/decisions.md) ----------------------------


@case("decision 5: a clean call after three flagged contacts opens nothing")
def _(s: Script) -> Check:
    s.started(0, "C1", LI, IMPERSONATION).ended(10, "C1", LI, IMPERSONATION, 10)
    s.started(100, "C2", LI, INVESTMENT).ended(110, "C2", LI, INVESTMENT, 10)
    s.started(200, "C3", LI, LOAN).ended(210, "C3", LI, LOAN, 10)
    s.close(220, "INC-C3", "false_alarm")
    s.started(300, "C4", LI, CLEAN)

    def check(r: Result) -> None:
        assert [i["id"] for i in r.report["incidents"]] == ["INC-C3"]

    return check


@case("decision 13: a unit going offline keeps the offer it already has")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.status(256, "G-YJ-CH-01", "offline")
    s.reply(270, "G-YJ-CH-01", "accepted", incident)

    def check(r: Result) -> None:
        assert r.units("INC-C1")["G-YJ-CH-01"] == "accepted"

    return check


@case("decision 15: a notified grid worker hears that the incident closed")
def _(s: Script) -> Check:
    incident = s.escalated(0, "C1")
    s.close(300, incident, "false_alarm")

    def check(r: Result) -> None:
        notices = [
            m["payload"]["data"] for m in r.outbox() if m["topic"].endswith("/W-YJ-07/dispatches")
        ]
        assert [n["closed"] for n in notices] == [False, True]
        assert r.units("INC-C1")["W-YJ-07"] == "notified"

    return check


@case("decision 17: a second operator escalation of an unknown subscriber changes nothing")
def _(s: Script) -> Check:
    s.call(0, "C1", STRANGER, INVESTMENT, until_s=60)
    s.escalate(70, "INC-C1").escalate(80, "INC-C1")

    def check(r: Result) -> None:
        assert r.units("INC-C1") == {"P-YJ-01": "offered"}
        assert r.timeline("INC-C1")[-1] == "escalate_ignored"

    return check
