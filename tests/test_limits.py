"""Input limits: a per-source rate limit, and bounded memory for every growing structure."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from scenario import CHEN, CLEAN, Player, Script

from adapters.store import Store
from dispatcher.limits import RateLimiter
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from rules.contacts import ContactLog

SEED = Path(__file__).parent / "data" / "chen_case.jsonl"


class TestRateLimiter:
    def test_allows_a_burst_then_the_rate(self) -> None:
        limiter = RateLimiter(rate=10, burst=5, max_keys=100)
        assert [limiter.allow("s", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
        assert limiter.allow("s", 0.1)  # one token back after 1/10 s
        assert not limiter.allow("s", 0.1)

    def test_sources_are_limited_separately(self) -> None:
        limiter = RateLimiter(rate=1, burst=1, max_keys=100)
        assert limiter.allow("a", 0.0) and limiter.allow("b", 0.0)
        assert not limiter.allow("a", 0.0)

    def test_memory_is_bounded_by_max_keys(self) -> None:
        limiter = RateLimiter(rate=1, burst=1, max_keys=100)
        for i in range(10_000):
            limiter.allow(f"made-up-{i}", 0.0)
        assert len(limiter) == 100


CALLS = "antifraud/v1/events/hengnan/calls"
REPLIES = "antifraud/v1/units/G-YJ-CH-02/replies"
STATUS = "antifraud/v1/units/G-YJ-CH-01/status"


def _status(event_id: str, state: str = "online") -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "handset/G-YJ-CH-01",
        "type": "cn.antifraud.unit.status",
        "time": "2021-10-15T14:00:00+08:00",
        "data": {"state": state},
    }


async def test_a_flooding_call_topic_is_refused_past_its_budget(
    settings: Settings, tmp_path: Path
) -> None:
    limits = settings.limits
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        template = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])["payload"]
        for i in range(limits.burst_per_source + 20):  # all at the same instant
            flood = json.loads(json.dumps(template)) | {"id": f"f{i}", "source": f"src-{i}"}
            flood["data"] |= {"call_id": f"F{i}", "counterpart": CLEAN, "subscriber": _resident(i)}
            runtime.handle(CALLS, flood, 1.0)
        # another party's channel is untouched by the flood
        runtime.handle(STATUS, _status("s1"), 1.0)
        await runtime.commit()
        reasons = [r for (r,) in await store.fetchall("SELECT reason FROM rejected")]
        # varying the CloudEvent source does not help: the budget is the topic's
        assert len(reasons) == 20
        assert all(r.startswith("rate limit: calls/hengnan") for r in reasons)
        assert runtime.counts["handled"] == limits.burst_per_source + 1
        assert runtime.state.presence["G-YJ-CH-01"] == "online"
        # a second later the topic has tokens again, and a refused message can be resent
        again = json.loads(json.dumps(template)) | {"id": "f0-again", "source": "src-0"}
        runtime.handle(CALLS, again, 2.0)
        assert runtime.counts["handled"] == limits.burst_per_source + 2


async def test_a_flooding_unit_is_counted_not_stored_and_other_channels_go_on(
    settings: Settings, tmp_path: Path
) -> None:
    """A handset sending garbage at full speed: past its channel's budget nothing of it is
    read, stored or dead-lettered; it is counted, and summed up once a period."""
    limits = settings.limits
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        count = 30_000
        for i in range(count):
            runtime.handle(REPLIES, b"garbage %d" % i, 1.0 + i / 100_000)
        runtime.handle(STATUS, _status("s1"), 1.5)
        await runtime.commit()
        rows = await store.fetchall("SELECT reason FROM rejected")
        assert len(rows) == limits.refusals_per_period
        outbox = await store.fetchall("SELECT count(*) FROM outbox")
        assert outbox[0][0] == limits.refusals_per_period  # their dead letters, no more
        pairs = await store.fetchall("SELECT pairs FROM inbound")
        stored = sum(len(json.loads(p)) for (p,) in pairs)
        assert stored <= limits.refusals_per_period + 1
        assert runtime.counts["suppressed"] == count - limits.refusals_per_period
        assert runtime.state.presence["G-YJ-CH-01"] == "online"
        # the summary is due a period after the first message suppressed, whether or not
        # anything else arrives: a live processor waits for next_due()
        assert runtime.next_due() == 1.0 + limits.refusals_per_period / 100_000 + (
            limits.refusal_period_s
        )
        # once a period has passed, one summary says how many were left unread
        runtime.advance(1.0 + limits.refusal_period_s + 1)
        assert runtime.next_due() is None
        await runtime.commit()
        summary = await store.fetchall("SELECT topic, reason FROM rejected WHERE payload = ''")
        assert summary == [
            (
                REPLIES,
                f"over budget: {count - limits.refusals_per_period} messages on this channel "
                "since 1.000 were counted and not processed",
            )
        ]


async def test_a_flood_at_the_end_of_a_recording_is_summed_up_in_its_report(
    settings: Settings, play: Player
) -> None:
    """The recording ends before a refusal period has passed since the flood began: its
    report still says how many messages were counted and not processed."""
    limits = settings.limits
    over = 35
    s = Script().call(0, "C1", CHEN, CLEAN, until_s=10)
    for i in range(limits.refusals_per_period + over):
        s.raw(20 + i / 1000, REPLIES, f"garbage {i}")
    r = await play(s)
    last = 20 + (limits.refusals_per_period + over - 1) / 1000
    summaries = [x for x in r.report["rejected"] if x["reason"].startswith("over budget")]
    assert summaries == [
        {
            "at": last,
            "topic": REPLIES,
            "reason": f"over budget: {over} messages on this channel since "
            f"{20 + limits.refusals_per_period / 1000:.3f} were counted and not processed",
        }
    ]


async def test_a_pair_seen_on_one_channel_is_not_a_duplicate_on_another(
    settings: Settings, tmp_path: Path
) -> None:
    """Dedupe poisoning: a guard publishing the call source's next (source, id) on its own
    topic must not make the real call event a duplicate."""
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        template = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])["payload"]
        poison = {"source": template["source"], "id": template["id"]}
        runtime.handle(REPLIES, json.dumps(poison).encode(), 1.0)
        runtime.handle(STATUS, json.dumps(template).encode(), 1.0)  # even a valid copy
        runtime.handle(CALLS, json.dumps(template).encode(), 2.0)
        assert runtime.counts["duplicates"] == 0
        assert runtime.counts["handled"] == 1
        assert runtime.counts["rejected"] == 2
        # on its own channel a pair is still seen once
        runtime.handle(CALLS, json.dumps(template).encode(), 3.0)
        runtime.handle(REPLIES, json.dumps(poison).encode(), 3.0)
        assert runtime.counts["duplicates"] == 2
        await runtime.commit()
    # and so after a restart, from what the store kept
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        runtime.handle(CALLS, json.dumps(template).encode(), 4.0)
        runtime.handle(REPLIES, json.dumps(poison).encode(), 4.0)
        assert runtime.counts["duplicates"] == 2
        assert runtime.counts["handled"] == 0


async def test_pairs_kept_before_channels_count_on_every_channel(
    settings: Settings, tmp_path: Path
) -> None:
    """A store written when pairs were kept without their channel: its pairs still stop a
    redelivered message, until they leave the dedupe window."""
    async with Store(tmp_path / "s.sqlite3") as store:
        store.add_inbound("app-warning/hengnan", "w-1", 1.0)
        await store.commit()
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        template = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])["payload"]
        event = template | {"source": "app-warning/hengnan", "id": "w-1"}
        runtime.handle(CALLS, json.dumps(event).encode(), 2.0)
        assert runtime.counts["duplicates"] == 1
        runtime.advance(2.0 + settings.limits.dedupe_window_s + 10)
        runtime._expire_countdown = 0
        runtime.advance(3.0 + settings.limits.dedupe_window_s + 10)
        runtime.handle(CALLS, json.dumps(event).encode(), 4.0 + settings.limits.dedupe_window_s)
        assert runtime.counts["duplicates"] == 1


def _resident(i: int) -> str:
    return f"+86139{i:08d}"


def _stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")


async def _rejected_for(
    settings: Settings, tmp_path: Path, stamps: list[float], arrivals: float | list[float]
) -> int:
    """How many of a source's call events, one per stamp, are refused when they arrive at
    ``arrivals`` (one moment for all, or one each)."""
    moments = arrivals if isinstance(arrivals, list) else [arrivals] * len(stamps)
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        template = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])["payload"]
        for i, (stamp, at) in enumerate(zip(stamps, moments, strict=True)):
            event = json.loads(json.dumps(template)) | {
                "id": f"b{i}",
                "source": "carrier",
                "time": _stamp(stamp),
            }
            # many residents, as in a real backlog (one resident's calls have a budget too)
            event["data"] |= {"call_id": f"B{i}", "counterpart": CLEAN, "subscriber": _resident(i)}
            runtime.handle("antifraud/v1/events/hengnan/calls", event, at)
        # refused: dead-lettered within the topic's refusal budget, counted past it
        return runtime.counts["rejected"] + runtime.counts["suppressed"]


async def test_a_backlog_delivered_at_once_is_not_taken_for_a_flood(
    settings: Settings, tmp_path: Path
) -> None:
    """After an outage the broker delivers what a source sent meanwhile in one burst: the
    limit applies to the rate the source sent at (its events' ``time``), not to the burst."""
    limits = settings.limits
    count = limits.burst_per_source + 5_000
    start = 1_800_000_000.0
    steady = [start + i / (limits.rate_per_source / 2) for i in range(count)]  # half the limit
    assert await _rejected_for(settings, tmp_path / "a", steady, steady[-1] + 30) == 0


async def test_a_flood_is_refused_whatever_it_arrives_with(
    settings: Settings, tmp_path: Path
) -> None:
    limits = settings.limits
    count = limits.burst_per_source + 500
    start = 1_800_000_000.0
    # sent faster than the limit (all within one instant), arriving over a minute
    assert await _rejected_for(settings, tmp_path / "a", [start] * count, start + 60) == 500
    # stamped in the future to look spread out: a stamp is never taken as later than arrival
    future = [start + 3600 + i for i in range(count)]
    assert await _rejected_for(settings, tmp_path / "b", future, start) == 500


async def test_a_source_whose_clock_stands_still_is_not_taken_for_a_flood(
    settings: Settings, tmp_path: Path
) -> None:
    """Stamped all with one moment but arriving at an ordinary pace: under the limit as it
    arrives, so it passes (only a source over the limit on both clocks is refused)."""
    limits = settings.limits
    count = limits.burst_per_source + 5_000
    start = 1_800_000_000.0
    arrivals = [start + i / (limits.rate_per_source / 2) for i in range(count)]
    assert await _rejected_for(settings, tmp_path, [start] * count, arrivals) == 0


def test_the_contact_log_keeps_at_most_max_subscribers() -> None:
    log = ContactLog(horizon_s=86400, per_subscriber=8, max_subscribers=1000)
    for i in range(50_000):
        log.record(f"+86139{i:08d}", "+85251230001", float(i))
    assert len(log) == 1000
    assert log.distinct("+86139" + f"{49_999:08d}", 49_999.0, 86400) == 1


async def test_a_floods_pairs_leave_the_dedupe_memory_together_once_the_window_has_passed(
    settings: Settings, tmp_path: Path
) -> None:
    """Tens of thousands of pairs that leave the dedupe window within one expiry are all
    forgotten there, and the pair still within it is kept (and still a duplicate)."""
    window = settings.limits.dedupe_window_s
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        template = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])["payload"]
        calls = "antifraud/v1/events/hengnan/calls"
        for i in range(30_000):  # a flood, 30 s of it
            at = i / 1000
            runtime.advance(at)
            runtime.handle(calls, json.loads(json.dumps(template)) | {"id": f"e{i}"}, at)
        late = json.loads(json.dumps(template)) | {"id": "late"}
        runtime.advance(window)
        runtime.handle(calls, late, window)
        for k in range(2048):  # two expiries' worth of advances, past the flood's window
            runtime.advance(window + 40 + k / 1000)
        (kept,) = runtime._seen["calls/hengnan"]  # the late pair alone
        assert kept.endswith("\0late")
        duplicates = runtime.counts["duplicates"]
        runtime.handle(calls, late, window + 43)
        assert runtime.counts["duplicates"] == duplicates + 1
        await runtime.commit()


