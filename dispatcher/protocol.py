"""The wire protocol as models: every message in and out, for documentation and checks.

Inbound models live in ``dispatcher.inbound`` (they validate what arrives). The outbound
models here describe what the dispatcher publishes; the tests validate every message the
scenarios publish against them, and ``antifraud schemas`` writes JSON Schemas and an
AsyncAPI 3 document from both, so the published documentation cannot drift from behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model

from dispatcher.inbound import INBOUND_TYPES, _Envelope, _event_model

Time = Annotated[str, Field(description="RFC 3339 timestamp, UTC")]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubscriberDetail(_Out):
    msisdn: str
    known: bool
    name: str | None = None
    display_name: str | None = Field(None, description="the honorific, e.g. 陈女士")
    address: str | None = None
    estate: str | None = None
    estate_name: str | None = None
    grid: str | None = None
    vulnerable: bool | None = None


class CallbackState(_Out):
    attempts: int = Field(description="no_answer/busy results counted so far")
    max_attempts: int
    window_ends_at: Time | None = Field(description="when the door-knock starts regardless")


class CallDetail(_Out):
    call_id: str
    counterpart: str
    category: str | None
    duration_s: float
    ended: bool
    rules: list[str]


class DispatchDetail(_Out):
    dispatch_id: str
    unit: str
    unit_name: str
    role: Literal["guard", "police", "quick_police", "grid_worker"]
    status: Literal[
        "offered", "accepted", "declined", "expired", "cancelled", "arrived", "reported", "notified"
    ]
    offered_at: Time
    expires_at: Time | None
    accepted_at: Time | None
    arrived_at: Time | None
    reported_at: Time | None
    outcome: str | None


class TimelineItem(_Out):
    at: Time
    kind: str = Field(description="opened, rule_fired, callback_result, escalated, offered, …")
    by: str = Field(description="dispatcher, operator/{id}, a unit id, or the subscriber")
    text: str
    dispatch_id: str | None
    action_id: str | None = Field(
        description="the CloudEvent id of the operator action this entry records: the "
        "console that sent it sees it applied"
    )


class IncidentDetail(_Out):
    """The full incident: for operators, police and quick-police platforms only."""

    incident_id: str
    status: Literal["open", "escalated", "closed"]
    severity: Literal["warning", "critical"]
    rule: str = Field(description="the rule that last raised the severity")
    rule_label: str = Field(description="that rule as operators and police read it (Chinese)")
    subscriber: SubscriberDetail
    counterpart: str
    category: str | None
    category_label: str | None
    duration_s: float
    opened_at: Time
    critical_at: Time | None
    escalated_at: Time | None
    closed_at: Time | None
    outcome: (
        Literal["prevented", "loss", "false_alarm", "unreachable", "resolved_by_callback"] | None
    )
    note: str | None
    callback: CallbackState
    calls: list[CallDetail]
    dispatches: list[DispatchDetail]
    alerts: list[str] = Field(
        description="dead ends the operators must handle: "
        "unknown_subscriber, no_address, door_exhausted, police_exhausted, arrival_overdue, "
        "report_without_arrival, arrival_too_soon, report_overdue"
    )
    acknowledged: list[str] = Field(
        description="the alerts an operator has acknowledged (operator.acknowledge): a "
        "console sounds its alarm for the others only"
    )
    timeline: list[TimelineItem] = Field(
        description="incident.opened and incident.closed: the whole timeline; "
        "incident.updated: only the entries this change added"
    )
    timeline_from: int = Field(
        ge=0,
        description="the position of the first entry of timeline in the whole timeline "
        "(0 when it is whole): a consumer appends an update's entries at this position",
    )


_REPLIES = list[Literal["accepted", "declined", "arrived", "reported"]]


class RadioOffer(_Out):
    """A door-knock offer for a guard's radio or a grid worker: never a phone number or name."""

    dispatch_id: str
    incident_id: str
    role: Literal["guard", "grid_worker"]
    expires_at: Time
    reply_topic: str
    replies: _REPLIES
    address: str
    honorific: str
    text: str = Field(description="short text for a radio screen or text-to-speech")


class AppOffer(_Out):
    """An offer for a police patrol or quick-police platform: the complete incident."""

    dispatch_id: str
    incident_id: str
    role: Literal["police", "quick_police"]
    expires_at: Time
    reply_topic: str
    replies: _REPLIES
    text: str
    incident: IncidentDetail


class Cancelled(_Out):
    dispatch_id: str
    incident_id: str
    reason: Literal["taken", "expired", "closed"]
    text: str


class Notice(_Out):
    """Information for a grid worker where guards are handling it; no reply is expected."""

    dispatch_id: str
    incident_id: str
    role: Literal["grid_worker"]
    address: str
    honorific: str
    reply_expected: Literal[False]
    closed: bool = Field(description="true when it announces that the incident has closed")
    text: str


