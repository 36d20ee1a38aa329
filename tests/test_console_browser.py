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
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from test_console import PASSWORD, serving

from adapters.broker import Mosquitto, mosquitto_binary
from adapters.live import Clock, LiveService
from adapters.mqtt import BrokerURL, open_client
from adapters.recorder import publish_recording
from adapters.replay import replay
from dispatcher.inbound import cloudevent
from dispatcher.settings import Settings
from tools.handset import Handset, Step

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
    # the alarm sounds without a click first, as on the operators' kiosk browsers
    "--autoplay-policy=no-user-gesture-required",
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
            await expect(card).to_contain_text("小区春晖小区地址")
            assert "E-YJ-CH" not in await card.inner_text()  # names, not registry ids
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
            # (escalated now: 立即上门 is gone, closing is what remains)
            box = await card.locator('button[data-action="close"]').bounding_box()
            assert box is not None and box["x"] + box["width"] <= 1366

            # the incident's outcome is "prevented" (已阻止); the guard's report was "dissuaded"
            await expect(detail.locator(".badge")).to_have_text("已阻止", timeout=30_000)
            await expect(page.locator(f'#closed [data-incident="{INCIDENT}"]')).to_be_visible()
            await page.screenshot(path=ARTIFACTS / "4-closed.png")
            await playing
            stop.set()  # the dispatcher stops (the handsets too): the operators must see it
            await expect(page.locator("#dispatcher")).to_have_text(
                "调度服务已停止：预警不会自动处置", timeout=15_000
            )
            await expect(page.locator("#dispatcher-down")).to_be_visible()  # a banner too
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


AHEAD_S = 600.0  # the dispatcher's clock runs this far ahead of the browser's
CALLS = "antifraud/v1/events/hengnan/calls"
STRANGER, WANG, ZHAO, LI = "+8613999999999", "+8613800000003", "+8613800000005", "+8613800000004"
INVESTMENT, IMPERSONATION, REFUND = "+85251230002", "+85251230001", "+8617100009999"


async def call(url: BrokerURL, call_id: str, subscriber: str, counterpart: str, s: float) -> None:
    """A call-warning source: the call started and has lasted ``s`` seconds."""
    data = {"call_id": call_id, "subscriber": subscriber, "counterpart": counterpart}
    async with open_client(url) as source:
        for n, (verb, extra) in enumerate(
            [("started", {"direction": "inbound"}), ("progress", {"duration_s": s})]
        ):
            event = cloudevent(
                f"{call_id}-{n}", "app-warning/hengnan", f"cn.antifraud.call.{verb}", data | extra
            )
            await source.publish(CALLS, json.dumps(event), qos=1)


async def announce(url: BrokerURL, event: dict[str, Any]) -> None:
    """An incident event on the operators' topic, as if from the dispatcher."""
    async with open_client(url) as other:
        await other.publish("antifraud/v1/operators/incidents", json.dumps(event), qos=1)


@contextlib.asynccontextmanager
async def ahead_dispatcher(settings: Settings, broker: Mosquitto, tmp_path: Path) -> Any:
    """A live dispatcher whose clock is AHEAD_S ahead (as the demo's sped-up clock runs
    ahead), the console, and a logged-in operator's page at 1366x768."""
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = BrokerURL.parse(broker.url)
    stop = asyncio.Event()
    store = tmp_path / "live.sqlite3"
    service = LiveService(settings, url, store, Clock(1.0, time.time() + AHEAD_S))
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), 10)
    try:
        async with (
            serving(settings, broker, tmp_path, store) as (base, console),
            async_playwright() as playwright,
        ):
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1366, "height": 768}, locale="zh-CN")
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            await page.goto(f"{base}/login")
            await page.fill("input[name=operator]", "op-01")
            await page.fill("input[name=password]", PASSWORD)
            await page.click("button[type=submit]")
            await expect(page.locator("#dispatcher")).to_have_text("调度服务运行中")
            yield page, url, console
            assert not errors, errors  # no 404 (favicon included), no script error
            await browser.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def seconds(text: str) -> int:
    found = re.search(r"(\d+)分(\d+)秒", text)
    assert found, text
    return int(found.group(1)) * 60 + int(found.group(2))


