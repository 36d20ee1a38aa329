"""The fences around the libraries whose internals the adapters use: checked at start-up, and
no library error leaves them under its own name."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import aiosqlite
import paho.mqtt.client as mqtt
import pytest

from adapters import mqtt_internals, sqlite_internals
from adapters.broker import Mosquitto
from adapters.libraries import UnsupportedLibrary
from adapters.mqtt import BrokerURL, open_client, publish
from adapters.store import Store
from dispatcher.errors import BrokerError


class TestMqttFence:
    async def test_the_installed_aiomqtt_and_paho_are_supported(self) -> None:
        mqtt_internals.check_mqtt_library()
        mqtt_internals.check_client(aiomqtt.Client("127.0.0.1", 1))

    @pytest.mark.parametrize(
        ("owner", "attribute", "named"),
        [
            (aiomqtt.Client, "_on_message", "aiomqtt.Client._on_message"),
            (aiomqtt.Message, "_from_paho_message", "aiomqtt.Message._from_paho_message"),
            (mqtt.Client, "_packet_write", "paho.mqtt.client.Client._packet_write"),
        ],
    )
    def test_a_missing_attribute_is_named_with_the_versions_supported(
        self, monkeypatch: pytest.MonkeyPatch, owner: type, attribute: str, named: str
    ) -> None:
        monkeypatch.delattr(owner, attribute)
        monkeypatch.setattr(mqtt_internals, "_checked", False)
        with pytest.raises(UnsupportedLibrary, match=rf"lacks {named}, .* supports .* >= "):
            mqtt_internals.check_mqtt_library()

    async def test_a_client_without_its_pending_publishes_is_refused(self) -> None:
        client = aiomqtt.Client("127.0.0.1", 1)
        del client._pending_publishes
        with pytest.raises(UnsupportedLibrary, match=r"aiomqtt\.Client\(\)\._pending_publishes"):
            mqtt_internals.check_client(client)

    @pytest.mark.parametrize(
        ("aiomqtt_version", "paho_version", "message"),
        [
            ("3.0.0", None, r"aiomqtt 3\.0\.0 is installed; this dispatcher supports aiomqtt >= "),
            ("2.4.0", None, r"aiomqtt 2\.4\.0 is installed"),
            (None, "1.6.1", r"paho-mqtt 1\.6\.1 is installed; this dispatcher supports paho-mqtt"),
        ],
    )
    def test_a_version_outside_the_tested_range_is_refused_by_name(
        self, aiomqtt_version: str | None, paho_version: str | None, message: str
    ) -> None:
        with pytest.raises(UnsupportedLibrary, match=message):
            mqtt_internals.check_mqtt_library(
                aiomqtt_version or mqtt_internals.SUPPORTED["aiomqtt"][0],
                paho_version or mqtt_internals.SUPPORTED["paho-mqtt"][0],
            )

    async def test_opening_a_client_checks_the_library_first(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delattr(aiomqtt.Client, "_on_socket_register_write")
        monkeypatch.setattr(mqtt_internals, "_checked", False)
        with pytest.raises(UnsupportedLibrary):
            async with open_client(BrokerURL.parse("mqtt://127.0.0.1:9")):
                pass

    async def test_an_mqtt_error_in_a_connection_becomes_a_broker_error(
        self, broker: Mosquitto
    ) -> None:
        with pytest.raises(BrokerError, match="lost") as raised:
            async with open_client(BrokerURL.parse(broker.url)):
                raise aiomqtt.MqttError("lost")
        assert isinstance(raised.value.__cause__, aiomqtt.MqttError)

    async def test_a_publish_on_a_closed_connection_is_a_broker_error(
        self, broker: Mosquitto
    ) -> None:
        async with open_client(BrokerURL.parse(broker.url)) as client:
            pass
        with pytest.raises(BrokerError):
            await asyncio.wait_for(publish(client, "t/x", b"late", qos=1), 10)


class TestSqliteFence:
    def test_the_installed_aiosqlite_is_supported(self) -> None:
        sqlite_internals.check_aiosqlite()

    def test_a_missing_attribute_is_named_with_the_versions_supported(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delattr(aiosqlite.Connection, "_execute")
        monkeypatch.setattr(sqlite_internals, "_checked", False)
        with pytest.raises(
            UnsupportedLibrary, match=r"lacks aiosqlite\.Connection\._execute, .* aiosqlite >= "
        ):
            sqlite_internals.check_aiosqlite()

    def test_a_version_outside_the_tested_range_is_refused_by_name(self) -> None:
        with pytest.raises(UnsupportedLibrary, match=r"aiosqlite 1\.0 is installed; .* < "):
            sqlite_internals.check_aiosqlite("1.0")

    async def test_a_store_is_not_opened_on_an_unsupported_aiosqlite(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.delattr(aiosqlite.Connection, "_conn")
        monkeypatch.setattr(sqlite_internals, "_checked", False)
        with pytest.raises(UnsupportedLibrary, match="_conn"):
            async with Store(tmp_path / "store.sqlite3"):
                pass
