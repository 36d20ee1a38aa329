"""The runtime on in-memory ports (tests/fakes.py): no file, no broker, no real time."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from fakes import ManualClock, MemoryJournal, RecordingPublisher
from scenario import CALLS, CHEN, CLEAN, INVESTMENT

from antifraud import bootstrap
from dispatcher.errors import StoreError
from dispatcher.inbound import call_data, cloudevent
from dispatcher.model import incident_of_call
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

OPENED = "cn.antifraud.incident.opened"
OFFERED = "cn.antifraud.dispatch.offered"
CALL = "c-1"
INCIDENT = incident_of_call(CALL)
CALLBACK_WINDOW_S = 120  # config/hengnan.toml [callback]


def call(counterpart: str, duration_s: float, event_id: str = "e-1", call_id: str = CALL) -> bytes:
    """A ``call.progress`` of Ms. Chen's call with ``counterpart``."""
    data = call_data("progress", call_id, CHEN, counterpart, duration_s)
    event = cloudevent(
        event_id,
        "carrier/hengnan",
        "cn.antifraud.call.progress",
        data,
        time="2021-10-15T14:00:00+08:00",
    )
    return orjson.dumps(event)


async def started(
    settings: Settings, journal: MemoryJournal, *, outbox: bool = True
) -> tuple[Runtime, RecordingPublisher]:
    runtime = bootstrap.runtime(settings, journal, outbox=outbox)
    publisher = RecordingPublisher()
    runtime.on_written = publisher
    await runtime.start()
    return runtime, publisher


def types(messages: list[tuple[str, str | None]]) -> list[str | None]:
    return [type_ for _, type_ in messages]


