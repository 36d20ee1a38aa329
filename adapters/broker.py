"""A private local broker: Mosquitto on a free port (preferred) or an embedded amqtt broker.

Used by ``antifraud demo`` (when no ``--broker`` is given) and by the tests. Mosquitto runs from
the shipped ``config/mosquitto/local.conf``; amqtt speaks MQTT 3.1.1 only and keeps persistent
sessions only for authenticated clients, so it serves the demo where Mosquitto is missing.

``SecureBroker`` is a private Mosquitto running the shipped production config instead
(``config/mosquitto/production.conf``): the deployment's generated credentials and ACL
(``antifraud broker-credentials``) and a private CA's certificate for its TLS listener. The
security tests and ``antifraud bench flood`` run on it.
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
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from adapters.access import read_credentials, write_broker_files
from adapters.mqtt import BrokerURL, remember_protocol
from dispatcher.errors import BrokerError
from dispatcher.settings import Settings

CONFIG = Path(__file__).resolve().parent.parent / "config" / "mosquitto" / "local.conf"
PRODUCTION = CONFIG.parent / "production.conf"


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


# ---- the production config -------------------------------------------------------------------


def make_certificates(tls: Path) -> None:
    """A private CA and a server certificate for 127.0.0.1, as docs/RELIABILITY.md shows."""
    if shutil.which("openssl") is None:
        raise BrokerError("openssl is needed for the broker's TLS certificates")
    tls.mkdir(parents=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tls, check=True, capture_output=True)

    run(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-subj", "/CN=antifraud test CA", "-keyout", "ca.key", "-out", "ca.crt"),
    )
    run(
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1"),
        *("-keyout", "server.key", "-out", "server.csr"),
    )
    (tls / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        *("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt"),
    )


def give_to_broker_user(root: Path) -> None:
    """Started as root, Mosquitto drops to the ``mosquitto`` user: like a real installation,
    its files must belong to that user (the private ones stay mode 0600)."""
    import pwd

    if not _is_root():
        return
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in [root, *root.rglob("*")]:
        shutil.chown(path, "mosquitto", "mosquitto")


class SecureBroker:
    """A private Mosquitto in ``root`` running the shipped production config, with the
    deployment's generated credentials (``passwords``, by username) and ACL, and a private
    CA's certificate (``ca``) for its TLS listener; ``local_port`` is its loopback listener,
    ``tls_port`` its TLS one. ``broker`` is the process: ``broker.start()``, ``kill()``."""

    def __init__(self, settings: Settings, root: Path) -> None:
        conf = root / "conf"
        write_broker_files(settings, conf)
        make_certificates(conf / "tls")
        self.passwords = read_credentials(conf / "credentials.csv")
        self.ca = str(conf / "tls" / "ca.crt")
        self.tls_port, self.local_port = free_port(), free_port()
        text = PRODUCTION.read_text(encoding="utf-8")
        for key, value in {
            "@CONF_DIR@": str(conf),
            "@DATA_DIR@": str(root / "data"),
            "@TLS_PORT@": str(self.tls_port),
            "@LOCAL_PORT@": str(self.local_port),
        }.items():
            text = text.replace(key, value)
        (root / "data").mkdir()
        template = root / "production.conf"
        template.write_text(text.replace("@PORT@", "unused"), encoding="utf-8")
        self.broker = Mosquitto(
            root / "broker", port=self.local_port, config=template, keep_user=False
        )
        give_to_broker_user(root)

    def url(self, user: str | None, tls: bool = True, password: str | None = None) -> BrokerURL:
        port = self.tls_port if tls else self.local_port
        secret = password if password is not None else (self.passwords.get(user or "") or None)
        return BrokerURL(
            host="127.0.0.1",
            port=port,
            tls=tls,
            username=user,
            password=secret,
            ca_file=self.ca if tls else None,
        )


@contextmanager
def secure_broker(settings: Settings) -> Iterator[SecureBroker]:
    """A ``SecureBroker`` running until the block ends, then killed and its files removed."""
    # a folder of its own under /tmp: a caller's temporary folder may be private to root,
    # and Mosquitto runs as its own user once started
    root = Path(tempfile.mkdtemp(prefix="antifraud-secure-"))
    try:
        root.chmod(0o755)
        broker = SecureBroker(settings, root)
        broker.broker.start()
        try:
            yield broker
        finally:
            broker.broker.kill()
    finally:
        shutil.rmtree(root, ignore_errors=True)
