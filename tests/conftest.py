from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scenario import Player

from adapters.broker import Mosquitto
from dispatcher import logs
from dispatcher.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "hengnan.toml"
DATA = Path(__file__).resolve().parent / "data"

logs.configure("warning")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free port (the shipped config/mosquitto/local.conf)."""
    mosquitto = Mosquitto(tmp_path / "broker")
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.kill()


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings(CONFIG)


@pytest.fixture
def play(settings: Settings, tmp_path: Path) -> Player:
    return Player(settings, tmp_path)


@pytest.fixture
def deployment(tmp_path: Path) -> Callable[..., Path]:
    """A copy of the example deployment to edit: ``deployment(toml=..., units=...)``.

    Each keyword replaces a file's text (``toml`` for hengnan.toml, else a registry CSV by
    name); ``edit_toml`` is a function applied to the TOML text.
    """

    def make(edit_toml: Callable[[str], str] | None = None, **files: str) -> Path:
        target = tmp_path / "deployment"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(CONFIG.parent, target)
        for path in target.rglob("*"):
            path.chmod(0o644 if path.is_file() else 0o755)
        toml = target / "hengnan.toml"
        if "toml" in files:
            toml.write_text(files.pop("toml"), encoding="utf-8")
        if edit_toml is not None:
            toml.write_text(edit_toml(toml.read_text(encoding="utf-8")), encoding="utf-8")
        for name, text in files.items():
            (target / "hengnan" / f"{name}.csv").write_text(text, encoding="utf-8")
        return toml

    return make


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of the test's own (tests/postgres.py)."""
    from postgres import database

    with database() as url:
        yield url
