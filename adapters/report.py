"""The report of SPEC §6, built from the store (so it survives restarts and resumes)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from adapters.store import OUTBOX_PAYLOAD, RECEIPT, Store
from dispatcher.errors import StoreError
from dispatcher.model import Incident
from dispatcher.settings import Settings


async def build_report(store: Store, settings: Settings, base: float = 0.0) -> dict[str, Any]:
    """Times are seconds on the recording's clock; ``base`` is subtracted (0 for replays)."""

    def t(value: float | None) -> float | None:
        return None if value is None else round(value - base, 6)

    order = {unit_id: unit.order for unit_id, unit in settings.units.items()}
    incidents = []
    async for (doc,) in store.rows("SELECT doc FROM incidents ORDER BY opened_at, id"):
        inc = Incident.from_doc(json.loads(doc))
        dispatches = sorted(
            inc.dispatches.values(),
            key=lambda d: (d.offered_at, order.get(d.unit, 1 << 30), d.unit),
        )
        incidents.append(
            {
                "id": inc.id,
                "subscriber": inc.subscriber,
                "counterpart": inc.counterpart,
                "rule": inc.rule,
                "severity": inc.severity,
                "status": inc.status,
                "outcome": inc.outcome,
                "opened_at": t(inc.opened_at),
                "critical_at": t(inc.critical_at),
                "escalated_at": t(inc.escalated_at),
                "closed_at": t(inc.closed_at),
                "dispatches": [
                    {
                        "unit": d.unit,
                        "role": d.role,
                        "status": d.status,
                        "offered_at": t(d.offered_at),
                        "accepted_at": t(d.accepted_at),
                        "arrived_at": t(d.arrived_at),
                        "outcome": d.outcome,
                    }
                    for d in dispatches
                ],
            }
        )
    # a reply receipt is listed once: sent again to a redelivered reply, it is the same
    # message (same id), and a duplicated line changes nothing in the report (SPEC §6)
    published = []
    receipts: set[str] = set()
    names: dict[str, str] = {}  # a day repeats a few topics and types: each held once
    async for at, topic, type_, receipt in store.rows(
        f"SELECT at, topic, type, CASE WHEN type = ? THEN json_extract({OUTBOX_PAYLOAD}, '$.id') "
        "END FROM outbox ORDER BY seq",
        (RECEIPT,),
    ):
        if receipt is not None:
            if receipt in receipts:
                continue
            receipts.add(receipt)
        topic = names.setdefault(topic, topic)
        if type_ is not None:
            type_ = names.setdefault(type_, type_)
        published.append({"at": t(at), "topic": topic, "type": type_})
    rejected = [
        {"at": t(at), "topic": topic, "reason": reason}
        for at, topic, reason in await store.fetchall(
            "SELECT at, topic, reason FROM rejected ORDER BY seq"
        )
    ]
    return {"incidents": incidents, "published": published, "rejected": rejected}


def write_output(text: str, target: str) -> None:
    """Write a report: ``-`` is standard output; a file is written over."""
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text, encoding="utf-8")


def dump_report(report: dict[str, Any]) -> str:
    return json.dumps(report, ensure_ascii=False, indent=2) + "\n"


async def live_report(store_path: Path, settings: Settings) -> dict[str, Any]:
    """The report of a live store: seconds since the first inbound message it stored.

    A live store forgets refused input once it is older than the dedupe window
    (``Store.prune``), so ``rejected``, and the dead letters among ``published``, cover that
    window; the incidents and every other message published are all there. A damaged or
    foreign store is refused (``Store.open``), a missing one is not created."""
    if not await asyncio.to_thread(store_path.is_file):
        raise StoreError(f"{store_path}: no such store")
    async with Store(store_path) as store:
        meta = dict(await store.fetchall("SELECT key, value FROM meta"))
        base = float(meta.get("first_inbound_at", "0"))
        return await build_report(store, settings, base=base)
