"""`antifraud whatif`: a candidate configuration judged on recorded cases (docs/whatif.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from adapters.whatif import whatif
from antifraud.cli import main
from dispatcher.comparison import compare, differences, percentiles
from dispatcher.settings import load_settings

CONFIG = Path("config/hengnan.toml")
DATA = Path(__file__).parent / "data"
SEED = DATA / "chen_case.jsonl"
INC = "INC-C-20211015-0001"
LONG_CALL = """[[rules]]
id = "long_call_flagged"
label = "涉诈号码通话满3分钟"
severity = "critical"
description = "A flagged number has been on the line for 3 minutes"
when = { flagged = true, min_duration_s = 180 }
"""
WATCH = """[[rules]]
id = "flagged_call_watch"
label = "涉诈号码通话满30秒"
severity = "warning"
description = "A flagged number has been on the line for 30 s"
when = { flagged = true, min_duration_s = 30 }
"""


def candidate(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    """The example deployment with ``edits`` made to its text, its registries where they are."""
    text = CONFIG.read_text(encoding="utf-8")
    registries = (CONFIG.parent / "hengnan").resolve()
    text = text.replace('= "hengnan/', f'= "{registries}/')
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "candidate.toml"
    path.write_text(text, encoding="utf-8")
    return path


RAISED = ("min_duration_s = 180", "min_duration_s = 400")
REMOVED = (LONG_CALL, "")


async def run(recordings: list[Path], baseline: Path, cand: Path) -> dict[str, Any]:
    return await whatif([str(r) for r in recordings], load_settings(baseline), load_settings(cand))


def only(report: dict[str, Any]) -> dict[str, Any]:
    (entry,) = report["incidents"]
    return entry


class TestTheSeedCase:
    async def test_a_longer_threshold_turns_it_critical_later(self, tmp_path: Path) -> None:
        entry = only(await run([SEED], CONFIG, candidate(tmp_path, RAISED)))
        assert entry["change"] == "changed"
        assert (entry["baseline"]["critical_at"], entry["candidate"]["critical_at"]) == (180, 420)
        assert "critical_at 180.0 → 420.0" in entry["differences"]

    async def test_a_longer_threshold_escalates_later(self, tmp_path: Path) -> None:
        entry = only(await run([SEED], CONFIG, candidate(tmp_path, RAISED)))
        # three no-answer callbacks escalated it at 255; now they come before it is
        # critical and count for nothing, and the callback window escalates it at 420 + 120
        assert (entry["baseline"]["escalated_at"], entry["candidate"]["escalated_at"]) == (255, 540)
        assert "escalated_at 255.0 → 540.0" in entry["differences"]

    async def test_a_longer_threshold_offers_every_unit_later(self, tmp_path: Path) -> None:
        entry = only(await run([SEED], CONFIG, candidate(tmp_path, RAISED)))
        before = {d["unit"]: d["offered_at"] for d in entry["baseline"]["dispatches"]}
        after = {d["unit"]: d["offered_at"] for d in entry["candidate"]["dispatches"]}
        assert before == dict.fromkeys(["G-YJ-CH-01", "G-YJ-CH-02", "P-YJ-01", "W-YJ-07"], 255)
        assert all(after[unit] == 540 for unit in before)
        assert "G-YJ-CH-01 offered_at 255.0 → 540.0" in entry["differences"]
        # the recorded replies answered the offers of 255: nobody accepts those of 540,
        # so the quick-police platforms and the next patrol are offered in turn
        assert "Q-YJ-YL newly offered (quick_police, at 570.0)" in entry["differences"]
        assert "P-YJ-02 newly offered (police, at 600.0)" in entry["differences"]
        assert "outcome prevented → —" in entry["differences"]

    async def test_without_the_rule_it_stays_a_warning(self, tmp_path: Path) -> None:
        entry = only(await run([SEED], CONFIG, candidate(tmp_path, REMOVED)))
        assert entry["change"] == "changed"
        assert entry["candidate"]["severity"] == "warning"
        assert entry["differences"][:3] == [
            "severity critical → warning",
            "rule long_call_flagged → flagged_call_watch",
            "status closed → open",
        ]
        assert "G-YJ-CH-01 no longer offered" in entry["differences"]
        assert "W-YJ-07 no longer notified" in entry["differences"]
        assert entry["candidate"]["dispatches"] == []

    async def test_without_any_rule_that_fires_it_is_gone(self, tmp_path: Path) -> None:
        cand = candidate(tmp_path, REMOVED, (WATCH, ""))
        entry = only(await run([SEED], CONFIG, cand))
        assert (entry["change"], entry["candidate"]) == ("gone", None)
        assert entry["baseline"]["id"] == INC

    async def test_the_other_way_round_it_is_new(self, tmp_path: Path) -> None:
        cand = candidate(tmp_path, REMOVED, (WATCH, ""))
        entry = only(await run([SEED], cand, CONFIG))
        assert (entry["change"], entry["baseline"]) == ("new", None)
        assert entry["candidate"]["outcome"] == "prevented"


class TestIdenticalConfigurations:
    async def test_every_incident_is_the_same(self) -> None:
        recordings = sorted((DATA / "golden").glob("spec-*.jsonl"))
        report = await run(recordings, CONFIG, CONFIG)
        assert len(report["incidents"]) > 20
        assert {e["change"] for e in report["incidents"]} == {"same"}
        assert all(e["differences"] == [] for e in report["incidents"])
        assert all(e["baseline"] == e["candidate"] for e in report["incidents"])
        summary = report["summary"]
        assert summary["changes"]["same"] == len(report["incidents"])
        assert summary["incidents_opened"]["baseline"] == summary["incidents_opened"]["candidate"]

    async def test_several_recordings_keep_an_id_apart_by_recording(self) -> None:
        recordings = [SEED, DATA / "golden" / "seed.jsonl"]
        report = await run(recordings, CONFIG, CONFIG)
        keys = [(e["recording"], e["id"]) for e in report["incidents"]]
        assert keys == [(str(SEED), INC), (str(DATA / "golden" / "seed.jsonl"), INC)]
        assert report["summary"]["incidents_opened"] == {"baseline": 2, "candidate": 2}


class TestSummary:
    async def test_figures_of_the_seed_case_raised_to_400s(self, tmp_path: Path) -> None:
        summary = (await run([SEED], CONFIG, candidate(tmp_path, RAISED)))["summary"]
        assert summary["changes"] == {"new": 0, "gone": 0, "changed": 1, "same": 0}
        assert summary["incidents_opened"] == {"baseline": 1, "candidate": 1}
        assert summary["turned_critical"] == {"baseline": 1, "candidate": 1}
        assert summary["escalated"] == {"baseline": 1, "candidate": 1}
        # baseline: two guards and a patrol; candidate: the same three expire, then two
        # quick-police platforms and the second patrol
        assert summary["door_knocks_offered"] == {"baseline": 3, "candidate": 6}
        assert summary["notices_sent"] == {"baseline": 1, "candidate": 1}
        assert summary["offered_by_role"] == {
            "guard": {"baseline": 2, "candidate": 2},
            "police": {"baseline": 1, "candidate": 2},
            "quick_police": {"baseline": 0, "candidate": 2},
            "grid_worker": {"baseline": 0, "candidate": 0},
        }
        assert summary["outcomes"]["prevented"] == {"baseline": 1, "candidate": 0}
        assert summary["outcomes"]["open"] == {"baseline": 0, "candidate": 1}
        durations = summary["durations"]
        # opened by the 30 s warning at 30; critical at 180 → 420; escalated 255 → 540
        assert durations["warning_to_critical"]["p50"] == {"baseline": 150, "candidate": 390}
        assert durations["warning_to_escalation"]["max"] == {"baseline": 225, "candidate": 510}
        assert durations["warning_to_first_acceptance"]["p90"] == {
            "baseline": 232,
            "candidate": None,
        }
        assert durations["warning_to_first_arrival"]["count"] == {"baseline": 1, "candidate": 0}

    @pytest.mark.parametrize(
        ("values", "expected"),
        [
            ([], {"count": 0, "p50": None, "p90": None, "max": None}),
            ([7.0], {"count": 1, "p50": 7.0, "p90": 7.0, "max": 7.0}),
            ([3.0, 1.0, 2.0], {"count": 3, "p50": 2.0, "p90": 3.0, "max": 3.0}),
            ([float(n) for n in range(10, 0, -1)], {"count": 10, "p50": 5, "p90": 9, "max": 10}),
        ],
    )
    def test_percentiles_are_values_that_occurred(
        self, values: list[float], expected: dict[str, Any]
    ) -> None:
        assert percentiles(values) == expected


def incident(**changes: Any) -> dict[str, Any]:
    expected = json.loads((DATA / "chen_case.expected.json").read_text(encoding="utf-8"))
    return {**expected["incidents"][0], **changes}


class TestDifferences:
    def test_an_unchanged_incident_has_none(self) -> None:
        assert differences(incident(), incident()) == []

    def test_a_dispatch_status_and_outcome_change(self) -> None:
        after = incident()
        after["dispatches"] = [dict(d) for d in after["dispatches"]]
        after["dispatches"][2].update(status="expired", outcome=None)
        assert differences(incident(), after) == [
            "P-YJ-01 status reported → expired",
            "P-YJ-01 outcome dissuaded → —",
        ]

    def test_entries_follow_the_baseline_then_what_only_the_candidate_opened(self) -> None:
        a, b, c = incident(id="INC-A"), incident(id="INC-B"), incident(id="INC-C")
        entries = compare("r.jsonl", [a, b], [c, b])
        assert [(e["id"], e["change"]) for e in entries] == [
            ("INC-A", "gone"),
            ("INC-B", "same"),
            ("INC-C", "new"),
        ]


class TestCommandLine:
    def test_writes_the_report_to_a_file(self, tmp_path: Path) -> None:
        out = tmp_path / "whatif.json"
        out.write_text("an older report", encoding="utf-8")  # written over, as replay does
        cand = candidate(tmp_path, RAISED)
        assert main(["whatif", str(SEED), "--config", str(cand), "--report", str(out)]) == 0
        report = json.loads(out.read_text(encoding="utf-8"))
        assert report["candidate_config"] == str(cand)
        assert report["baseline_config"] == str(CONFIG)
        assert only(report)["change"] == "changed"

    def test_writes_the_report_to_stdout(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        args = ["whatif", str(SEED), "--config", str(CONFIG), "--baseline", str(CONFIG)]
        assert main([*args, "--report", "-"]) == 0
        captured = capsys.readouterr()
        assert only(json.loads(captured.out))["change"] == "same"
        assert captured.err == ""  # nothing on stderr without --summary

    def test_summary_prints_a_table(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        cand = candidate(tmp_path, RAISED)
        args = ["whatif", str(SEED), "--config", str(cand), "--report", str(tmp_path / "r.json")]
        assert main([*args, "--summary"]) == 0
        table = capsys.readouterr().err
        assert "1 recording(s); incidents: 0 new, 0 gone, 1 changed, 0 same" in table
        assert re.search(r"door-knocks offered +3 +6  \*", table)
        assert re.search(r"turned critical +150\.0 / 150\.0 / 150\.0 +390\.0 / 390\.0 / 390", table)
        assert f"{INC} changed: status closed → escalated;" in table
        assert len(table.splitlines()) <= 30

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["nope.jsonl"], "nope.jsonl: cannot read the recording: No such file"),
            ([str(SEED), "nope.jsonl"], "nope.jsonl: cannot read the recording"),
            ([str(SEED), str(SEED)], "chen_case.jsonl: named twice"),
            ([str(SEED), "--baseline", "nope.toml"], "nope.toml: file not found"),
        ],
    )
    def test_bad_input_is_one_clear_error_and_exit_1(
        self,
        capsys: pytest.CaptureFixture[str],
        tmp_path: Path,
        args: list[str],
        message: str,
    ) -> None:
        out = tmp_path / "r.json"
        assert main(["whatif", *args, "--config", str(CONFIG), "--report", str(out)]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()

    def test_a_bad_candidate_names_its_file_and_problem(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        cand = candidate(tmp_path, ("min_duration_s = 180", "min_duration_s = -1"))
        assert main(["whatif", str(SEED), "--config", str(cand)]) == 1
        err = capsys.readouterr().err
        assert "configuration error" in err
        assert f"{cand}: " in err
        assert "min_duration_s" in err