async def test_each_channel_forgets_its_pairs_when_they_leave_the_window(
    settings: Settings, tmp_path: Path
) -> None:
    """Thousands of channels (a wave's radios), each swept when its own oldest pair leaves
    the window: one whose oldest pair was made new again is swept at that pair's time, and
    a channel emptied and used again is swept as a new one."""
    window = settings.limits.dedupe_window_s
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        for i in range(3000):
            runtime._remember_pair(f"replies/U{i}", f"U{i}\0a", float(i))
            runtime._remember_pair(f"replies/U{i}", f"U{i}\0b", float(i) + 0.5)
        # the oldest pair of U0 arrives again past the window: new again, at the back
        assert not runtime._duplicate("replies/U0", ("U0", "a"), window + 1)
        runtime._expire_seen(window + 1000.25)  # pairs made before 1000.25 leave
        assert "replies/U0" in runtime._seen and list(runtime._seen["replies/U0"]) == ["U0\0a"]
        assert "replies/U999" not in runtime._seen
        assert list(runtime._seen["replies/U1000"]) == ["U1000\0b"]
        assert all(f"replies/U{i}" in runtime._seen for i in range(1001, 3000))
        runtime._remember_pair("replies/U5", "U5\0c", window + 1001)  # emptied, used again
        runtime._expire_seen(window + 2999.25)
        assert set(runtime._seen) == {"replies/U0", "replies/U2999", "replies/U5"}
        runtime._expire_seen(2 * window + 1002)
        assert runtime._seen == {}
        assert runtime._seen_count == 0 and runtime._seen_front == {}
        await runtime.commit()


