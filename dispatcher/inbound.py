"""Inbound messages: topic routing, CloudEvents envelope and per-type data, validated strictly.

``parse_message`` turns ``(topic, payload)`` into an ``Inbound`` or raises ``InputError`` with a
reason precise enough for whoever reads the dead-letter topic to fix the sender.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Union, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

from dispatcher.errors import InputError
from dispatcher.settings import Settings

CALL_ID = r"[A-Za-z0-9._-]{1,64}"
UNIT_ID = r"[A-Za-z0-9._-]{1,64}"
INCIDENT_ID_RE = re.compile(rf"^INC-{CALL_ID}$")
DISPATCH_ID_RE = re.compile(rf"^INC-{CALL_ID}:{UNIT_ID}$")
# RFC 3339 date-time, with field ranges checked (a day of 31 in a short month still passes)
RFC3339 = re.compile(
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])[Tt]([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)"
    r"(\.\d{1,9})?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)$"
)
EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")

E164 = Annotated[str, Field(pattern=r"^\+[1-9][0-9]{1,14}$")]
CallId = Annotated[str, Field(pattern=rf"^{CALL_ID}$")]
IncidentId = Annotated[str, Field(pattern=INCIDENT_ID_RE.pattern)]
DispatchId = Annotated[str, Field(pattern=DISPATCH_ID_RE.pattern)]
Seconds = Annotated[float, Field(ge=0, le=10_000_000, allow_inf_nan=False)]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CallStarted(_Data):
    call_id: CallId
    subscriber: E164
    counterpart: E164
    direction: Literal["inbound", "outbound"]


class CallProgress(_Data):
    call_id: CallId
    subscriber: E164
    counterpart: E164
    duration_s: Seconds


class CallEnded(CallProgress):
    pass


class OperatorCallback(_Data):
    incident_id: IncidentId
    result: Literal["no_answer", "busy", "answered_safe", "answered_at_risk"]


class OperatorEscalate(_Data):
    incident_id: IncidentId


class OperatorClose(_Data):
    incident_id: IncidentId
    outcome: Literal["prevented", "loss", "false_alarm", "unreachable"]
    note: Annotated[str, Field(max_length=2000)] | None = None


AlertCode = Literal[
    "unknown_subscriber",
    "no_address",
    "door_exhausted",
    "police_exhausted",
    "arrival_overdue",
    "report_without_arrival",
    "arrival_too_soon",
    "report_overdue",
]


class OperatorAcknowledge(_Data):
    """An operator has taken on the incident's dead ends (its ``alerts``) by hand."""

    incident_id: IncidentId
    # each code at most once, so as many as there are codes
    alerts: Annotated[list[AlertCode], Field(min_length=1, max_length=len(get_args(AlertCode)))]


class UnitReply(_Data):
    dispatch_id: DispatchId


class UnitReported(_Data):
    dispatch_id: DispatchId
    outcome: Literal["dissuaded", "not_home", "loss", "false_alarm"]


class UnitStatus(_Data):
    state: Literal["online", "offline"]


TopicKind = Literal["calls", "actions", "replies", "status"]

# type -> (data model, the topic kind it must arrive on)
INBOUND_TYPES: dict[str, tuple[type[_Data], TopicKind]] = {
    "cn.antifraud.call.started": (CallStarted, "calls"),
    "cn.antifraud.call.progress": (CallProgress, "calls"),
    "cn.antifraud.call.ended": (CallEnded, "calls"),
    "cn.antifraud.operator.callback": (OperatorCallback, "actions"),
    "cn.antifraud.operator.escalate": (OperatorEscalate, "actions"),
    "cn.antifraud.operator.close": (OperatorClose, "actions"),
    "cn.antifraud.operator.acknowledge": (OperatorAcknowledge, "actions"),
    "cn.antifraud.unit.accepted": (UnitReply, "replies"),
    "cn.antifraud.unit.declined": (UnitReply, "replies"),
    "cn.antifraud.unit.arrived": (UnitReply, "replies"),
    "cn.antifraud.unit.reported": (UnitReported, "replies"),
    "cn.antifraud.unit.status": (UnitStatus, "status"),
}