_REPLY = Literal["accepted", "declined", "arrived", "reported"]


class ReceiptApplied(_Out):
    """The reply was taken: an accepted offer is now the unit's job."""

    reply_id: str = Field(description="the CloudEvent id of the reply answered")
    dispatch_id: str = Field(description="the dispatch the reply named")
    reply: _REPLY
    status: Literal["applied"]
    text: str = Field(description="short Chinese text for a radio screen or text-to-speech")


class ReceiptRefused(_Out):
    """The reply changed nothing; ``code`` says why, ``reason`` says it to the unit."""

    reply_id: str = Field(description="the CloudEvent id of the reply answered")
    dispatch_id: str = Field(description="the dispatch the reply named")
    reply: _REPLY
    status: Literal["refused"]
    text: str = Field(description="操作被拒绝：followed by the reason")
    code: Literal[
        "incident_closed",
        "taken",
        "expired",
        "not_your_dispatch",
        "unknown_dispatch",
        "out_of_order",
        "no_reply_expected",
        "invalid",
        "internal_error",
    ] = Field(description="stable machine code of the refusal")
    reason: str = Field(description="short Chinese reason for a radio screen or text-to-speech")


class InputRejected(_Out):
    topic: str
    reason: str
    source: str | None
    id: str | None
    payload: str = Field(description="the rejected payload as text, cut at 1024 characters")


class DispatcherStatus(_Out):
    state: Literal["online", "offline"] = Field(
        description="online while the dispatcher is connected; offline when it stops, or "
        "as its will when its connection is lost"
    )
    instance: str | None = Field(
        default=None,
        description="with a PostgreSQL store (active/standby): the instance serving, as "
        "host:pid:random, the holder of the store's lease",
    )
    since: str | None = Field(
        default=None, description="with a PostgreSQL store: when this instance took the lease"
    )
    epoch: int | None = Field(
        default=None,
        description="with a PostgreSQL store: the lease's epoch, one more at every takeover",
    )


OUTBOUND_TYPES: dict[str, Any] = {
    "cn.antifraud.incident.opened": IncidentDetail,
    "cn.antifraud.incident.updated": IncidentDetail,
    "cn.antifraud.incident.closed": IncidentDetail,
    "cn.antifraud.dispatch.offered": Annotated[
        Union[RadioOffer, AppOffer],  # noqa: UP007
        Field(discriminator="role"),
    ],
    "cn.antifraud.dispatch.cancelled": Cancelled,
    "cn.antifraud.dispatch.notice": Notice,
    "cn.antifraud.reply.receipt": Annotated[
        Union[ReceiptApplied, ReceiptRefused],  # noqa: UP007
        Field(discriminator="status"),
    ],
    "cn.antifraud.input.rejected": InputRejected,
    "cn.antifraud.dispatcher.status": DispatcherStatus,
}


class _OutEnvelope(_Envelope):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    subject: str
    time: str
    datacontenttype: Literal["application/json"]


def _outbound_model(type_name: str, data: Any) -> type[BaseModel]:
    type_literal: Any = Literal[type_name]
    return create_model(
        "Event_" + type_name.replace("cn.antifraud.", "").replace(".", "_"),
        __base__=_OutEnvelope,
        type=(type_literal, ...),
        data=(data, ...),
    )


OUTBOUND_EVENTS = {name: _outbound_model(name, data) for name, data in OUTBOUND_TYPES.items()}
INBOUND_EVENTS = {name: _event_model(name, model) for name, (model, _) in INBOUND_TYPES.items()}


def validate_outbound(event: dict[str, Any]) -> BaseModel:
    """Check a published CloudEvent against its model (raises ``ValidationError``)."""
    return OUTBOUND_EVENTS[event["type"]].model_validate(event, strict=False)


# ---- documents -----------------------------------------------------------------------------

