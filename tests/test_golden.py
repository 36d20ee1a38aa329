"""Replay reports that must not change: every recording under ``tests/data/golden/`` (the seed
case, every SPEC §5 case of ``test_workflow_spec.py``, a synthetic day) and a synthetic scam
wave are replayed and their reports compared, byte for byte, with the reports committed
beside them. A change to how the dispatcher is built must leave every one identical; a change
to what it decides must regenerate them on purpose, and say why in its commit:

    .venv/bin/python tests/test_golden.py --write      # the recordings and their reports
    .venv/bin/python tests/test_golden.py --reports    # the reports of the recordings as they are
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from adapters.replay import replay  # noqa: E402
from adapters.report import dump_report  # noqa: E402
from dispatcher import logs  # noqa: E402
from dispatcher.settings import Settings, load_settings  # noqa: E402
from tools.bench_replay import write_day, write_wave  # noqa: E402

GOLDEN = ROOT / "tests" / "data" / "golden"
CONFIG = ROOT / "config" / "hengnan.toml"
WAVE_CASES = 20


def recordings() -> list[Path]:
    return sorted(GOLDEN.glob("*.jsonl"))


async def report_of(recording: Path, settings: Settings, tmp: Path) -> str:
    store = tmp / f"{recording.stem}.sqlite3"
    return dump_report(await replay(recording, settings, store))


@pytest.mark.parametrize("recording", recordings(), ids=lambda p: p.stem)
async def test_a_recordings_report_is_unchanged(recording: Path, tmp_path: Path) -> None:
    expected = recording.with_suffix(".report.json").read_text(encoding="utf-8")
    assert await report_of(recording, load_settings(CONFIG), tmp_path) == expected


async def test_a_scam_waves_report_is_unchanged(tmp_path: Path) -> None:
    config, _ = write_wave(tmp_path, load_settings(CONFIG), WAVE_CASES)
    report = await report_of(tmp_path / "wave.jsonl", load_settings(config), tmp_path)
    assert report == (GOLDEN / "wave.report").read_text(encoding="utf-8")


def test_the_corpus_is_all_there() -> None:
    names = {p.stem for p in recordings()}
    assert {"seed", "day"} <= names
    assert sum(n.startswith("spec-") for n in names) >= 57


async def _write(recordings_too: bool) -> None:
    """Regenerate the reports from the current code, and first the corpus itself when
    ``recordings_too`` (the spec cases' recordings are numbered in the order of the cases)."""
    from scenario import Script
    from test_workflow_spec import CASES

    logs.configure("error")
    settings = load_settings(CONFIG)
    if recordings_too:
        shutil.rmtree(GOLDEN, ignore_errors=True)
        GOLDEN.mkdir(parents=True)
        shutil.copy(ROOT / "tests" / "data" / "chen_case.jsonl", GOLDEN / "seed.jsonl")
        write_day(GOLDEN / "day.jsonl", settings, 1_500)
        for n, param in enumerate(CASES, 1):
            script = Script()
            param.values[0](script)  # type: ignore[attr-defined]
            script.write(GOLDEN / f"spec-{n:02d}.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        for recording in recordings():
            report = await report_of(recording, settings, Path(tmp))
            recording.with_suffix(".report.json").write_text(report, encoding="utf-8")
        wave = Path(tmp) / "wave"
        config, _ = write_wave(wave, settings, WAVE_CASES)
        report = await report_of(wave / "wave.jsonl", load_settings(config), Path(tmp))
        (GOLDEN / "wave.report").write_text(report, encoding="utf-8")
    what = "recordings and their reports" if recordings_too else "recordings' reports"
    print(f"wrote {len(recordings())} {what}, and the wave's, to {GOLDEN}")


if __name__ == "__main__":
    import asyncio

    if sys.argv[1:] not in (["--write"], ["--reports"]):
        sys.exit(__doc__)
    asyncio.run(_write(sys.argv[1:] == ["--write"]))
