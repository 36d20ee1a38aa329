"""The rules' vocabulary: a rule, its severity and its conditions, as the deployment's
configuration spells them (``[[rules]]``, parsed strictly)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

IDENT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

Severity = Literal["warning", "critical"]
Ident = Annotated[str, Field(pattern=IDENT.pattern)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContactCondition(_Strict):
    min_distinct: int = Field(ge=1)
    window_s: float = Field(gt=0)


class Conditions(_Strict):
    """Every condition present must hold; an absent condition is not checked."""

    flagged: bool | None = None
    categories: list[str] | None = None
    min_duration_s: float | None = Field(None, ge=0)
    vulnerable: bool | None = None
    distinct_flagged_contacts: ContactCondition | None = None


class RuleSettings(_Strict):
    id: Ident
    severity: Severity
    description: str = ""
    # what operators and police read (the timeline, the board, the apps' text); without
    # one, the rule's conditions in words
    label: Annotated[str, Field(min_length=1, max_length=40)] | None = None
    when: Conditions
