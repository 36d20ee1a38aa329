"""`antifraud stats`: outcomes per rule and per unit, read from stores built by replays."""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from adapters.replay import replay
from adapters.stats import read_store
from antifraud.cli import main
from dispatcher.outcomes import behind, figures, precision
from dispatcher.settings import Settings, load_settings

CONFIG = Path("config/hengnan.toml")
DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(CONFIG)


async def store_of(recording: Path, tmp_path: Path, settings: Settings) -> Path:
    path = tmp_path / f"{recording.stem}.sqlite3"
    await replay(recording, settings, path)
    return path


def stats(store: Path, timezone: str = "Asia/Shanghai", **days: date) -> dict[str, Any]:
    incidents, dispatches, origin = read_store(store)
    return figures(incidents, dispatches, origin, timezone, days.get("first"), days.get("last"))


def counts(**nonzero: int) -> dict[str, int]:
    names = ("prevented", "loss", "false_alarm", "unreachable", "resolved_by_callback", "open")
    return {name: nonzero.get(name, 0) for name in names}


class TestTheSeedCase:
    """Ms. Chen's case: warned at 30, escalated at 255; guard 01 accepts at 262 and is at the
    door at 420, patrol 01 accepts at 280 and arrives at 1155; both dissuade her."""

    async def test_outcomes_and_the_rule(self, tmp_path: Path, settings: Settings) -> None:
        figures_ = stats(await store_of(DATA / "chen_case.jsonl", tmp_path, settings))
        assert figures_["incidents"] == 1
        assert figures_["outcomes"] == counts(prevented=1)
        assert figures_["rules"] == {
            "long_call_flagged": {"incidents": 1, "outcomes": counts(prevented=1), "precision": 1.0}
        }

    async def test_each_unit(self, tmp_path: Path, settings: Settings) -> None:
        units = stats(await store_of(DATA / "chen_case.jsonl", tmp_path, settings))["units"]
        guard = units["G-YJ-CH-01"]
        assert (guard["role"], guard["offers"], guard["accepted"]) == ("guard", 1, 1)
        assert guard["to_accept"] == {"count": 1, "p50": 7.0, "p90": 7.0}  # 255 → 262
        assert guard["to_arrive"] == {"count": 1, "p50": 158.0, "p90": 158.0}  # 262 → 420
        other = units["G-YJ-CH-02"]  # stood down when 01 took it
        assert (other["offers"], other["accepted"], other["withdrawn"]) == (1, 0, 1)
        patrol = units["P-YJ-01"]
        assert patrol["to_accept"]["p50"] == 25.0  # 255 → 280
        assert patrol["to_arrive"]["p50"] == 875.0  # 280 → 1155
        grid = units["W-YJ-07"]
        assert (grid["offers"], grid["notices"]) == (0, 1)

    async def test_by_role_and_to_the_door(self, tmp_path: Path, settings: Settings) -> None:
        figures_ = stats(await store_of(DATA / "chen_case.jsonl", tmp_path, settings))
        guards = figures_["roles"]["guard"]
        assert (guards["offers"], guards["accepted"], guards["withdrawn"]) == (2, 1, 1)
        # warned at 30, the guard at the door at 420
        assert figures_["warning_to_first_arrival"] == {
            "count": 1,
            "p50": 390.0,
            "p90": 390.0,
            "max": 390.0,
        }
        assert [(d["date"], d["incidents"]) for d in figures_["daily"]] == [("2021-10-15", 1)]

    async def test_the_histogram_to_the_door(self, tmp_path: Path, settings: Settings) -> None:
        figures_ = stats(await store_of(DATA / "chen_case.jsonl", tmp_path, settings))
        histogram = figures_["warning_to_first_arrival_histogram"]
        assert [(b["from_s"], b["to_s"]) for b in histogram][:2] == [(0, 300), (300, 600)]
        assert histogram[-1]["to_s"] is None
        assert [b["incidents"] for b in histogram] == [0, 1, 0, 0, 0, 0, 0]  # 390 s

    async def test_the_incidents_behind_each_figure(
        self, tmp_path: Path, settings: Settings
    ) -> None:
        store = await store_of(DATA / "chen_case.jsonl", tmp_path, settings)
        keys = behind(*read_store(store), "Asia/Shanghai")
        seed = ["INC-C-20211015-0001"]
        for key in (
            "all",
            "outcome:prevented",
            "rule:long_call_flagged",
            "rule:long_call_flagged:prevented",
            "day:2021-10-15",
            "unit:G-YJ-CH-01",
            "unit:W-YJ-07",
            "role:guard",
            "arrived",
            "arrival:1",
        ):
            assert keys[key] == seed, key
        assert keys["arrival:0"] == [] and "outcome:loss" not in keys
        assert behind(*read_store(store), "Asia/Shanghai", date(2021, 10, 16))["arrived"] == []


