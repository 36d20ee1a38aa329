"""Property-based fuzzing of the inbound path: nothing raises, rejected input changes nothing."""

from __future__ import annotations

import asyncio
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
    "#",
    "",
]
SEED = Path(__file__).parent / "data" / "chen_case.jsonl"

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
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
        "id": st.text(min_size=0, max_size=12),
        "source": st.text(min_size=0, max_size=12),
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
        "time": st.sampled_from(["2021-10-15T14:00:00Z", "nope", 5]),
        "subject": st.text(max_size=5),
        "ext": scalars,
    },
)
payloads = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | events.map(lambda e: json.dumps(e).encode())
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
    runtime = Runtime(settings, store)
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
