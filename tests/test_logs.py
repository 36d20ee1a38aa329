"""Logs: one JSON line per state change, ids bound, residents' numbers masked."""

from __future__ import annotations

import io
import json
from pathlib import Path

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
