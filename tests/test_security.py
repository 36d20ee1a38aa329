"""Broker security: the shipped production config on a real Mosquitto, every denial proven.

Mosquitto 2 grants every SUBSCRIBE and filters each message, and with MQTT 3.1.1 acknowledges
a denied PUBLISH and drops it, so a denial is proven by what does not arrive: the forbidden
message is published first, then an allowed one on the same connection; when the allowed one
has arrived, the forbidden one would have arrived before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from adapters.access import read_credentials, write_broker_files
from adapters.broker import SecureBroker, mosquitto_binary, secure_broker
from adapters.live import Clock, LiveService
from adapters.mqtt import BrokerURL, open_client
from adapters.replay import replay
from adapters.report import live_report
from dispatcher.errors import BrokerError
from dispatcher.settings import Settings

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(
        mosquitto_binary() is None or shutil.which("openssl") is None,
        reason="mosquitto and openssl are needed",
    ),
]

SEED = Path(__file__).parent / "data" / "chen_case.jsonl"
P = "antifraud/v1"


@pytest.fixture
def secure(settings: Settings) -> Iterator[SecureBroker]:
    with secure_broker(settings) as broker:
        yield broker


@contextlib.asynccontextmanager
async def listening(url: BrokerURL, *topics: str) -> AsyncIterator[list[tuple[str, bytes]]]:
    """A client subscribed to ``topics``; yields the list its messages are appended to."""
    got: list[tuple[str, bytes]] = []
    async with open_client(url) as client:
        await client.subscribe([(t, 1) for t in topics])

        async def collect() -> None:
            async for message in client.messages:
                got.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]

        task = asyncio.create_task(collect())
        try:
            yield got
        finally:
            task.cancel()


async def arrives(got: list[tuple[str, bytes]], marker: bytes, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not any(payload == marker for _, payload in got):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{marker!r} never arrived; got {got}")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # and a little more, for good measure


async def publish_denied_then_allowed(
    url: BrokerURL, denied: str, allowed: str, observer: list[tuple[str, bytes]]
) -> None:
    async with open_client(url) as client:
        with contextlib.suppress(aiomqtt.MqttError):  # MQTT 5 may answer "not authorized"
            await client.publish(denied, b"forbidden", qos=1)
        await client.publish(allowed, b"control", qos=1)
    await arrives(observer, b"control")
    assert not any(p == b"forbidden" for _, p in observer), observer


# ---- who may connect -----------------------------------------------------------------------


async def test_anonymous_clients_are_refused(secure: SecureBroker) -> None:
    with pytest.raises(BrokerError, match=r"refused|not authori"):
        async with open_client(secure.url(None)):
            pass


async def test_a_wrong_password_is_refused(secure: SecureBroker) -> None:
    with pytest.raises(BrokerError):
        async with open_client(secure.url("G-YJ-CH-01", password="guess")):
            pass


async def test_a_plain_connection_to_the_tls_listener_fails(secure: SecureBroker) -> None:
    plain = BrokerURL(
        "127.0.0.1", secure.tls_port, False, "G-YJ-CH-01", secure.passwords["G-YJ-CH-01"]
    )
    with pytest.raises(BrokerError):
        async with open_client(plain, operation_timeout=3):
            pass


async def test_tls_with_the_deployment_ca_and_a_password_connects(secure: SecureBroker) -> None:
    async with open_client(secure.url("G-YJ-CH-01")):
        pass


# ---- handsets ------------------------------------------------------------------------------


async def test_a_handset_reads_only_its_own_dispatches(secure: SecureBroker) -> None:
    async with listening(
        secure.url("G-YJ-CH-01"),
        f"{P}/units/G-YJ-CH-02/dispatches",
        f"{P}/units/G-YJ-CH-01/dispatches",
        f"{P}/operators/incidents",
    ) as got:
        async with open_client(secure.url("dispatcher", tls=False)) as dispatcher:
            await dispatcher.publish(f"{P}/units/G-YJ-CH-02/dispatches", b"forbidden", qos=1)
            await dispatcher.publish(f"{P}/operators/incidents", b"forbidden", qos=1)
            await dispatcher.publish(f"{P}/units/G-YJ-CH-01/dispatches", b"control", qos=1)
        await arrives(got, b"control")
    assert [t for t, _ in got] == [f"{P}/units/G-YJ-CH-01/dispatches"]


@pytest.mark.parametrize(
    "denied",
    [
        f"{P}/units/G-YJ-CH-02/replies",  # another unit's replies: a forged reply
        f"{P}/units/G-YJ-CH-02/status",  # another unit's presence
        f"{P}/operators/op-01/actions",  # an operator's action
        f"{P}/events/hengnan/calls",  # a call event
        f"{P}/units/G-YJ-CH-02/dispatches",  # an offer to someone else
        f"{P}/incidents/INC-X",  # incident state
    ],
)
async def test_a_handset_writes_only_its_own_replies_and_status(
    secure: SecureBroker, denied: str
) -> None:
    async with listening(secure.url("dispatcher", tls=False), f"{P}/#") as observer:
        await publish_denied_then_allowed(
            secure.url("G-YJ-CH-01"), denied, f"{P}/units/G-YJ-CH-01/replies", observer
        )


# ---- call-warning sources and consoles ------------------------------------------------------


@pytest.mark.parametrize(
    "denied",
    [
        f"{P}/operators/op-01/actions",
        f"{P}/units/G-YJ-CH-01/replies",
        f"{P}/events/elsewhere/calls",
        f"{P}/units/G-YJ-CH-01/dispatches",
    ],
)
async def test_a_call_warning_source_only_publishes_call_events(
    secure: SecureBroker, denied: str
) -> None:
    async with listening(secure.url("dispatcher", tls=False), f"{P}/#") as observer:
        await publish_denied_then_allowed(
            secure.url("app-warning-hengnan"), denied, f"{P}/events/hengnan/calls", observer
        )


# what no console may publish, besides the actions of operators that are not its own
NOT_FOR_CONSOLES = [
    f"{P}/units/G-YJ-CH-01/replies",
    f"{P}/events/hengnan/calls",
    f"{P}/units/G-YJ-CH-01/dispatches",
    f"{P}/operators/incidents",
]


@pytest.mark.parametrize(
    ("username", "allowed", "denied"),
    [
        # an operator's console: its own actions, not another operator's
        *[("op-01", f"{P}/operators/op-01/actions", d) for d in NOT_FOR_CONSOLES],
        ("op-01", f"{P}/operators/op-01/actions", f"{P}/operators/op-02/actions"),
        # the console server: the actions of the deployment's operators, no one else's
        *[("console", f"{P}/operators/op-02/actions", d) for d in NOT_FOR_CONSOLES],
        ("console", f"{P}/operators/op-02/actions", f"{P}/operators/op-99/actions"),
    ],
)
async def test_a_console_only_publishes_the_actions_of_its_operators(
    secure: SecureBroker, username: str, allowed: str, denied: str
) -> None:
    async with listening(secure.url("dispatcher", tls=False), f"{P}/#") as observer:
        await publish_denied_then_allowed(secure.url(username), denied, allowed, observer)


@pytest.mark.parametrize(
    ("username", "allowed"),
    [
        ("op-01", f"{P}/operators/op-01/actions"),
        ("console", f"{P}/operators/op-01/actions"),
        ("app-warning-hengnan", f"{P}/events/hengnan/calls"),
    ],
)
@pytest.mark.parametrize("kind", ["status", "replies"])
async def test_nobody_but_a_unit_speaks_on_a_unit_topic_named_like_itself(
    secure: SecureBroker, username: str, allowed: str, kind: str
) -> None:
    """A retained "presence" of ``units/op-01/status`` would reach every console and the
    recorder: the rights of a unit are its own, not those of any username."""
    async with listening(secure.url("dispatcher", tls=False), f"{P}/#") as observer:
        await publish_denied_then_allowed(
            secure.url(username), f"{P}/units/{username}/{kind}", allowed, observer
        )


@pytest.mark.parametrize("username", ["op-01", "console"])
async def test_an_operator_console_reads_what_it_shows_and_not_dispatches(
    secure: SecureBroker, username: str
) -> None:
    async with listening(secure.url(username), f"{P}/#") as got:
        async with open_client(secure.url("dispatcher", tls=False)) as dispatcher:
            await dispatcher.publish(f"{P}/units/G-YJ-CH-01/dispatches", b"forbidden", qos=1)
            await dispatcher.publish(f"{P}/units/G-YJ-CH-01/replies", b"forbidden", qos=1)
            await dispatcher.publish(f"{P}/events/hengnan/calls", b"forbidden", qos=1)
            await dispatcher.publish(f"{P}/incidents/INC-X", b"state", qos=1)
            await dispatcher.publish(f"{P}/units/G-YJ-CH-01/status", b"presence", qos=1)
            await dispatcher.publish(f"{P}/deadletter", b"rejected", qos=1)
            await dispatcher.publish(f"{P}/dispatcher/status", b"dispatcher", qos=1)
            await dispatcher.publish(f"{P}/operators/incidents", b"control", qos=1)
        await arrives(got, b"control")
    assert sorted(p for _, p in got) == [
        b"control",
        b"dispatcher",
        b"presence",
        b"rejected",
        b"state",
    ]


# ---- everything together -------------------------------------------------------------------


async def test_the_seed_case_runs_with_each_party_on_its_own_credentials(
    settings: Settings, secure: SecureBroker, tmp_path: Path
) -> None:
    store = tmp_path / "live.sqlite3"
    service = LiveService(settings, secure.url("dispatcher", tls=False), store, Clock(100.0))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), 10)
    lines = [json.loads(line) for line in SEED.read_text(encoding="utf-8").splitlines()]
    clients: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        for line in lines:
            parts = line["topic"].split("/")
            user = {"events": "app-warning-hengnan", "operators": parts[3], "units": parts[3]}[
                parts[2]
            ]
            if user not in clients:
                clients[user] = await stack.enter_async_context(open_client(secure.url(user)))
        start = asyncio.get_running_loop().time()
        for line in lines:
            delay = start + line["at"] / 100.0 - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            parts = line["topic"].split("/")
            user = {"events": "app-warning-hengnan", "operators": parts[3], "units": parts[3]}[
                parts[2]
            ]
            await clients[user].publish(line["topic"], json.dumps(line["payload"]), qos=1)
        await asyncio.sleep(0.5)
    stop.set()
    await task
    live = await live_report(store, settings)
    expected = await replay(SEED, settings)
    assert [(i["status"], i["outcome"]) for i in live["incidents"]] == [("closed", "prevented")]
    assert [d["status"] for d in live["incidents"][0]["dispatches"]] == [
        d["status"] for d in expected["incidents"][0]["dispatches"]
    ]
    assert live["rejected"] == []


def test_usernames_must_be_unique_across_roles(settings: Settings, tmp_path: Path) -> None:
    from dataclasses import replace

    from adapters.access import accounts_for
    from dispatcher.errors import ConfigError

    clash = replace(
        settings, access=settings.access.model_copy(update={"operators": ["G-YJ-CH-01"]})
    )
    with pytest.raises(ConfigError, match=r"both a operator and a unit|both a unit"):
        accounts_for(clash, {})


def test_credentials_are_private_and_kept_across_runs(settings: Settings, tmp_path: Path) -> None:
    first = {a.username: a.password for a in write_broker_files(settings, tmp_path)}
    second = {a.username: a.password for a in write_broker_files(settings, tmp_path)}
    assert first == second
    assert (tmp_path / "credentials.csv").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "mosquitto.passwd").stat().st_mode & 0o777 == 0o600
    text = (tmp_path / "mosquitto.passwd").read_text(encoding="utf-8")
    assert all(password not in text for password in first.values())


async def test_a_lost_radio_is_cut_off_by_rotating_its_password(
    settings: Settings, secure: SecureBroker
) -> None:
    """A guard's radio is lost: ``broker-credentials --rotate UNIT`` and a reload of the
    broker end the thief's connection and refuse the old password; the replacement radio
    logs in with the new one, and nobody else's password changed."""
    import signal

    from antifraud.cli import main
    from dispatcher.errors import BrokerError

    conf = Path(secure.ca).parent.parent
    old = dict(secure.passwords)
    out = ["--config", str(settings.path), "--out", str(conf)]
    with pytest.raises(BrokerError):  # the broker ends the thief's session
        async with open_client(secure.url("G-YJ-CH-01")) as thief:
            assert main(["broker-credentials", *out, "--rotate", "G-YJ-CH-01"]) == 0
            new = read_credentials(conf / "credentials.csv")
            assert new["G-YJ-CH-01"] != old["G-YJ-CH-01"]
            assert {u: pw for u, pw in new.items() if u != "G-YJ-CH-01"} == {
                u: pw for u, pw in old.items() if u != "G-YJ-CH-01"
            }
            assert secure.broker.process is not None
            secure.broker.process.send_signal(signal.SIGHUP)
            for _ in range(50):
                await thief.publish(f"{P}/units/G-YJ-CH-01/status", b"still here", qos=1)
                await asyncio.sleep(0.1)
    with pytest.raises(BrokerError):
        async with open_client(secure.url("G-YJ-CH-01", password=old["G-YJ-CH-01"])):
            pass
    async with open_client(secure.url("G-YJ-CH-01", password=new["G-YJ-CH-01"])):
        pass
    assert main(["broker-credentials", *out, "--rotate", "G-NOBODY"]) != 0