async def test_a_sweep_visits_only_the_channels_with_pairs_to_forget(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep costs what it forgets, not the county's size: with thousands of channels and
    one pair past the window it looks into that one channel (and the receipts' and a legacy
    store's memories), where it looked into every channel."""
    import dispatcher.runtime as runtime_module

    window = settings.limits.dedupe_window_s
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        for i in range(3000):
            runtime._remember_pair(f"replies/U{i}", f"U{i}\0a", 10.0 + i)
        looked: list[int] = []
        real = runtime_module.forget_while

        def counting(ordered: dict[Any, Any], old: Any) -> None:
            looked.append(len(ordered))
            real(ordered, old)

        monkeypatch.setattr(runtime_module, "forget_while", counting)
        runtime._expire_seen(window + 10.5)  # U0's pair alone has left the window
        assert "replies/U0" not in runtime._seen and len(runtime._seen) == 2999
        assert len(looked) == 3  # U0's channel, the legacy pairs, the receipts
        await runtime.commit()


async def test_the_dedupe_memory_is_bounded_under_a_flood(
    settings: Settings, tmp_path: Path
) -> None:
    small = settings.limits.model_copy(update={"max_dedupe_entries": 1000})
    from dataclasses import replace

    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(replace(settings, limits=small), store)
        await runtime.start()
        template = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])["payload"]
        for i in range(5000):
            event = json.loads(json.dumps(template)) | {"id": f"e{i}"}
            runtime.handle("antifraud/v1/events/hengnan/calls", event, float(i))
        assert runtime._seen_count == sum(map(len, runtime._seen.values())) == 1000
        await runtime.commit()


