"""The published protocol documents are generated from the models and kept in sync."""

from __future__ import annotations

import json
from pathlib import Path

from dispatcher.inbound import INBOUND_TYPES
from dispatcher.outbound import Topics
from dispatcher.protocol import CHANNELS, INBOUND_EVENTS, OUTBOUND_TYPES, render_documents

DOCS = Path(__file__).resolve().parent.parent / "docs"
SEED = Path(__file__).parent / "data" / "chen_case.jsonl"


def test_the_committed_schemas_and_asyncapi_document_are_up_to_date() -> None:
    """Regenerate with `antifraud schemas` after changing a message model."""
    for relative, text in render_documents().items():
        path = DOCS / relative
        assert path.exists(), f"{relative} is missing: run `antifraud schemas`"
        assert path.read_text(encoding="utf-8") == text, (
            f"{relative} is stale: run `antifraud schemas`"
        )


def test_every_message_type_has_a_schema_and_a_channel() -> None:
    docs = render_documents()
    asyncapi = json.loads(docs["asyncapi.json"])
    names = {m["name"] for m in asyncapi["components"]["messages"].values()}
    assert names == set(INBOUND_TYPES) | set(OUTBOUND_TYPES)
    for name in names:
        assert f"schemas/{name}.json" in docs


def test_every_line_of_the_seed_case_matches_its_inbound_schema() -> None:
    for line in SEED.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)["payload"]
        INBOUND_EVENTS[event["type"]].model_validate(event)


def test_the_protocol_document_names_every_topic_and_type() -> None:
    text = (DOCS / "protocol.md").read_text(encoding="utf-8")
    for name in [*INBOUND_TYPES, *OUTBOUND_TYPES]:
        assert name in text, name
    for topic in (
        "/events/{region}/calls",
        "/operators/{operator_id}/actions",
        "/units/{unit_id}/replies",
        "/units/{unit_id}/status",
        "/units/{unit_id}/dispatches",
        "/operators/incidents",
        "/incidents/{incident_id}",
        "/deadletter",
    ):
        assert topic in text, topic


def test_the_topics_the_code_uses_are_the_documented_channels() -> None:
    """What the dispatcher, the console, handsets and the benchmarks publish and subscribe
    to comes from ``Topics``; the documents come from ``CHANNELS``: the two must agree."""
    topics = Topics("acme/v1")
    documented = {c["address"].replace("{prefix}", "acme/v1") for c in CHANNELS}
    used = {
        topics.calls("{region}"),
        topics.actions("{operator_id}"),
        topics.replies("{unit_id}"),
        topics.unit_status("{unit_id}"),
        topics.dispatches("{unit_id}"),
        topics.operators,
        topics.incident("{incident_id}"),
        topics.dispatcher_status,
        topics.deadletter,
    }
    assert used == documented
    filters = {
        "{region}": "hn",
        "{operator_id}": "+",
        "{unit_id}": "+",
        "{incident_id}": "+",
    }

    def as_filter(address: str) -> str:
        for name, value in filters.items():
            address = address.replace(name, value)
        return address

    assert topics.inbound_filters("hn") == [
        as_filter(c["address"].replace("{prefix}", "acme/v1"))
        for c in CHANNELS
        if c["action"] == "receive"
    ]
    assert topics.all_incidents == as_filter(topics.incident("{incident_id}"))
