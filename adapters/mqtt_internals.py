"""The fence around aiomqtt's and paho-mqtt's internals: every use of their private attributes.

The dispatcher's client (adapters/mqtt.py) needs four things neither library offers publicly:
acknowledging a message only once its effects are committed, taking each message as paho
decodes it, writing a packet from the call that queues it, and a window of unacknowledged
messages the broker's CONNACK may narrow. Each is done here, and only here, through the
attributes listed in ``AIOMQTT_ATTRIBUTES`` and ``PAHO_ATTRIBUTES``. ``check_mqtt_library``
verifies, before the first client is opened, that the installed versions are the ones tested
(``SUPPORTED``) and that those attributes exist; ``check_client`` does the same for the
attributes a client only has once made. Anything else refuses to start with
``UnsupportedLibrary``, naming the versions supported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt
import structlog
from aiomqtt.types import PahoSocket
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties

from adapters.libraries import require

log = structlog.get_logger("mqtt")

IN_FLIGHT = 1000  # QoS 1 messages a client may have unacknowledged (paho's default: 20)

# the versions these internals were read in and tested with: at least the first, below the second
SUPPORTED = {"aiomqtt": ("2.5", "2.6"), "paho-mqtt": ("2.1", "2.3")}

# the callbacks ``Client`` overrides, the message constructor it calls
AIOMQTT_CLASS_ATTRIBUTES = (
    "_on_connect",
    "_on_publish",
    "_on_message",
    "_on_socket_register_write",
)
# what a client made by aiomqtt holds: its paho client, the events its publish() waits on, the
# future its connection ends with, its event loop
AIOMQTT_ATTRIBUTES = ("_client", "_pending_publishes", "_disconnected", "_loop")
# paho: the packet writer, the window of unacknowledged messages (an instance attribute)
PAHO_CLASS_ATTRIBUTES = ("_packet_write", "manual_ack_set", "loop_write", "ack", "is_connected")
PAHO_ATTRIBUTES = ("_max_inflight_messages",)

_checked = False


def check_mqtt_library(aiomqtt_version: str | None = None, paho_version: str | None = None) -> None:
    """Refuse to go on unless the installed aiomqtt and paho-mqtt are versions this fence
    supports and have the attributes it uses (``UnsupportedLibrary``); once, when the first
    client is opened. The versions may be given (to check another installation's)."""
    global _checked
    if _checked and aiomqtt_version is None and paho_version is None:
        return
    require(
        "aiomqtt",
        SUPPORTED["aiomqtt"],
        [
            (aiomqtt.Client, "aiomqtt.Client", AIOMQTT_CLASS_ATTRIBUTES),
            (aiomqtt.Message, "aiomqtt.Message", ("_from_paho_message",)),
        ],
        aiomqtt_version,
    )
    require(
        "paho-mqtt",
        SUPPORTED["paho-mqtt"],
        [(mqtt.Client, "paho.mqtt.client.Client", PAHO_CLASS_ATTRIBUTES)],
        paho_version,
    )
    _checked = aiomqtt_version is None and paho_version is None


def check_client(client: aiomqtt.Client) -> None:
    """The attributes a client only has once made, as ``check_mqtt_library`` checks the rest."""
    require("aiomqtt", SUPPORTED["aiomqtt"], [(client, "aiomqtt.Client()", AIOMQTT_ATTRIBUTES)])
    require(
        "paho-mqtt",
        SUPPORTED["paho-mqtt"],
        [(client._client, "paho.mqtt.client.Client()", PAHO_ATTRIBUTES)],
    )


def paho_of(client: aiomqtt.Client) -> mqtt.Client:
    """The paho client under an aiomqtt client."""
    return client._client


def pending_publishes(client: aiomqtt.Client) -> dict[int, asyncio.Event]:
    """aiomqtt's table of QoS 1/2 publishes awaiting the broker's answer, by message id: its
    ``on_publish`` callback sets (and drops) each event."""
    return client._pending_publishes


def ending(client: aiomqtt.Client) -> asyncio.Future[None]:
    """The future aiomqtt resolves (or fails) when the connection ends."""
    return client._disconnected


def write_packet(paho: mqtt.Client) -> bool:
    """Write paho's next queued packet to the socket now; whether the socket took it."""
    return paho._packet_write() == MQTTErrorCode.MQTT_ERR_SUCCESS


def ack_manually(client: aiomqtt.Client) -> None:
    """Leave acknowledging QoS 1/2 messages to the application (aiomqtt has no option)."""
    client._client.manual_ack_set(True)


Deliver = Callable[[aiomqtt.Client, aiomqtt.Message], None]


class Client(aiomqtt.Client):
    """aiomqtt's client, registering its socket writer at once when asked on the event loop
    (adapters/mqtt.py's docstring); from another thread, as aiomqtt does.

    With ``deliver``, each message received is handed to ``deliver(client, message)`` as paho
    decodes it, instead of going through ``messages``: that iterator creates a task and waits
    on it for every message, three passes of the event loop before anyone sees the message.
    Wait for the end of the connection with ``adapters.mqtt.disconnected``.
    """

    deliver: Deliver | None = None
    # called after each acknowledgement of a message this client published
    on_acknowledged: Callable[[], None] | None = None
    # the topic of each QoS 1 message ``publish_now`` queued, until the broker answers for it
    # (set by ``adapters.mqtt._client``)
    publishing: dict[int, str]
    # the URL of the node it connects to (set by ``adapters.mqtt``)
    node: str = ""

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Properties | None = None,
    ) -> None:
        """A broker that receives fewer unacknowledged messages than ``IN_FLIGHT`` says so in
        its CONNACK (MQTT 5 Receive Maximum); sending more is a protocol error."""
        most = getattr(properties, "ReceiveMaximum", None)
        if most:
            # paho's setter refuses once connected; nothing is in flight before the CONNACK
            client._max_inflight_messages = min(IN_FLIGHT, int(most))
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        """A broker that refuses a message (MQTT 5: a PUBACK with a failure reason, such as
        an ACL that does not allow the topic) still acknowledges it, and it is never
        delivered: say so loudly, with the topic, rather than take it for sent."""
        topic = self.publishing.pop(mid, None)
        if getattr(reason_code, "is_failure", False):
            log.error("publish_refused", topic=topic, mid=mid, reason=str(reason_code))
        super()._on_publish(client, userdata, mid, reason_code, properties)
        if self.on_acknowledged is not None:
            self.on_acknowledged()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.deliver is None:
            super()._on_message(client, userdata, message)
        else:
            self.deliver(self, aiomqtt.Message._from_paho_message(message))

    def _on_socket_register_write(
        self, client: mqtt.Client, userdata: Any, sock: PahoSocket
    ) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # no loop in this thread: paho's connecting thread
            on_loop = False
        if not on_loop:
            super()._on_socket_register_write(client, userdata, sock)
            return
        self._loop.add_writer(sock.fileno(), self.write_ready)

    def write_ready(self) -> None:
        """The socket can take more: write what paho has queued (aiomqtt's own callback)."""
        try:
            self._client.loop_write()
        except Exception as exc:  # a broken connection: aiomqtt's reader notices and ends it
            if not self._disconnected.done():
                self._disconnected.set_exception(exc)
