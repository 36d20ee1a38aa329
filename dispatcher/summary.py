"""A readable rendering of a report, for people at a terminal."""

from __future__ import annotations

from typing import Any


def _t(value: float | None) -> str:
    if value is None:
        return "—"
    minutes, seconds = divmod(value, 60)
    return f"{int(minutes):02d}:{seconds:04.1f}"


def render_summary(report: dict[str, Any]) -> str:
    lines = [
        f"{len(report['incidents'])} incident(s), {len(report['published'])} message(s) "
        f"published, {len(report['rejected'])} input(s) rejected"
    ]
    for inc in report["incidents"]:
        lines.append("")
        lines.append(f"{inc['id']}  {inc['status'].upper()}  outcome={inc['outcome'] or '—'}")
        lines.append(
            f"  subscriber {inc['subscriber']}  counterpart {inc['counterpart']}  "
            f"severity {inc['severity']} ({inc['rule']})"
        )
        lines.append(
            f"  opened {_t(inc['opened_at'])}  critical {_t(inc['critical_at'])}  "
            f"escalated {_t(inc['escalated_at'])}  closed {_t(inc['closed_at'])}"
        )
        for d in inc["dispatches"]:
            if d["status"] == "notified":  # told, nothing asked: no reply to show
                lines.append(
                    f"    {d['unit']:<12} {d['role']:<12} {d['status']:<10} "
                    f"notified {_t(d['offered_at'])}"
                )
                continue
            lines.append(
                f"    {d['unit']:<12} {d['role']:<12} {d['status']:<10} "
                f"offered {_t(d['offered_at'])}  accepted {_t(d['accepted_at'])}  "
                f"arrived {_t(d['arrived_at'])}  outcome {d['outcome'] or '—'}"
            )
    for rej in report["rejected"]:
        lines.append(f"rejected at {_t(rej['at'])} on {rej['topic']}: {rej['reason']}")
    return "\n".join(lines)