class TestACall:
    async def test_a_flagged_call_opens_an_incident_whose_messages_wait_for_the_commit(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        runtime, publisher = await started(settings, journal)
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        assert list(runtime.state.incidents) == [INCIDENT]
        assert types(journal.messages(queued=True)) == [OPENED, OPENED]
        assert list(journal.queued.incidents) == [INCIDENT]
        assert (journal.messages(), publisher.handed) == ([], [])

    async def test_a_clean_call_queues_only_its_processed_pair(self, settings: Settings) -> None:
        journal = MemoryJournal()
        runtime, _ = await started(settings, journal)
        runtime.handle(CALLS, call(CLEAN, 200.0), 10.0)
        assert runtime.state.incidents == {}
        assert not journal.holds_effects()
        assert len(journal.queued.inbound) == 1

    async def test_the_same_call_event_again_is_dropped_as_a_duplicate(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        runtime, _ = await started(settings, journal)
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 11.0)
        assert (runtime.counts["handled"], runtime.counts["duplicates"]) == (1, 1)
        assert len(journal.messages(queued=True)) == 2


class TestAFailingStep:
    async def test_a_step_that_fails_half_way_is_undone_and_dead_lettered(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        runtime, _ = await started(settings, journal)
        step = runtime.workflow.step

        def fails_after_the_step(*args: Any) -> Any:
            step(*args)  # the incident is opened in memory …
            raise RuntimeError("a defect")  # … and then the step fails

        runtime.workflow.step = fails_after_the_step  # type: ignore[method-assign]
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        assert runtime.state.incidents == {}
        assert journal.queued.incidents == {}
        assert [reason for _, _, reason, _ in journal.queued.rejected] == [
            "internal error: RuntimeError: a defect"
        ]
        assert types(journal.messages(queued=True)) == ["cn.antifraud.input.rejected"]
        assert (runtime.counts["handled"], runtime.counts["rejected"]) == (0, 1)

    async def test_after_an_undone_step_the_next_call_opens_the_incident(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        runtime, _ = await started(settings, journal)
        step = runtime.workflow.step

        def fails_once(*args: Any) -> Any:
            runtime.workflow.step = step  # type: ignore[method-assign]
            step(*args)
            raise RuntimeError("a defect")

        runtime.workflow.step = fails_once  # type: ignore[method-assign]
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        runtime.handle(CALLS, call(INVESTMENT, 210.0, event_id="e-2"), 20.0)
        assert list(runtime.state.incidents) == [INCIDENT]
        assert list(journal.queued.incidents) == [INCIDENT]


class TestACommit:
    async def test_a_commit_hands_its_messages_over_in_order(self, settings: Settings) -> None:
        journal = MemoryJournal()
        runtime, publisher = await started(settings, journal)
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        await runtime.commit()
        assert len(publisher.handed) == 1
        assert [p["type"] for p in publisher.payloads() if p] == [OPENED, OPENED]
        seqs = [seq for seq, *_ in publisher.handed[0]]
        assert sorted(seqs) == seqs
        assert types(journal.messages()) == [OPENED, OPENED]
        assert (journal.messages(queued=True), journal.flushes) == ([], 1)

    async def test_a_failed_commit_keeps_everything_for_the_next_one(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        runtime, publisher = await started(settings, journal)
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        journal.fail_commits = 1
        with pytest.raises(StoreError, match="refused"):
            await runtime.commit()
        assert (publisher.handed, journal.messages()) == ([], [])
        await runtime.commit()
        assert [p["type"] for p in publisher.payloads() if p] == [OPENED, OPENED]
        assert list(journal.committed.incidents) == [INCIDENT]

    async def test_in_replay_messages_count_as_sent_and_nobody_is_handed_any(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        runtime, publisher = await started(settings, journal, outbox=False)
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        await runtime.commit()
        assert publisher.handed == []
        assert [sent for *_, sent in journal.committed.outbox] == [True, True]


class TestTimers:
    async def test_an_unanswered_callback_window_escalates_to_offers_on_the_fake_clock(
        self, settings: Settings
    ) -> None:
        journal, clock = MemoryJournal(), ManualClock(10.0)
        runtime, _ = await started(settings, journal)
        runtime.handle(CALLS, call(INVESTMENT, 200.0), clock.now())
        assert clock.now() + CALLBACK_WINDOW_S == runtime.next_due()
        runtime.advance(clock.advance(CALLBACK_WINDOW_S - 1))
        assert runtime.counts["timers"] == 0
        runtime.advance(clock.advance(1))
        assert runtime.counts["timers"] == 1
        assert OFFERED in types(journal.messages(queued=True))


class TestARestart:
    async def test_a_new_runtime_continues_from_the_journal(self, settings: Settings) -> None:
        journal = MemoryJournal()
        first, _ = await started(settings, journal)
        first.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        await first.commit()
        second, _ = await started(settings, journal)
        assert list(second.state.incidents) == [INCIDENT]
        assert second.next_due() == 10.0 + CALLBACK_WINDOW_S
        second.handle(CALLS, call(INVESTMENT, 200.0), 11.0)  # redelivered after the restart
        assert second.counts["duplicates"] == 1

    async def test_a_timer_that_fell_due_while_the_service_was_down_gives_offers_their_time(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        first, _ = await started(settings, journal)
        first.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        await first.commit()
        # down for 70 s past the callback window; back, it catches up at 200
        second, _ = await started(settings, journal)
        second.advance(200.0, late_after=2.0)
        incident = second.state.incidents[INCIDENT]
        assert incident.escalated_at == 200.0
        offers = [d for d in incident.dispatches.values() if d.status == "offered"]
        assert offers and all(d.offered_at == 200.0 for d in offers)
        guard_accept_s = settings.dispatch.guard_accept_s
        assert {d.expires_at for d in offers if d.role == "guard"} == {200.0 + guard_accept_s}
        assert second.clock == 200.0

    async def test_a_timer_a_little_late_still_fires_at_its_due_time(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        runtime, _ = await started(settings, journal)
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        runtime.advance(10.0 + CALLBACK_WINDOW_S + 1.5, late_after=2.0)
        assert runtime.state.incidents[INCIDENT].escalated_at == 10.0 + CALLBACK_WINDOW_S


class TestKeptInbound:
    async def test_a_call_that_opens_an_incident_is_kept_as_received_against_it(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        runtime, _ = await started(settings, journal)
        payload = call(INVESTMENT, 200.0)
        runtime.handle(CALLS, payload, 10.0)
        runtime.handle(CALLS, call(CLEAN, 10.0, "e-2", "c-2"), 11.0)  # joins it
        await runtime.commit()
        kept = journal.committed.kept
        assert [(k.incident_id, k.call_id, k.at) for k in kept] == [
            (INCIDENT, CALL, 10.0),
            (INCIDENT, "c-2", 11.0),
        ]
        assert kept[0].payload == payload.decode() and kept[0].subscriber == CHEN

    async def test_a_clean_call_of_nobody_s_incident_is_not_kept(self, settings: Settings) -> None:
        journal = MemoryJournal()
        runtime, _ = await started(settings, journal)
        runtime.handle(CALLS, call(CLEAN, 10.0), 10.0)
        await runtime.commit()
        assert journal.committed.kept == []

    async def test_kept_messages_go_with_their_incident_s_retention(
        self, settings: Settings
    ) -> None:
        journal = MemoryJournal()
        runtime, _ = await started(settings, journal)
        runtime.handle(CALLS, call(INVESTMENT, 200.0), 10.0)
        await runtime.commit()
        await journal.prune(0.0, 0.0, (1e9, 1e9))  # open: kept whatever its age
        assert len(journal.committed.kept) == 1