def now_rfc3339() -> str:
    """The current moment as an RFC 3339 UTC timestamp, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cloudevent(
    event_id: str,
    source: str,
    type_: str,
    data: dict[str, Any],
    *,
    subject: str | None = None,
    time: str | None = None,
) -> dict[str, Any]:
    """An inbound message as the dispatcher accepts it (SPEC §2), for those who send them:
    handsets, the console, the demo and the benchmarks. ``time`` defaults to now."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": type_,
        "time": now_rfc3339() if time is None else time,
        "datacontenttype": "application/json",
        "data": data,
    }
    if subject is not None:
        event["subject"] = subject
    return event


def call_data(
    verb: str, call_id: str, subscriber: str, counterpart: str, duration_s: float | None = None
) -> dict[str, Any]:
    """The ``data`` of a ``call.{verb}`` event (an inbound call for ``started``)."""
    data: dict[str, Any] = {
        "call_id": call_id,
        "subscriber": subscriber,
        "counterpart": counterpart,
    }
    if verb == "started":
        data["direction"] = "inbound"
    else:
        data["duration_s"] = duration_s
    return data


@dataclass(frozen=True, slots=True)
class Inbound:
    """A validated inbound message. ``party`` is who speaks: region, operator id or unit id."""

    topic: str
    kind: TopicKind
    party: str
    source: str
    id: str
    type: str
    data: Any
    time: str | None = None  # the CloudEvent ``time``, as sent

    @property
    def verb(self) -> str:
        """The last part of the type: ``started``, ``callback``, ``accepted``, …"""
        return self.type.rsplit(".", 1)[1]


class TopicRouter:
    """Knows the deployment's inbound topics and who speaks on each."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = settings.service.prefix
        self.region = settings.service.region
        self.units = settings.units
        self._levels = len(self.prefix.split("/"))
        self._operator_id = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
        self._known: dict[str, tuple[TopicKind, str]] = {}
        self._channels: dict[str, tuple[TopicKind, str, str]] = {}

    def route(self, topic: str) -> tuple[TopicKind, str]:
        """(kind, who speaks) for an inbound topic; ``InputError`` for any other topic."""
        known = self._known.get(topic)
        if known is None:
            known = self._route(topic)
            if len(self._known) >= 65536:  # valid topics are few; stay bounded regardless
                self._known.clear()
            self._known[topic] = known
        return known

    def channel(self, topic: str) -> tuple[TopicKind, str, str]:
        """``route`` and the channel the topic is: its kind and the party it names, such as
        ``replies/G-YJ-CH-01``. Budgets and duplicates are counted per channel."""
        known = self._channels.get(topic)
        if known is None:
            kind, party = self.route(topic)
            known = (kind, party, f"{kind}/{party}")
            if len(self._channels) >= 65536:
                self._channels.clear()
            self._channels[topic] = known
        return known

    def _route(self, topic: str) -> tuple[TopicKind, str]:
        parts = topic.split("/")
        head, rest = "/".join(parts[: self._levels]), parts[self._levels :]
        if head != self.prefix or len(rest) != 3:
            raise InputError(f"unknown topic {_clip(topic)!r}")
        group, party, leaf = rest
        if group == "events" and leaf == "calls":
            if party != self.region:
                raise InputError(
                    f"topic region {_clip(party)!r} is not this deployment's ({self.region!r})"
                )
            return "calls", party
        if group == "operators" and leaf == "actions":
            if not self._operator_id.match(party):
                raise InputError(f"operator id {_clip(party)!r} in the topic is not a valid id")
            return "actions", party
        if group == "units" and leaf in ("replies", "status"):
            if party not in self.units:
                raise InputError(f"unknown unit {_clip(party)!r} in the topic")
            return leaf, party  # type: ignore[return-value]
        raise InputError(f"unknown topic {_clip(topic)!r}")


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _nesting_exceeds(raw: bytes, limit: int) -> bool:
    """True when the JSON text nests objects/arrays deeper than ``limit`` (strings skipped)."""
    if raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):  # { [
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x7D, 0x5D):
            depth -= 1
    return False


def decode_payload(payload: bytes, max_bytes: int, max_depth: int) -> Any:
    """Bytes off the wire to a JSON value, refusing oversized, non-UTF-8 or too deep input."""
    if len(payload) > max_bytes:
        raise InputError(f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    if not payload.strip():
        raise InputError("empty payload (not JSON)")
    if _nesting_exceeds(payload, max_depth):
        raise InputError(f"JSON nests deeper than {max_depth} levels")
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


MAX_ID = 256
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
AttributeText = Annotated[str, Field(min_length=1, max_length=MAX_ID, pattern=PRINTABLE)]
Rfc3339 = Annotated[str, Field(pattern=RFC3339.pattern)]


class _Envelope(BaseModel):
    """CloudEvents 1.0 context attributes; extension attributes are checked after validation."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    specversion: Literal["1.0"]
    id: AttributeText
    source: AttributeText
    time: Rfc3339 | None = None
    subject: Annotated[str, Field(max_length=MAX_ID)] | None = None
    datacontenttype: Literal["application/json"] | None = None
    dataschema: Annotated[str, Field(max_length=2048)] | None = None


