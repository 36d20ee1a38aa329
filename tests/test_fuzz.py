"""Property-based fuzzing of the inbound path: nothing raises, rejected input changes nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from adapters.store import Store
from dispatcher.inbound import INBOUND_TYPES
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

P = "antifraud/v1"
TOPICS = [
    f"{P}/events/hengnan/calls",
    f"{P}/operators/op-01/actions",
    f"{P}/units/G-YJ-CH-01/replies",
    f"{P}/units/G-YJ-CH-01/status",
    f"{P}/deadletter",
    f"{P}/units/../replies",
    f"{P}/units/G-YJ-CH-01\ud800/replies",
    f"{P}/operators/op-\udcff/actions",
    f"{P}/events/hengnan\U0001f600/calls",
    "\udced\udca0\udc80",  # bytes that are not UTF-8, as a recording reads them
    "#",
    "",
]
SEED = Path(__file__).parent / "data" / "chen_case.jsonl"

# What hypothesis' default text leaves out: lone surrogates (category Cs), and characters
# beyond the Basic Multilingual Plane alongside them.
NASTY_CHARS = ["\ud800", "\udbff", "\udc00", "\udfff", "\U0001f600", "\U0010ffff", "\x00", "\u2028"]
any_text = st.text(st.characters(exclude_categories=()), max_size=12) | st.lists(
    st.sampled_from([*NASTY_CHARS, "a", "C-1", "op-01"]), max_size=4
).map("".join)
# Every class of bytes that is not UTF-8: a surrogate encoded, overlong forms, beyond
# U+10FFFF, truncated sequences, lone continuation bytes, bytes never used.
INVALID_UTF8 = [
    b"\xed\xa0\x80",  # U+D800 as UTF-8 would encode it
    b"\xed\xbf\xbf",  # U+DFFF
    b"\xc0\x80",  # overlong NUL
    b"\xe0\x80\xaf",  # overlong '/'
    b"\xf0\x82\x82\xac",  # overlong euro sign
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xe2\x82",  # truncated
    b"\xf0\x9f\x98",  # truncated four-byte
    b"\x80",  # lone continuation
    b"\xbf\xbf",
    b"\xc1\xbf",
    b"\xf5\x80\x80\x80",
    b"\xfe",
    b"\xff",
]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30) | any_text
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
field_values = (
    st.sampled_from(
        [
            "C-20211015-0001",
            "INC-C-20211015-0001",
            "INC-C-20211015-0001:G-YJ-CH-01",
            "+8613800000001",
            "+85251230002",
            "no_answer",
            "accepted",
            "online",
            "inbound",
            "dissuaded",
            30,
            180.5,
            -1,
        ]
    )
    | scalars
)
events = st.fixed_dictionaries(
    {
        "specversion": st.sampled_from(["1.0", "1.0", "0.3", 1]),
        "id": any_text,
        "source": any_text,
        "type": st.sampled_from([*INBOUND_TYPES, "cn.antifraud.other", 7]),
        "data": st.dictionaries(
            st.sampled_from(
                [
                    "call_id",
                    "subscriber",
                    "counterpart",
                    "direction",
                    "duration_s",
                    "incident_id",
                    "result",
                    "outcome",
                    "dispatch_id",
                    "state",
                    "note",
                    "x",
                ]
            ),
            field_values,
            max_size=6,
        ),
    },
    optional={
        "time": st.sampled_from(["2021-10-15T14:00:00Z", "nope", 5, "2021-10-15T14:00:00\ud800Z"]),
        "subject": any_text,
        "datacontenttype": st.sampled_from(["application/json", "\udfff"]),
        "ext": scalars,
        "\ud800": scalars,
    },
)


def _raw(value: Any) -> bytes:
    """JSON text with every string written as-is, lone surrogates as their raw bytes."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def spliced(draw: st.DrawFn) -> bytes:
    """A valid-looking event's bytes with a sequence that is not UTF-8 put into it."""
    body = _raw(draw(events))
    at = draw(st.integers(0, len(body)))
    return body[:at] + draw(st.sampled_from(INVALID_UTF8)) + body[at:]


payloads = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | events.map(lambda e: json.dumps(e).encode())  # lone surrogates escaped
    | events.map(_raw)  # and raw
    | spliced()
    | events
)


def fingerprint(runtime: Runtime) -> Any:
    """Everything a message could change, cheaply: compared around each rejected message."""
    state = runtime.state
    return (
        tuple(
            (
                i.id,
                i.status,
                i.severity,
                i.rule,
                i.duration_s,
                i.callback_attempts,
                len(i.timeline),
                len(i.calls),
                tuple(i.alerts),
                i.seq,
                tuple((d.id, d.status, d.outcome) for d in i.dispatches.values()),
            )
            for i in state.incidents.values()
        ),
        tuple(state.presence.items()),
        tuple(state.busy.items()),
        tuple(state.open_by_subscriber.items()),
        len(state.contacts),
    )  # the outbox is left out: a rejection adds its dead letter there, as it should


