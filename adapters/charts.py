"""Bar charts as SVG text: the charts of ``antifraud stats --html`` and of the console's 统计
view, drawn here so that both show the same picture, print as vectors and need no script.

Every text is escaped; each bar carries ``data-figure`` (the key of the incidents behind it,
``dispatcher.outcomes.behind``) so that a page may make it a link.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 640
HEIGHT = 240
MARGIN_TOP = 34  # the title and the value above the tallest bar
MARGIN_BOTTOM = 40  # the labels under the bars
MARGIN_SIDE = 16
INK = "#1f2937"
GRID = "#d1d5db"
FONT = "'Noto Sans CJK SC','Source Han Sans SC','WenQuanYi Micro Hei','Microsoft YaHei',sans-serif"


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    figure: str  # the key of the incidents behind it
    color: str = "#2563eb"


def bar_chart(title: str, bars: Sequence[Bar], unit: str = "起", max_labels: int = 16) -> str:
    """A bar chart of ``bars``, left to right, the value written above each bar; with more
    bars than ``max_labels`` only every n-th label is written under its bar."""
    plot_w = WIDTH - 2 * MARGIN_SIDE
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    base = MARGIN_TOP + plot_h
    top = max((b.value for b in bars), default=0) or 1
    slot = plot_w / max(len(bars), 1)
    bar_w = max(slot * 0.7, 1.0)
    every = max(1, -(-len(bars) // max_labels))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="{escape(FONT)}" font-size="13" fill="{INK}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{MARGIN_SIDE}" y="16" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<line x1="{MARGIN_SIDE}" y1="{base}" x2="{WIDTH - MARGIN_SIDE}" y2="{base}" '
        f'stroke="{GRID}"/>',
    ]
    if not bars:
        middle_y = MARGIN_TOP + plot_h / 2
        parts.append(f'<text x="{WIDTH / 2}" y="{middle_y}" text-anchor="middle">无数据</text>')
    for n, bar in enumerate(bars):
        height = plot_h * bar.value / top
        x = MARGIN_SIDE + n * slot + (slot - bar_w) / 2
        middle = x + bar_w / 2
        parts.append(
            f'<g class="bar" data-figure="{escape(bar.figure)}" data-value="{bar.value}">'
            f"<title>{escape(bar.label)}：{bar.value}{escape(unit)}</title>"
            f'<rect x="{x:.1f}" y="{base - height:.1f}" width="{bar_w:.1f}" '
            f'height="{max(height, 0.0):.1f}" fill="{escape(bar.color)}"/>'
            f'<text x="{middle:.1f}" y="{base - height - 4:.1f}" text-anchor="middle">'
            f"{bar.value}</text>"
        )
        if n % every == 0:
            parts.append(
                f'<text x="{middle:.1f}" y="{base + 16}" text-anchor="middle">'
                f"{escape(bar.label)}</text>"
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)
