"""N workers serving M regions on fenced leases: the simulation of docs/scale.md.

The lease's statements are checked on their own, then whole runs under each kind of fault:
nothing lost, nothing decided twice differently, nothing published from a commit made after
fencing, and the gaps within their bounds. A run with the fence switched off must be caught.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tools.sim_regions import (
    FAULT_KINDS,
    PROBE_MS,
    Figures,
    LeaseTable,
    Params,
    main,
    simulate,
)

SEEDS = (1, 2, 3)
# short runs with many faults: ten minutes of virtual time, a fault every 20 s on average
SHORT = Params(seconds=600, fault_every_s=20)


def run(seed: int, **changes: Any) -> Figures:
    return simulate(dataclasses.replace(SHORT, seed=seed, **changes))


def takeover_bound(p: Params) -> int:
    """From a holder's last renewal to its regions being served again elsewhere: the lease
    expires one TTL after the renewal; a standby's next take comes within one take interval;
    connecting to the broker session takes at most connect_ms[1], noticed at the next batch
    step; the gap is measured by a probe every PROBE_MS."""
    return p.ttl_ms + p.take_ms + p.connect_ms[1] + p.batch_ms + PROBE_MS


class TestTheLeaseStatements:
    def test_take_succeeds_only_on_an_expired_lease_and_bumps_the_epoch(self) -> None:
        table = LeaseTable(["R01"])
        assert table.take("R01", "a", 4000, now=0) == 1
        assert table.take("R01", "b", 4000, now=3999) is None
        assert table.take("R01", "b", 4000, now=4000) is None  # expires_at < now, strictly
        assert table.take("R01", "b", 4000, now=4001) == 2
        row = table.rows["R01"]
        assert (row.holder, row.epoch, row.since, row.expires_at) == ("b", 2, 4001, 8001)

    def test_renew_and_fence_need_the_same_holder_and_epoch(self) -> None:
        table = LeaseTable(["R01"])
        table.take("R01", "a", 4000, now=0)
        assert table.renew("R01", "a", 1, 4000, now=1000)
        assert table.rows["R01"].expires_at == 5000
        assert table.fence("R01", "a", 1)
        table.take("R01", "b", 4000, now=6000)
        assert not table.renew("R01", "a", 1, 4000, now=6001)
        assert not table.fence("R01", "a", 1)
        assert table.fence("R01", "b", 2)

    def test_the_fence_holds_past_expiry_until_someone_takes(self) -> None:
        """The fence checks holder and epoch, not the time: a late commit of a holder nobody
        replaced yet is still the only writer's."""
        table = LeaseTable(["R01"])
        table.take("R01", "a", 4000, now=0)
        assert table.fence("R01", "a", 1)
        assert table.rows["R01"].expires_at < 10_000
        assert table.fence("R01", "a", 1)

    def test_release_lets_the_next_take_in_at_once(self) -> None:
        table = LeaseTable(["R01"])
        table.take("R01", "a", 4000, now=0)
        assert not table.release("R01", "b", 1, now=100)
        assert table.release("R01", "a", 1, now=100)
        assert table.take("R01", "b", 4000, now=101) == 2


def test_without_faults_every_region_is_taken_once_and_spread_evenly() -> None:
    figures = simulate(dataclasses.replace(SHORT, faults=()))
    assert [r.takes for r in figures.regions] == [1] * 12
    assert sorted(len(w.held) for w in figures.workers) == [4, 4, 4]
    assert figures.max_gap_ms() == 0
    assert figures.violations() == []
    assert sum(r.events for r in figures.regions) > 12 * 500


def test_the_same_seed_gives_the_same_run() -> None:
    def summary(f: Figures) -> list[tuple[int, int, int, int, int]]:
        return [(r.events, r.takes, r.max_gap, r.max_delay, r.duplicates) for r in f.regions]

    assert summary(run(7)) == summary(run(7))
    assert summary(run(7)) != summary(run(8))


