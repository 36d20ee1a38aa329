"""Flagged-number lookup and the repeated-contact history."""

from __future__ import annotations

import pytest

from rules import CallFacts, ContactLog, FlaggedNumbers, RuleSet
from rules.conditions import Conditions, ContactCondition, RuleSettings
from rules.flagged import FlaggedPattern

PATTERNS = [
    FlaggedPattern("+85251230001", "exact", "impersonation", "a"),
    FlaggedPattern("+8616500", "prefix", "loan", "b"),
    FlaggedPattern("+86165001", "prefix", "refund", "c"),
    FlaggedPattern("+8616500199999", "exact", "investment", "d"),
]


class TestFlaggedNumbers:
    @pytest.mark.parametrize(
        ("number", "category"),
        [
            ("+85251230001", "impersonation"),  # an exact number
            ("+85251230002", None),  # a neighbour of an exact number is not flagged
            ("+8616500000000", "loan"),  # under a prefix
            ("+8616500100000", "refund"),  # the longest prefix wins
            ("+8616500199999", "investment"),  # an exact number beats any prefix
            ("+861650", None),  # shorter than every prefix
            ("+8613800000001", None),
        ],
    )
    def test_lookup(self, number: str, category: str | None) -> None:
        hit = FlaggedNumbers(PATTERNS).lookup(number)
        assert (hit.category if hit else None) == category

    def test_a_large_registry_is_looked_up_without_scanning(self) -> None:
        many = [FlaggedPattern(f"+8617{i:09d}", "exact", "x", "") for i in range(200_000)]
        numbers = FlaggedNumbers([*many, *PATTERNS])
        assert len(numbers) == 200_004
        assert numbers._lengths == [9, 8]  # one dict probe per distinct prefix length
        assert numbers.lookup("+8617000123456").category == "x"  # type: ignore[union-attr]


class TestContactLog:
    def test_counts_distinct_numbers_within_the_window(self) -> None:
        log = ContactLog(horizon_s=100, per_subscriber=10)
        for at, number in [(0, "a"), (10, "b"), (20, "a"), (30, "c")]:
            log.record("s", number, at)
        assert log.distinct("s", now=30, window_s=100) == 3
        assert log.distinct("s", now=30, window_s=15) == 2  # b at 10 is outside [15, 30]

    def test_keeps_at_most_per_subscriber_entries(self) -> None:
        log = ContactLog(horizon_s=10_000, per_subscriber=8)
        for i in range(100):
            log.record("s", f"n{i}", i)
        assert len(log) == 8
        assert log.distinct("s", now=99, window_s=10_000) == 8

    def test_entries_older_than_the_horizon_expire(self) -> None:
        log = ContactLog(horizon_s=60, per_subscriber=8)
        log.record("s", "a", 0)
        log.record("s", "b", 100)
        assert len(log) == 1

    def test_prune_forgets_subscribers_with_only_old_contacts(self) -> None:
        log = ContactLog(horizon_s=60, per_subscriber=8)
        for i in range(1000):
            log.record(f"s{i}", "a", 0)
        log.record("recent", "a", 500)
        log.prune(now=500)
        assert len(log) == 1

    def test_prune_goes_by_each_subscribers_latest_contact(self) -> None:
        log = ContactLog(horizon_s=60, per_subscriber=8)
        log.record("first", "a", 0)  # known first, and contacted again since
        for i in range(1000):
            log.record(f"s{i}", "a", 1)
        log.record("first", "b", 480)
        log.prune(now=500)
        assert len(log) == 1  # "first"'s latest: the one within the horizon
        assert log.distinct("first", now=500, window_s=60) == 1

    def test_a_subscriber_behind_a_newer_one_is_pruned_later_and_never_counted(self) -> None:
        log = ContactLog(horizon_s=60, per_subscriber=8)
        log.record("new", "a", 100)
        log.record("old", "a", 10)  # came late, out of order
        log.prune(now=100)
        assert log.distinct("old", now=100, window_s=60) == 0
        log.prune(now=200)
        assert len(log) == 0

    def test_at_most_max_subscribers_forgets_the_one_contacted_longest_ago(self) -> None:
        log = ContactLog(horizon_s=10_000, per_subscriber=8, max_subscribers=2)
        log.record("a", "x", 0)
        log.record("b", "x", 1)
        log.record("a", "y", 2)
        log.record("c", "x", 3)
        assert log.distinct("a", now=3, window_s=10_000) == 2
        assert log.distinct("b", now=3, window_s=10_000) == 0
        assert log.distinct("c", now=3, window_s=10_000) == 1


class TestRuleSet:
    def rule(self, **when: object) -> RuleSettings:
        return RuleSettings(id="r", severity="warning", when=Conditions(**when))  # type: ignore[arg-type]

    def facts(self, **changes: object) -> CallFacts:
        base: dict[str, object] = {
            "subscriber": "s",
            "counterpart": "c",
            "duration_s": 0.0,
            "vulnerable": False,
            "flag": None,
            "at": 0.0,
        }
        return CallFacts(**(base | changes))  # type: ignore[arg-type]

    def test_a_rule_without_conditions_always_holds(self) -> None:
        rules = RuleSet([self.rule()])
        assert rules.any_unflagged
        assert rules.matching(self.facts(), ContactLog(0, 8)) == rules.rules

    def test_all_conditions_must_hold(self) -> None:
        rules = RuleSet([self.rule(vulnerable=True, min_duration_s=60)])
        log = ContactLog(0, 8)
        assert rules.matching(self.facts(vulnerable=True, duration_s=59), log) == []
        assert rules.matching(self.facts(vulnerable=False, duration_s=90), log) == []
        assert rules.matching(self.facts(vulnerable=True, duration_s=60), log) == rules.rules

    def test_the_contact_horizon_is_the_widest_window(self) -> None:
        rules = RuleSet(
            [
                self.rule(distinct_flagged_contacts=ContactCondition(min_distinct=2, window_s=50)),
                self.rule(distinct_flagged_contacts=ContactCondition(min_distinct=2, window_s=500)),
            ]
        )
        assert rules.contact_horizon_s == 500
