"""Logs: one JSON line per state change, ids bound, residents' numbers masked."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from adapters.replay import replay
from dispatcher import logs
from dispatcher.settings import Settings

SEED = Path(__file__).parent / "data" / "chen_case.jsonl"


async def test_every_state_change_is_one_json_line_with_ids_and_masked_numbers(
    settings: Settings, tmp_path: Path
) -> None:
    stream = io.StringIO()
    logs.configure("info", stream)
    try:
        await replay(SEED, settings, tmp_path / "s.sqlite3")
    finally:
        logs.configure("warning")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    changes = [line for line in lines if line.get("incident_id")]
    assert [line["event"] for line in changes][:2] == ["opened", "rule_fired"]
    accepted = next(line for line in changes if line["event"] == "accepted")
    assert accepted["dispatch_id"] == "INC-C-20211015-0001:G-YJ-CH-01"
    assert accepted["level"] == "info" and "timestamp" in accepted
    text = stream.getvalue()
    assert "+8613800000001" not in text
    assert "+86138****0001" in text


def test_masking_keeps_ids_readable() -> None:
    assert logs.mask("INC-C-20211015-0001 from +8613800000001") == (
        "INC-C-20211015-0001 from +86138****0001"
    )
    assert logs.mask({"a": ["+85251230002"]}) == {"a": ["+85251****0002"]}


def test_held_lines_keep_their_moment_and_order_and_are_written_on_release() -> None:
    stream = io.StringIO()
    logs.configure("info", stream)
    log = structlog.get_logger("test")
    try:
        log.info("before", n=0)
        logs.hold()
        log.info("first", resident="+8613800000001")
        try:
            raise ValueError("the disk said no")
        except ValueError:
            log.info("second", exc_info=True)  # the exception as it was when logged
        held_at = datetime.now(UTC)
        time.sleep(0.01)
        assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["before"]
        logs.release()
        log.info("after")
    finally:
        logs.release()
        logs.configure("warning")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["before", "first", "second", "after"]
    assert lines[1]["resident"] == "+86138****0001"  # masked when written
    assert "ValueError: the disk said no" in lines[2]["exception"]
    for line in lines[1:3]:  # stamped when logged, not when written
        assert datetime.fromisoformat(line["timestamp"]) <= held_at


def test_a_warning_writes_every_held_line_at_once() -> None:
    stream = io.StringIO()
    logs.configure("info", stream)
    log = structlog.get_logger("test")
    try:
        logs.hold()
        log.info("held")
        log.warning("broker_unavailable")
        written = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
        log.info("not held any more")
        assert written == ["held", "broker_unavailable"]
        assert stream.getvalue().count("\n") == 3
    finally:
        logs.release()
        logs.configure("warning")


async def test_a_timeline_entry_is_logged_only_at_a_level_that_writes_it(
    settings: Settings, tmp_path: Path
) -> None:
    """Below ``info`` nothing of a timeline entry is written, and it is not even made into a
    line (``logs.info_enabled``); at ``info`` every entry is."""
    quiet, loud = io.StringIO(), io.StringIO()
    logs.configure("warning", quiet)
    try:
        assert not logs.info_enabled()
        await replay(SEED, settings, tmp_path / "quiet.sqlite3")
        logs.configure("info", loud)
        assert logs.info_enabled()
        await replay(SEED, settings, tmp_path / "loud.sqlite3")
    finally:
        logs.configure("warning")
    assert quiet.getvalue() == ""
    with sqlite3.connect(tmp_path / "loud.sqlite3") as db:
        entries = [kind for (kind,) in db.execute("SELECT kind FROM timeline ORDER BY seq")]
    logged = [json.loads(line)["event"] for line in loud.getvalue().splitlines()]
    assert len(entries) > 10
    assert [event for event in logged if event in set(entries)] == entries
