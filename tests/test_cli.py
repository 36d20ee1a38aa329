"""The `antifraud` command line, run in-process as a user would run it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.broker import mosquitto_binary
from antifraud.cli import main

DATA = Path(__file__).parent / "data"
CONFIG = Path(__file__).parents[1] / "config" / "hengnan.toml"
SEED = DATA / "chen_case.jsonl"
EXPECTED = json.loads((DATA / "chen_case.expected.json").read_text(encoding="utf-8"))


def test_replay_writes_the_report_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(SEED), "--config", "config/hengnan.toml", "--report", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["incidents"] == EXPECTED["incidents"]


def test_replay_until_then_resume_writes_the_same_report(tmp_path: Path) -> None:
    store, first, second = tmp_path / "s.sqlite3", tmp_path / "a.json", tmp_path / "b.json"
    args = ["replay", str(SEED), "--store", str(store)]
    assert main([*args, "--until", "300", "--report", str(first)]) == 0
    partial = json.loads(first.read_text(encoding="utf-8"))
    assert partial["incidents"][0]["status"] == "escalated"
    assert main([*args, "--report", str(second)]) == 0
    assert json.loads(second.read_text(encoding="utf-8"))["incidents"] == EXPECTED["incidents"]


def test_a_second_dispatcher_on_the_same_store_is_refused_before_it_connects(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import os

    from adapters.store import WriterLock

    store = tmp_path / "live.sqlite3"
    running = WriterLock(store)  # the first dispatcher, as far as the store is concerned
    running.acquire()
    try:
        args = ["run", "--store", str(store), "--broker", "mqtt://127.0.0.1:9"]
        assert main(args) == 1
    finally:
        running.release()
    err = capsys.readouterr().err
    assert f"live.sqlite3: already in use by pid {os.getpid()} on " in err
    assert "stop that one first, or use another --store" in err
    assert "broker_connecting" not in err  # refused before it took the broker connection


def test_replay_summary_is_readable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["replay", str(SEED), "--report", str(tmp_path / "r.json"), "--summary"]) == 0
    err = capsys.readouterr().err
    assert "INC-C-20211015-0001  CLOSED  outcome=prevented" in err
    assert "G-YJ-CH-01" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "nope.jsonl"], "nope.jsonl: cannot read the recording"),
        (["replay", str(SEED), "--config", "nope.toml"], "nope.toml: file not found"),
    ],
)
def test_errors_are_one_clear_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(args) == 1
    assert message in capsys.readouterr().err


def bench(*args: str) -> str:
    """What ``antifraud bench ARGS`` prints (a figure's presence is tested, never its value)."""
    return subprocess.run(
        [sys.executable, "-m", "antifraud.cli", "bench", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout


def test_output_cut_short_by_its_reader_ends_quietly() -> None:
    """`antifraud replay … --report - | head`: a reader that has gone before the report is
    written (here at once); the command ends without a traceback on the engineer's terminal."""
    command = f"{sys.executable} -m antifraud.cli replay {SEED} --config {CONFIG} --report - | true"
    run = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr, run.stderr
    assert run.returncode == 141


def test_bench_replay_prints_its_figures() -> None:
    out = bench("replay", "--events", "3000", "--active", "2000")
    for figure in ("events/s", "replay / json.loads", "peak RSS", "concurrently active calls"):
        assert figure in out


@pytest.mark.broker
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_bench_live_prints_its_figures() -> None:
    out = bench("live", "--events", "1000", "--samples", "5")
    figures = (
        "(a) bare",
        "taking each message as paho decodes it",
        "(b) dispatcher",
        "(b)/(a)",
        "against the subscriber taking messages as decoded",
        "p99 dispatcher / p99 bare",
        "bare relay",
    )
    for figure in figures:
        assert figure in out
    assert ", 0 rejected" in out  # the backlog of (b) passes the per-source rate limit


@pytest.mark.broker
@pytest.mark.skipif(
    mosquitto_binary() is None or not shutil.which("mosquitto_pub") or not shutil.which("openssl"),
    reason="mosquitto, mosquitto_pub and openssl are needed",
)
def test_bench_flood_prints_its_figures_and_its_verdict() -> None:
    args = ["flood", "--samples", "4", "--flood", "3000", "--calls", "6", "--check"]
    run = subprocess.run(
        [sys.executable, "-m", "antifraud.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = run.stdout
    assert "running config/mosquitto/production.conf" in out, run.stderr
    rows = {row[0]: row[1:] for row in (line.split() for line in out.splitlines()) if row}
    for phase in ("unloaded", "flood"):  # samples, then p50, p90, p99, max: ordered, measured
        figures = [float(value) for value in rows[phase]]
        assert figures[0] == 4 and 0 < figures[1] <= figures[2] <= figures[3] <= figures[4], out
    sent = re.search(r"([\d,]+) sent in (\d+) runs .* received by the dispatcher ([\d,]+)", out)
    assert sent is not None, out
    assert int(sent[1].replace(",", "")) == 3000 * int(sent[2]) > 0
    assert int(sent[3].replace(",", "")) > 0  # the flood reached the dispatcher
    assert re.search(r"^p99 flood / p99 unloaded = \d+\.\d\d", out, re.M), out
    assert "6 of 6 opened their incidents during the flood" in out
    verdict = out.splitlines()[-1].split(":")[0]
    assert verdict in ("PASS", "FAIL") and run.returncode == (verdict == "FAIL"), out


def test_bench_escalation_prints_a_row_per_idle_pause() -> None:
    out = bench("escalation", "--samples", "5", "--idle", "0", "3")
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:2] for row in rows] == [["0", "ms"], ["3", "ms"]], out
    for row in rows:  # handled p50 / p90, written p50 / p90, both: all measured, all positive
        figures = [float(value) for value in row[2:] if value != "/"]
        assert len(figures) == 5 and all(value > 0 for value in figures), out


def test_a_replay_can_pass_over_a_last_line_cut_short_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a crash, a recording's last line is often cut short: by default the replay
    stops at it, naming the line; with --skip-bad-lines it reports what it skipped and
    writes the report of the rest, the same as the recording without that line."""
    seed = Path(__file__).parent / "data" / "chen_case.jsonl"
    whole = seed.read_text(encoding="utf-8")
    cut = tmp_path / "cut.jsonl"
    last = whole.splitlines()[-1]
    cut.write_text(whole + last[: len(last) // 2], encoding="utf-8")
    lines = len(whole.splitlines())
    assert main(["replay", str(cut), "--report", str(tmp_path / "a.json")]) == 1
    assert f"{cut}:{lines + 1}: not JSON" in capsys.readouterr().err
    args = ["replay", str(cut), "--skip-bad-lines", "--report", str(tmp_path / "b.json")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"skipped: {cut}:{lines + 1}: not JSON" in err
    assert "skipped 1 line(s)" in err
    assert main(["replay", str(seed), "--report", str(tmp_path / "c.json")]) == 0
    assert (tmp_path / "b.json").read_text() == (tmp_path / "c.json").read_text()


def test_every_command_and_option_says_what_it_is_for() -> None:
    import argparse

    from antifraud.cli import build_parser

    silent: list[str] = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    walk(sub, f"{name} {command}")
                for choice in action._choices_actions:
                    if not choice.help:
                        silent.append(f"{name} {choice.dest}")
            elif not action.help:
                silent.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "antifraud")
    assert silent == []


@pytest.mark.broker
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_sigterm_to_the_demo_stops_its_broker_and_removes_its_files(tmp_path: Path) -> None:
    import os
    import signal
    import threading
    import time

    private = tmp_path / "tmp"
    private.mkdir()
    demo = subprocess.Popen(
        [sys.executable, "-m", "antifraud.cli", "demo", "--speed", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(private)},
    )
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # the case is under way
            if "playing" in line:
                break
        # the demo goes on printing the case: read it, or a full pipe stops the demo mid-write
        drain = threading.Thread(target=demo.stdout.read, daemon=True)
        drain.start()
        children = subprocess.run(
            ["ps", "-o", "pid=,comm=", "--ppid", str(demo.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        pairs = zip(children[::2], children[1::2], strict=True)
        brokers = [int(pid) for pid, name in pairs if "mosq" in name]
        assert brokers, children
        assert any(private.iterdir())  # the broker's and the store's folders
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 143
        deadline = time.monotonic() + 5
        while any(os.path.exists(f"/proc/{pid}") for pid in brokers):
            assert time.monotonic() < deadline, "the demo's broker outlived it"
            time.sleep(0.05)
        assert list(private.iterdir()) == []
    finally:
        if demo.poll() is None:
            demo.kill()


def test_the_console_command_serves_its_login_page_and_stops_on_sigterm(tmp_path: Path) -> None:
    """``antifraud console`` as an operator starts it: on a store, with its broker away."""
    import signal
    import time
    import urllib.request

    from adapters.broker import free_port

    store = tmp_path / "s.sqlite3"
    assert main(["replay", str(SEED), "--store", str(store), "--report", str(tmp_path / "r")]) == 0
    port = free_port()
    args = ["console", "--store", str(store), "--broker", "mqtt://127.0.0.1:9"]
    console = subprocess.Popen(
        [sys.executable, "-m", "antifraud.cli", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        page = ""
        deadline = time.monotonic() + 30
        while not page and time.monotonic() < deadline and console.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2) as r:
                    page = r.read().decode("utf-8")
            except OSError:
                time.sleep(0.2)
        assert console.poll() is None, console.communicate()[1][-2000:]
        assert "<form" in page
    finally:
        console.send_signal(signal.SIGTERM)
        _, err = console.communicate(timeout=30)
    assert "Traceback" not in err, err[-2000:]