@pytest.mark.parametrize("kind", FAULT_KINDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_the_invariants_hold_under_each_fault(kind: str, seed: int) -> None:
    figures = run(seed, faults=(kind,))
    assert figures.faults[kind] > 10
    assert figures.violations() == []
    assert all(figures.decided_twice(r)[1] == 0 for r in figures.regions)
    cap = figures.params.cap()
    assert all(w.max_held <= cap for w in figures.workers)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_invariants_hold_under_every_fault_at_once(seed: int) -> None:
    """Faults overlapping: two workers down together leave more regions than one can take,
    which lengthens gaps, but loses or contradicts nothing."""
    figures = run(seed, fault_every_s=10)
    assert sum(figures.faults.values()) > 40
    assert figures.violations() == []


@pytest.mark.parametrize("seed", SEEDS)
def test_a_crash_costs_its_regions_at_most_one_ttl_and_a_take(seed: int) -> None:
    figures = run(seed, faults=("crash",), fault_spacing_s=40)
    p = figures.params
    assert figures.faults["crash"] >= 5
    # at least the time from the last renewal to the expiry: the crashes did hit holders
    assert figures.max_gap_ms() >= p.ttl_ms - p.renew_ms
    assert figures.max_gap_ms() <= takeover_bound(p)
    # an event waits at most one batch more: it may have reached the worker just before
    assert figures.max_delay_ms() <= takeover_bound(p) + p.batch_ms


@pytest.mark.parametrize("seed", SEEDS)
def test_a_frozen_leader_is_fenced_when_it_wakes_and_its_regions_move_in_bounds(
    seed: int,
) -> None:
    figures = run(seed, faults=("freeze",), fault_spacing_s=40)
    p = figures.params
    assert figures.faults["freeze"] >= 5
    # each freeze struck with a batch in hand; on waking its commit was refused by the fence
    assert sum(r.fenced for r in figures.regions) >= figures.faults["freeze"]
    assert all(store.stale_commits == 0 for store in figures.stores.values())
    assert figures.max_gap_ms() <= takeover_bound(p)
    assert figures.violations() == []


@pytest.mark.parametrize("seed", SEEDS)
def test_a_database_failover_stalls_every_region_until_promotion(seed: int) -> None:
    figures = run(seed, faults=("failover",), failover_s=(10.0, 10.0), fault_spacing_s=40)
    p = figures.params
    assert figures.faults["failover"] >= 5
    for region in figures.regions:
        assert 10_000 <= region.max_gap <= 10_000 + takeover_bound(p) - p.ttl_ms
    assert figures.violations() == []


@pytest.mark.parametrize("seed", SEEDS)
def test_the_broken_lease_is_caught(seed: int) -> None:
    """The fence switched off: a frozen leader that wakes commits its batch on top of the new
    holder's decisions of the same events, which is found."""
    figures = run(seed, faults=("freeze",), fence=False)
    contradicted = sum(figures.decided_twice(r)[1] for r in figures.regions)
    stale = sum(r.stale_published for r in figures.regions)
    assert contradicted > 0 or stale > 0
    assert any("decided twice, differently" in v for v in figures.violations())


def test_the_command_prints_the_table_and_says_whether_the_invariants_hold(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--workers", "3", "--regions", "6", "--hours", "0.1", "--seed", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "max gap s" in out and "\nR06 " in out and "invariants hold" in out
    assert main([*argv, "--faults", "freeze", "--fault-every", "20", "--no-fence"]) == 1
    assert "INVARIANTS VIOLATED" in capsys.readouterr().out


def test_the_command_refuses_an_unknown_fault(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--faults", "meteor"])
    assert stopped.value.code == 2
    assert "meteor" in capsys.readouterr().err


@pytest.mark.parametrize("seed", SEEDS)
def test_every_worker_serves_again_once_the_faults_are_over(seed: int) -> None:
    """After the last fault the drain rebalances: nobody is left stuck, frozen or idle."""
    figures = run(seed, fault_every_s=10)
    p = figures.params
    assert all(w.alive and w.frozen_batch is None for w in figures.workers)
    held = sorted(len(w.held) for w in figures.workers)
    assert sum(held) == p.regions
    assert held[0] >= p.regions // p.workers - 1