def _event_model(type_name: str, data_model: type[_Data]) -> type[_Envelope]:
    type_literal: Any = Literal[type_name]
    return create_model(
        "Event_" + type_name.rsplit(".", 2)[-2] + "_" + type_name.rsplit(".", 1)[-1],
        __base__=_Envelope,
        type=(type_literal, ...),
        data=(data_model, ...),
    )


_EVENT_MODELS = [_event_model(name, model) for name, (model, _) in INBOUND_TYPES.items()]
_EVENT_UNION: Any = Annotated[Union[tuple(_EVENT_MODELS)], Field(discriminator="type")]  # noqa: UP007
_EVENTS: TypeAdapter[Any] = TypeAdapter(_EVENT_UNION)


def _reason(event: dict[str, Any], exc: ValidationError) -> str:
    """Turn pydantic's errors into one reason a sender can act on."""
    errors = exc.errors()
    first = errors[0]
    if first["type"] == "union_tag_not_found":
        if "type" not in event:
            return "not a CloudEvent: missing 'type'"
        return "CloudEvent 'type' must be a non-empty string"
    if first["type"] == "union_tag_invalid":
        if type(event.get("type")) is not str or not event["type"]:
            return "CloudEvent 'type' must be a non-empty string"
        return f"unknown type {_clip(event['type'])!r}"
    missing = [str(e["loc"][1]) for e in errors if e["type"] == "missing" and len(e["loc"]) == 2]
    if missing:
        return "not a CloudEvent: missing " + ", ".join(repr(k) for k in missing)
    parts = []
    for err in errors[:3]:
        loc = [str(p) for p in err["loc"][1:]]
        msg = "unknown field" if err["type"] == "extra_forbidden" else _readable(err)
        if loc[0] == "data":
            parts.append(f"invalid data: {'.'.join(loc) or 'data'}: {msg}")
        elif loc[0] == "specversion":
            parts.append(
                f"not a CloudEvent 1.0: specversion is {_clip(repr(event['specversion']))}"
            )
        else:
            parts.append(f"CloudEvent {'.'.join(loc)!r}: {msg}")
    more = len(errors) - 3
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


