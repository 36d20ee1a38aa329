"""Declarative fraud rules: flagged-number lookup, contact history and rule evaluation."""

from rules.contacts import ContactLog
from rules.engine import CallFacts, RuleSet
from rules.flagged import FlaggedNumbers

__all__ = ["CallFacts", "ContactLog", "FlaggedNumbers", "RuleSet"]
