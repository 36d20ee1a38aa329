"""A clustered broker: a list of nodes, the first that answers taken, the next after a loss;
and three NATS nodes with JetStream and their MQTT listeners.

On NATS, the dispatcher is given the three nodes' URLs and connects to the first; the handsets and
the calls' source are given the same list in another order, so they sit on the other nodes.
The seed case is published (its pace compressed, the timers at their real lengths, each
reply sent once its unit has the offer it answers, as in tests/test_crash.py) and the node
the dispatcher is on is killed with SIGKILL once the first offer has reached its handset.
The dispatcher moves to the next node, where its persistent sessions are waiting (NATS keeps
them, and the retained messages, in JetStream streams replicated on all three nodes). Then:
the report says what the uninterrupted replay says and every offer reached its unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from test_crash import _cancel, statuses

from adapters.broker import Mosquitto, free_port, mosquitto_binary
from adapters.live import Clock, LiveService
from adapters.mqtt import BrokerURL, node_of, open_client
from adapters.recording import read_lines
from adapters.replay import replay
from adapters.report import live_report
from adapters.store import Store
from dispatcher.errors import BrokerError
from dispatcher.settings import Settings

NATS = shutil.which("nats-server")

pytestmark = pytest.mark.broker

SEED = Path(__file__).parent / "data" / "chen_case.jsonl"
COMPRESS = 100.0  # the 25-minute seed case in 15 s; no timer of it is shorter than a reply
INCIDENT = "INC-C-20211015-0001"

NODE = """\
server_name: {name}
listen: 127.0.0.1:{client}
jetstream {{ store_dir: "{store}" }}
cluster {{ name: antifraud, listen: 127.0.0.1:{route}, routes: [{routes}] }}
mqtt {{ listen: 127.0.0.1:{mqtt}, stream_replicas: 3, consumer_replicas: 3 }}
"""


class NatsCluster:
    """Three private nats-server processes routed into one cluster, each with JetStream (a
    store folder of its own) and an MQTT listener on a free port."""

    def __init__(self, folder: Path, size: int = 3) -> None:
        self.folder = folder
        self.names = [f"n{i + 1}" for i in range(size)]
        self.ports = {name: (free_port(), free_port(), free_port()) for name in self.names}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def urls(self) -> list[str]:
        return [f"mqtt://127.0.0.1:{self.ports[name][2]}" for name in self.names]

    def start(self) -> None:
        assert NATS is not None
        routes = ", ".join(f"nats-route://127.0.0.1:{p[1]}" for p in self.ports.values())
        for name, (client, route, mqtt) in self.ports.items():
            node = self.folder / name
            node.mkdir(parents=True)
            conf = node / "nats.conf"
            text = NODE.format(
                name=name, client=client, route=route, mqtt=mqtt, routes=routes, store=node
            )
            conf.write_text(text, encoding="utf-8")
            with (node / "nats.log").open("ab") as log:
                self.processes[name] = subprocess.Popen(
                    [NATS, "-c", str(conf)], stdout=log, stderr=log
                )

    async def ready(self, within: float = 30.0) -> None:
        """Wait until every node takes an MQTT session (JetStream has its meta leader)."""
        async with asyncio.timeout(within):
            for url in self.urls:
                while True:
                    try:
                        async with open_client(BrokerURL.parse(url), "probe", persistent=False):
                            break
                    except BrokerError:
                        await asyncio.sleep(0.2)

    def kill(self, url: str) -> None:
        process = self.processes[self.names[self.urls.index(url)]]
        process.kill()
        process.wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@contextlib.contextmanager
def nats_cluster(folder: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def compressed(tmp: Path) -> Path:
    lines = [json.loads(line) for line in SEED.read_text(encoding="utf-8").splitlines()]
    path = tmp / "seed.jsonl"
    path.write_text(
        "".join(
            json.dumps(line | {"at": round(line["at"] / COMPRESS, 3)}, ensure_ascii=False) + "\n"
            for line in lines
        ),
        encoding="utf-8",
    )
    return path


async def publish_causally(
    path: Path, url: BrokerURL, received: dict[str, list[dict[str, Any]]], arrived: asyncio.Event
) -> None:
    """tests/test_crash.py's ``publish_causally``, as a call-warning source and the units'
    radios do it on a cluster: a message the broker did not acknowledge in time (JetStream
    electing new leaders after a node was lost) is sent again, over a new connection if need
    be, until it is acknowledged. The dispatcher handles a message sent twice once."""
    loop = asyncio.get_running_loop()
    client: Any = None
    async with contextlib.AsyncExitStack() as stack:
        start = loop.time()
        for line in read_lines(path):
            delay = start + line.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            parts = line.topic.split("/")
            if parts[-1] == "replies" and isinstance(line.payload, dict):
                unit, dispatch = parts[-2], line.payload["data"]["dispatch_id"]

                def offered(unit: str = unit, dispatch: str = dispatch) -> bool:
                    return any(
                        m["type"] == "cn.antifraud.dispatch.offered"
                        and m["data"].get("dispatch_id") == dispatch
                        for m in received.get(unit, [])
                    )

                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(60):
                        while not offered():
                            arrived.clear()
                            await arrived.wait()
            payload = json.dumps(line.payload, ensure_ascii=False).encode()
            async with asyncio.timeout(40):
                while True:
                    try:
                        if client is None:
                            client = await stack.enter_async_context(open_client(url))
                        await client.publish(line.topic, payload, qos=1)
                        break
                    except (BrokerError, aiomqtt.MqttError):
                        await stack.aclose()  # a new connection, on the next node if need be
                        client = None
                        await asyncio.sleep(0.2)


def rotated(urls: list[str], by: int) -> BrokerURL:
    return BrokerURL.parse(",".join(urls[by:] + urls[:by]))


class TestBrokerList:
    def test_names_its_nodes_in_order_with_one_user_and_one_scheme(self) -> None:
        broker = BrokerURL.parse("mqtt://dispatcher@a:1883, mqtt://b ,mqtt://c:2883")
        assert [str(node) for node in broker.nodes] == [
            "mqtt://dispatcher@a:1883",
            "mqtt://dispatcher@b:1883",
            "mqtt://dispatcher@c:2883",
        ]
        assert str(broker) == ",".join(str(node) for node in broker.nodes)

    @pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
    async def test_a_client_takes_the_first_node_that_answers(self, broker: Mosquitto) -> None:
        nodes = BrokerURL.parse(f"mqtt://127.0.0.1:{free_port()},{broker.url}")
        async with open_client(nodes) as client:
            assert node_of(client) == broker.url

    @pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
    async def test_a_lost_connection_is_followed_by_one_to_the_next_node(
        self, tmp_path: Path
    ) -> None:
        first, second = Mosquitto(tmp_path / "first"), Mosquitto(tmp_path / "second")
        first.start()
        second.start()
        try:
            nodes = BrokerURL.parse(f"{first.url},{second.url}")
            with pytest.raises(BrokerError):
                async with open_client(nodes) as client:
                    assert node_of(client) == first.url
                    raise aiomqtt.MqttError("lost")
            async with open_client(nodes) as client:
                assert node_of(client) == second.url
            async with open_client(nodes) as client:  # and stays there while it answers
                assert node_of(client) == second.url
        finally:
            first.kill()
            second.kill()

    async def test_none_answering_is_a_broker_error_naming_each(self) -> None:
        ports = [free_port(), free_port()]
        nodes = BrokerURL.parse(",".join(f"mqtt://127.0.0.1:{port}" for port in ports))
        with pytest.raises(BrokerError, match="no node of the broker answers") as raised:
            async with open_client(nodes):
                pass
        for port in ports:
            assert f"127.0.0.1:{port}" in str(raised.value)


@pytest.mark.skipif(NATS is None, reason="nats-server is not installed")
async def test_killing_the_node_the_dispatcher_is_on_mid_case_loses_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    path = compressed(tmp_path)
    expected = await replay(path, settings)
    units = sorted({d["unit"] for i in expected["incidents"] for d in i["dispatches"]})
    received: dict[str, list[dict[str, Any]]] = {u: [] for u in units}
    arrived = asyncio.Event()  # a unit received something
    store = tmp_path / "live.sqlite3"

    with nats_cluster(tmp_path / "nats") as cluster:
        await cluster.ready()
        urls = cluster.urls
        service = LiveService(
            settings, BrokerURL.parse(",".join(urls)), store, Clock(), client_id="dispatcher"
        )
        stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            for unit in units:  # each handset keeps a persistent session, on the third node
                handsets = rotated(urls, 2)
                client = await stack.enter_async_context(
                    open_client(handsets, unit, persistent=True)
                )
                await client.subscribe(f"antifraud/v1/units/{unit}/dispatches", qos=1)

                async def collect(client: Any = client, unit: str = unit) -> None:
                    async for message in client.messages:
                        received[unit].append(json.loads(bytes(message.payload)))
                        arrived.set()

                stack.push_async_callback(_cancel, asyncio.create_task(collect()))

            running = asyncio.create_task(service.run(stop))
            await asyncio.wait_for(service.ready.wait(), 20)
            assert service.link.client is not None
            assert node_of(service.link.client) == urls[0]  # the first that answers
            publishing = asyncio.create_task(
                publish_causally(path, rotated(urls, 1), received, arrived)
            )
            async with asyncio.timeout(20):
                while not any(received.values()):
                    arrived.clear()
                    await arrived.wait()
            cluster.kill(urls[0])
            await asyncio.wait_for(publishing, 40)
            async with Store(store) as opened:
                for _ in range(150):  # 30 s at most
                    runtime = service.runtime
                    if (
                        runtime is not None
                        and runtime.state.incidents[INCIDENT].status == "closed"
                        and await opened.unsent(10) == []
                    ):
                        break
                    await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # the last messages reach the handsets
            assert service.link.client is not None
            on = node_of(service.link.client)
            stop.set()
            await asyncio.wait_for(running, 10)

    assert on != urls[0]
    assert service.stats["connects"] >= 2
    live = await live_report(store, settings)
    assert statuses(live) == statuses(expected)
    assert live["rejected"] == []  # a message handled twice would be refused as out of order
    for incident in live["incidents"]:
        for d in incident["dispatches"]:
            kind = "notice" if d["status"] == "notified" else "offered"
            got = [
                m
                for m in received[d["unit"]]
                if m["type"] == f"cn.antifraud.dispatch.{kind}"
                and m["data"]["dispatch_id"] == f"{incident['id']}:{d['unit']}"
            ]
            assert got, f"the {kind} for {d['unit']} in {incident['id']} never arrived"
