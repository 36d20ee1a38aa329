"""The SVG charts of the stats report and the console's 统计 view."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from adapters.charts import Bar, bar_chart
from adapters.replay import replay
from adapters.stats import read_store
from adapters.stats_report import bin_label, charts
from dispatcher.outcomes import ARRIVAL_BINS_S, OUTCOMES, figures
from dispatcher.settings import Settings

SVG = "{http://www.w3.org/2000/svg}"
DAY = Path(__file__).parent / "data" / "golden" / "day.jsonl"


def bars(svg: str) -> list[ET.Element]:
    return [g for g in ET.fromstring(svg).iter(f"{SVG}g") if g.get("class") == "bar"]


class TestABarChart:
    def test_one_bar_per_value_each_with_its_figure_and_value(self) -> None:
        svg = bar_chart("按结果", [Bar("已阻止", 3, "outcome:prevented"), Bar("误报", 1, "x:1")])
        drawn = bars(svg)
        assert [(g.get("data-figure"), g.get("data-value")) for g in drawn] == [
            ("outcome:prevented", "3"),
            ("x:1", "1"),
        ]

    def test_the_tallest_bar_fills_the_plot_and_the_others_are_in_proportion(self) -> None:
        svg = bar_chart("t", [Bar("a", 4, "a"), Bar("b", 1, "b"), Bar("c", 0, "c")])
        heights = [float(g.find(f"{SVG}rect").get("height")) for g in bars(svg)]  # type: ignore[union-attr]
        assert heights[0] == pytest.approx(4 * heights[1])
        assert heights[2] == 0

    def test_every_text_is_escaped(self) -> None:
        svg = bar_chart("<b>&", [Bar('"><script>', 1, "k'&")])
        assert "<script>" not in svg and "<b>" not in svg
        assert bars(svg)[0].get("data-figure") == "k'&"

    def test_no_bars_says_no_data(self) -> None:
        svg = bar_chart("空", [])
        assert bars(svg) == [] and "无数据" in svg

    def test_many_bars_label_only_every_nth(self) -> None:
        svg = bar_chart("t", [Bar(f"d{n}", n, f"k{n}") for n in range(40)], max_labels=10)
        labels = [
            t.text for t in ET.fromstring(svg).iter(f"{SVG}text") if t.text and t.text[0] == "d"
        ]
        assert labels == [f"d{n}" for n in range(0, 40, 4)]


async def test_a_days_charts_have_a_bar_per_outcome_bin_and_day(
    tmp_path: Path, settings: Settings
) -> None:
    store = tmp_path / "day.sqlite3"
    await replay(DAY, settings, store)
    stats = figures(*read_store(store), "Asia/Shanghai")
    drawn = {name: bars(svg) for name, svg in charts(stats).items()}
    assert [g.get("data-figure") for g in drawn["outcomes"]] == [f"outcome:{o}" for o in OUTCOMES]
    assert len(drawn["arrival"]) == len(ARRIVAL_BINS_S)
    assert [(g.get("data-figure"), g.get("data-value")) for g in drawn["daily"]] == [
        ("day:2026-01-01", "8"),
        ("day:2026-01-02", "2"),
    ]


@pytest.mark.parametrize(
    ("low", "high", "text"), [(0, 300, "0–5分"), (1800, 2700, "30–45分"), (2700, None, "≥45分")]
)
def test_a_bins_label_is_in_minutes(low: int, high: int | None, text: str) -> None:
    assert bin_label(low, high) == text
