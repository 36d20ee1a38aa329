"""`antifraud export`: a real case from a store becomes a recording that replays the same."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from adapters.broker import Mosquitto, mosquitto_binary
from adapters.live import Clock, LiveService
from adapters.mqtt import BrokerURL
from adapters.recorder import publish_recording
from adapters.recording import read_lines
from adapters.replay import replay
from adapters.store import Store
from adapters.whatif import whatif
from antifraud.cli import main
from dispatcher.settings import Settings

DATA = Path(__file__).parent / "data"
SEED = DATA / "chen_case.jsonl"
INC = "INC-C-20211015-0001"
TIMES = ("opened_at", "critical_at", "escalated_at", "closed_at")
DISPATCH_TIMES = ("offered_at", "accepted_at", "arrived_at")


def entry(report: dict[str, Any], incident_id: str = INC) -> dict[str, Any]:
    """The report's entry of the incident, its times from the first message of the run."""
    (found,) = [i for i in report["incidents"] if i["id"] == incident_id]
    return found


def shifted(entry: dict[str, Any], by: float) -> dict[str, Any]:
    def t(value: float | None) -> float | None:
        return None if value is None else round(value - by, 6)

    return {
        **entry,
        **{k: t(entry[k]) for k in TIMES},
        "dispatches": [{**d, **{k: t(d[k]) for k in DISPATCH_TIMES}} for d in entry["dispatches"]],
    }


async def replayed_store(settings: Settings, tmp_path: Path, recording: Path = SEED) -> Path:
    store = tmp_path / "replay.sqlite3"
    await replay(recording, settings, store)
    return store


def export(*args: str) -> int:
    return main(["export", *args])


