"""A private local broker: Mosquitto on a free port (preferred) or an embedded amqtt broker.

Used by ``antifraud demo`` (when no ``--broker`` is given) and by the tests. Mosquitto runs from
the shipped ``config/mosquitto/local.conf``; amqtt speaks MQTT 3.1.1 only and keeps persistent
sessions only for authenticated clients, so it serves the demo where Mosquitto is missing.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from adapters.mqtt import BrokerURL, remember_protocol
from dispatcher.errors import BrokerError

CONFIG = Path(__file__).resolve().parent.parent / "config" / "mosquitto" / "local.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise BrokerError(f"no broker listening on 127.0.0.1:{port} after {timeout:g} s")


class Mosquitto:
    """A private Mosquitto process: ``start()``, ``stop()`` (graceful), ``kill()``, ``restart``."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        config: Path = CONFIG,
        persistence: bool = True,
        keep_user: bool = True,
    ) -> None:
        """``keep_user``: run as whoever starts it. Started by root, Mosquitto otherwise
        switches to the ``mosquitto`` user, as an installed broker does, and its files must
        then belong to that user."""
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.port = port or free_port()
        self.data_dir = data_dir
        self.conf = data_dir / "mosquitto.conf"
        text = config.read_text(encoding="utf-8")
        text = text.replace("@PORT@", str(self.port)).replace("@DATA_DIR@", str(data_dir))
        if not persistence:
            text = text.replace("persistence true", "persistence false")
        if keep_user and _is_root() and not re.search(r"(?m)^\s*user\s", text):
            # Started by root, Mosquitto switches to the `mosquitto` user, which cannot write
            # its persistence file into a data directory only root can reach: sessions and
            # retained messages would not survive a restart. A private broker keeps the
            # identity of whoever started it.
            text += "\n# started by root: stay root to write the persistence file\nuser root\n"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(text, encoding="utf-8")
        self.log = data_dir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=log, stderr=log
            )
        try:
            wait_for_port(self.port)
        except BrokerError:
            self.kill()
            raise BrokerError(
                f"mosquitto did not start: {self.log.read_text(errors='replace')}"
            ) from None

    def stop(self) -> None:
        """Stop gracefully (Mosquitto saves its persistence file)."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


@asynccontextmanager
async def local_broker(prefer: str = "auto") -> AsyncIterator[tuple[str, str]]:
    """Yield ``(url, kind)`` of a broker running until the block ends."""
    if prefer in ("auto", "mosquitto") and mosquitto_binary():
        with tempfile.TemporaryDirectory(prefix="antifraud-broker-") as tmp:
            broker = Mosquitto(Path(tmp))
            broker.start()
            try:
                yield broker.url, "mosquitto"
            finally:
                broker.stop()
        return
    if prefer == "mosquitto":
        raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
    try:
        from amqtt.broker import Broker
    except ImportError:
        raise BrokerError(
            "no local broker: install mosquitto, or the demo extra (pip install -e '.[demo]'), "
            "or give --broker URL"
        ) from None
    port = free_port()
    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    try:
        await asyncio.to_thread(wait_for_port, port)
        url = f"mqtt://127.0.0.1:{port}"
        remember_protocol(BrokerURL.parse(url), "3.1.1")  # amqtt speaks MQTT 3.1.1 only
        yield url, "amqtt"
    finally:
        await broker.shutdown()