# what each pattern of the inbound models means, for a reason a sender can act on
_PATTERNS = {
    RFC3339.pattern: "must be an RFC 3339 date-time with an offset, like 2021-10-15T14:00:00+08:00",
    f"^{CALL_ID}$": "must be 1 to 64 letters, digits, '.', '_' or '-'",
    r"^\+[1-9][0-9]{1,14}$": "must be a phone number in E.164, like +8613800000001",
    INCIDENT_ID_RE.pattern: "must be 'INC-' and a call id, like INC-C-20211015-0001",
    DISPATCH_ID_RE.pattern: "must be an incident id, ':' and a unit id, like INC-C-1:G-YJ-CH-01",
    PRINTABLE: "must not contain control characters",
}


def _readable(err: Any) -> str:
    """pydantic's message, with a pattern named by what it means and the value received."""
    if err["type"] == "string_pattern_mismatch":
        meaning = _PATTERNS.get(err.get("ctx", {}).get("pattern", ""), "has the wrong form")
        value = err.get("input")
        return f"{meaning} (got {_clip(str(value), 40)!r})" if isinstance(value, str) else meaning
    return str(err["msg"])


def _check_extensions(extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if not EXTENSION_NAME.match(key):
            raise InputError(f"not a CloudEvent: attribute name {_clip(key)!r} is not allowed")
        if not isinstance(value, str | int | bool) or (
            isinstance(value, str) and len(value) > MAX_ID
        ):
            raise InputError(
                f"CloudEvent extension {key!r} must be a short string, integer or boolean"
            )


def parse_message(
    router: TopicRouter, topic: str, payload: bytes | Any, settings: Settings
) -> Inbound:
    """Validate one inbound message. ``payload`` is raw bytes or an already decoded JSON value."""
    kind, party = router.route(topic)
    return parse_routed(kind, party, topic, payload, settings)


def parse_routed(
    kind: TopicKind,
    party: str,
    topic: str,
    payload: bytes | Any,
    settings: Settings,
    strict: bool = False,
) -> Inbound:
    """``parse_message`` for a topic already routed to ``kind`` and ``party``. ``strict``: a
    decoded payload came from the strict parser, so it holds nothing the wire could not."""
    limits = settings.limits
    if isinstance(payload, bytes | bytearray):
        event = decode_payload(bytes(payload), limits.max_payload_bytes, limits.max_json_depth)
    else:
        event = payload
        if not strict:
            _check_decoded(event)
    if type(event) is not dict:
        raise InputError(
            f"not a CloudEvent: payload is a JSON {type(event).__name__}, not an object"
        )
    try:
        model = _EVENTS.validate_python(event)
    except ValidationError as exc:
        raise InputError(_reason(event, exc)) from None
    if model.__pydantic_extra__:
        _check_extensions(model.__pydantic_extra__)
    event_type: str = model.type
    if INBOUND_TYPES[event_type][1] != kind:
        raise InputError(f"type {event_type} is not accepted on topic {_clip(topic)!r}")
    return Inbound(topic, kind, party, model.source, model.id, event_type, model.data, model.time)


def _check_decoded(event: Any) -> None:
    """A payload handed over already decoded (a recording line) must be what the wire could
    carry: JSON the strict parser accepts. A lone surrogate or an integer beyond 64 bits,
    which Python's own parser reads, is refused here, as its bytes would be."""
    try:
        orjson.dumps(event)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InputError(f"not JSON: {exc}") from None


_EXCESS_FRACTION = re.compile(r"(\.\d{6})\d+")


def event_epoch(time: str) -> float | None:
    """Epoch seconds of a CloudEvent ``time`` that passed validation (RFC 3339), or ``None``
    for the few RFC 3339 forms Python does not read (a leap second is read as :59.999999)."""
    try:  # the usual form, read as it is
        return datetime.fromisoformat(time).timestamp()
    except ValueError:
        pass
    text = time.upper()
    if "." in text:
        text = _EXCESS_FRACTION.sub(r"\1", text)
    if text[17:19] == "60":
        text = text[:17] + "59.999999" + text[19:].lstrip(".0123456789")
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
