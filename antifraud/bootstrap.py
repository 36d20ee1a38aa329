"""The composition root: where the core is given its adapters.

Every mode is built from these: ``antifraud run`` (a live service: the SQLite store, the
system clock, a broker), ``antifraud backup`` (a store), the tests (a runtime over any journal,
such as the in-memory one of tests/fakes.py). Replay, the demo, the console and the
benchmarks take the settings made here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from dispatcher.errors import ConfigError
from dispatcher.ports import Clock, Journal
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings, load_settings

if TYPE_CHECKING:  # the adapters are imported by the modes that use them, when they run
    from adapters.live import LiveService
    from adapters.live.standby import Standby
    from adapters.mqtt import BrokerURL
    from adapters.store import Store


Server: TypeAlias = "LiveService | Standby"


def settings(path: str | Path) -> Settings:
    """The deployment, validated (``ConfigError`` lists every problem)."""
    return load_settings(path)


def broker(settings: Settings, url: str | None = None) -> BrokerURL:
    """The dispatcher's broker: ``url``, else the config's, with the config's credentials
    (the password from ``ANTIFRAUD_BROKER_PASSWORD``, else ``broker_password_file``, else
    ``broker_password``). With a password and no ``broker_username``, the dispatcher logs in
    as ``[access] dispatcher_user``, the user ``antifraud broker-credentials`` made for it
    (MQTT has no password without a username; decisions.md 121)."""
    import os

    from adapters.mqtt import PASSWORD_ENV, BrokerURL

    service = settings.service
    password = service.broker_password.get_secret_value() if service.broker_password else None
    if service.broker_password_file:
        try:
            password = Path(service.broker_password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                [
                    f"{settings.path}: service.broker_password_file: cannot read "
                    f"{service.broker_password_file}: {exc.strerror}"
                ]
            ) from None
    username = service.broker_username
    if username is None and (password or os.environ.get(PASSWORD_ENV)):
        username = settings.access.dispatcher_user
    return BrokerURL.parse(url or service.broker, password, username, service.broker_ca_file)


def clock(speed: float = 1.0, start: float | None = None) -> Clock:
    """The system clock, or one running ``speed`` times faster from ``start``."""
    from adapters.live import Clock as SystemClock

    return SystemClock(speed, start)


def store(path: str | Path) -> Store:
    """The SQLite store at ``path`` (an async context manager: opened, checked, closed)."""
    from adapters.store import Store

    return Store(path)


def runtime(settings: Settings, journal: Journal, *, outbox: bool = False) -> Runtime:
    """The runtime over ``journal``; ``outbox``: its messages wait there for a publisher."""
    return Runtime(settings, journal, outbox=outbox)


def live_service(settings: Settings, broker: BrokerURL, store: str | Path) -> Server:
    """The live dispatcher: the runtime on ``broker`` and the system clock, its state in the
    SQLite store at ``store``, or, for a PostgreSQL URL, in that database, served by
    whichever of the processes on it holds the store's lease (active/standby)."""
    from adapters.journal import is_postgres

    if is_postgres(store):
        from adapters.live.standby import Standby

        return Standby(settings, broker, str(store), ttl_s=settings.service.lease_ttl_s)
    from adapters.live import LiveService

    return LiveService(settings, broker, store)
