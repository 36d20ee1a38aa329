"""The operator console over HTTP: login, sessions, CSRF, actions, refusals, history, CSV."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import aiomqtt
import pytest
from aiohttp import ClientSession, CookieJar, web

from adapters.broker import Mosquitto, free_port, mosquitto_binary
from adapters.console import (
    ALERT_TEXT,
    UNCONFIRMED,
    Console,
    Users,
    check_password,
    hash_password,
    refusal_text,
)
from adapters.live import Clock, LiveService
from adapters.mqtt import BrokerURL, open_client
from adapters.replay import replay
from adapters.store import Store
from dispatcher.errors import ConfigError
from dispatcher.inbound import AlertCode
from dispatcher.protocol import IncidentDetail
from dispatcher.settings import Settings, load_settings

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]
SEED = Path(__file__).parent / "data" / "chen_case.jsonl"
PASSWORD = "correct horse battery"


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    broker: Mosquitto,
    tmp_path: Path,
    store: Path | None = None,
    via: str | None = None,
) -> AsyncIterator[tuple[str, Console]]:
    """The console served, connected to ``broker`` (or through ``via``, a relay's URL)."""
    users = Users(tmp_path / "users.json")
    users.set_password("op-01", PASSWORD)
    console = Console(settings, BrokerURL.parse(via or broker.url), store, users)
    runner = web.AppRunner(console.app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.wait_for(console.connected.wait(), 10)
    try:
        yield f"http://127.0.0.1:{port}", console
    finally:
        await runner.cleanup()


async def login(
    http: ClientSession, base: str, operator: str = "op-01", password: str = PASSWORD
) -> dict[str, Any]:
    async with http.post(
        f"{base}/login", data={"operator": operator, "password": password}, allow_redirects=False
    ) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/"
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    async with http.get(f"{base}/api/state") as response:
        assert response.status == 200
        return await response.json()  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def operator_watched(
    settings: Settings, broker: Mosquitto, tmp_path: Path, via: str | None = None
) -> AsyncIterator[tuple[str, Console, ClientSession, dict[str, Any], aiomqtt.Client]]:
    """The console served, op-01 logged in (its state: the CSRF token), and a client
    subscribed to every operator's actions, to see what the console publishes."""
    async with (
        serving(settings, broker, tmp_path, via=via) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
        open_client(BrokerURL.parse(broker.url)) as spy,
    ):
        await spy.subscribe("antifraud/v1/operators/+/actions", qos=1)
        yield base, console, http, await login(http, base), spy


def test_passwords_are_hashed_with_scrypt_and_checked(tmp_path: Path) -> None:
    stored = hash_password("s3cret-words")
    assert stored.startswith("scrypt$") and "s3cret-words" not in stored
    assert check_password("s3cret-words", stored)
    assert not check_password("s3cret-word", stored)
    users = Users(tmp_path / "u.json")
    users.set_password("op-01", "s3cret-words")
    assert (tmp_path / "u.json").stat().st_mode & 0o777 == 0o600
    assert users.check("op-01", "s3cret-words") and not users.check("op-02", "s3cret-words")


async def test_pages_need_a_login_and_a_wrong_password_is_refused(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    async with (
        serving(settings, broker, tmp_path) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        async with http.get(f"{base}/", allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (302, "/login")
        async with http.get(f"{base}/api/state") as response:
            assert response.status == 401
        for operator, password in [("op-01", "wrong"), ("op-99", PASSWORD), ("op-02", PASSWORD)]:
            async with http.post(
                f"{base}/login",
                data={"operator": operator, "password": password},
                allow_redirects=False,
            ) as response:
                assert response.headers["Location"] == "/login?failed=1"
        async with http.get(f"{base}/api/state") as response:
            assert response.status == 401
        state = await login(http, base)
        assert state["operator"] == "op-01" and len(state["csrf"]) > 20
        async with http.get(f"{base}/static/console.js") as response:
            assert response.status == 200  # every asset is served locally


async def test_an_action_needs_the_csrf_token_and_is_published_as_the_operator(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    async with operator_watched(settings, broker, tmp_path) as (base, _, http, state, spy):
        target = f"{base}/api/incidents/INC-C1/callback"
        async with http.post(target, json={"result": "no_answer"}) as response:
            assert response.status == 403
        async with http.post(
            target, json={"result": "no_answer"}, headers={"X-CSRF-Token": "forged"}
        ) as response:
            assert response.status == 403
        async with http.post(
            target, json={"result": "maybe"}, headers={"X-CSRF-Token": state["csrf"]}
        ) as response:
            assert response.status == 400
        async with http.post(
            target, json={"result": "no_answer"}, headers={"X-CSRF-Token": state["csrf"]}
        ) as response:
            assert response.status == 200
            action_id = (await response.json())["action_id"]
        message = await asyncio.wait_for(anext(spy.messages.__aiter__()), 5)
    event = json.loads(bytes(message.payload))  # type: ignore[arg-type]
    assert str(message.topic) == "antifraud/v1/operators/op-01/actions"
    assert (event["id"], event["source"], event["type"]) == (
        action_id,
        "console/op-01",
        "cn.antifraud.operator.callback",
    )
    assert event["data"] == {"incident_id": "INC-C1", "result": "no_answer"}


async def test_an_action_the_broker_may_not_have_is_reported_as_unconfirmed(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """The console's connection dies after the action reached the broker but before the
    broker's acknowledgement came back: the operator is told at once that it may or may not
    have gone, not kept waiting and then shown a server error."""
    from tools.relay import PUBACK, Relay

    async with (
        Relay(("127.0.0.1", broker.port), mqtt=True) as relay,  # the console's way to the broker
        operator_watched(settings, broker, tmp_path, via=relay.url) as (base, _, http, state, spy),
    ):
        relay.lose(PUBACK)  # the broker's acknowledgements do not reach the console

        async def escalate() -> tuple[int, str]:
            async with http.post(
                f"{base}/api/incidents/INC-C1/escalate",
                json={},
                headers={"X-CSRF-Token": state["csrf"]},
            ) as response:
                return response.status, await response.text()

        acting = asyncio.create_task(escalate())
        await asyncio.wait_for(anext(spy.messages.__aiter__()), 5)  # the broker has it
        await asyncio.wait_for(relay.a_packet_lost.wait(), 5)  # and acknowledged it, in vain
        broker.kill()
        status, text = await asyncio.wait_for(acting, 3)  # before the 5 s it may wait
    assert status == 503
    assert text == UNCONFIRMED


async def escalate_unknown(http: ClientSession, base: str, state: dict[str, Any]) -> str:
    """An operator presses 立即上门 on an incident the dispatcher does not know; the id of
    the action the console sent."""
    async with http.post(
        f"{base}/api/incidents/INC-NOPE/escalate",
        json={},
        headers={"X-CSRF-Token": state["csrf"]},
    ) as response:
        return str((await response.json())["action_id"])


async def test_a_refused_action_comes_back_with_the_dispatchers_reason(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    service = LiveService(settings, BrokerURL.parse(broker.url), tmp_path / "live.sqlite3", Clock())
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), 10)
    try:
        async with (
            serving(settings, broker, tmp_path) as (base, _),
            ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
        ):
            state = await login(http, base)
            async with http.ws_connect(f"{base}/ws") as ws:
                action_id = await escalate_unknown(http, base, state)
                while True:
                    frame = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
                    if frame["kind"] == "refused":
                        break
        assert frame["data"]["action_id"] == action_id
        assert "unknown incident INC-NOPE" in frame["data"]["reason"]
    finally:
        stop.set()
        await task


async def test_a_refusal_is_matched_to_an_action_by_its_id_topic_and_source(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """A dead letter of another party's message that happens to carry the same id is not
    the refusal of the operator's action; the dispatcher's, of the action itself, is."""
    from dispatcher.inbound import cloudevent

    prefix = settings.service.prefix
    async with (
        serving(settings, broker, tmp_path) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
        open_client(BrokerURL.parse(broker.url)) as other,
    ):
        state = await login(http, base)
        async with http.ws_connect(f"{base}/ws") as ws:
            action_id = await escalate_unknown(http, base, state)

            async def dead_letter(topic: str, source: str, reason: str) -> None:
                data = {
                    "topic": topic,
                    "reason": reason,
                    "source": source,
                    "id": action_id,
                    "payload": "{}",
                }
                event = cloudevent(
                    f"dl-{reason}",
                    settings.service.source,
                    "cn.antifraud.input.rejected",
                    data,
                    subject=topic,
                )
                await other.publish(f"{prefix}/deadletter", json.dumps(event), qos=1)

            await dead_letter(f"{prefix}/units/G-YJ-CH-01/replies", "unit/G-YJ-CH-01", "not-it")
            await dead_letter(f"{prefix}/operators/op-01/actions", "console/op-01", "the-one")
            while True:
                frame = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
                if frame["kind"] == "refused":
                    break
    assert frame["data"]["action_id"] == action_id
    assert frame["data"]["reason"] == "the-one"


async def test_one_operators_many_actions_never_cost_another_his_refusal(
    settings: Settings, broker: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console remembers the actions it sent to match their refusals, a bounded number
    per operator: op-02 sending more than that forgets only his own, and op-01 still hears
    that his action was refused."""
    from adapters import console as console_module
    from dispatcher.inbound import cloudevent

    monkeypatch.setattr(console_module, "PENDING_ACTIONS", 5)
    prefix = settings.service.prefix
    async with (
        serving(settings, broker, tmp_path) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as other_operator,
        open_client(BrokerURL.parse(broker.url)) as dispatcher,
    ):
        console.users.set_password("op-02", PASSWORD)
        state = await login(http, base)
        second = await login(other_operator, base, "op-02")
        async with http.ws_connect(f"{base}/ws") as ws:
            action_id = await escalate_unknown(http, base, state)
            for _ in range(6):
                await escalate_unknown(other_operator, base, second)
            data = {
                "topic": f"{prefix}/operators/op-01/actions",
                "reason": "unknown incident INC-NOPE",
                "source": "console/op-01",
                "id": action_id,
                "payload": "{}",
            }
            event = cloudevent(
                "dl-1",
                settings.service.source,
                "cn.antifraud.input.rejected",
                data,
                subject=data["topic"],
            )
            await dispatcher.publish(f"{prefix}/deadletter", json.dumps(event), qos=1)
            while True:
                frame = json.loads((await asyncio.wait_for(ws.receive(), 10)).data)
                if frame["kind"] == "refused":
                    break
    assert frame["data"]["action_id"] == action_id
    assert frame["data"]["operator"] == "op-01"


async def test_operators_see_whether_the_dispatcher_is_running(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """Unknown until the dispatcher is heard from; online once it is connected; offline as
    its will when its connection is cut, online again when it is back; offline when it stops.
    Each status is a retained message of the published protocol."""
    from dispatcher.protocol import validate_outbound
    from tools.relay import Relay

    url = BrokerURL.parse(broker.url)
    relay = Relay(("127.0.0.1", broker.port))  # the dispatcher's way to the broker
    await relay.start()
    through_relay = BrokerURL.parse(relay.url)
    async with (
        serving(settings, broker, tmp_path) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        state = await login(http, base)
        assert state["dispatcher"] == "unknown"
        async with http.ws_connect(f"{base}/ws") as ws:

            async def next_presence() -> str:
                while True:
                    frame = json.loads((await asyncio.wait_for(ws.receive(), 15)).data)
                    if frame["kind"] == "dispatcher":
                        return str(frame["data"]["state"])

            service = LiveService(settings, through_relay, tmp_path / "live.sqlite3", Clock())
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(stop))
            try:
                assert await next_presence() == "online"
                # announced once it is subscribed, as it takes the connection as its own
                await asyncio.wait_for(service.connected.wait(), 10)
                relay.drop()  # the connection is cut: no goodbye
                assert await next_presence() == "offline"  # the broker published its will
                assert await next_presence() == "online"  # reconnected
            finally:
                stop.set()
                await task
                await relay.close()
            assert await next_presence() == "offline"
    async with open_client(url) as reader:
        await reader.subscribe(f"{settings.service.prefix}/dispatcher/status", qos=1)
        retained = await asyncio.wait_for(anext(reader.messages.__aiter__()), 5)
    event = json.loads(bytes(retained.payload))  # type: ignore[arg-type]
    validate_outbound(event)
    assert (event["data"], event["subject"]) == ({"state": "offline"}, settings.service.client_id)


async def test_history_is_searchable_and_exports_csv(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    store = tmp_path / "history.sqlite3"
    await replay(SEED, settings, store)
    async with (
        serving(settings, broker, tmp_path, store) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        await login(http, base)
        for query, found in [
            ({"q": "陈某某"}, 1),
            ({"q": "+85251230002"}, 1),
            ({"q": "王阿姨"}, 0),
            ({"outcome": "prevented"}, 1),
            ({"outcome": "loss"}, 0),
            # the seed case closed on 15 October 2021 (its recording's clock), not in 1970
            ({"from": "2021-10-15", "to": "2021-10-15"}, 1),
            ({"to": "2021-10-14"}, 0),
            ({"from": "2021-10-16"}, 0),
        ]:
            async with http.get(f"{base}/api/history", params=query) as response:
                assert len((await response.json())["incidents"]) == found, query
        async with http.get(f"{base}/api/history.csv", params={"q": "陈"}) as response:
            body = (await response.read()).decode("utf-8-sig")
            assert response.headers["Content-Type"].startswith("text/csv")
    lines = body.strip().splitlines()
    assert lines[0].startswith("incident_id,closed,subscriber,name")
    assert "INC-C-20211015-0001" in lines[1] and "陈某某" in lines[1] and "prevented" in lines[1]


async def test_stats_give_the_figures_their_charts_and_the_incidents_behind(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    store = tmp_path / "stats.sqlite3"
    await replay(SEED, settings, store)
    async with (
        serving(settings, broker, tmp_path, store) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        async with http.get(f"{base}/api/stats") as response:
            assert (response.status, await response.text()) == (401, "请先登录")
        await login(http, base)
        async with http.get(f"{base}/api/stats") as response:
            assert response.status == 200
            found = await response.json()
        # the seed case opened on 15 October 2021 in Hengnan
        async with http.get(f"{base}/api/stats", params={"from": "2021-10-16"}) as response:
            later = await response.json()
    assert found["figures"]["incidents"] == 1
    assert found["figures"]["outcomes"]["prevented"] == 1
    assert set(found["charts"]) == {"outcomes", "arrival", "daily"}
    assert found["charts"]["daily"].count('class="bar"') == 1
    assert found["behind"]["outcome:prevented"] == ["INC-C-20211015-0001"]
    assert found["behind"]["unit:G-YJ-CH-01"] == ["INC-C-20211015-0001"]
    line = found["incidents"]["INC-C-20211015-0001"]
    assert (line["rule"], line["outcome"], line["opened"][:10]) == (
        "long_call_flagged",
        "prevented",
        "2021-10-15",
    )
    assert later["figures"]["incidents"] == 0 and later["incidents"] == {}


@pytest.mark.parametrize(
    ("query", "text"),
    [
        ({"from": "15/10/2021"}, "日期应写成 YYYY-MM-DD，例如 2021-10-15"),
        ({"to": "2021-02-30"}, "日期应写成 YYYY-MM-DD，例如 2021-10-15"),
        ({"from": "2021-10-15x"}, "日期应写成 YYYY-MM-DD，例如 2021-10-15"),
        ({"from": "2021-10-16", "to": "2021-10-15"}, "开始日期不能晚于结束日期"),
    ],
)
async def test_stats_refuse_bad_dates_in_chinese(
    settings: Settings, broker: Mosquitto, tmp_path: Path, query: dict[str, str], text: str
) -> None:
    async with (
        serving(settings, broker, tmp_path) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        await login(http, base)
        async with http.get(f"{base}/api/stats", params=query) as response:
            assert (response.status, await response.text()) == (400, text)


async def test_the_board_lists_units_with_presence(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    url = BrokerURL.parse(broker.url)
    async with open_client(url) as radio:
        await radio.publish(
            "antifraud/v1/units/G-YJ-CH-01/status",
            json.dumps(
                {
                    "specversion": "1.0",
                    "id": "s1",
                    "source": "unit/G-YJ-CH-01",
                    "type": "cn.antifraud.unit.status",
                    "data": {"state": "offline"},
                }
            ),
            qos=1,
            retain=True,
        )
    async with (
        serving(settings, broker, tmp_path) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        await login(http, base)
        for _ in range(50):
            async with http.get(f"{base}/api/state") as response:
                units = {u["id"]: u for u in (await response.json())["units"]}
            if units["G-YJ-CH-01"]["presence"] == "offline":
                break
            await asyncio.sleep(0.05)
    assert units["G-YJ-CH-01"]["presence"] == "offline"
    assert units["G-YJ-CH-02"]["presence"] == "unknown"
    assert len(units) == len(settings.units)


async def test_a_person_can_watch_the_demo_in_the_console(settings: Settings) -> None:
    import io
    import re

    from adapters.broker import local_broker
    from tools.demo import DEFAULT_RECORDING, run_demo

    out = io.StringIO()
    port = free_port()
    async with local_broker("mosquitto") as (url, _):
        demo = asyncio.create_task(
            run_demo(
                settings,
                DEFAULT_RECORDING,
                url,
                speed=100.0,
                out=out,
                console_port=port,
                linger_s=1.0,
            )
        )
        for _ in range(200):
            found = re.search(r"log in as (\S+), password (\S+),", out.getvalue())
            if found:
                break
            await asyncio.sleep(0.05)
        assert found, out.getvalue()
        seen: set[str] = set()
        async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as http:
            await login(http, f"http://127.0.0.1:{port}", found[1], found[2])
            # The console closes when the demo's linger ends, before the demo
            # returns: poll until the closing is seen, not until the demo is done.
            while "closed" not in seen and not demo.done():
                async with http.get(f"http://127.0.0.1:{port}/api/state") as response:
                    if response.status == 200:
                        seen |= {i["status"] for i in (await response.json())["incidents"]}
                await asyncio.sleep(0.1)
        assert await demo == 0
    assert {"open", "escalated", "closed"} <= seen


def zoned(settings: Settings, zone: str) -> Settings:
    return dataclasses.replace(
        settings, service=settings.service.model_copy(update={"timezone": zone})
    )


@pytest.mark.parametrize(
    ("zone", "day", "clock", "offset"),
    [
        ("Asia/Shanghai", "2021-10-15", "2021-10-15 14:", "+08:00"),
        # the same moment, where it is still the evening before
        ("America/Los_Angeles", "2021-10-14", "2021-10-14 23:", "-07:00"),
    ],
)
async def test_history_and_csv_are_in_the_deployments_time_zone(
    settings: Settings,
    broker: Mosquitto,
    tmp_path: Path,
    zone: str,
    day: str,
    clock: str,
    offset: str,
) -> None:
    """Whatever the server's own zone, history, its day filters and the CSV all use
    ``service.timezone``: the seed case closed at 14:2x in Hengnan (06:2x UTC)."""
    store = tmp_path / "history.sqlite3"
    await replay(SEED, settings, store)
    async with (
        serving(zoned(settings, zone), broker, tmp_path, store) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        state = await login(http, base)
        assert state["timezone"] == zone
        async with http.get(f"{base}/api/history", params={"from": day, "to": day}) as response:
            (found,) = (await response.json())["incidents"]
        assert found["closed"].startswith(clock) and found["closed"].endswith(offset)
        other = "2021-10-16" if day == "2021-10-15" else "2021-10-15"
        async with http.get(f"{base}/api/history", params={"from": other}) as response:
            assert (await response.json())["incidents"] == []
        async with http.get(f"{base}/api/history.csv", params={"to": day}) as response:
            rows = list(csv.DictReader(io.StringIO((await response.read()).decode("utf-8-sig"))))
        assert len(rows) == 1
        assert rows[0]["closed"].startswith(clock) and rows[0]["closed"].endswith(offset)


def test_the_default_time_zone_is_the_deployments_and_a_wrong_one_is_named(
    deployment: Any,
) -> None:
    assert load_settings(deployment()).service.timezone == "Asia/Shanghai"
    for wrong in ("Asia/Shangai", "+08:00", "../../etc/passwd", "Asia"):
        toml = deployment(
            edit_toml=lambda t, w=wrong: t.replace("[service]\n", f'[service]\ntimezone = "{w}"\n')
        )
        with pytest.raises(ConfigError) as error:
            load_settings(toml)
        (problem,) = error.value.problems
        assert problem.startswith(f"{toml}: service.timezone: "), problem
        assert "IANA" in problem
    toml = deployment(
        edit_toml=lambda t: t.replace("[service]\n", '[service]\ntimezone = "Europe/Berlin"\n')
    )
    assert load_settings(toml).service.timezone == "Europe/Berlin"


def test_the_dispatchers_refusals_are_told_in_chinese() -> None:
    assert refusal_text("incident INC-X is closed") == "事件已结案，操作未执行"
    assert "没有这个事件" in refusal_text("unknown incident INC-NOPE")
    assert refusal_text("incident INC-X has no alert no_address: its alerts are none") == (
        "事件的警报已变化：请看清后再确认"
    )
    invalid = "invalid data: data.alerts: List should have at least 1 item after validation"
    assert refusal_text(invalid) == "操作内容无效，调度服务未执行"
    assert refusal_text("CloudEvent 'time': bad") == "操作内容无效，调度服务未执行"
    assert refusal_text("unknown type 'cn.antifraud.operator.x'") == "调度服务不接受这种操作"
    assert "限流" in refusal_text("rate limit: op-01 sent more than 50 messages/s (bursts of 500)")
    unknown = refusal_text("something new went wrong")
    assert unknown.startswith("调度服务拒绝了此操作") and "something new went wrong" in unknown
    assert set(ALERT_TEXT) == set(get_args(AlertCode))  # every alert the dispatcher raises
    assert all(
        re.search(r"请", text) and not re.search(r"[a-z]_[a-z]", text)
        for text in ALERT_TEXT.values()
    )


async def test_an_incident_off_the_board_opens_from_the_store_and_the_favicon_is_served(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    store = tmp_path / "history.sqlite3"
    await replay(SEED, settings, store)
    async with (
        serving(settings, broker, tmp_path, store) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        async with http.get(f"{base}/api/incidents/INC-C-20211015-0001") as response:
            assert response.status == 401
        await login(http, base)
        async with http.get(f"{base}/api/incidents/INC-C-20211015-0001") as response:
            incident = (await response.json())["incident"]
        IncidentDetail.model_validate(incident)
        assert incident["outcome"] == "prevented"
        assert incident["closed_at"].startswith("2021-10-15T06:")  # the recording's clock
        async with http.get(f"{base}/api/incidents/INC-NOPE") as response:
            assert response.status == 404
        async with http.get(f"{base}/favicon.ico") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("image/svg+xml")


async def test_a_console_started_late_shows_the_whole_timeline_from_the_store(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """An update carries only the entries it added. A console that hears an incident first
    from a later update puts the timeline together from the dispatcher's store; without the
    store it shows what it has and says how many entries it lacks (its ``timeline_from``)."""
    store = tmp_path / "seed.sqlite3"
    report = await replay(SEED, settings, store)
    incident_id = report["incidents"][0]["id"]
    async with Store(store) as opened:
        rows = await opened.fetchall(
            "SELECT payload FROM outbox WHERE topic = ? AND payload IS NOT NULL ORDER BY seq",
            ("antifraud/v1/operators/incidents",),
        )
    events = [json.loads(p) for (p,) in rows]
    updates = [e for e in events if e["type"] == "cn.antifraud.incident.updated"]
    late = [e for e in updates if e["data"]["timeline_from"] > 5][:3]  # heard from here on
    assert len(late) == 3
    stored = next(e for e in events if e["type"] == "cn.antifraud.incident.closed")
    whole = stored["data"]["timeline"]
    for with_store in (True, False):
        async with serving(settings, broker, tmp_path, store if with_store else None) as (_, c):
            for event in late:
                await c.handle_message(
                    "antifraud/v1/operators/incidents", json.dumps(event).encode()
                )
            shown = c.board.incidents[incident_id]
        last = late[-1]["data"]
        end = last["timeline_from"] + len(last["timeline"])
        if with_store:
            assert shown["timeline"] == whole[:end] and shown["timeline_from"] == 0
        else:  # what it holds, and where that starts
            first = late[0]["data"]["timeline_from"]
            assert shown["timeline"] == whole[first:end]
            assert shown["timeline_from"] == first