class TestExportOfAnIncident:
    async def test_the_export_of_a_replayed_incident_replays_to_the_same_incident(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        original = await replay(SEED, settings)
        store = await replayed_store(settings, tmp_path)
        out = tmp_path / "case.jsonl"
        assert export("--store", str(store), "--incident", INC, "--out", str(out)) == 0
        again = await replay(out, settings)
        assert [i["id"] for i in again["incidents"]] == [INC]
        assert entry(again) == entry(original)  # the seed's first message is at 0 already

    async def test_the_export_starts_at_0_and_keeps_the_times_between_messages(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        """A recording whose first message arrives at 500 s exports from 0: the incident's
        times are those of the original, less 500 s."""
        late = tmp_path / "late.jsonl"
        late.write_text(
            "".join(
                json.dumps({"at": line.at + 500, "topic": line.topic, "payload": line.payload})
                + "\n"
                for line in read_lines(SEED)
            ),
            encoding="utf-8",
        )
        original = await replay(late, settings)
        store = await replayed_store(settings, tmp_path, late)
        out = tmp_path / "case.jsonl"
        assert export("--store", str(store), "--incident", INC, "--out", str(out)) == 0
        assert next(read_lines(out)).at == 0.0
        assert entry(await replay(out, settings)) == shifted(entry(original), 500)

    async def test_the_payloads_are_written_back_as_received(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        store = await replayed_store(settings, tmp_path)
        out = tmp_path / "case.jsonl"
        export("--store", str(store), "--incident", INC, "--out", str(out))
        seed = [(line.topic, line.payload) for line in read_lines(SEED)]
        exported = [(line.topic, line.payload) for line in read_lines(out)]
        assert exported == [m for m in seed if m in exported]
        assert exported[0] == seed[0]  # the call.started before the incident opened

    async def test_an_exported_incident_is_a_recording_whatif_reads(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        store = await replayed_store(settings, tmp_path)
        out = tmp_path / "case.jsonl"
        export("--store", str(store), "--incident", INC, "--out", str(out))
        report = await whatif([str(out)], settings, settings)
        assert [(e["id"], e["change"]) for e in report["incidents"]] == [(INC, "same")]
        assert report["incidents"][0]["baseline"] == entry(await replay(SEED, settings))


class TestExportOfARange:
    async def test_a_range_holds_the_messages_kept_within_it(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        """The seed case is on 2021-10-15 from 14:00 (+08:00): its day holds all of it, and
        a range that stops at 14:01 only the messages before."""
        store = await replayed_store(settings, tmp_path)
        day = tmp_path / "day.jsonl"
        args = ["--store", str(store), "--from", "2021-10-15", "--to", "2021-10-15"]
        assert export(*args, "--out", str(day)) == 0
        assert entry(await replay(day, settings))["outcome"] == "prevented"
        part = tmp_path / "part.jsonl"
        window = ["--from", "2021-10-15T14:00:00", "--to", "2021-10-15T14:01:00+08:00"]
        assert export("--store", str(store), *window, "--out", str(part)) == 0
        assert [line.at for line in read_lines(part)] == [0.0, 30.0]

    async def test_a_range_with_nothing_in_it_is_refused(
        self, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        store = await replayed_store(settings, tmp_path)
        out = tmp_path / "none.jsonl"
        args = ["--store", str(store), "--from", "2021-10-16", "--to", "2021-10-16"]
        assert export(*args, "--out", str(out)) == 1
        assert "no kept inbound messages" in capsys.readouterr().err
        assert not out.exists()


class TestRefusals:
    async def test_an_existing_out_is_never_written_over(
        self, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        store = await replayed_store(settings, tmp_path)
        out = tmp_path / "case.jsonl"
        out.write_text("keep me\n", encoding="utf-8")
        assert export("--store", str(store), "--incident", INC, "--out", str(out)) == 1
        assert "already exists" in capsys.readouterr().err
        assert out.read_text(encoding="utf-8") == "keep me\n"

    async def test_an_unknown_incident_is_named(
        self, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        store = await replayed_store(settings, tmp_path)
        out = tmp_path / "case.jsonl"
        assert export("--store", str(store), "--incident", "INC-X", "--out", str(out)) == 1
        assert "no incident 'INC-X'" in capsys.readouterr().err
        assert not out.exists()

    @pytest.mark.parametrize(
        "content", [None, b"not a database at all", b""], ids=["missing", "text", "empty"]
    )
    def test_a_store_that_is_not_one_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None
    ) -> None:
        store = tmp_path / "store.sqlite3"
        if content is not None:
            store.write_bytes(content)
        out = tmp_path / "case.jsonl"
        assert export("--store", str(store), "--incident", INC, "--out", str(out)) == 1
        err = capsys.readouterr().err
        assert "no such store" in err or "not a dispatcher store" in err
        assert not out.exists()

    async def test_the_store_is_read_not_written(self, settings: Settings, tmp_path: Path) -> None:
        store = await replayed_store(settings, tmp_path)
        before = store.read_bytes()
        export("--store", str(store), "--incident", INC, "--out", str(tmp_path / "case.jsonl"))
        assert store.read_bytes() == before

    def test_either_an_incident_or_a_range(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        out = str(tmp_path / "x.jsonl")
        assert export("--store", "s", "--out", out) == 1
        assert export("--store", "s", "--incident", INC, "--from", "2021-10-15", "--out", out) == 1
        assert export("--store", "s", "--from", "2021-10-15", "--out", out) == 1
        assert "--from and --to" in capsys.readouterr().err


class TestRetention:
    async def test_a_live_store_forgets_the_messages_of_incidents_past_retention(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        store = await replayed_store(settings, tmp_path)
        async with Store(store) as opened:
            opened.set_meta("mode", "live")
            await opened.commit()
            retention = settings.incident.retention_s
            await opened.prune(0.0, 0.0, (1500.0 + retention - 1, -1.0))
            kept = await opened.fetchall("SELECT COUNT(*) FROM incident_inbound")
            assert kept[0][0] > 0  # closed at 1500: still retained
            await opened.prune(0.0, 0.0, (1500.0 + 1, 1.0))
            left = await opened.fetchall("SELECT incident_id, at FROM incident_inbound")
        assert left == []  # its messages, and the contact at 0 that opened nothing

    async def test_a_replay_store_keeps_them(self, settings: Settings, tmp_path: Path) -> None:
        store = await replayed_store(settings, tmp_path)
        async with Store(store) as opened:
            await opened.prune(0.0, 0.0, (1e12, 1e12))
            kept = await opened.fetchall("SELECT COUNT(*) FROM incident_inbound")
        assert kept[0][0] > 0


@pytest.mark.broker
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
async def test_the_live_service_keeps_what_an_export_replays(
    settings: Settings, broker: Mosquitto, tmp_path: Path
) -> None:
    store = tmp_path / "live.sqlite3"
    stop = asyncio.Event()
    service = LiveService(
        settings, BrokerURL.parse(broker.url), store, Clock(speed=100.0), client_id="export-test"
    )
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        await publish_recording(SEED, BrokerURL.parse(broker.url), speed=100.0)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    out = tmp_path / "case.jsonl"
    assert export("--store", str(store), "--incident", INC, "--out", str(out)) == 0
    again, original = entry(await replay(out, settings)), entry(await replay(SEED, settings))
    assert again["outcome"] == original["outcome"] == "prevented"
    assert [d["status"] for d in again["dispatches"]] == [
        d["status"] for d in original["dispatches"]
    ]
    for key in TIMES:  # the live clock ran 100 times faster than the recording's
        assert again[key] == pytest.approx(original[key], abs=3)
    with sqlite3.connect(store) as db:
        assert db.execute("SELECT COUNT(*) FROM incident_inbound").fetchone()[0] > 0
