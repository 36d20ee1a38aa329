"""What a configuration change does to real cases: two reports of the same recordings compared.

Pure functions over the incidents of SPEC §6 reports (``antifraud whatif``, docs/whatif.md):
each incident is matched by its id, its differences put in short texts, and both runs summed
up side by side.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

Incident = dict[str, Any]

SCALARS = (
    "severity",
    "rule",
    "status",
    "outcome",
    "opened_at",
    "critical_at",
    "escalated_at",
    "closed_at",
)
DISPATCH_FIELDS = ("status", "offered_at", "accepted_at", "arrived_at", "outcome")
ROLES = ("guard", "police", "quick_police", "grid_worker")
OUTCOMES = ("prevented", "loss", "false_alarm", "unreachable", "resolved_by_callback", "open")
# every duration is counted from the incident's opening, its first warning
DURATIONS = {
    "warning_to_critical": "turned critical",
    "warning_to_escalation": "escalated",
    "warning_to_first_acceptance": "first acceptance",
    "warning_to_first_arrival": "first arrival",
}


def _value(value: Any) -> str:
    return "—" if value is None else str(value)


def _is_notice(dispatch: dict[str, Any]) -> bool:
    return bool(dispatch["status"] == "notified")


def differences(baseline: Incident, candidate: Incident) -> list[str]:
    """Short texts, baseline first: ``critical_at 180.0 → 420.0``, ``P-YJ-02 newly offered``."""
    texts = [
        f"{field} {_value(baseline[field])} → {_value(candidate[field])}"
        for field in SCALARS
        if baseline[field] != candidate[field]
    ]
    before = {d["unit"]: d for d in baseline["dispatches"]}
    after = {d["unit"]: d for d in candidate["dispatches"]}
    for unit, old in before.items():
        if unit not in after:
            texts.append(f"{unit} no longer {'notified' if _is_notice(old) else 'offered'}")
            continue
        new = after[unit]
        texts.extend(
            f"{unit} {field} {_value(old[field])} → {_value(new[field])}"
            for field in DISPATCH_FIELDS
            if old[field] != new[field]
        )
    for unit, new in after.items():
        if unit not in before:
            verb = "notified" if _is_notice(new) else "offered"
            texts.append(f"{unit} newly {verb} ({new['role']}, at {_value(new['offered_at'])})")
    return texts


def compare(
    recording: str, baseline: Sequence[Incident], candidate: Sequence[Incident]
) -> list[dict[str, Any]]:
    """One entry per incident id found in either run, in the order the runs list them
    (the baseline's first, then those only the candidate opened)."""
    before = {inc["id"]: inc for inc in baseline}
    after = {inc["id"]: inc for inc in candidate}
    entries = []
    for incident_id in [*before, *(i for i in after if i not in before)]:
        old, new = before.get(incident_id), after.get(incident_id)
        if old is None:
            change, texts = "new", ["not in the baseline's run"]
        elif new is None:
            change, texts = "gone", ["not in the candidate's run"]
        else:
            texts = differences(old, new)
            change = "changed" if texts else "same"
        entries.append(
            {
                "recording": recording,
                "id": incident_id,
                "change": change,
                "baseline": old,
                "candidate": new,
                "differences": texts,
            }
        )
    return entries


def percentiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """Nearest rank: p50 and p90 are values that occurred, never interpolated."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p90": None, "max": None}

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"count": len(ordered), "p50": rank(0.5), "p90": rank(0.9), "max": ordered[-1]}


def _first(incident: Incident, field: str) -> float | None:
    times = [d[field] for d in incident["dispatches"] if d[field] is not None]
    return min(times) if times else None


def _durations(incidents: Iterable[Incident]) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {name: [] for name in DURATIONS}
    for inc in incidents:
        ends = {
            "warning_to_critical": inc["critical_at"],
            "warning_to_escalation": inc["escalated_at"],
            "warning_to_first_acceptance": _first(inc, "accepted_at"),
            "warning_to_first_arrival": _first(inc, "arrived_at"),
        }
        for name, end in ends.items():
            if end is not None:
                found[name].append(round(end - inc["opened_at"], 6))
    return found


def figures(incidents: Sequence[Incident]) -> dict[str, Any]:
    """The figures of one run: counts, offers by role, outcomes and duration percentiles."""
    offers = [d for inc in incidents for d in inc["dispatches"] if not _is_notice(d)]
    roles = Counter(d["role"] for d in offers)
    outcomes = Counter(inc["outcome"] or "open" for inc in incidents)
    return {
        "incidents_opened": len(incidents),
        "turned_critical": sum(inc["critical_at"] is not None for inc in incidents),
        "escalated": sum(inc["escalated_at"] is not None for inc in incidents),
        "door_knocks_offered": len(offers),
        "notices_sent": sum(_is_notice(d) for inc in incidents for d in inc["dispatches"]),
        "offered_by_role": {
            role: roles[role] for role in [*ROLES, *sorted(set(roles) - set(ROLES))]
        },
        "outcomes": {
            outcome: outcomes[outcome]
            for outcome in [*OUTCOMES, *sorted(set(outcomes) - set(OUTCOMES))]
        },
        "durations": {name: percentiles(values) for name, values in _durations(incidents).items()},
    }


def _beside(before: Any, after: Any) -> Any:
    if isinstance(before, dict):
        return {key: _beside(before[key], after[key]) for key in before}
    return {"baseline": before, "candidate": after}


def summarize(
    entries: Sequence[dict[str, Any]],
    baseline: Sequence[Incident],
    candidate: Sequence[Incident],
) -> dict[str, Any]:
    """Both runs' figures, each value as ``{"baseline": …, "candidate": …}``."""
    changes = Counter(entry["change"] for entry in entries)
    before, after = figures(baseline), figures(candidate)
    # a role or outcome seen in one run only is counted 0 in the other
    for key in ("offered_by_role", "outcomes"):
        for name in [*before[key], *after[key]]:
            before[key].setdefault(name, 0)
            after[key].setdefault(name, 0)
        after[key] = {name: after[key][name] for name in before[key]}
    return {
        "changes": {change: changes[change] for change in ("new", "gone", "changed", "same")},
        **_beside(before, after),
    }


def _n(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _spread(stats: dict[str, Any]) -> str:
    return " / ".join(_n(stats[key]) for key in ("p50", "p90", "max"))


def render_table(report: dict[str, Any], changed_shown: int = 8) -> str:
    """The summary on one screen: a line a figure, baseline beside candidate, ``*`` where
    they differ, then the first incidents that changed."""
    summary = report["summary"]
    changes = summary["changes"]
    lines = [
        f"baseline  {report['baseline_config']}",
        f"candidate {report['candidate_config']}",
        f"{len(report['recordings'])} recording(s); incidents: "
        + ", ".join(f"{changes[c]} {c}" for c in ("new", "gone", "changed", "same")),
        "",
        f"{'':<28} {'baseline':>23} {'candidate':>23}",
    ]

    def row(label: str, before: Any, after: Any) -> None:
        mark = "" if before == after else "  *"
        lines.append(f"{label:<28} {before:>23} {after:>23}{mark}")

    for key, label in (
        ("incidents_opened", "incidents opened"),
        ("turned_critical", "turned critical"),
        ("escalated", "escalated"),
        ("door_knocks_offered", "door-knocks offered"),
    ):
        row(label, _n(summary[key]["baseline"]), _n(summary[key]["candidate"]))
    for role, pair in summary["offered_by_role"].items():
        if pair["baseline"] or pair["candidate"]:
            row(f"  to {role}", _n(pair["baseline"]), _n(pair["candidate"]))
    row(
        "grid workers told",
        _n(summary["notices_sent"]["baseline"]),
        _n(summary["notices_sent"]["candidate"]),
    )
    lines.append("outcomes")
    for outcome, pair in summary["outcomes"].items():
        if pair["baseline"] or pair["candidate"]:
            row(f"  {outcome}", _n(pair["baseline"]), _n(pair["candidate"]))
    lines.append(f"{'seconds from the warning to':<28} {'p50 / p90 / max':>23}")
    for name, label in DURATIONS.items():
        stats = summary["durations"][name]
        before = {key: pair["baseline"] for key, pair in stats.items()}
        after = {key: pair["candidate"] for key, pair in stats.items()}
        row(f"  {label}", _spread(before), _spread(after))
    changed = [entry for entry in report["incidents"] if entry["change"] != "same"]
    if changed:
        lines.append("")
    several = len(report["recordings"]) > 1
    for entry in changed[:changed_shown]:
        where = f"{entry['recording']} " if several else ""
        texts = entry["differences"]
        shown = "; ".join(texts[:3]) + (f"; … {len(texts) - 3} more" if len(texts) > 3 else "")
        lines.append(f"{where}{entry['id']} {entry['change']}: {shown}")
    if len(changed) > changed_shown:
        lines.append(f"… {len(changed) - changed_shown} more incident(s) changed: see the report")
    return "\n".join(lines)