async def test_one_partys_flood_forgets_its_own_pairs_not_the_others(
    settings: Settings, tmp_path: Path
) -> None:
    """The dedupe memory is bounded in all; past the bound the channel holding the most
    forgets its oldest. A radio flipping its status at its budget fills the memory with its
    own pairs: an operator's action redelivered after it is still a duplicate."""
    from dataclasses import replace

    small = settings.limits.model_copy(update={"max_dedupe_entries": 1000})
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(replace(settings, limits=small), store)
        await runtime.start()
        action = {
            "specversion": "1.0",
            "id": "op-cb-1",
            "source": "console/op-01",
            "type": "cn.antifraud.operator.escalate",
            "data": {"incident_id": "INC-NOPE"},
        }
        actions = "antifraud/v1/operators/op-01/actions"
        runtime.handle(actions, action, 1.0)
        for i in range(1500):
            flip = _status(f"flip-{i}", "online" if i % 2 else "offline")
            runtime.handle(STATUS, flip, 2.0 + i / 50)
        assert runtime._seen_count <= 1000
        assert len(runtime._seen["actions/op-01"]) == 1
        duplicates = runtime.counts["duplicates"]
        runtime.handle(actions, action, 40.0)  # redelivered
        assert runtime.counts["duplicates"] == duplicates + 1
        await runtime.commit()


async def test_limits_never_touch_normal_traffic(play: Player) -> None:
    s = Script()
    for k in range(50):
        s.call(k * 10.0, f"C{k}", CHEN, CLEAN, until_s=60, step=1)  # 61 events a call, dense
    r = await play(s)
    assert r.report["rejected"] == []


async def test_one_residents_flood_of_calls_is_refused_past_its_budget(
    settings: Settings, tmp_path: Path
) -> None:
    """Each call of a resident with an open incident costs more the longer that incident:
    one resident's calls have a budget of their own, and others' calls go on."""
    limits = settings.limits
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        template = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])["payload"]
        for i in range(limits.burst_per_subscriber + 30):  # one resident, at one instant
            event = json.loads(json.dumps(template)) | {"id": f"r{i}"}
            event["data"] |= {"call_id": f"R{i}", "counterpart": CLEAN}
            runtime.handle(CALLS, event, 1.0)
        other = json.loads(json.dumps(template)) | {"id": "o1"}
        other["data"] |= {"call_id": "O1", "counterpart": CLEAN, "subscriber": _resident(1)}
        runtime.handle(CALLS, other, 1.0)
        assert runtime.counts["handled"] == limits.burst_per_subscriber + 1
        assert runtime.counts["rejected"] + runtime.counts["suppressed"] == 30
        await runtime.commit()
        reasons = [r for (r,) in await store.fetchall("SELECT reason FROM rejected")]
        assert reasons and all(r.startswith("rate limit: calls of +86138") for r in reasons)
