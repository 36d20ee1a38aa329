"""The main session's connection, as the connection stage hands it to the publisher."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiomqtt


@dataclass
class Link:
    # the connection messages are published over: set once it is announced online and the
    # receiving sessions are up (or waited for), None while there is none
    client: aiomqtt.Client | None = None
    connected: asyncio.Event = field(default_factory=asyncio.Event)  # ``client`` is set
    # the publisher has something to do: messages committed or acknowledged, a connection
    # gained or lost
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # commits may write their messages to the socket themselves (the publisher says when)
    direct: bool = False

    def up(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.connected.set()
        self.wake.set()

    def down(self) -> None:
        """What is in flight over the connection is lost: nothing is written over the next
        one before the publisher has seen that and sends again from the store."""
        self.client = None
        self.connected.clear()
        self.direct = False
        self.wake.set()
