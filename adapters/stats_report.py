"""The figures of ``antifraud stats`` in Chinese: their charts (shared with the console's 统计
view) and the self-contained HTML report of ``--html``, printable on A4 (docs/stats.md)."""

from __future__ import annotations

from html import escape
from typing import Any

from adapters.charts import Bar, bar_chart
from dispatcher.settings import Settings
from dispatcher.texts import OUTCOME_TEXT

OUTCOME_LABELS = {**OUTCOME_TEXT, "open": "未结案"}
ROLE_LABELS = {
    "guard": "保安",
    "police": "民警",
    "quick_police": "快警平台",
    "grid_worker": "网格员",
}
OUTCOME_COLORS = {
    "prevented": "#15803d",
    "loss": "#b91c1c",
    "false_alarm": "#6b7280",
    "unreachable": "#d97706",
    "resolved_by_callback": "#0e7490",
    "open": "#2563eb",
}


def outcome_label(code: str) -> str:
    return OUTCOME_LABELS.get(code, code)


def bin_label(low: int, high: int | None) -> str:
    return f"≥{low // 60}分" if high is None else f"{low // 60}–{high // 60}分"


def seconds_text(value: float | None) -> str:
    if value is None:
        return "—"
    s = round(value)
    return f"{s // 60}分{s % 60:02d}秒"


def charts(stats: dict[str, Any]) -> dict[str, str]:
    """The three charts of a period's figures, as SVG: incidents by outcome, the histogram of
    the time from the warning to the first arrival, and incidents per day."""
    outcomes = [
        Bar(outcome_label(code), n, f"outcome:{code}", OUTCOME_COLORS.get(code, "#2563eb"))
        for code, n in stats["outcomes"].items()
    ]
    arrivals = [
        Bar(bin_label(b["from_s"], b["to_s"]), b["incidents"], f"arrival:{n}", "#7c3aed")
        for n, b in enumerate(stats["warning_to_first_arrival_histogram"])
    ]
    daily = [
        Bar(d["date"][5:], d["incidents"], f"day:{d['date']}", "#0369a1") for d in stats["daily"]
    ]
    return {
        "outcomes": bar_chart("按结果（起）", outcomes),
        "arrival": bar_chart("预警→首位到达门口用时（起）", arrivals),
        "daily": bar_chart("每日事件数（起）", daily),
    }


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def tables(stats: dict[str, Any], settings: Settings) -> dict[str, str]:
    """The figures as HTML tables, every label in Chinese."""
    rules = [
        [
            settings.rule_name(rule),
            str(r["incidents"]),
            *(str(r["outcomes"].get(code, 0)) for code in ("prevented", "loss", "false_alarm")),
            _percent(r["precision"]),
        ]
        for rule, r in stats["rules"].items()
    ]

    def unit_row(name: str, u: dict[str, Any]) -> list[str]:
        return [
            name,
            str(u["offers"]),
            str(u["accepted"]),
            str(u["declined"]),
            str(u["expired"]),
            str(u["withdrawn"]),
            seconds_text(u["to_accept"]["p50"]),
            seconds_text(u["to_arrive"]["p50"]),
            seconds_text(u["to_arrive"]["p90"]),
        ]

    unit_head = ["派单", "接警", "拒绝", "超时", "撤回", "接警用时中位", "到达用时中位", "到达 P90"]
    units = [
        unit_row(
            f"{settings.units[unit].name if unit in settings.units else unit}"
            f"（{ROLE_LABELS.get(u['role'], u['role'])}）",
            u,
        )
        for unit, u in stats["units"].items()
    ]
    roles = [unit_row(ROLE_LABELS.get(role, role), r) for role, r in stats["roles"].items()]
    door = stats["warning_to_first_arrival"]
    daily = [
        [d["date"], str(d["incidents"]), str(d["critical"]), str(d["escalated"])]
        + [str(d["outcomes"].get(code, 0)) for code in ("prevented", "loss", "false_alarm")]
        for d in stats["daily"]
    ]
    return {
        "outcomes": _table(
            ["结果", "事件数"],
            [[outcome_label(code), str(n)] for code, n in stats["outcomes"].items()],
        ),
        "rules": _table(["规则", "事件数", "已阻止", "已被骗", "误报", "准确率"], rules),
        "units": _table(["单位", *unit_head], units),
        "roles": _table(["类别", *unit_head], roles),
        "arrival": _table(
            ["到达事件数", "中位数", "P90", "最长"],
            [
                [
                    str(door["count"]),
                    seconds_text(door["p50"]),
                    seconds_text(door["p90"]),
                    seconds_text(door["max"]),
                ]
            ],
        ),
        "daily": _table(
            ["日期", "事件数", "转紧急", "上门派单", "已阻止", "已被骗", "误报"], daily
        ),
    }


STYLE = """
@page { size: A4; margin: 14mm; }
body { font-family: 'Noto Sans CJK SC','Source Han Sans SC','Microsoft YaHei',sans-serif;
       color: #1f2937; margin: 0 auto; max-width: 182mm; font-size: 10.5pt; }
h1 { font-size: 16pt; margin: 0 0 4pt; } h2 { font-size: 12pt; margin: 12pt 0 4pt; }
p.meta { color: #4b5563; margin: 0 0 8pt; }
section { break-inside: avoid; }
svg.chart { width: 100%; height: auto; max-width: 170mm; }
table { border-collapse: collapse; width: 100%; margin: 4pt 0; }
th, td { border: 1px solid #d1d5db; padding: 2pt 5pt; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f4f6; white-space: nowrap; }
@media print { body { max-width: none; } }
"""


def html_report(stats: dict[str, Any], settings: Settings, store: str) -> str:
    """One self-contained HTML page: no script, no file or address outside it."""
    chart = charts(stats)
    table = tables(stats, settings)
    period = f"{stats['from'] or '最早'} 至 {stats['to'] or '最近'}"
    sections = [
        ("按结果", chart["outcomes"] + table["outcomes"]),
        ("按规则", table["rules"]),
        ("预警→首位到达门口", chart["arrival"] + table["arrival"]),
        ("每日趋势", chart["daily"] + table["daily"]),
        ("按单位", table["units"]),
        ("按单位类别", table["roles"]),
    ]
    body = "".join(f"<section><h2>{escape(t)}</h2>{html}</section>" for t, html in sections)
    return (
        '<!doctype html>\n<html lang="zh-CN"><head><meta charset="utf-8">'
        f"<title>处置统计 {escape(period)}</title><style>{STYLE}</style></head><body>"
        f"<h1>反诈预警处置统计</h1>"
        f'<p class="meta">{escape(period)}（时区 {escape(stats["timezone"])}）· 共 '
        f"{stats['incidents']} 起事件 · 数据来源 {escape(store)}</p>"
        f"{body}</body></html>\n"
    )
