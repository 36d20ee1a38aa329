"""``antifraud stats``: how incidents ended, per rule and per unit, read from a store
(docs/stats.md).

The figures go out as JSON, or as a self-contained HTML report with charts
(``adapters.stats_report``). The store is opened read-only (a live dispatcher may be
writing it); the figures are computed by ``dispatcher.outcomes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

from adapters.reading import READ_ERRORS, StoreRef, read_failure
from adapters.stats_report import html_report
from dispatcher.errors import StoreError
from dispatcher.outcomes import figures
from dispatcher.settings import load_settings

DEFAULT_CONFIG = "config/hengnan.toml"
INCIDENT_FIELDS = ("id", "rule", "outcome", "opened_at", "critical_at", "escalated_at")
DISPATCH_FIELDS = (
    "incident_id",
    "unit",
    "role",
    "status",
    "offered_at",
    "accepted_at",
    "arrived_at",
)


def read_store(
    store: StoreRef | str | Path,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """The incidents and dispatches of ``store`` (a SQLite file's path or a PostgreSQL URL),
    and the epoch seconds of its clock 0 (a replay's recording clock; 0 for a live store,
    whose times are epoch seconds)."""
    ref = store if isinstance(store, StoreRef) else StoreRef(store)
    if not ref.exists():
        raise StoreError(f"{ref}: no such store")
    try:
        db = ref.connect()
    except READ_ERRORS as exc:
        raise read_failure(ref, exc) from None
    try:
        meta = {key: value for key, value in db.execute("SELECT key, value FROM meta")}
        incidents = []
        for (doc,) in db.execute("SELECT doc FROM incidents ORDER BY opened_at, id"):
            full = json.loads(doc)
            incidents.append({name: full.get(name) for name in INCIDENT_FIELDS})
        dispatches = [
            dict(zip(DISPATCH_FIELDS, row, strict=True))
            for row in db.execute(
                f"SELECT {', '.join(DISPATCH_FIELDS)} FROM dispatches ORDER BY offered_at, id"
            )
        ]
    except READ_ERRORS as exc:
        raise read_failure(ref, exc) from None
    finally:
        db.close()
    return incidents, dispatches, float(meta.get("clock_origin", "0"))


def cmd_stats(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    incidents, dispatches, origin = read_store(args.store)
    shown = str(StoreRef(args.store))  # as given, a password masked
    stats = figures(
        incidents,
        dispatches,
        origin,
        settings.service.timezone,
        args.date_from,
        args.date_to,
    )
    if args.html is not None:
        _write(Path(args.html), html_report(stats, settings, shown))
    if args.json is None and args.html is not None:
        return 0
    text = json.dumps({"store": shown, **stats}, ensure_ascii=False, indent=2) + "\n"
    if args.json in (None, "-"):
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        _write(Path(args.json), text)
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def add_stats_parser(sub: Any) -> None:
    """Register ``stats`` on the command line's subcommands."""
    p = sub.add_parser(
        "stats", help="outcomes per rule and per unit, from a store, as JSON or an HTML report"
    )
    p.add_argument("--store", required=True, help="a dispatcher's or a replay's SQLite store")
    p.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"the deployment, for its time zone (default {DEFAULT_CONFIG})",
    )
    p.add_argument(
        "--from",
        dest="date_from",
        type=_day,
        metavar="DATE",
        help="first day, YYYY-MM-DD, in the deployment's time zone",
    )
    p.add_argument(
        "--to", dest="date_to", type=_day, metavar="DATE", help="last day (included), YYYY-MM-DD"
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        help="JSON file, or - for stdout (the default, unless --html alone is given)",
    )
    p.add_argument(
        "--html", metavar="PATH", help="also (or only) a self-contained HTML report with charts"
    )
    p.set_defaults(func=cmd_stats, quiet=True)
