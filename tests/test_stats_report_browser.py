"""The HTML report of ``antifraud stats --html`` in a real headless Chromium: its charts are
drawn, it needs nothing from outside the file, and it prints on A4. A screenshot and the
printed PDF are saved under ``artifacts/stats/``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters.replay import replay
from antifraud.cli import main
from dispatcher.settings import Settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "stats"
DAY = Path(__file__).parent / "data" / "golden" / "day.jsonl"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)


async def test_the_report_renders_its_charts_offline_and_prints_on_a4(
    tmp_path: Path, settings: Settings
) -> None:
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    store = tmp_path / "day.sqlite3"
    await replay(DAY, settings, store)
    report = tmp_path / "stats.html"
    assert main(["stats", "--store", str(store), "--html", str(report)]) == 0
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        page = await browser.new_page(viewport={"width": 900, "height": 1200}, locale="zh-CN")
        asked: list[str] = []
        page.on("request", lambda request: asked.append(request.url))
        await page.goto(report.as_uri())
        await expect(page.locator("h1")).to_have_text("反诈预警处置统计")
        await expect(page.locator("svg.chart")).to_have_count(3)
        await expect(page.locator("svg.chart").nth(2).locator("g.bar")).to_have_count(2)
        for n in range(3):
            box = await page.locator("svg.chart").nth(n).bounding_box()
            assert box is not None and box["width"] > 400 and box["height"] > 150
        tallest = await page.locator('g.bar[data-figure="day:2026-01-01"] rect').bounding_box()
        assert tallest is not None and tallest["height"] > 100
        await page.screenshot(path=ARTIFACTS / "report.png", full_page=True)
        pdf = await page.pdf(path=ARTIFACTS / "report.pdf", format="A4")
        assert pdf.startswith(b"%PDF")
        assert asked == [report.as_uri()]  # nothing fetched beyond the file itself
        await browser.close()