async def test_dead_ends_alarm_until_acknowledged_on_a_board_sorted_by_urgency(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    async with ahead_dispatcher(settings, broker, tmp_path) as (page, url, _):
        board = page.locator("#critical")
        await expect(board).to_contain_text("当前没有需要处置的事件")
        await call(url, "C-DEAD", STRANGER, INVESTMENT, 200)  # nobody knows where she lives
        await call(url, "C-WAIT", WANG, INVESTMENT, 70)  # vulnerable: critical at 60 s
        await call(url, "C-RUN", ZHAO, IMPERSONATION, 130)
        await call(url, "C-LOOK", LI, REFUND, 40)  # a warning only
        dead, wait, run = (
            board.locator(f'[data-incident="INC-{c}"]') for c in ("C-DEAD", "C-WAIT", "C-RUN")
        )
        await expect(run).to_be_visible(timeout=10_000)
        for other in (dead, wait):
            await expect(other).to_be_visible(timeout=10_000)
        # the cards came in one after another, each pushing the others on: the board takes
        # a press once it has stood still (MOVED_MS)
        await page.wait_for_timeout(900)
        await run.locator('button[data-action="escalate"]').click()
        # every press answers at once, then says it was applied
        await expect(run.locator(".feedback")).to_be_visible(timeout=1_000)
        await expect(run.locator(".feedback")).to_contain_text("已生效", timeout=10_000)
        await expect(run.locator('button[data-action="escalate"]')).to_have_count(0)
        await expect(run.locator('button[data-action="no_answer"]')).to_have_count(0)
        await expect(run).to_contain_text(re.compile(r"剩\d+秒"))  # the guards' accept deadline

        # dead ends first, then critical awaiting callback, then running dispatches
        order = await board.locator("article").evaluate_all("a => a.map(n => n.dataset.incident)")
        assert order == ["INC-C-DEAD", "INC-C-WAIT", "INC-C-RUN"], order
        await expect(dead).to_contain_text("未登记用户：请电话核实身份和住址")
        assert "unknown_subscriber" not in await dead.inner_text()
        colour = "el => getComputedStyle(el).borderLeftColor"
        assert await dead.evaluate(colour) != await run.evaluate(colour)
        await expect(wait).to_contain_text("易受骗")
        warning = page.locator('#warnings [data-incident="INC-C-LOOK"]')
        await expect(warning).to_be_visible()
        assert "待回拨" not in await warning.inner_text()

        # the alarm sounds, again and again, until someone acknowledges it
        alarm = "() => ({...window.consoleAlarm, context: window.consoleAlarm.context()})"
        first = await page.evaluate(alarm)
        assert first["active"] and first["context"] == "running", first
        await page.wait_for_timeout(3_500)
        assert (await page.evaluate(alarm))["beeps"] >= first["beeps"] + 2
        await page.screenshot(path=ARTIFACTS / "7-board-three-cards.png")
        await run.click()
        detail = page.locator("#detail")
        await expect(detail.locator("#dispatch-table")).to_be_visible()
        await page.screenshot(path=ARTIFACTS / "8-detail-open.png")
        # at 1366x768 with the detail open: headers on one line, the third card's buttons in view
        for height in await detail.locator("#dispatch-table th").evaluate_all(
            "hs => hs.map(h => h.getBoundingClientRect().height)"
        ):
            assert height < 30, height
        box = await run.locator('button[data-action="close"]').bounding_box()
        assert (
            box is not None and box["x"] + box["width"] <= 1366 and box["y"] + box["height"] <= 768
        )
        assert await page.evaluate("document.documentElement.scrollWidth") <= 1366

        await dead.locator('button[data-action="acknowledge"]').click()
        await expect(dead.locator(".feedback")).to_contain_text("已生效", timeout=10_000)
        await expect(dead.locator('button[data-action="acknowledge"]')).to_have_count(0)
        # every operator sees who took it on
        await expect(dead.locator("h3 .badge")).to_have_text("接线员 op-01 已确认·人工处置中")
        stopped = await page.evaluate(alarm)
        assert not stopped["active"], stopped
        await page.wait_for_timeout(2_500)
        assert (await page.evaluate(alarm))["beeps"] == stopped["beeps"]
        await dead.click()
        acknowledged = detail.locator('li[data-kind="acknowledged"]')
        await expect(acknowledged).to_contain_text("接线员 op-01")
        await expect(acknowledged).to_contain_text("确认警报，转人工处置：未登记用户")
        # the timeline speaks one language: no rule ids, station codes or "dispatcher"
        for text in await detail.locator(".timeline li").all_inner_texts():
            assert not re.search(r"[A-Za-z_]{4,}", text), text
        await detail.locator("button.close-detail").click()
        await expect(detail).to_be_hidden()

        await page.reload()  # the dispatcher holds the acknowledgement
        await expect(dead).to_be_visible()
        await expect(dead.locator('button[data-action="acknowledge"]')).to_have_count(0)
        assert not (await page.evaluate(alarm))["active"]


async def test_closing_needs_an_outcome_refusals_are_chinese_and_clocks_are_the_dispatchers(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    async with ahead_dispatcher(settings, broker, tmp_path) as (page, url, console):
        await call(url, "C-WAIT", WANG, INVESTMENT, 70)
        card = page.locator('#critical [data-incident="INC-C-WAIT"]')
        clock = card.locator("[data-clock=critical]")
        await expect(clock).to_be_visible(timeout=10_000)
        await page.wait_for_timeout(3_000)
        # on the browser's clock the incident would turn critical 10 minutes from now
        assert 2 <= seconds(await clock.inner_text()) < 30

        # an incident the dispatcher does not know: its refusal comes back in Chinese
        ghost = dict(console.board.incidents["INC-C-WAIT"], incident_id="INC-GHOST")
        event = {
            "specversion": "1.0",
            "id": "ghost-1",
            "source": "antifraud/dispatcher/hengnan",
            "type": "cn.antifraud.incident.opened",
            "time": console.dispatcher_now(),
            "subject": "INC-GHOST",
            "datacontenttype": "application/json",
            "data": ghost,
        }
        await announce(url, event)
        phantom = page.locator('#critical [data-incident="INC-GHOST"]')
        await phantom.locator('button[data-action="busy"]').click()
        await expect(phantom.locator(".feedback")).to_contain_text(
            "被拒绝：调度服务中没有这个事件", timeout=10_000
        )
        await page.screenshot(path=ARTIFACTS / "9-refused.png")

        # closing: no outcome chosen, no close; then a confirmation
        close = card.locator('button[data-action="close"]')
        await expect(close).to_be_disabled()
        await card.locator('select[data-field="outcome"]').select_option(label="已阻止")
        await close.click()
        confirm = card.locator('button[data-action="confirm-close"]')
        await expect(confirm).to_contain_text("确认结案：已阻止")
        await page.wait_for_timeout(500)
        assert console.board.incidents["INC-C-WAIT"]["status"] == "open"
        await confirm.click()
        closed = page.locator('#closed [data-incident="INC-C-WAIT"]')
        await expect(closed).to_contain_text("已阻止", timeout=10_000)
        await closed.click()
        shown = page.locator("#detail [data-clock=critical]")
        first = seconds(await shown.inner_text())
        await page.wait_for_timeout(2_500)
        assert seconds(await shown.inner_text()) == first  # stopped at close
        assert first < 60

        # closed in the step that found no police for a loss: the row says what was left
        loss = dict(
            console.board.incidents["INC-C-WAIT"],
            incident_id="INC-LOSS",
            outcome="loss",
            alerts=["police_exhausted"],
            acknowledged=[],
        )
        event = dict(event, id="loss-1", type="cn.antifraud.incident.closed", subject="INC-LOSS")
        event["data"] = loss
        await announce(url, event)
        row = page.locator('#closed [data-incident="INC-LOSS"]')
        await expect(row.locator(".tag.unhandled")).to_contain_text(
            "结案时仍有未处置警报", timeout=10_000
        )
        await expect(row).to_contain_text("已被骗")
        assert not (await page.evaluate("window.consoleAlarm.active"))  # a closed one: no alarm
        # its card is gone: the operator is told once, with the alarm's tone
        await expect(page.locator("#toast")).to_contain_text(
            "⚠ INC-LOSS 已结案（已被骗），但仍有未处置警报：无民警接警"
        )
        beeps = await page.evaluate("window.consoleAlarm.beeps")
        await announce(url, dict(event, id="loss-2"))  # the same close again: no second word
        await page.wait_for_timeout(500)
        assert await page.evaluate("window.consoleAlarm.beeps") == beeps
        await page.screenshot(path=ARTIFACTS / "14-closed-unhandled.png")

        # no guard took the door, but the patrol is on its way: the alarm says so
        at = console.dispatcher_now()
        patrol = {
            "dispatch_id": "INC-DOOR:P-YJ-01",
            "unit": "P-YJ-01",
            "unit_name": "云集派出所 巡逻一组",
            "role": "police",
            "status": "accepted",
            "offered_at": at,
            "expires_at": None,
            "accepted_at": at,
            "arrived_at": None,
            "reported_at": None,
            "outcome": None,
        }
        door = dict(
            loss,
            incident_id="INC-DOOR",
            status="escalated",
            outcome=None,
            closed_at=None,
            alerts=["door_exhausted"],
            dispatches=[patrol],
        )
        event = dict(event, id="door-1", type="cn.antifraud.incident.updated", subject="INC-DOOR")
        event["data"] = door
        await announce(url, event)
        alert = page.locator('#critical [data-incident="INC-DOOR"] [data-alert="door_exhausted"]')
        await expect(alert).to_contain_text("（云集派出所 巡逻一组 已接警，在途）", timeout=10_000)


async def test_a_warning_is_escalated_from_its_detail_and_a_double_press_counts_once(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    async with ahead_dispatcher(settings, broker, tmp_path) as (page, url, console):
        # a warning is a row under 预警: its detail has the actions (escalate at any severity)
        await call(url, "C-WARN", ZHAO, REFUND, 40)
        row = page.locator('#warnings [data-incident="INC-C-WARN"]')
        await expect(row).to_be_visible(timeout=10_000)
        await row.click()
        detail = page.locator("#detail")
        await expect(detail.locator('select[data-field="outcome"]')).to_be_visible()
        await page.screenshot(path=ARTIFACTS / "12-warning-detail.png")
        await detail.locator('button[data-action="escalate"]').click()
        card = page.locator('#critical [data-incident="INC-C-WARN"]')
        await expect(card).to_contain_text("上门处置中", timeout=10_000)

        # a second press while the first waits for the dispatcher sends nothing
        await call(url, "C-TWICE", WANG, INVESTMENT, 200)
        twice = page.locator('#critical [data-incident="INC-C-TWICE"]')
        no_answer = twice.locator('button[data-action="no_answer"]')
        await expect(no_answer).to_be_visible(timeout=10_000)
        # it came in first on the board, where the escalated card was: it takes no press
        # until the board has stood still (MOVED_MS)
        await page.wait_for_timeout(900)
        await no_answer.click()
        await page.wait_for_timeout(300)
        await no_answer.click(force=True)  # a disabled button takes no click
        await expect(twice.locator(".feedback")).to_contain_text("已生效", timeout=10_000)
        await page.wait_for_timeout(1_000)
        assert console.board.incidents["INC-C-TWICE"]["callback"]["attempts"] == 1
        await expect(twice.locator('button[data-action="no_answer"]')).to_be_enabled()


async def test_presses_land_on_the_card_aimed_at_safe_asks_twice_and_feedback_says_what_counted(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    from playwright.async_api import expect

    async with ahead_dispatcher(settings, broker, tmp_path) as (page, url, console):
        await call(url, "C-OLD", WANG, INVESTMENT, 70)
        old = page.locator('#critical [data-incident="INC-C-OLD"]')
        await expect(old.locator('button[data-action="no_answer"]')).to_be_visible(timeout=10_000)

        # a new critical card comes in at the top, pushing the old one down just as the
        # operator presses its button: the press is not sent
        pressed = asyncio.create_task(
            page.evaluate(
                """() => new Promise((resolve) => {
                  const board = document.querySelector("#critical");
                  const seen = new MutationObserver(() => {
                    if (!board.querySelector('[data-incident="INC-C-NEW"]')) return;
                    seen.disconnect();
                    const old = board.querySelector('[data-incident="INC-C-OLD"]');
                    old.querySelector('[data-action="no_answer"]').click();
                    // and the new card, come in where the old one was
                    const fresh = board.querySelector('[data-incident="INC-C-NEW"]');
                    fresh.querySelector('[data-action="no_answer"]').click();
                    resolve(true);
                  });
                  seen.observe(board, { childList: true, subtree: true });
                })"""
            )
        )
        await asyncio.sleep(0.2)
        await call(url, "C-NEW", ZHAO, IMPERSONATION, 130)
        assert await asyncio.wait_for(pressed, 10)
        order = await page.locator("#critical article").evaluate_all(
            "a => a.map(n => n.dataset.incident)"
        )
        assert order == ["INC-C-NEW", "INC-C-OLD"], order
        await expect(old.locator(".feedback")).to_contain_text("看板刚刚变动，回拨：无人接听未发送")
        new = page.locator('#critical [data-incident="INC-C-NEW"]')
        await expect(new.locator(".feedback")).to_contain_text("看板刚刚变动，回拨：无人接听未发送")
        await page.wait_for_timeout(500)
        assert console.board.incidents["INC-C-OLD"]["callback"]["attempts"] == 0
        assert console.board.incidents["INC-C-NEW"]["callback"]["attempts"] == 0
        await page.wait_for_timeout(500)  # the board has stood still: the press goes
        await old.locator('button[data-action="no_answer"]').click()
        # the feedback is the dispatcher's own word on the press
        await expect(old.locator(".feedback")).to_contain_text(
            "已生效：回拨结果：无人接听（第1/3次）", timeout=10_000
        )

        # the operator narrows the window and opens a card's detail: the panel takes its
        # width from the board and the other card goes to a row of its own, under his own
        # hand; an update redraws the board, and a press on the card that moved still goes
        await page.wait_for_timeout(2_100)  # past the last press's repeat guard (REPEAT_MS)
        await page.set_viewport_size({"width": 1000, "height": 768})
        before = await old.bounding_box()
        await new.locator("h3").click()
        await expect(page.locator("#detail")).to_be_visible()
        after = await old.bounding_box()
        assert before is not None and after is not None
        assert (before["x"], before["y"]) != (after["x"], after["y"])  # it did move
        await page.evaluate(
            """() => {
              renderBoard();  // an update, and the press right after it
              document.querySelector('#critical [data-incident="INC-C-OLD"] '
                                     + '[data-action="no_answer"]').click();
            }"""
        )
        await expect(old.locator(".feedback")).to_contain_text(
            "已生效：回拨结果：无人接听（第2/3次）", timeout=10_000
        )
        await page.locator("#detail .close-detail").click()
        await page.set_viewport_size({"width": 1366, "height": 768})

        # "answered, safe" closes the incident: it asks again, and a double click is one press
        await new.locator('button[data-action="answered_safe"]').dblclick()
        confirm = new.locator('button[data-action="confirm-answered_safe"]')
        await expect(confirm).to_contain_text("确认：接通·已安全")
        await page.screenshot(path=ARTIFACTS / "13-safe-asks-again.png")
        await page.wait_for_timeout(500)
        assert console.board.incidents["INC-C-NEW"]["status"] == "open"
        await new.locator('button[data-action="cancel-answered_safe"]').click()
        await expect(confirm).to_have_count(0)
        await new.locator('button[data-action="answered_safe"]').click()
        await page.wait_for_timeout(600)
        await confirm.click()
        await expect(page.locator('#closed [data-incident="INC-C-NEW"]')).to_contain_text(
            "回拨确认安全", timeout=10_000
        )
        # its card left the board at once: the close is said where the operator looks
        await expect(page.locator("#toast")).to_contain_text("INC-C-NEW 已结案：回拨确认安全")

        # a callback result that comes after the escalation is recorded, and said not to count
        await page.wait_for_timeout(900)  # the closed card left, the other moved: MOVED_MS
        await old.locator('button[data-action="escalate"]').click()
        await expect(old).to_contain_text("上门处置中", timeout=10_000)
        await page.wait_for_timeout(2_200)  # the escalation's press no longer holds the card
        await page.evaluate(
            """() => act(state.incidents.get("INC-C-OLD"), "callback", { result: "no_answer" },
                         ACTION_LABEL.no_answer)"""
        )
        feedback = old.locator(".feedback")
        await expect(feedback).to_contain_text(
            "已记录，事件未因此改变：回拨结果：无人接听（已升级，不计入）", timeout=10_000
        )
        assert "noted" in (await feedback.get_attribute("class") or "")
        await page.screenshot(path=ARTIFACTS / "13-not-counted.png")


async def test_the_stats_view_charts_a_period_and_opens_the_incidents_behind_a_figure(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    store = tmp_path / "stats.sqlite3"
    await replay(SEED, settings, store)
    async with (
        serving(settings, broker, tmp_path, store) as (base, _),
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1366, "height": 768}, locale="zh-CN")
        await page.goto(f"{base}/login")
        await page.fill("input[name=operator]", "op-01")
        await page.fill("input[name=password]", PASSWORD)
        await page.click("button[type=submit]")
        await expect(page.locator("#operator")).to_have_text("接线员 op-01")
        await page.click("button[data-tab=stats]")
        await expect(page.locator("#stats-zone")).to_have_text("时区 Asia/Shanghai")
        await expect(page.locator("#chart-outcomes svg g.bar")).to_have_count(6)
        await expect(page.locator("#chart-arrival svg g.bar")).to_have_count(7)
        await expect(page.locator("#chart-daily svg g.bar")).to_have_count(1)
        await expect(page.locator("#stats-summary")).to_contain_text("共 1 起事件")
        await expect(page.locator("#stats-summary")).to_contain_text("中位 6分30秒")
        box = await page.locator("#chart-outcomes svg").bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 100
        await expect(page.locator("#stats-tables")).to_contain_text("保安")
        await page.screenshot(path=ARTIFACTS / "10-stats.png", full_page=True)

        # a bar of the chart lists its incidents; a count in a table does too
        await page.click('#chart-outcomes g.bar[data-figure="outcome:prevented"]')
        row = page.locator(f'#behind-table tr[data-incident="{INCIDENT}"]')
        await expect(page.locator("#behind-title")).to_contain_text("按结果：已阻止：1起（1 起")
        await expect(row).to_contain_text("2021-10-15")
        await expect(row).to_contain_text("已阻止")
        await page.click('#stats-tables a[data-figure="unit:G-YJ-CH-01"]')
        await expect(page.locator("#behind-title")).to_contain_text("参与的事件（1 起")
        await row.click()
        await expect(page.locator("#detail")).to_be_visible()
        await expect(page.locator("#detail h2")).to_contain_text(INCIDENT)
        await page.screenshot(path=ARTIFACTS / "11-stats-behind.png", full_page=True)

        # a period without incidents: empty charts, no links
        await page.fill("#stats-form input[name=from]", "2021-10-16")
        await page.click("#stats-form button[type=submit]")
        await expect(page.locator("#stats-summary")).to_contain_text("共 0 起事件")
        await expect(page.locator("#chart-daily")).to_contain_text("无数据")
        await expect(page.locator("#stats-summary a.figure")).to_have_count(0)
        await browser.close()
