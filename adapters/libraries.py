"""The start-up check of the libraries whose internals an adapter relies on.

Two adapters reach past a library's public surface: the MQTT client (adapters/mqtt_internals.py,
into aiomqtt and paho-mqtt) and the store (adapters/sqlite_internals.py, into aiosqlite). Each
fence names the versions it was tested with and the attributes it uses, and checks both before
the first client or connection is opened, so that an upgrade that moved an attribute stops the
service at once with the versions it supports, rather than with an ``AttributeError`` in the
middle of a publish.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata

from dispatcher.errors import DispatcherError


class UnsupportedLibrary(DispatcherError):
    """An installed library is outside the versions an adapter supports, or lacks an
    attribute the adapter relies on: install a supported version."""


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _release(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for part in version.split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def require(
    distribution: str,
    supported: tuple[str, str],
    owners: Iterable[tuple[object, str, Iterable[str]]],
    version: str | None = None,
) -> None:
    """Refuse ``distribution`` unless its version is in ``supported`` (at least the first,
    below the second) and each owner (an object, its name) has each attribute named."""
    low, high = supported
    wanted = f"{distribution} >= {low}, < {high}"
    found = version_of(distribution) if version is None else version
    release = _release(found)
    if not release or not _release(low) <= release < _release(high):
        raise UnsupportedLibrary(
            f"{distribution} {found} is installed; this dispatcher supports {wanted}"
        )
    missing = [
        f"{name}.{attribute}"
        for owner, name, attributes in owners
        for attribute in attributes
        if not hasattr(owner, attribute)
    ]
    if missing:
        raise UnsupportedLibrary(
            f"{distribution} {found} lacks {', '.join(missing)}, which this dispatcher relies "
            f"on; it supports {wanted}"
        )
