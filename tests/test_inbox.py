"""The inbox's reading of operators' actions that arrive on two sessions (decisions.md 120)."""

from __future__ import annotations

import aiomqtt

from adapters.live.inbox import COPIES_KEPT, Inbox

OWN = "antifraud/v1/operators/op-01/actions"  # a listed operator's topic
OTHER = "antifraud/v1/operators/op-99/actions"  # an operator the deployment does not list


def message(topic: str, payload: bytes, qos: int = 1) -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, qos, False, 0, None)


def read(inbox: Inbox) -> list[bytes]:
    """What the processor reads of what is queued (every message taken is acknowledged)."""
    return [bytes(m.payload) for _, m in inbox.take(1 << 20) if not inbox.echo(m)]  # type: ignore[arg-type]


def test_the_first_copy_of_an_action_is_read_whichever_session_brings_it() -> None:
    inbox = Inbox([OWN])
    client = None
    inbox.receive_action(client, message(OWN, b"a"))  # type: ignore[arg-type]
    inbox.receive_action(client, message(OWN, b"b"))  # type: ignore[arg-type]
    inbox.receive_action(client, message(OWN, b"b"))  # type: ignore[arg-type]
    inbox.receive_action(client, message(OWN, b"a"))  # type: ignore[arg-type]
    inbox.receive_action(client, message(OWN, b"c"))  # type: ignore[arg-type]
    assert inbox.waiting == 5  # each to be acknowledged in its turn
    assert inbox.copies == 2
    assert read(inbox) == [b"a", b"b", b"c"]
    assert read(inbox) == []


def test_a_second_copy_at_qos_0_is_dropped_and_an_unlisted_topic_is_read_every_time() -> None:
    inbox = Inbox([OWN])
    inbox.receive_action(None, message(OWN, b"x", qos=0))  # type: ignore[arg-type]
    inbox.receive_action(None, message(OWN, b"x", qos=0))  # type: ignore[arg-type]
    inbox.receive_action(None, message(OTHER, b"y"))  # type: ignore[arg-type]
    inbox.receive_action(None, message(OTHER, b"y"))  # type: ignore[arg-type]
    assert (inbox.waiting, inbox.copies) == (3, 1)
    assert read(inbox) == [b"x", b"y", b"y"]  # the runtime drops the duplicate, and says so


def test_a_copy_that_never_comes_is_forgotten_past_the_bound() -> None:
    """A flood whose copies the broker dropped on one session: its digests are bounded,
    and an operator's own are kept apart from another's."""
    mine = "antifraud/v1/operators/op-02/actions"
    inbox = Inbox([OWN, mine])
    inbox.receive_action(None, message(OWN, b"esc"))  # type: ignore[arg-type]
    for i in range(COPIES_KEPT + 10):
        inbox.receive_action(None, message(mine, b"flood %d" % i, qos=0))  # type: ignore[arg-type]
    inbox.receive_action(None, message(mine, b"flood 0", qos=0))  # type: ignore[arg-type]
    inbox.receive_action(None, message(OWN, b"esc"))  # type: ignore[arg-type]
    got = read(inbox)
    assert got.count(b"esc") == 1
    assert got.count(b"flood 0") == 2  # forgotten, read again: the runtime's dedupe drops it
    assert len(got) == COPIES_KEPT + 10 + 2