class TestADay:
    """The day recording starts at 2026-01-01T00:00Z (08:00 in Hengnan): its last two incidents
    open after 16:00 UTC, on the 2nd in Hengnan."""

    async def test_the_daily_trend_is_in_the_deployments_zone(
        self, tmp_path: Path, settings: Settings
    ) -> None:
        store = await store_of(GOLDEN / "day.jsonl", tmp_path, settings)
        daily = stats(store)["daily"]
        assert [(d["date"], d["incidents"], d["escalated"]) for d in daily] == [
            ("2026-01-01", 8, 8),
            ("2026-01-02", 2, 2),
        ]
        assert [d["date"] for d in stats(store, "UTC")["daily"]] == ["2026-01-01"]

    async def test_from_and_to_choose_days(self, tmp_path: Path, settings: Settings) -> None:
        store = await store_of(GOLDEN / "day.jsonl", tmp_path, settings)
        assert stats(store, first=date(2026, 1, 2))["incidents"] == 2
        assert stats(store, last=date(2026, 1, 1))["incidents"] == 8
        assert stats(store, first=date(2026, 1, 3))["incidents"] == 0

    async def test_per_rule(self, tmp_path: Path, settings: Settings) -> None:
        rules = stats(await store_of(GOLDEN / "day.jsonl", tmp_path, settings))["rules"]
        assert {rule: r["incidents"] for rule, r in rules.items()} == {
            "impersonation_long_call": 4,
            "long_call_flagged": 4,
            "vulnerable_long_call": 2,
        }

    async def test_offers_nobody_answered(self, tmp_path: Path, settings: Settings) -> None:
        figures_ = stats(await store_of(GOLDEN / "day.jsonl", tmp_path, settings))
        # nobody on the radio that day: every offer expired, operators closed them all
        guards = figures_["roles"]["guard"]
        assert (guards["offers"], guards["expired"], guards["accepted"]) == (14, 14, 0)
        assert figures_["warning_to_first_arrival"]["count"] == 0


@pytest.mark.parametrize(
    ("recording", "rule", "outcomes", "expected"),
    [
        ("spec-56", "long_call_flagged", counts(false_alarm=1), 0.0),
        ("spec-17", "flagged_call_watch", counts(false_alarm=1, open=1), 0.0),
        ("spec-33", "long_call_flagged", counts(prevented=1, open=1), 1.0),
        ("spec-23", "long_call_flagged", counts(resolved_by_callback=1), None),
    ],
)
async def test_a_rules_precision_counts_only_known_answers(
    tmp_path: Path,
    settings: Settings,
    recording: str,
    rule: str,
    outcomes: dict[str, int],
    expected: float | None,
) -> None:
    rules = stats(await store_of(GOLDEN / f"{recording}.jsonl", tmp_path, settings))["rules"]
    assert rules[rule]["outcomes"] == outcomes
    assert rules[rule]["precision"] == expected


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ({"prevented": 2, "loss": 1, "false_alarm": 1}, 0.75),
        ({"loss": 1, "unreachable": 5}, 1.0),
        ({"false_alarm": 3, "open": 2}, 0.0),
        ({"unreachable": 1, "open": 1}, None),
    ],
)
def test_precision_is_real_scams_among_judged(outcomes: dict[str, int], expected: float) -> None:
    assert precision(outcomes) == expected


class TestCommandLine:
    async def test_json_to_a_file_leaves_the_store_as_it_was(
        self, tmp_path: Path, settings: Settings
    ) -> None:
        store = await store_of(DATA / "chen_case.jsonl", tmp_path, settings)
        before = hashlib.sha256(store.read_bytes()).hexdigest()
        out = tmp_path / "stats.json"
        assert main(["stats", "--store", str(store), "--json", str(out)]) == 0
        written = json.loads(out.read_text(encoding="utf-8"))
        assert (written["store"], written["timezone"]) == (str(store), "Asia/Shanghai")
        assert written["outcomes"]["prevented"] == 1
        assert hashlib.sha256(store.read_bytes()).hexdigest() == before

    async def test_json_to_stdout_with_days(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path, settings: Settings
    ) -> None:
        store = await store_of(GOLDEN / "day.jsonl", tmp_path, settings)
        args = ["stats", "--store", str(store), "--from", "2026-01-02", "--to", "2026-01-02"]
        assert main(args) == 0
        written = json.loads(capsys.readouterr().out)
        assert (written["from"], written["to"], written["incidents"]) == (
            "2026-01-02",
            "2026-01-02",
            2,
        )

    async def test_html_alone_writes_a_self_contained_report(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path, settings: Settings
    ) -> None:
        store = await store_of(GOLDEN / "day.jsonl", tmp_path, settings)
        out = tmp_path / "report" / "stats.html"
        assert main(["stats", "--store", str(store), "--html", str(out)]) == 0
        assert capsys.readouterr().out == ""
        page = out.read_text(encoding="utf-8")
        assert page.count("<svg") == 3
        assert "@page { size: A4" in page
        assert "<script" not in page and "src=" not in page and "href=" not in page
        assert "按结果" in page and "每日趋势" in page and "2026-01-02" in page

    async def test_html_and_json_together(self, tmp_path: Path, settings: Settings) -> None:
        store = await store_of(DATA / "chen_case.jsonl", tmp_path, settings)
        html, out = tmp_path / "s.html", tmp_path / "s.json"
        args = ["stats", "--store", str(store), "--html", str(html), "--json", str(out)]
        assert main(args) == 0
        assert json.loads(out.read_text(encoding="utf-8"))["incidents"] == 1
        assert "陈" not in html.read_text(encoding="utf-8")  # figures, not residents

    def test_a_missing_store_is_one_clear_error(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        assert main(["stats", "--store", str(tmp_path / "nope.sqlite3")]) == 1
        assert "nope.sqlite3: no such store" in capsys.readouterr().err
        assert not (tmp_path / "nope.sqlite3").exists()

    def test_a_file_that_is_no_store_is_one_clear_error(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        other = tmp_path / "notes.txt"
        other.write_text("not a database\n", encoding="utf-8")
        assert main(["stats", "--store", str(other)]) == 1
        assert "notes.txt: not a dispatcher store" in capsys.readouterr().err

    def test_a_bad_date_is_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_:
            main(["stats", "--store", "x.sqlite3", "--from", "15/10/2021"])
        assert exit_.value.code == 2
        assert "'15/10/2021' is not a date (YYYY-MM-DD)" in capsys.readouterr().err