async def test_the_dispatchers_password_is_never_printed_or_logged(
    settings: Settings, secure: SecureBroker, tmp_path: Path
) -> None:
    import io

    from dispatcher import logs

    password = secure.passwords["dispatcher"]
    url = secure.url("dispatcher", tls=False)
    assert password not in str(url) and password not in repr(url)
    log = io.StringIO()
    logs.configure("debug", log)
    try:
        service = LiveService(settings, url, tmp_path / "live.sqlite3", Clock(1.0))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await asyncio.wait_for(service.ready.wait(), 10)
        stop.set()
        await task
        wrong = BrokerURL("127.0.0.1", secure.local_port, False, "dispatcher", password[::-1])
        with pytest.raises(BrokerError) as refused:
            async with open_client(wrong):
                pass
    finally:
        logs.configure("warning")
    assert "broker_connected" in log.getvalue()
    for text in (log.getvalue(), str(refused.value)):
        assert password not in text and password[::-1] not in text


async def test_a_dispatcher_given_only_its_password_file_logs_in_as_its_access_user(
    secure: SecureBroker, deployment: Callable[..., Path], tmp_path: Path
) -> None:
    """operations.md's set-up: the generated credentials, the config's password file, no
    ``broker_username``. The dispatcher logs in as ``[access] dispatcher_user``, as the
    broker's credentials name it (a password without a username is refused by MQTT)."""
    from antifraud import bootstrap
    from dispatcher.settings import load_settings

    secret = tmp_path / "dispatcher.password"
    secret.write_text(secure.passwords["dispatcher"] + "\n", encoding="utf-8")
    secret.chmod(0o600)
    config = deployment(
        edit_toml=lambda text: text.replace(
            'broker = "mqtt://127.0.0.1:1883"',
            f'broker = "mqtt://127.0.0.1:{secure.local_port}"\nbroker_password_file = "{secret}"',
        )
    )
    settings = load_settings(config)
    assert settings.service.broker_username is None
    url = bootstrap.broker(settings)
    assert (url.username, url.password) == ("dispatcher", secure.passwords["dispatcher"])
    service = LiveService(settings, url, tmp_path / "live.sqlite3", Clock(1.0))
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
