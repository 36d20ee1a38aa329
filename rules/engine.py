"""Evaluating declarative rules against one call event: small pure functions over plain data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rules.conditions import Conditions, RuleSettings
from rules.contacts import ContactLog
from rules.flagged import FlaggedPattern

SEVERITY_RANK = {"warning": 1, "critical": 2}


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What a rule may look at: one call event and what is known about its parties."""

    subscriber: str
    counterpart: str
    duration_s: float
    vulnerable: bool
    flag: FlaggedPattern | None
    at: float


def holds(when: Conditions, facts: CallFacts, contacts: ContactLog) -> bool:
    """True when every condition present in ``when`` holds for ``facts``."""
    if when.flagged is not None and (facts.flag is not None) != when.flagged:
        return False
    if when.categories is not None and (
        facts.flag is None or facts.flag.category not in when.categories
    ):
        return False
    if when.vulnerable is not None and facts.vulnerable != when.vulnerable:
        return False
    if when.min_duration_s is not None and facts.duration_s < when.min_duration_s:
        return False
    if when.distinct_flagged_contacts is not None:
        c = when.distinct_flagged_contacts
        if contacts.distinct(facts.subscriber, facts.at, c.window_s) < c.min_distinct:
            return False
    return True


class RuleSet:
    """The deployment's rules in configuration order."""

    def __init__(self, rules: Sequence[RuleSettings]) -> None:
        self.rules = list(rules)
        self.by_id = {r.id: r for r in self.rules}
        # The widest contact window any rule looks at: how long contacts must be remembered.
        self.contact_horizon_s = max(
            (
                r.when.distinct_flagged_contacts.window_s
                for r in self.rules
                if r.when.distinct_flagged_contacts is not None
            ),
            default=0.0,
        )
        # Whether any rule can fire for a counterpart that is not flagged (most calls are clean).
        self.any_unflagged = any(
            r.when.flagged is not True and r.when.categories is None for r in self.rules
        )

    def matching(self, facts: CallFacts, contacts: ContactLog) -> list[RuleSettings]:
        if facts.flag is None and not self.any_unflagged:
            return []
        return [rule for rule in self.rules if holds(rule.when, facts, contacts)]


def strongest(rules: Sequence[RuleSettings]) -> RuleSettings:
    """The first rule, in configuration order, with the highest severity among ``rules``."""
    best = rules[0]
    for rule in rules[1:]:
        if SEVERITY_RANK[rule.severity] > SEVERITY_RANK[best.severity]:
            best = rule
    return best