@pytest.fixture(scope="module")
def seeded(settings: Settings, tmp_path_factory: Any) -> Iterator[Runtime]:
    """One runtime, in the middle of the seed case (offers out, one accepted), for every
    example: handling is synchronous, so the loop is needed only to open and close the store."""
    loop = asyncio.new_event_loop()
    store = Store(tmp_path_factory.mktemp("fuzz") / "s.sqlite3")
    loop.run_until_complete(store.open())
    # budgets wide open: every example must reach the parser and the dead-letter path
    wide = settings.limits.model_copy(
        update={"burst_per_party": 10**9, "burst_per_source": 10**9, "refusals_per_period": 10**9}
    )
    runtime = Runtime(dataclasses.replace(settings, limits=wide), store)
    runtime.loop = loop  # type: ignore[attr-defined]
    loop.run_until_complete(runtime.start())
    for line in SEED.read_text(encoding="utf-8").splitlines()[:14]:
        entry = json.loads(line)
        runtime.advance(entry["at"])
        runtime.handle(entry["topic"], entry["payload"], entry["at"])
    yield runtime
    loop.run_until_complete(store.close())
    loop.close()


FUZZ_EXAMPLES = int(os.environ.get("ANTIFRAUD_FUZZ_EXAMPLES", "10000"))


@hsettings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(messages=st.lists(st.tuples(st.sampled_from(TOPICS), payloads), min_size=1, max_size=4))
def test_random_input_never_raises_and_rejections_change_nothing(
    seeded: Runtime, messages: list[tuple[str, Any]]
) -> None:
    runtime = seeded
    for topic, payload in messages:
        before, rejected = fingerprint(runtime), runtime.counts["rejected"]
        runtime.handle(topic, payload, 400.0)  # must not raise, whatever it is given
        if runtime.counts["rejected"] > rejected:
            assert fingerprint(runtime) == before
    # and whatever it queued can be written: a store that refuses a write stops the service
    runtime.loop.run_until_complete(runtime.commit(flush=False))  # type: ignore[attr-defined]
    assert runtime.counts["suppressed"] == 0


async def test_a_defect_in_the_workflow_dead_letters_the_message_and_the_service_goes_on(
    settings: Settings, tmp_path: Path
) -> None:
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()

        def broken(event: object, now: float) -> list[object]:
            raise RuntimeError("boom")

        good = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])
        original, runtime.workflow.step = runtime.workflow.step, broken  # type: ignore[method-assign,assignment]
        runtime.handle(good["topic"], good["payload"], 0.0)
        runtime.workflow.step = original  # type: ignore[method-assign]
        second = json.loads(SEED.read_text(encoding="utf-8").splitlines()[1])
        runtime.handle(second["topic"], second["payload"], 30.0)
        await runtime.commit()
        rows = await store.fetchall("SELECT reason FROM rejected")
        assert rows == [("internal error: RuntimeError: boom",)]
        assert runtime.counts["handled"] == 1


async def test_old_contacts_and_dedupe_pairs_are_pruned_from_memory_and_store(
    settings: Settings, tmp_path: Path
) -> None:
    async with Store(tmp_path / "s.sqlite3") as store:
        runtime = Runtime(settings, store)
        await runtime.start()
        template = json.loads(SEED.read_text(encoding="utf-8").splitlines()[0])
        for i in range(3000):  # a flagged contact for 3,000 different subscribers
            payload = json.loads(json.dumps(template["payload"]))
            payload["id"] = f"e{i}"
            payload["data"] |= {"call_id": f"K{i}", "subscriber": f"+86139{i:08d}"}
            runtime.advance(float(i))
            runtime.handle(template["topic"], payload, float(i))
        await runtime.commit()
        assert len(runtime.state.contacts) == 3000
        later = 3 * 86400.0
        for _ in range(1100):
            runtime.advance(later)
        await runtime.commit()
        assert len(runtime.state.contacts) == 0
        assert runtime._seen == {}
        assert await store.fetchall("SELECT count(*) FROM contacts") == [(0,)]
        assert await store.fetchall("SELECT count(*) FROM inbound") == [(0,)]


REPLAY_EXAMPLES = int(os.environ.get("ANTIFRAUD_REPLAY_FUZZ_EXAMPLES", "60"))


@st.composite
def recording_lines(draw: st.DrawFn) -> bytes:
    """A recording's bytes: lines of hostile messages on every topic, each as a decoded
    payload (lone surrogates escaped), a raw payload, or with bytes that are not UTF-8 in
    the file itself."""
    out = []
    for at in range(draw(st.integers(1, 6))):
        topic = draw(st.sampled_from(TOPICS)) or "x"
        form = draw(st.sampled_from(["payload", "raw", "bytes"]))
        if form == "payload":
            line = json.dumps({"at": at, "topic": topic, "payload": draw(events)}).encode()
        elif form == "raw":
            text = _raw(draw(events)).decode("utf-8", "surrogateescape")
            line = json.dumps({"at": at, "topic": topic, "payload_raw": text}).encode()
        else:
            body = _raw({"at": at, "topic": topic, "payload": draw(events)})
            cut = draw(st.integers(0, len(body)))
            line = body[:cut] + draw(st.sampled_from(INVALID_UTF8)) + body[cut:]
        out.append(line)
    return b"\n".join(out) + b"\n"


@hsettings(
    max_examples=REPLAY_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(recording=recording_lines())
def test_replay_of_any_recording_reports_or_names_the_bad_line(
    settings: Settings, tmp_path_factory: Any, recording: bytes
) -> None:
    """A replay either writes its report or refuses the recording with a RecordingError
    naming the line; nothing else escapes, whatever the file holds."""
    from adapters.replay import replay
    from dispatcher.errors import RecordingError

    path = tmp_path_factory.mktemp("replay-fuzz") / "r.jsonl"
    path.write_bytes(recording)
    try:
        report = asyncio.run(replay(path, settings))
    except RecordingError as exc:
        assert str(path) in str(exc)
        return
    json.dumps(report, ensure_ascii=False).encode("utf-8")  # the report is writable text
