"""``antifraud export``: a real case, from a store, as a recording ``replay`` and ``whatif`` read.

The store keeps the inbound messages that touched each incident, as received, with their
arrival times (``incident_inbound``, written in the same commit as the step's other effects).
An incident's export holds those, and the flagged contacts of its subscriber that touched no
incident within the rules' contact window before it opened (or belong to its own calls); a
range's holds every kept message that arrived in it. Times are shifted so that the first line
is at 0: the replay's report gives times from the first exported message
(docs/decisions.md). The store is opened read-only; an existing ``--out`` is never written
over. Such a file holds residents' numbers and what the operators and units said about them:
it is as sensitive as the store (docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from adapters.reading import READ_ERRORS, StoreRef, read_failure
from dispatcher.errors import StoreError
from dispatcher.settings import load_settings
from rules.engine import RuleSet

DEFAULT_CONFIG = "config/hengnan.toml"
EXPORT_SCHEMA = 6  # the first store version that keeps inbound messages


def _incident_sql(calls: int) -> str:
    """The kept messages of an incident: its own, and its subscriber's flagged contacts of
    no incident from before it opened (within the horizon) or of one of its calls."""
    of_calls = f" OR call_id IN ({', '.join('?' * calls)})" if calls else ""
    return (
        "SELECT MIN(seq), at, topic, payload FROM incident_inbound "
        "WHERE incident_id = ? OR (incident_id IS NULL AND subscriber = ? "
        f"AND ((at >= ? AND at <= ?){of_calls})) "
        "GROUP BY at, topic, payload ORDER BY 1"
    )


_RANGE = (
    "SELECT MIN(seq), at, topic, payload FROM incident_inbound WHERE at >= ? AND at < ? "
    "GROUP BY at, topic, payload ORDER BY 1"
)


class Bound:
    """A ``--from`` or ``--to`` as given: a day, or a time (RFC 3339; without an offset it is
    in the deployment's time zone)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.day: date | None = None
        self.time: datetime | None = None
        try:
            if len(text) == 10:
                self.day = date.fromisoformat(text)
            else:
                self.time = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a date (YYYY-MM-DD) or an RFC 3339 time"
            ) from None

    def epoch(self, zone: ZoneInfo, end: bool) -> float:
        """Epoch seconds: a day starts at its midnight; as an end (``--to``), a day is
        included whole and a time is where the range stops (not included)."""
        if self.day is not None:
            day = self.day + timedelta(days=1) if end else self.day
            return datetime.combine(day, time(), zone).timestamp()
        assert self.time is not None
        moment = self.time if self.time.tzinfo else self.time.replace(tzinfo=zone)
        return moment.timestamp()


def _open(store: StoreRef) -> tuple[Any, dict[str, str]]:
    if not store.exists():
        raise StoreError(f"{store}: no such store")
    try:
        db = store.connect()
        version_sql = (
            "SELECT version FROM store_schema" if store.postgres else "PRAGMA user_version"
        )
        version = db.execute(version_sql).fetchone()[0]
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except READ_ERRORS as exc:
        raise read_failure(store, exc) from None
    if version < EXPORT_SCHEMA:
        db.close()
        raise StoreError(
            f"{store}: this store (schema {version}) was written before the dispatcher kept "
            "inbound messages; it has nothing to export until a dispatcher of this version "
            "has opened it"
        )
    return db, meta


def incident_rows(db: Any, incident_id: str, horizon_s: float) -> list[Any]:
    found = db.execute(
        "SELECT subscriber, opened_at, doc FROM incidents WHERE id = ?", (incident_id,)
    ).fetchone()
    if found is None:
        raise StoreError(f"no incident {incident_id!r} in the store")
    subscriber, opened_at, doc = found
    calls = list(json.loads(doc).get("calls", {}))
    params = [incident_id, subscriber, opened_at - horizon_s, opened_at, *calls]
    rows = list(db.execute(_incident_sql(len(calls)), params).fetchall())
    if not rows:
        raise StoreError(
            f"incident {incident_id!r} has no kept inbound messages (it was handled before "
            "the store kept them, or they were pruned with its retention)"
        )
    return rows


