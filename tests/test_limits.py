"""Input limits: a per-source rate limit, and bounded memory for every growing structure."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

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


async def test_a_flooding_source_is_dead_lettered_and_others_go_on(
    settings: Settings, tmp_path: Path
) -> None:
    limits = settings.limits
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        template = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])["payload"]
        for i in range(limits.burst_per_source + 20):  # all at the same instant
            flood = json.loads(json.dumps(template)) | {"id": f"f{i}", "source": "flooder"}
            flood["data"] |= {"call_id": f"F{i}", "counterpart": CLEAN}
            runtime.handle("antifraud/v1/events/hengnan/calls", flood, 1.0)
        calm = json.loads(json.dumps(template)) | {"id": "c1", "source": "calm"}
        runtime.handle("antifraud/v1/events/hengnan/calls", calm, 1.0)
        await runtime.commit()
        reasons = [r for (r,) in await store.fetchall("SELECT reason FROM rejected")]
        assert len(reasons) == 20
        assert all(r.startswith("rate limit: source 'flooder'") for r in reasons)
        assert runtime.counts["handled"] == limits.burst_per_source + 1
        # a second later the source has tokens again, and a refused message can be resent
        runtime.handle(
            "antifraud/v1/events/hengnan/calls",
            json.loads(json.dumps(template))
            | {"id": f"f{limits.burst_per_source}", "source": "flooder"},
            2.0,
        )
        assert runtime.counts["handled"] == limits.burst_per_source + 2


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
            event["data"] |= {"call_id": f"B{i}", "counterpart": CLEAN}
            runtime.handle("antifraud/v1/events/hengnan/calls", event, at)
        return runtime.counts["rejected"]


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
        assert len(runtime._seen) == 1000
        await runtime.commit()


async def test_limits_never_touch_normal_traffic(play: Player) -> None:
    s = Script()
    for k in range(50):
        s.call(k * 10.0, f"C{k}", CHEN, CLEAN, until_s=60, step=1)  # 61 events a call, dense
    r = await play(s)
    assert r.report["rejected"] == []