CHANNELS: list[dict[str, Any]] = [
    {
        "id": "calls",
        "address": "{prefix}/events/{region}/calls",
        "action": "receive",
        "qos": 1,
        "retain": False,
        "who": "call-warning source",
        "messages": [
            "cn.antifraud.call.started",
            "cn.antifraud.call.progress",
            "cn.antifraud.call.ended",
        ],
    },
    {
        "id": "operatorActions",
        "address": "{prefix}/operators/{operator_id}/actions",
        "action": "receive",
        "qos": 1,
        "retain": False,
        "who": "operator console",
        "messages": [
            "cn.antifraud.operator.callback",
            "cn.antifraud.operator.escalate",
            "cn.antifraud.operator.close",
            "cn.antifraud.operator.acknowledge",
        ],
    },
    {
        "id": "unitReplies",
        "address": "{prefix}/units/{unit_id}/replies",
        "action": "receive",
        "qos": 1,
        "retain": False,
        "who": "handset (the topic's unit is who speaks)",
        "messages": [
            "cn.antifraud.unit.accepted",
            "cn.antifraud.unit.declined",
            "cn.antifraud.unit.arrived",
            "cn.antifraud.unit.reported",
        ],
    },
    {
        "id": "unitStatus",
        "address": "{prefix}/units/{unit_id}/status",
        "action": "receive",
        "qos": 1,
        "retain": True,
        "who": "handset (online; offline as its will)",
        "messages": ["cn.antifraud.unit.status"],
    },
    {
        "id": "unitDispatches",
        "address": "{prefix}/units/{unit_id}/dispatches",
        "action": "send",
        "qos": 1,
        "retain": False,
        "who": "one unit's handset",
        "messages": [
            "cn.antifraud.dispatch.offered",
            "cn.antifraud.dispatch.cancelled",
            "cn.antifraud.dispatch.notice",
            "cn.antifraud.reply.receipt",
        ],
    },
    {
        "id": "operatorIncidents",
        "address": "{prefix}/operators/incidents",
        "action": "send",
        "qos": 1,
        "retain": False,
        "who": "operator consoles",
        "messages": [
            "cn.antifraud.incident.opened",
            "cn.antifraud.incident.updated",
            "cn.antifraud.incident.closed",
        ],
    },
    {
        "id": "incidentState",
        "address": "{prefix}/incidents/{incident_id}",
        "action": "send",
        "qos": 1,
        "retain": True,
        "who": "operator consoles (cleared when closed + retention)",
        "messages": [
            "cn.antifraud.incident.opened",
            "cn.antifraud.incident.updated",
            "cn.antifraud.incident.closed",
        ],
    },
    {
        "id": "dispatcherStatus",
        "address": "{prefix}/dispatcher/status",
        "action": "send",
        "qos": 1,
        "retain": True,
        "who": "operator consoles (online; offline when it stops, or as its will)",
        "messages": ["cn.antifraud.dispatcher.status"],
    },
    {
        "id": "deadletter",
        "address": "{prefix}/deadletter",
        "action": "send",
        "qos": 1,
        "retain": False,
        "who": "whoever watches rejected input",
        "messages": ["cn.antifraud.input.rejected"],
    },
]


def schema_documents() -> dict[str, dict[str, Any]]:
    """``{file name: JSON Schema}`` for every message type, in and out."""
    docs: dict[str, dict[str, Any]] = {}
    for name, model in {**INBOUND_EVENTS, **OUTBOUND_EVENTS}.items():
        schema = TypeAdapter(model).json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"{name}.json"
        schema["title"] = name
        docs[f"{name}.json"] = schema
    return docs


def asyncapi_document(prefix: str = "antifraud/v1") -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for channel in CHANNELS:
        address = channel["address"].replace("{prefix}", prefix)
        params = {
            p: {"description": p.replace("_", " ")}
            for p in ("region", "operator_id", "unit_id", "incident_id")
            if "{" + p + "}" in address
        }
        refs = {}
        for name in channel["messages"]:
            key = name.replace("cn.antifraud.", "").replace(".", "_")
            messages[key] = {
                "name": name,
                "title": name,
                "contentType": "application/json",
                "payload": {"$ref": f"schemas/{name}.json"},
            }
            refs[key] = {"$ref": f"#/components/messages/{key}"}
        channels[channel["id"]] = {
            "address": address,
            "messages": refs,
            "description": f"{channel['who']}; QoS {channel['qos']}"
            + ("; retained" if channel["retain"] else ""),
            **({"parameters": params} if params else {}),
            "bindings": {"mqtt": {"bindingVersion": "0.2.0"}},
        }
        operations[f"{channel['action']}_{channel['id']}"] = {
            "action": channel["action"],
            "channel": {"$ref": f"#/channels/{channel['id']}"},
            "messages": [{"$ref": f"#/channels/{channel['id']}/messages/{key}"} for key in refs],
            "bindings": {
                "mqtt": {
                    "qos": channel["qos"],
                    "retain": channel["retain"],
                    "bindingVersion": "0.2.0",
                }
            },
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Anti-fraud alert dispatcher",
            "version": "1.0.0",
            "description": "MQTT topics and CloudEvents 1.0 (structured JSON) messages of "
            "the dispatcher; see docs/protocol.md.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render_documents() -> dict[str, str]:
    """Every generated file under ``docs/``: ``{relative path: text}``."""
    files = {
        f"schemas/{name}": json.dumps(doc, ensure_ascii=False, indent=2) + "\n"
        for name, doc in schema_documents().items()
    }
    files["asyncapi.json"] = json.dumps(asyncapi_document(), ensure_ascii=False, indent=2) + "\n"
    return files


def write_documents(docs: Path) -> list[Path]:
    written = []
    for relative, text in render_documents().items():
        path = docs / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
