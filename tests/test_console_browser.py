"""The operator console in a real headless Chromium (Debian's package, driven by Playwright).

An operator logs in; the seed case's calls are played onto a live broker; the incident
appears; the operator presses "no answer" three times; the guards are offered, one accepts
and the other is stood down; the incident closes as prevented. Screenshots of each step are
saved under ``artifacts/console/``, and the board is checked at 1366×768.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from pathlib import Path

import pytest
from test_console import PASSWORD, serving

from adapters.broker import Mosquitto, mosquitto_binary
from adapters.handset import Handset, Step
from adapters.live import Clock, LiveService
from adapters.mqtt import BrokerURL
from adapters.recorder import publish_recording
from dispatcher.settings import Settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "console"
SEED = Path(__file__).parent / "data" / "chen_case.jsonl"
INCIDENT = "INC-C-20211015-0001"
SPEED = 20.0  # the dispatcher's clock: the callback window of 120 s lasts 6 s

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium is not installed (apt-get install chromium); .ci/run installs it",
    ),
]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def test_an_operator_handles_the_seed_case_in_the_browser(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = BrokerURL.parse(broker.url)
    calls = tmp_path / "calls.jsonl"  # the call-warning source's part of the seed case
    calls.write_text(
        "".join(
            line + "\n"
            for line in SEED.read_text(encoding="utf-8").splitlines()
            if "/events/" in json.loads(line)["topic"]
        ),
        encoding="utf-8",
    )
    stop = asyncio.Event()
    service = LiveService(settings, url, tmp_path / "live.sqlite3", Clock(SPEED))
    # the units reply as in the seed case (each after the same delay, 10x faster)
    handsets = [
        Handset(
            settings,
            "G-YJ-CH-01",
            url,
            [Step("accepted", 7), Step("arrived", 165), Step("reported", 285, "dissuaded")],
            200.0,
            show=lambda _: None,
        ),
        Handset(settings, "G-YJ-CH-02", url, None, show=lambda _: None),
        Handset(
            settings,
            "P-YJ-01",
            url,
            [Step("accepted", 25), Step("arrived", 900), Step("reported", 1245, "dissuaded")],
            200.0,
            show=lambda _: None,
        ),
    ]
    tasks = [asyncio.create_task(service.run(stop))]
    tasks += [asyncio.create_task(h.run(stop)) for h in handsets]
    await asyncio.wait_for(service.ready.wait(), 10)
    try:
        async with (
            serving(settings, broker, tmp_path, tmp_path / "live.sqlite3") as (base, _),
            async_playwright() as playwright,
        ):
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1366, "height": 768}, locale="zh-CN")
            await page.goto(f"{base}/")
            await expect(page).to_have_url(f"{base}/login")
            await page.fill("input[name=operator]", "op-01")
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await expect(page.locator("#operator")).to_have_text("接线员 op-01")
            await expect(page.locator("#link")).to_have_text("已连接")
            await expect(page.locator("#dispatcher")).to_have_text("调度服务运行中")
            await page.screenshot(path=ARTIFACTS / "1-logged-in.png")

            playing = asyncio.create_task(publish_recording(calls, url, speed=SPEED))
            card = page.locator(f'#critical [data-incident="{INCIDENT}"]')
            await expect(card).to_be_visible(timeout=20_000)
            await expect(card).to_contain_text("陈某某（陈女士）")
            await expect(card).to_contain_text("春晖小区（E-YJ-CH）")
            await expect(card).to_contain_text("+85251230002（虚假投资理财）")
            await page.screenshot(path=ARTIFACTS / "2-critical.png")

            for attempt in (1, 2, 3):
                await card.locator('button[data-action="no_answer"]').click()
                if attempt < 3:
                    await expect(card).to_contain_text(f"{attempt}/3 次未接通")
            await card.click()
            detail = page.locator("#detail")
            await expect(
                detail.locator('tr[data-unit="G-YJ-CH-02"][data-status="cancelled"]')
            ).to_be_visible(timeout=10_000)
            await expect(detail.locator('tr[data-unit="G-YJ-CH-01"]')).not_to_have_attribute(
                "data-status", "offered"
            )
            await expect(detail.locator('li[data-kind="callback_result"]')).to_have_count(3)
            await expect(detail).to_contain_text("接线员 op-01")
            await page.screenshot(path=ARTIFACTS / "3-dispatched.png")

            # the board at 1366x768: nothing wider than the screen, the actions in view
            assert await page.evaluate("document.documentElement.scrollWidth") <= 1366
            assert await page.evaluate("document.body.scrollWidth") <= 1366
            box = await card.locator('button[data-action="escalate"]').bounding_box()
            assert box is not None and box["x"] + box["width"] <= 1366

            await expect(detail.locator(".badge")).to_have_text("已劝阻", timeout=30_000)
            await expect(page.locator(f'#closed [data-incident="{INCIDENT}"]')).to_be_visible()
            await page.screenshot(path=ARTIFACTS / "4-closed.png")
            await playing
            stop.set()  # the dispatcher stops (the handsets too): the operators must see it
            await expect(page.locator("#dispatcher")).to_have_text(
                "调度服务已停止：预警不会自动处置", timeout=15_000
            )
            await page.screenshot(path=ARTIFACTS / "5-dispatcher-stopped.png")
            await browser.close()
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)


async def test_the_header_says_when_the_board_is_stale(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """A lone surrogate retained on a unit's status topic leaves the board live (the next
    presence shows); should the console's feed stop anyway, the header and a banner say the
    board is stale, not "connected"."""
    from playwright.async_api import async_playwright, expect

    from adapters.mqtt import open_client

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = BrokerURL.parse(broker.url)
    async with open_client(url) as radio:
        await radio.publish(
            "antifraud/v1/units/G-YJ-CH-01/status",
            b'{"data":{"state":"\xed\xa0\x80"}}',
            qos=1,
            retain=True,
        )
    async with (
        serving(settings, broker, tmp_path) as (base, console),
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1366, "height": 768}, locale="zh-CN")
        await page.goto(f"{base}/login")
        await page.fill("input[name=operator]", "op-01")
        await page.fill("input[name=password]", PASSWORD)
        await page.click("button[type=submit]")
        await expect(page.locator("#link")).to_have_text("已连接")
        await expect(page.locator("#stale")).to_be_hidden()
        await page.click('button[data-tab="units"]')
        async with open_client(url) as radio:
            await radio.publish(
                "antifraud/v1/units/G-YJ-CH-02/status",
                json.dumps(
                    {
                        "specversion": "1.0",
                        "id": "s1",
                        "source": "unit/G-YJ-CH-02",
                        "type": "cn.antifraud.unit.status",
                        "data": {"state": "offline"},
                    }
                ),
                qos=1,
            )
        row = page.locator('#unit-table tr[data-unit="G-YJ-CH-02"]')
        await expect(row).to_contain_text("离线")
        await expect(page.locator('#unit-table tr[data-unit="G-YJ-CH-01"]')).to_contain_text(
            "未上报"
        )
        assert console.mqtt_task is not None
        console.mqtt_task.cancel()  # the feed ends, whatever the cause
        await expect(page.locator("#link")).to_have_text("消息中断：看板已停止更新")
        await expect(page.locator("#stale")).to_be_visible()
        await page.screenshot(path=ARTIFACTS / "6-feed-stopped.png")
        await browser.close()
