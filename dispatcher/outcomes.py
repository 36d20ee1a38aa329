"""How incidents ended, per rule and per unit: the figures of ``antifraud stats`` (docs/stats.md).

Pure functions over the rows of a store: incidents (their documents) and dispatches, with
times in the store's seconds and ``origin`` the epoch seconds of its clock 0.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from dispatcher.comparison import percentiles

OUTCOMES = ("prevented", "loss", "false_alarm", "unreachable", "resolved_by_callback", "open")
# the histogram of the time from the warning to the first arrival: bins' lower edges, seconds
ARRIVAL_BINS_S = (0, 300, 600, 900, 1200, 1800, 2700)


def _outcomes(incidents: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(inc["outcome"] or "open" for inc in incidents)
    return {name: counts[name] for name in [*OUTCOMES, *sorted(set(counts) - set(OUTCOMES))]}


def precision(outcomes: dict[str, int]) -> float | None:
    """(prevented + loss) / (prevented + loss + false alarms): how often a rule's incident was
    a real scam, among those whose answer is known; ``None`` with none known."""
    real = outcomes.get("prevented", 0) + outcomes.get("loss", 0)
    judged = real + outcomes.get("false_alarm", 0)
    return round(real / judged, 4) if judged else None


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return percentiles([round(v, 6) for v in values])


def _median_p90(values: Sequence[float]) -> dict[str, Any]:
    """A unit's or role's times: the median and p90 are what is asked, with the count."""
    return {key: value for key, value in _spread(values).items() if key != "max"}


def _units(dispatches: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in dispatches:
        rows[d["unit"]].append(d)
    units = {}
    for unit in sorted(rows):
        units[unit] = {"role": rows[unit][0]["role"], **_unit_figures(rows[unit])}
    return units


def _unit_figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    offers = [d for d in rows if d["status"] != "notified"]
    accepted = [d for d in offers if d["accepted_at"] is not None]
    arrived = [d for d in accepted if d["arrived_at"] is not None]
    return {
        "offers": len(offers),
        "accepted": len(accepted),
        "declined": sum(d["status"] == "declined" for d in offers),
        "expired": sum(d["status"] == "expired" for d in offers),
        # taken by another unit, or the incident closed, before this one answered
        "withdrawn": sum(d["status"] == "cancelled" and d["accepted_at"] is None for d in offers),
        "notices": len(rows) - len(offers),
        # from the offer to the acceptance; from the acceptance to the door
        "to_accept": _median_p90([d["accepted_at"] - d["offered_at"] for d in accepted]),
        "to_arrive": _median_p90([d["arrived_at"] - d["accepted_at"] for d in arrived]),
    }


def _histogram(seconds: dict[str, float]) -> list[dict[str, Any]]:
    """How many incidents fall in each bin of ``ARRIVAL_BINS_S`` (the last one open-ended)."""
    edges = [*ARRIVAL_BINS_S[1:], None]
    return [
        {
            "from_s": low,
            "to_s": high,
            "incidents": sum(low <= s and (high is None or s < high) for s in seconds.values()),
        }
        for low, high in zip(ARRIVAL_BINS_S, edges, strict=True)
    ]


def _first_arrivals(
    chosen: Sequence[dict[str, Any]], rows: Iterable[dict[str, Any]]
) -> dict[str, float]:
    """Seconds from each incident's opening to its first unit at the door, by incident id,
    for the incidents someone reached."""
    first_arrival: dict[str, float] = {}
    for d in rows:
        if d["arrived_at"] is not None:
            known = first_arrival.get(d["incident_id"])
            if known is None or d["arrived_at"] < known:
                first_arrival[d["incident_id"]] = d["arrived_at"]
    return {
        inc["id"]: first_arrival[inc["id"]] - inc["opened_at"]
        for inc in chosen
        if inc["id"] in first_arrival
    }


def _chosen(
    incidents: Sequence[dict[str, Any]],
    dispatches: Sequence[dict[str, Any]],
    day: Callable[[float], date],
    first_day: date | None,
    last_day: date | None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    chosen = [
        inc
        for inc in incidents
        if (first_day is None or day(inc["opened_at"]) >= first_day)
        and (last_day is None or day(inc["opened_at"]) <= last_day)
    ]
    ids = {inc["id"] for inc in chosen}
    return chosen, [d for d in dispatches if d["incident_id"] in ids]


def _day_of(origin: float, timezone: str) -> Callable[[float], date]:
    zone = ZoneInfo(timezone)

    def day(at: float) -> date:
        return datetime.fromtimestamp(origin + at, zone).date()

    return day


def behind(
    incidents: Sequence[dict[str, Any]],
    dispatches: Sequence[dict[str, Any]],
    origin: float,
    timezone: str,
    first_day: date | None = None,
    last_day: date | None = None,
) -> dict[str, list[str]]:
    """The incidents behind each figure of ``figures``, by the figure's key: ``outcome:X``,
    ``rule:R``, ``rule:R:X``, ``unit:U``, ``role:R``, ``day:YYYY-MM-DD``, ``arrival:N`` (the
    N-th bin of the histogram) and ``arrived`` (every incident someone reached)."""
    day = _day_of(origin, timezone)
    chosen, rows = _chosen(incidents, dispatches, day, first_day, last_day)
    keys: dict[str, list[str]] = defaultdict(list)
    for inc in chosen:
        outcome = inc["outcome"] or "open"
        for key in (
            "all",
            f"outcome:{outcome}",
            f"rule:{inc['rule']}",
            f"rule:{inc['rule']}:{outcome}",
            f"day:{day(inc['opened_at']).isoformat()}",
        ):
            keys[key].append(inc["id"])
    for d in rows:
        for key in (f"unit:{d['unit']}", f"role:{d['role']}"):
            if d["incident_id"] not in keys[key]:
                keys[key].append(d["incident_id"])
    arrivals = _first_arrivals(chosen, rows)
    keys["arrived"] = list(arrivals)
    edges = [*ARRIVAL_BINS_S[1:], None]
    for n, (low, high) in enumerate(zip(ARRIVAL_BINS_S, edges, strict=True)):
        keys[f"arrival:{n}"] = [
            i for i, s in arrivals.items() if low <= s and (high is None or s < high)
        ]
    return dict(keys)


def figures(
    incidents: Sequence[dict[str, Any]],
    dispatches: Sequence[dict[str, Any]],
    origin: float,
    timezone: str,
    first_day: date | None = None,
    last_day: date | None = None,
) -> dict[str, Any]:
    """The statistics of the incidents opened from ``first_day`` to ``last_day`` (both
    included, dates in ``timezone``), and of their dispatches."""
    day = _day_of(origin, timezone)
    chosen, rows = _chosen(incidents, dispatches, day, first_day, last_day)

    by_rule: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for inc in chosen:
        by_rule[inc["rule"]].append(inc)
    rules = {}
    for rule in sorted(by_rule):
        outcomes = _outcomes(by_rule[rule])
        rules[rule] = {
            "incidents": len(by_rule[rule]),
            "outcomes": outcomes,
            "precision": precision(outcomes),
        }

    by_role: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in rows:
        by_role[d["role"]].append(d)
    roles = {role: _unit_figures(by_role[role]) for role in sorted(by_role)}

    to_door = _first_arrivals(chosen, rows)

    days: dict[date, list[dict[str, Any]]] = defaultdict(list)
    for inc in chosen:
        days[day(inc["opened_at"])].append(inc)
    daily = [
        {
            "date": when.isoformat(),
            "incidents": len(days[when]),
            "critical": sum(inc["critical_at"] is not None for inc in days[when]),
            "escalated": sum(inc["escalated_at"] is not None for inc in days[when]),
            "outcomes": _outcomes(days[when]),
        }
        for when in sorted(days)
    ]
    return {
        "timezone": timezone,
        "from": first_day.isoformat() if first_day else None,
        "to": last_day.isoformat() if last_day else None,
        "incidents": len(chosen),
        "outcomes": _outcomes(chosen),
        "rules": rules,
        "units": _units(rows),
        "roles": roles,
        "warning_to_first_arrival": _spread(list(to_door.values())),
        "warning_to_first_arrival_histogram": _histogram(to_door),
        "daily": daily,
    }
