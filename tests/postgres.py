"""A PostgreSQL database of a test's own, on the machine's server (127.0.0.1:5432, trust
authentication as ``postgres``, or ``$ANTIFRAUD_TEST_PG``): made for the test, dropped after."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

SERVER = os.environ.get("ANTIFRAUD_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


@contextmanager
def database(prefix: str = "antifraud_test") -> Iterator[str]:
    """The URL of a new, empty database, dropped (with whoever is still connected) after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{SERVER}/{name}"
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
