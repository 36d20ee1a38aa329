"""Deployment configuration: one TOML file plus its CSV registries, parsed strictly.

Every problem found is reported as ``file: key: what is wrong`` (``file:line: column: …`` for a
CSV row), all of them at once, so a deployment can be fixed in one pass.
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from dispatcher.errors import ConfigError
from rules.conditions import IDENT, Conditions, Ident, RuleSettings
from rules.flagged import FlaggedPattern

E164 = re.compile(r"^\+[1-9][0-9]{1,14}$")
PREFIX = re.compile(r"^\+[0-9]{1,15}$")

UnitKind = Literal["guard", "police", "quick_police", "grid_worker"]


def check_broker_urls(text: str) -> list[str]:
    """The URLs of a broker value (``mqtt://a:1883,mqtt://b:1883``); ``ValueError`` saying
    which one is wrong. One scheme for all: a cluster is not half encrypted."""
    urls = [url.strip() for url in text.split(",")]
    schemes = set()
    for url in urls:
        if not url:
            raise ValueError(f"broker URLs {text!r}: an empty entry between the commas")
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://…")
        try:
            parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
        except ValueError:
            raise ValueError(f"broker URL {url!r}: the port is not a number") from None
        schemes.add(parts.scheme)
    if len(schemes) > 1:
        raise ValueError(f"broker URLs {text!r}: mix mqtt:// and mqtts://; use one for all")
    return urls


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServiceSettings(_Strict):
    region: Ident = "default"
    prefix: str = "antifraud/v1"
    source: str = "antifraud/dispatcher"
    default_station: Ident
    store: str = "var/dispatcher.sqlite3"
    # full: every commit is on disk before its messages are acknowledged (survives a power
    # cut); normal: on the OS (survives the process being killed), ~0.5 ms faster per commit
    store_sync: Literal["full", "normal"] = "full"
    # a PostgreSQL store's lease (active/standby): not renewed for this long, a standby may
    # take it; the serving instance renews it every quarter of it
    lease_ttl_s: float = Field(default=4.0, ge=1.0, le=60.0)
    # one broker, or the nodes of a clustered one: a TOML list, or one value with the URLs
    # separated by commas (normalised to that form); clients connect to the first that answers
    broker: str = "mqtt://127.0.0.1:1883"
    broker_username: str | None = None
    # the password: from ANTIFRAUD_BROKER_PASSWORD, else this file, else broker_password
    broker_password_file: str | None = None
    broker_password: SecretStr | None = None
    broker_ca_file: str | None = None  # for mqtts:// when the broker's CA is not a public one
    client_id: Ident = "antifraud-dispatcher"
    # the deployment's time zone (IANA name): every time the operator console shows or exports
    timezone: str = "Asia/Shanghai"

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(
                f"{value!r} is not an IANA time zone name (e.g. 'Asia/Shanghai')"
            ) from None
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value.startswith(("postgresql://", "postgres://")):
            try:
                parts = urlsplit(value)
                parts.port  # noqa: B018  (parsing it is the check)
            except ValueError as exc:
                raise ValueError(f"not a PostgreSQL URL: {exc}") from None
            if parts.password is not None or "password" in dict(parse_qsl(parts.query)):
                raise ValueError(
                    "the PostgreSQL URL holds a password, which would show in the process "
                    "list and the logs; give it in PGPASSWORD or a PGPASSFILE instead"
                )
            if not parts.path.strip("/"):
                raise ValueError("the PostgreSQL URL names no database (postgresql://user@host/db)")
        return value

    @field_validator("broker", mode="before")
    @classmethod
    def _broker(cls, value: object) -> object:
        if isinstance(value, list):
            if not value or not all(isinstance(url, str) for url in value):
                raise ValueError("must be a broker URL or a non-empty list of them")
            value = ",".join(value)
        if isinstance(value, str):
            return ",".join(check_broker_urls(value))
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if (
            not value
            or value.startswith("/")
            or value.endswith("/")
            or any(c in value for c in "#+")
        ):
            raise ValueError("must be topic levels like 'antifraud/v1', without wildcards")
        return value


class CallbackSettings(_Strict):
    max_attempts: int = Field(3, ge=1, le=100)
    window_s: float = Field(120, gt=0)


class DispatchSettings(_Strict):
    guard_accept_s: float = Field(30, gt=0)
    police_accept_s: float = Field(60, gt=0)
    # a unit that accepted and has not arrived within this alerts the operators (a lost or
    # stolen radio's accept would otherwise hold the door-knock for ever): guards and grid
    # workers, on the estate or nearby; patrols and quick-police platforms, across the town
    guard_arrive_s: float = Field(600, gt=0)
    police_arrive_s: float = Field(1800, gt=0)
    # an arrival said sooner than this after the acceptance is checked by phone: nobody gets
    # from the radio to the door that fast, and a lost radio's holder could press on (0: off)
    min_arrive_s: float = Field(60, ge=0)
    # a unit that arrived and has given no outcome within this alerts the operators: an
    # hour at a door without a word is worth a call (a lost radio's arrive, say)
    report_s: float = Field(3600, gt=0)


class IncidentSettings(_Strict):
    retention_s: float = Field(86400, gt=0)


class LimitSettings(_Strict):
    max_payload_bytes: int = Field(65536, ge=256)
    max_json_depth: int = Field(16, ge=4, le=200)
    dedupe_window_s: float = Field(86400, gt=0)
    max_dedupe_entries: int = Field(2_000_000, ge=1000)
    contacts_per_subscriber: int = Field(256, ge=8)
    max_contact_subscribers: int = Field(500_000, ge=100)
    # the region's call topic: messages a second (on both clocks, decisions.md 39) …
    rate_per_source: float = Field(2000, gt=0)
    burst_per_source: int = Field(10_000, ge=1)  # … with bursts of up to this many
    # each unit's replies and status, and each operator's actions: messages a second …
    rate_per_party: float = Field(50, gt=0)
    burst_per_party: int = Field(500, ge=1)  # … with bursts of up to this many
    # call events of one resident, on arrival: a resident has a call or two at a time, each
    # reporting its progress now and then; the burst covers a backlog after an outage
    rate_per_subscriber: float = Field(10, gt=0)
    burst_per_subscriber: int = Field(1000, ge=1)
    # refusals a channel may have stored and dead-lettered a period; past that, counted
    refusals_per_period: int = Field(20, ge=1)
    refusal_period_s: float = Field(60, gt=0)
    max_sources: int = Field(10_000, ge=10)  # channels remembered by the budgets


class AccessSettings(_Strict):
    """Broker usernames by role, for `antifraud broker-credentials` and the ACL."""

    dispatcher_user: Ident = "dispatcher"
    console_user: Ident = "console"  # the console server, publishing for logged-in operators
    recorder_user: Ident = "recorder"  # `antifraud record`: reads the inbound topics
    sources: list[Ident] = []
    operators: list[Ident] = []


class ConsoleSettings(_Strict):
    users_file: str = "var/console-users.json"  # operator -> scrypt hash, mode 0600
    session_hours: float = Field(12, gt=0)
    secure_cookies: bool = False  # true when the console is served over HTTPS
    # the reverse proxies in front of the console (addresses or networks): from them, a
    # client's address is the one their X-Forwarded-For names, for the login throttle
    trusted_proxies: list[str] = []

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or network (e.g. '10.0.0.5', '10.0.0.0/24')"
                ) from None
        return value


class RegistryPaths(_Strict):
    estates: str
    units: str
    subscribers: str
    flagged_numbers: str


class StationSettings(_Strict):
    name: str


def conditions_text(when: Conditions, categories: dict[str, str]) -> str:
    """A rule's conditions in words an operator reads at a glance (Chinese)."""
    parts: list[str] = []
    if when.vulnerable:
        parts.append("易受骗居民")
    elif when.vulnerable is False:
        parts.append("非易受骗居民")
    if when.categories:
        parts.append("与" + "/".join(categories.get(c, c) for c in when.categories) + "号码")
    elif when.flagged:
        parts.append("与涉诈号码")
    elif when.flagged is False:
        parts.append("与非涉诈号码")
    if when.min_duration_s is not None:
        parts.append(f"通话满{when.min_duration_s:g}秒")
    if when.distinct_flagged_contacts is not None:
        c = when.distinct_flagged_contacts
        hours = c.window_s / 3600
        span = f"{hours:g}小时" if hours >= 1 else f"{c.window_s:g}秒"
        parts.append(f"{span}内被{c.min_distinct}个不同涉诈号码联系")
    return "".join(parts) or "任意通话"


class FileSettings(_Strict):
    service: ServiceSettings
    registries: RegistryPaths
    stations: dict[Ident, StationSettings]
    callback: CallbackSettings = CallbackSettings()
    dispatch: DispatchSettings = DispatchSettings()
    incident: IncidentSettings = IncidentSettings()
    limits: LimitSettings = LimitSettings()
    access: AccessSettings = AccessSettings()
    console: ConsoleSettings = ConsoleSettings()
    rules: list[RuleSettings]


@dataclass(frozen=True, slots=True)
class Estate:
    id: str
    name: str
    kind: Literal["estate", "village"]
    township: str
    grid: str
    station: str
    address: str


@dataclass(frozen=True, slots=True)
class Unit:
    id: str
    kind: UnitKind
    channel: Literal["radio", "app"]
    estate: str | None
    grid: str | None
    station: str
    name: str
    order: int


@dataclass(frozen=True, slots=True)
class Subscriber:
    msisdn: str
    name: str
    display_name: str
    estate: str
    address: str
    grid: str
    vulnerable: bool


@dataclass(frozen=True)
class Settings:
    """The whole deployment, validated and cross-checked."""

    path: Path
    service: ServiceSettings
    callback: CallbackSettings
    dispatch: DispatchSettings
    incident: IncidentSettings
    limits: LimitSettings
    stations: dict[str, StationSettings]
    rules: list[RuleSettings]
    estates: dict[str, Estate]
    units: dict[str, Unit]
    subscribers: dict[str, Subscriber]
    flagged: list[FlaggedPattern]
    access: AccessSettings = field(default_factory=AccessSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    guards_by_estate: dict[str, list[Unit]] = field(default_factory=dict)
    grid_workers_by_grid: dict[str, list[Unit]] = field(default_factory=dict)
    police_by_station: dict[str, list[Unit]] = field(default_factory=dict)
    quick_police_by_station: dict[str, list[Unit]] = field(default_factory=dict)

    def unit_name(self, unit_id: str) -> str:
        """The unit's name, also for a unit the store still names in a dispatch after it was
        taken out of ``units.csv`` (decisions.md 49): its incident must go on being shown and
        handled, not fail on every message."""
        unit = self.units.get(unit_id)
        return unit.name if unit is not None else f"{unit_id}（已不在单位配置中）"

    def rule_name(self, rule_id: str) -> str:
        """How operators and police read a rule: its ``label``, else its conditions in words
        (a rule id no longer configured, named in an old incident, is shown as it is)."""
        return self._rule_names.get(rule_id, rule_id)

    @cached_property
    def _rule_names(self) -> dict[str, str]:
        categories = {f.category: f.label for f in self.flagged}
        return {r.id: r.label or conditions_text(r.when, categories) for r in self.rules}

    def summary(self) -> str:
        """A one-screen description of the deployment, for ``antifraud check-config``."""
        kinds: dict[str, int] = {}
        for unit in self.units.values():
            kinds[unit.kind] = kinds.get(unit.kind, 0) + 1
        lines = [
            f"config {self.path}: OK",
            f"  region {self.service.region}, topic prefix {self.service.prefix}, "
            f"broker {self.service.broker}, store {self.service.store}",
            f"  stations {len(self.stations)} (default {self.service.default_station}), "
            f"estates {len(self.estates)}, subscribers {len(self.subscribers)}, "
            f"flagged patterns {len(self.flagged)}",
            "  units " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
            f"  callback: {self.callback.max_attempts} attempts "
            f"within {self.callback.window_s:g} s; "
            f"accept within: guard {self.dispatch.guard_accept_s:g} s, "
            f"police {self.dispatch.police_accept_s:g} s; "
            f"closed incidents kept {self.incident.retention_s:g} s",
            f"  rules {len(self.rules)}:",
        ]
        for rule in self.rules:
            lines.append(f"    {rule.id:<26} {rule.severity:<8} {describe_conditions(rule.when)}")
        return "\n".join(lines)


def describe_conditions(when: Conditions) -> str:
    parts: list[str] = []
    if when.categories:
        parts.append("counterpart category in " + "/".join(when.categories))
    elif when.flagged is True:
        parts.append("flagged counterpart")
    elif when.flagged is False:
        parts.append("counterpart not flagged")
    if when.vulnerable is not None:
        parts.append("vulnerable subscriber" if when.vulnerable else "subscriber not vulnerable")
    if when.min_duration_s is not None:
        parts.append(f"call >= {when.min_duration_s:g} s")
    if when.distinct_flagged_contacts is not None:
        c = when.distinct_flagged_contacts
        parts.append(f">= {c.min_distinct} distinct flagged numbers within {c.window_s:g} s")
    return ", ".join(parts) or "always"


def _pydantic_problems(
    where: str, exc: ValidationError, raw: dict[str, Any] | None = None
) -> list[str]:
    problems = []
    rules = raw.get("rules") if raw is not None else None
    for err in exc.errors():
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        key = key.lstrip(".") or "(top level)"
        loc = err["loc"]
        if (
            len(loc) >= 2
            and loc[0] == "rules"
            and isinstance(loc[1], int)
            and isinstance(rules, list)
            and loc[1] < len(rules)
            and isinstance(rules[loc[1]], dict)
            and isinstance(rules[loc[1]].get("id"), str)
        ):  # a rule is named by its id too
            key = key.replace(f"rules[{loc[1]}]", f"rules[{loc[1]}] ({rules[loc[1]]['id']})", 1)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # the validator's own words
        problems.append(f"{where}: {key}: {msg}")
    return problems


Row = dict[str, str]
T = TypeVar("T")


def _read_csv(
    path: Path, columns: list[str], problems: list[str], what: str = "", named_by: str = ""
) -> list[tuple[int, Row]]:
    """The rows of a registry; with ``what``, a registry without rows is a problem too (a
    deployment with no units, say, would start and never send anyone). ``named_by`` is where
    the deployment names the file ("FILE.toml: registries.units"), said when it is missing."""
    before = len(problems)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                problems.append(f"{path}: file is empty (expected header {','.join(columns)})")
                return []
            header = [h.strip() for h in header]
            if header != columns:
                problems.append(
                    f"{path}:1: header is {','.join(header)}; expected {','.join(columns)}"
                )
                return []
            rows: list[tuple[int, Row]] = []
            # a value repeated down the file (a kind, a station, an estate) is held once: a
            # county's registries repeat each of them thousands of times
            held: dict[str, str] = {}
            for line_no, values in enumerate(reader, start=2):
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(columns):
                    problems.append(
                        f"{path}:{line_no}: has {len(values)} fields; expected {len(columns)}"
                    )
                    continue
                rows.append(
                    (
                        line_no,
                        {
                            c: held.setdefault(text := v.strip(), text)
                            for c, v in zip(columns, values, strict=True)
                        },
                    )
                )
            if not rows and what and len(problems) == before:
                problems.append(f"{path}: no {what}: the file has a header and no rows")
            return rows
    except FileNotFoundError:
        if named_by:
            problems.append(
                f"{named_by}: {path}: file not found (the paths of [registries] are relative "
                "to the deployment's file)"
            )
        else:
            problems.append(f"{path}: file not found")
    except UnicodeDecodeError as exc:
        problems.append(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    except csv.Error as exc:
        problems.append(f"{path}: malformed CSV ({exc})")
    return []


def _unique(
    path: Path,
    rows: list[tuple[int, Row]],
    key: str,
    build: Callable[[int, Row], T | None],
    problems: list[str],
) -> dict[str, T]:
    seen: dict[str, int] = {}
    out: dict[str, T] = {}
    for line_no, row in rows:
        ident = row[key]
        if ident in seen:
            problems.append(
                f"{path}:{line_no}: {key}: duplicate id {ident!r} (first on line {seen[ident]})"
            )
            continue
        seen[ident] = line_no
        item = build(line_no, row)
        if item is not None:
            out[ident] = item
    return out


def load_settings(path: str | Path) -> Settings:
    """Load and cross-check a deployment; raise ``ConfigError`` listing every problem."""
    path = Path(path)
    problems: list[str] = []
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    try:
        doc = FileSettings.model_validate(raw)
    except ValidationError as exc:
        problems = _pydantic_problems(str(path), exc, raw)
        # Still check everything that can be read (the registries, each rule that is valid
        # on its own, the default station), so that one run lists every problem.
        stations: dict[str, StationSettings] = {}
        flagged_found: list[FlaggedPattern] | None = None
        with contextlib.suppress(ValidationError):  # the registries need both
            stations = _STATIONS.validate_python(raw.get("stations"))
            registries = RegistryPaths.model_validate(raw.get("registries"))
            flagged_found = _load_registries(path, registries, stations, problems)[3]
        rules = []
        raw_rules = raw.get("rules")
        for index, rule in enumerate(raw_rules if isinstance(raw_rules, list) else []):
            with contextlib.suppress(ValidationError):
                rules.append((index, RuleSettings.model_validate(rule)))
        _check_rules(path, rules, flagged_found, "the flagged numbers", problems)
        service = raw.get("service")
        station = service.get("default_station") if isinstance(service, dict) else None
        if isinstance(station, str) and stations and station not in stations:
            problems.append(f"{path}: service.default_station: unknown station {station!r}")
        raise ConfigError(problems) from None

    estates, units, subscribers, flagged = _load_registries(
        path, doc.registries, doc.stations, problems
    )
    stations = doc.stations
    flagged_path = path.parent / doc.registries.flagged_numbers
    _check_rules(path, list(enumerate(doc.rules)), flagged, flagged_path.name, problems)
    if doc.service.default_station not in stations:
        problems.append(
            f"{path}: service.default_station: unknown station {doc.service.default_station!r}"
        )

    if problems:
        raise ConfigError(problems)

    settings = Settings(
        path=path,
        service=doc.service,
        callback=doc.callback,
        dispatch=doc.dispatch,
        incident=doc.incident,
        limits=doc.limits,
        stations=dict(stations),
        rules=list(doc.rules),
        estates=estates,
        units=units,
        subscribers=subscribers,
        flagged=flagged,
        access=doc.access,
        console=doc.console,
    )
    for unit in sorted(units.values(), key=lambda u: u.order):
        if unit.kind == "guard" and unit.estate:
            settings.guards_by_estate.setdefault(unit.estate, []).append(unit)
        elif unit.kind == "grid_worker" and unit.grid:
            settings.grid_workers_by_grid.setdefault(unit.grid, []).append(unit)
        elif unit.kind == "police":
            settings.police_by_station.setdefault(unit.station, []).append(unit)
        elif unit.kind == "quick_police":
            settings.quick_police_by_station.setdefault(unit.station, []).append(unit)
    return settings


_STATIONS: TypeAdapter[dict[str, StationSettings]] = TypeAdapter(dict[Ident, StationSettings])


def _check_rules(
    path: Path,
    rules: list[tuple[int, RuleSettings]],
    flagged: list[FlaggedPattern] | None,
    flagged_name: str,
    problems: list[str],
) -> None:
    """Cross-check the rules: unique ids, known categories, no contradiction. Each is
    named by its position and its id. ``flagged`` None: the flagged numbers could not be
    read, so categories are not checked."""
    categories = {f.category for f in flagged} if flagged is not None else None
    seen: dict[str, int] = {}
    for index, rule in rules:
        where = f"{path}: rules[{index}] ({rule.id})"
        if rule.id in seen:
            problems.append(
                f"{path}: rules[{index}].id: duplicate rule id {rule.id!r} "
                f"(first at rules[{seen[rule.id]}])"
            )
        seen.setdefault(rule.id, index)
        for category in rule.when.categories or []:
            if categories is not None and category not in categories:
                problems.append(
                    f"{where}.when.categories: {category!r} is no category of {flagged_name} "
                    f"(known: {', '.join(sorted(categories))})"
                )
        if rule.when.categories is not None and rule.when.flagged is False:
            problems.append(f"{where}.when: categories and flagged = false contradict")


def _load_registries(
    config: Path,
    registries: RegistryPaths,
    stations: dict[str, StationSettings],
    problems: list[str],
) -> tuple[dict[str, Estate], dict[str, Unit], dict[str, Subscriber], list[FlaggedPattern]]:
    """Read and cross-check the CSV registries ``config`` names, appending every problem
    found."""
    base = config.parent

    def key(name: str) -> str:
        return f"{config}: registries.{name}"

    def station_ok(where: str, column: str, station: str) -> bool:
        if station not in stations:
            problems.append(f"{where}: {column}: unknown station {station!r} (see [stations])")
            return False
        return True

    # estates
    estates_path = base / registries.estates
    estate_cols = ["id", "name", "kind", "township", "grid", "station", "address"]
    estate_rows = _read_csv(estates_path, estate_cols, problems, "estates", key("estates"))

    def build_estate(line_no: int, row: Row) -> Estate | None:
        where = f"{estates_path}:{line_no}"
        ok = True
        if not IDENT.match(row["id"]):
            problems.append(f"{where}: id: {row['id']!r} is not an id ([A-Za-z0-9._-], 1-64)")
            ok = False
        if row["kind"] not in ("estate", "village"):
            problems.append(f"{where}: kind: {row['kind']!r} is not 'estate' or 'village'")
            ok = False
        if not row["grid"]:
            problems.append(f"{where}: grid: missing")
            ok = False
        ok = station_ok(where, "station", row["station"]) and ok
        if not row["address"]:
            problems.append(f"{where}: address: missing")
            ok = False
        if not ok:
            return None
        return Estate(
            id=row["id"],
            name=row["name"],
            kind=row["kind"],  # type: ignore[arg-type]
            township=row["township"],
            grid=row["grid"],
            station=row["station"],
            address=row["address"],
        )

    estates = _unique(estates_path, estate_rows, "id", build_estate, problems)
    grids = {e.grid for e in estates.values()}

    # units
    units_path = base / registries.units
    unit_cols = ["id", "kind", "channel", "estate", "grid", "station", "name"]
    unit_rows = _read_csv(units_path, unit_cols, problems, "units", key("units"))
    order = iter(range(len(unit_rows)))

    def build_unit(line_no: int, row: Row) -> Unit | None:
        where = f"{units_path}:{line_no}"
        ok = True
        kind = row["kind"]
        if not IDENT.match(row["id"]):
            problems.append(f"{where}: id: {row['id']!r} is not an id ([A-Za-z0-9._-], 1-64)")
            ok = False
        if kind not in ("guard", "police", "quick_police", "grid_worker"):
            problems.append(
                f"{where}: kind: {kind!r} is not guard, police, quick_police or grid_worker"
            )
            ok = False
        if row["channel"] not in ("radio", "app"):
            problems.append(f"{where}: channel: {row['channel']!r} is not 'radio' or 'app'")
            ok = False
        if row["estate"] and row["estate"] not in estate_ids:
            problems.append(f"{where}: estate: unknown estate {row['estate']!r}")
            ok = False
        if kind == "guard" and not row["estate"]:
            problems.append(f"{where}: estate: a guard needs the estate it guards")
            ok = False
        if row["grid"] and row["grid"] not in grids:
            problems.append(f"{where}: grid: unknown grid {row['grid']!r} (no estate has it)")
            ok = False
        if kind == "grid_worker" and not row["grid"]:
            problems.append(f"{where}: grid: a grid worker needs its grid")
            ok = False
        if not row["station"]:
            problems.append(f"{where}: station: missing")
            ok = False
        else:
            ok = station_ok(where, "station", row["station"]) and ok
        guarded = estate_stations.get(row["estate"]) if kind == "guard" else None
        if guarded is not None and row["station"] and row["station"] != guarded:
            # a guard works at his estate, whose police are its station's: another station
            # here is a typo in one of the two files, and who is told what depends on which
            problems.append(
                f"{where}: station: {row['station']!r} is not the station of the guard's "
                f"estate {row['estate']!r} ({guarded!r}, in {estates_path})"
            )
            ok = False
        if not ok:
            return None
        return Unit(
            id=row["id"],
            kind=kind,  # type: ignore[arg-type]
            channel=row["channel"],  # type: ignore[arg-type]
            estate=row["estate"] or None,
            grid=row["grid"] or None,
            station=row["station"],
            name=row["name"],
            order=next(order),
        )

    estate_stations = {row["id"]: row["station"] for _, row in estate_rows}
    estate_ids = estate_stations.keys()
    units = _unique(units_path, unit_rows, "id", build_unit, problems)

    # subscribers
    subs_path = base / registries.subscribers
    sub_cols = ["msisdn", "name", "display_name", "estate", "address", "grid", "vulnerable"]
    sub_rows = _read_csv(subs_path, sub_cols, problems, "subscribers", key("subscribers"))

    def build_subscriber(line_no: int, row: Row) -> Subscriber | None:
        where = f"{subs_path}:{line_no}"
        ok = True
        if not E164.match(row["msisdn"]):
            problems.append(f"{where}: msisdn: {row['msisdn']!r} is not an E.164 number")
            ok = False
        if row["estate"] not in estate_ids:
            problems.append(f"{where}: estate: unknown estate {row['estate']!r}")
            ok = False
        if row["grid"] not in grids:
            problems.append(f"{where}: grid: unknown grid {row['grid']!r} (no estate has it)")
            ok = False
        if row["vulnerable"].lower() not in ("true", "false"):
            problems.append(f"{where}: vulnerable: {row['vulnerable']!r} is not true or false")
            ok = False
        if not row["display_name"]:
            problems.append(f"{where}: display_name: missing (the honorific a guard hears)")
            ok = False
        if not row["address"]:
            problems.append(f"{where}: address: missing")
            ok = False
        if not ok:
            return None
        return Subscriber(
            msisdn=row["msisdn"],
            name=row["name"],
            display_name=row["display_name"],
            estate=row["estate"],
            address=row["address"],
            grid=row["grid"],
            vulnerable=row["vulnerable"].lower() == "true",
        )

    subscribers = _unique(subs_path, sub_rows, "msisdn", build_subscriber, problems)

    # flagged numbers
    flagged_path = base / registries.flagged_numbers
    flagged_rows = _read_csv(
        flagged_path,
        ["pattern", "match", "category", "label"],
        problems,
        "flagged numbers",
        key("flagged_numbers"),
    )
    flagged: list[FlaggedPattern] = []
    seen_patterns: dict[tuple[str, str], int] = {}
    for line_no, row in flagged_rows:
        where = f"{flagged_path}:{line_no}"
        pattern, match = row["pattern"], row["match"]
        if match not in ("exact", "prefix"):
            problems.append(f"{where}: match: {match!r} is not 'exact' or 'prefix'")
            continue
        if not (E164 if match == "exact" else PREFIX).match(pattern):
            problems.append(f"{where}: pattern: {pattern!r} is not an E.164 number or prefix")
            continue
        if not row["category"]:
            problems.append(f"{where}: category: missing")
            continue
        if (pattern, match) in seen_patterns:
            problems.append(
                f"{where}: pattern: duplicate {match} pattern {pattern!r} "
                f"(first on line {seen_patterns[(pattern, match)]})"
            )
            continue
        seen_patterns[(pattern, match)] = line_no
        flagged.append(FlaggedPattern(pattern, match, row["category"], row["label"]))  # type: ignore[arg-type]

    return estates, units, subscribers, flagged