def _line(at: float, topic: str, payload: str) -> str:
    """One recording line, with the payload's JSON text as received where it is one line."""
    head = f'{{"at": {json.dumps(at)}, "topic": {json.dumps(topic, ensure_ascii=False)}, '
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return head + f'"payload_raw": {json.dumps(payload, ensure_ascii=False)}}}'
    if "\n" in payload or "\r" in payload:  # whitespace between tokens: the value, one line
        payload = json.dumps(value, ensure_ascii=False)
    return head + f'"payload": {payload}}}'


def export(
    store: str | Path | StoreRef,
    out: Path,
    *,
    incident: str | None = None,
    span: tuple[float, float] | None = None,
    horizon_s: float = 0.0,
) -> int:
    """Write the recording of ``incident`` (or of the epoch seconds ``span``) to ``out``,
    which must not exist. ``store``: a SQLite file's path or a PostgreSQL URL. Returns the
    number of lines written."""
    store = store if isinstance(store, StoreRef) else StoreRef(store)
    db, meta = _open(store)
    try:
        if incident is not None:
            rows = incident_rows(db, incident, horizon_s)
        else:
            assert span is not None
            origin = float(meta.get("clock_origin", "0"))
            rows = db.execute(_RANGE, (span[0] - origin, span[1] - origin)).fetchall()
            if not rows:
                raise StoreError(f"{store}: no kept inbound messages in that range")
    except READ_ERRORS as exc:
        raise read_failure(store, exc) from None
    finally:
        db.close()
    first = rows[0][1]
    text = "".join(_line(round(at - first, 6), topic, p) + "\n" for _, at, topic, p in rows)
    try:
        with out.open("x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        raise StoreError(f"{out}: already exists; an export is never written over") from None
    except OSError as exc:
        raise StoreError(f"{out}: cannot write the recording: {exc.strerror}") from None
    return len(rows)


def cmd_export(args: argparse.Namespace) -> int:
    if (args.incident is None) == (args.date_from is None and args.date_to is None):
        raise StoreError("give either --incident, or --from and --to")
    if args.incident is None and (args.date_from is None or args.date_to is None):
        raise StoreError("a range needs both --from and --to")
    out = Path(args.out)
    if out.exists():  # before anything is read: the answer does not depend on the store
        raise StoreError(f"{out}: already exists; an export is never written over")
    settings = load_settings(args.config)
    span = None
    if args.incident is None:
        zone = ZoneInfo(settings.service.timezone)
        span = (args.date_from.epoch(zone, False), args.date_to.epoch(zone, True))
        if span[1] <= span[0]:
            raise StoreError("--to must come after --from")
    lines = export(
        args.store,
        out,
        incident=args.incident,
        span=span,
        horizon_s=RuleSet(settings.rules).contact_horizon_s,
    )
    print(f"{out}: {lines} line(s)")
    return 0


def add_export_parser(sub: Any) -> None:
    """Register ``export`` on the command line's subcommands."""
    p = sub.add_parser(
        "export", help="an incident (or a time range) of a store as a recording to replay"
    )
    p.add_argument("--store", required=True, help="a dispatcher's or a replay's SQLite store")
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"the deployment, for its time zone and rules (default {DEFAULT_CONFIG})",
    )
    p.add_argument("--incident", metavar="ID", help="the incident to export")
    p.add_argument(
        "--from",
        dest="date_from",
        type=Bound,
        metavar="T",
        help="range start: YYYY-MM-DD or an RFC 3339 time, in the deployment's time zone",
    )
    p.add_argument(
        "--to",
        dest="date_to",
        type=Bound,
        metavar="T",
        help="range end: a day is included whole, a time is where the range stops",
    )
    p.add_argument("--out", required=True, help="the recording to write (must not exist)")
    p.set_defaults(func=cmd_export, quiet=True)
