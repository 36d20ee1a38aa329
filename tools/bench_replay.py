"""``antifraud bench replay``: a synthetic day replayed, with figures printed.

Each measurement runs in a fresh child process so its peak RSS is its own:

1. a bare ``json.loads`` pass over every line of the day's recording (the baseline);
2. the full replay of the same file (validation, rules, workflow, SQLite store, report);
3. a recording of N concurrently active calls (started, none ended yet) to size the state.
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dispatcher.inbound import call_data, cloudevent
from dispatcher.model import incident_of_call
from dispatcher.settings import Settings

PREFIX = "antifraud/v1"
CLEAN_PREFIXES = ("+86139", "+86137", "+86186", "+86158")


class DayWriter:
    """Writes a recording line by line with CloudEvents ids unique per source."""

    def __init__(self, handle: Any, region: str) -> None:
        self.handle = handle
        self.region = region
        self.seq = 0
        self.lines = 0

    def event(
        self, at: float, topic: str, source: str, type_: str, subject: str, data: dict[str, Any]
    ) -> None:
        self.seq += 1
        payload = cloudevent(
            f"bench-{self.seq:08d}",
            source,
            f"cn.antifraud.{type_}",
            data,
            subject=subject,
            time="2026-01-01T00:00:00Z",
        )
        self.handle.write(
            json.dumps(
                {"at": round(at, 3), "topic": topic, "payload": payload}, separators=(",", ":")
            )
            + "\n"
        )
        self.lines += 1

    def call(
        self,
        at: float,
        verb: str,
        call_id: str,
        sub: str,
        other: str,
        duration: float | None = None,
    ) -> None:
        data = call_data(verb, call_id, sub, other, duration)
        self.event(
            at,
            f"{PREFIX}/events/{self.region}/calls",
            f"carrier/{self.region}",
            f"call.{verb}",
            call_id,
            data,
        )

    def action(self, at: float, verb: str, data: dict[str, Any]) -> None:
        self.event(
            at,
            f"{PREFIX}/operators/op-01/actions",
            "console/op-01",
            f"operator.{verb}",
            data["incident_id"],
            data,
        )

    def reply(
        self, at: float, unit: str, verb: str, dispatch_id: str, outcome: str | None = None
    ) -> None:
        data: dict[str, Any] = {"dispatch_id": dispatch_id}
        if outcome:
            data["outcome"] = outcome
        self.event(
            at, f"{PREFIX}/units/{unit}/replies", f"unit/{unit}", f"unit.{verb}", dispatch_id, data
        )


def write_day(path: Path, settings: Settings, events: int, seed: int = 7) -> int:
    """A day of traffic: mostly clean calls, some short flagged calls, a few door-knocks."""
    rng = random.Random(seed)
    flagged = [f.pattern for f in settings.flagged if f.match == "exact"]
    prefixes = [f.pattern for f in settings.flagged if f.match == "prefix"]
    residents = sorted(settings.subscribers)
    rows: list[tuple[float, int, str, tuple[Any, ...]]] = []
    n = 0

    def add(at: float, kind: str, *args: Any) -> None:
        nonlocal n
        n += 1
        rows.append((at, n, kind, args))

    # door-knock cases: each resident in turn, one case every ~2 h, nothing left open
    for slot in range(10):
        sub = residents[slot % len(residents)]
        start = 3600.0 + slot * 7200.0
        call_id = f"DK-{slot:03d}"
        other = flagged[slot % len(flagged)]
        incident = incident_of_call(call_id)
        add(start, "call", "started", call_id, sub, other)
        for k in range(1, 11):
            add(start + 30 * k, "call", "progress", call_id, sub, other, 30.0 * k)
        for k in range(3):
            add(
                start + 200 + 20 * k,
                "action",
                "callback",
                {"incident_id": incident, "result": "no_answer"},
            )
        add(start + 900, "action", "close", {"incident_id": incident, "outcome": "prevented"})
    # short flagged calls (some residents get several: repeated-contact warnings)
    clean_budget = events - len(rows)
    flagged_calls = max(clean_budget // 40, 1)
    for i in range(flagged_calls):
        at = rng.uniform(0, 86000)
        sub = f"+8613{rng.randrange(10**8, 10**9)}"
        other = (
            rng.choice(flagged)
            if rng.random() < 0.5
            else rng.choice(prefixes) + str(rng.randrange(10**4, 10**5))
        )
        add(at, "call", "started", f"FL-{i:06d}", sub, other)
        add(at + 12, "call", "ended", f"FL-{i:06d}", sub, other, 12.0)
    # clean calls until the budget is used: started, a progress or two, ended
    i = 0
    while len(rows) < events:
        at = rng.uniform(0, 86000)
        sub = f"+8613{rng.randrange(10**8, 10**9)}"
        other = rng.choice(CLEAN_PREFIXES) + str(rng.randrange(10**7, 10**8))
        call_id = f"CL-{i:07d}"
        add(at, "call", "started", call_id, sub, other)
        add(at + 30, "call", "progress", call_id, sub, other, 30.0)
        add(at + 45, "call", "ended", call_id, sub, other, 45.0)
        i += 1
    rows.sort()
    with path.open("w", encoding="utf-8") as handle:
        writer = DayWriter(handle, settings.service.region)
        for at, _, kind, args in rows[:events]:
            if kind == "call":
                verb, call_id, sub, other, *rest = args
                writer.call(at, verb, call_id, sub, other, rest[0] if rest else None)
            else:
                writer.action(at, args[0], args[1])
        return writer.lines


def write_active(path: Path, settings: Settings, calls: int, seed: int = 11) -> None:
    """``calls`` calls started within a minute, none ended: the state of a busy moment."""
    rng = random.Random(seed)
    flagged = [f.pattern for f in settings.flagged if f.match == "exact"]
    with path.open("w", encoding="utf-8") as handle:
        writer = DayWriter(handle, settings.service.region)
        for i in range(calls):
            sub = f"+8613{i:09d}"
            other = (
                rng.choice(flagged)
                if i % 20 == 0
                else rng.choice(CLEAN_PREFIXES) + str(rng.randrange(10**7, 10**8))
            )
            writer.call(60.0 * i / calls, "started", f"AC-{i:07d}", sub, other)


def write_wave(folder: Path, settings: Settings, cases: int, seed: int = 13) -> tuple[Path, int]:
    """A scam wave: a synthetic county with, per case, one estate (two guards and a grid
    worker), a station (a patrol and a quick-police platform) and a resident, and ``cases``
    door-knocks whose calls all start within ten minutes: critical, three unanswered
    callbacks, escalation, the first guard and the patrol accept, arrive and report. Returns
    the deployment written into ``folder`` (its rules, timings and limits are ``settings``')
    and the number of lines of ``folder/wave.jsonl``."""
    rng = random.Random(seed)
    flagged = next(f.pattern for f in settings.flagged if f.match == "exact")
    registries = folder / "wave"
    registries.mkdir(parents=True, exist_ok=True)
    estates = ["id,name,kind,township,grid,station,address"]
    units = ["id,kind,channel,estate,grid,station,name"]
    subscribers = ["msisdn,name,display_name,estate,address,grid,vulnerable"]
    stations = []
    for k in range(cases):
        estate, grid, station = f"E-W{k:05d}", f"GR-{k:05d}", f"PS-W{k:05d}"
        estates.append(f"{estate},小区{k},estate,街道,{grid},{station},县城路{k}号")
        units += [
            f"G-W{k:05d}-1,guard,radio,{estate},,{station},保安甲{k}",
            f"G-W{k:05d}-2,guard,radio,{estate},,{station},保安乙{k}",
            f"W-W{k:05d},grid_worker,radio,,{grid},{station},网格员{k}",
            f"P-W{k:05d},police,app,,,{station},巡逻{k}",
            f"Q-W{k:05d},quick_police,app,,,{station},快警{k}",
        ]
        subscribers.append(f"+86135{k:08d},居民{k},居民{k},{estate},{k}栋101,{grid},false")
        stations.append(f'[stations.{station}]\nname = "派出所{k}"\n')
    for name, table in (("estates", estates), ("units", units), ("subscribers", subscribers)):
        (registries / f"{name}.csv").write_text("\n".join(table) + "\n", encoding="utf-8")
    flagged_csv = settings.path.parent / settings_registry(settings, "flagged_numbers")
    (registries / "flagged_numbers.csv").write_bytes(flagged_csv.read_bytes())
    toml = settings.path.read_text(encoding="utf-8")
    head, _, rest = toml.partition("[registries]")
    tail = rest[rest.index("[callback]") :]
    (folder / "wave.toml").write_text(
        head.replace(f'default_station = "{settings.service.default_station}"',
                     'default_station = "PS-W00000"')
        + "[registries]\n"
        + 'estates = "wave/estates.csv"\nunits = "wave/units.csv"\n'
        + 'subscribers = "wave/subscribers.csv"\nflagged_numbers = "wave/flagged_numbers.csv"\n\n'
        + "\n".join(stations)
        + "\n"
        + tail,
        encoding="utf-8",
    )  # fmt: skip
    rows: list[tuple[float, int, str, tuple[Any, ...]]] = []

    def add(at: float, kind: str, *args: Any) -> None:
        rows.append((at, len(rows), kind, args))

    for k in range(cases):
        start = rng.uniform(0, 600)
        sub, call_id = f"+86135{k:08d}", f"WV-{k:05d}"
        incident = incident_of_call(call_id)
        guard, patrol = f"G-W{k:05d}-1", f"P-W{k:05d}"
        add(start, "call", "started", call_id, sub, flagged)
        for n in range(1, 12):
            add(start + 30 * n, "call", "progress", call_id, sub, flagged, 30.0 * n)
        for n in range(3):
            add(start + 190 + 10 * n, "action", "callback",
                {"incident_id": incident, "result": "no_answer"})  # fmt: skip
        add(start + 225, "reply", guard, "accepted", f"{incident}:{guard}")
        add(start + 235, "reply", patrol, "accepted", f"{incident}:{patrol}")
        add(start + 400, "reply", guard, "arrived", f"{incident}:{guard}")
        add(start + 450, "reply", patrol, "arrived", f"{incident}:{patrol}")
        add(start + 500, "reply", guard, "reported", f"{incident}:{guard}", "dissuaded")
        add(start + 520, "reply", patrol, "reported", f"{incident}:{patrol}", "dissuaded")
        add(start + 560, "call", "ended", call_id, sub, flagged, 560.0)
    rows.sort()
    with (folder / "wave.jsonl").open("w", encoding="utf-8") as handle:
        writer = DayWriter(handle, settings.service.region)
        for at, _, kind, args in rows:
            if kind == "call":
                writer.call(at, *args)
            elif kind == "action":
                writer.action(at, args[0], args[1])
            else:
                writer.reply(at, *args)
        return folder / "wave.toml", writer.lines


def settings_registry(settings: Settings, name: str) -> str:
    """A registry's path as the deployment's file names it."""
    import tomllib

    raw = tomllib.loads(settings.path.read_text(encoding="utf-8"))
    return str(raw["registries"][name])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, config: str, recording: str) -> None:
    """Runs inside the child process; prints one JSON line of figures."""
    import asyncio

    from dispatcher import logs
    from dispatcher.settings import load_settings

    logs.configure("error")
    settings = load_settings(config)
    if mode == "json":
        baseline = _rss_mb()
        start = time.perf_counter()
        with open(recording, encoding="utf-8") as handle:
            for line in handle:
                json.loads(line)
        elapsed = time.perf_counter() - start
        print(json.dumps({"seconds": elapsed, "rss_mb": _rss_mb(), "baseline_mb": baseline}))
        return
    from adapters.replay import replay

    with tempfile.TemporaryDirectory() as tmp:
        baseline = _rss_mb()
        start = time.perf_counter()
        report = asyncio.run(replay(Path(recording), settings, Path(tmp) / "s.sqlite3"))
        elapsed = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "seconds": elapsed,
                    "rss_mb": _rss_mb(),
                    "baseline_mb": baseline,
                    "incidents": len(report["incidents"]),
                    "rejected": len(report["rejected"]),
                }
            )
        )


def _run_child(mode: str, config: str, recording: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "tools.bench_replay", mode, config, str(recording)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_wave_bench(settings: Settings, cases: int, events: int) -> int:
    """A scam wave of ``cases`` door-knocks beside one tenth of it and the clean day of
    ``events`` events, in one run: the wave's lines/s against the day's, its per-line cost
    as it grows, and its peak memory."""
    with tempfile.TemporaryDirectory(prefix="antifraud-bench-wave-") as tmp:
        day = Path(tmp) / "day.jsonl"
        day_lines = write_day(day, settings, events)
        day_run = _run_child("replay", str(settings.path), day)
        day_rate = day_lines / day_run["seconds"]
        print(f"clean day: {day_lines:,} lines in {day_run['seconds']:.2f} s "
              f"({day_rate:,.0f} lines/s)")  # fmt: skip
        per_line: dict[int, float] = {}
        for n in sorted({max(cases // 10, 1), cases}):
            folder = Path(tmp) / f"wave-{n}"
            config, lines = write_wave(folder, settings, n)
            run = _run_child("replay", str(config), folder / "wave.jsonl")
            rate = lines / run["seconds"]
            per_line[n] = run["seconds"] / lines
            print(
                f"wave of {n:,} cases: {lines:,} lines in {run['seconds']:.2f} s "
                f"({rate:,.0f} lines/s, {rate / day_rate:.2f} × the clean day's; target >= 0.2), "
                f"{run['incidents']:,} incidents, {run['rejected']} rejected, "
                f"peak RSS {run['rss_mb']:.0f} MB (target <= 200 at 5,000 cases)"
            )
        if len(per_line) == 2:
            small, large = sorted(per_line)
            print(
                f"per-line cost at {large:,} cases / at {small:,}: "
                f"{per_line[large] / per_line[small]:.2f} (target <= 1.25)"
            )
    return 0


def run_replay_bench(settings: Settings, events: int, active: int, repeat: int = 3) -> int:
    """Each figure is measured ``repeat`` times, the bare pass and the replay alternating, and
    the median is reported: these machines are shared and single runs vary by ±10 %."""
    config = str(settings.path)
    with tempfile.TemporaryDirectory(prefix="antifraud-bench-") as tmp:
        day = Path(tmp) / "day.jsonl"
        lines = write_day(day, settings, events)
        size_mb = day.stat().st_size / 1e6
        print(
            f"synthetic day: {lines} events, {size_mb:.1f} MB ({day.name}); "
            f"each figure the median of {repeat} runs"
        )
        bares, fulls, ratios = [], [], []
        for _ in range(repeat):
            bare = _run_child("json", config, day)
            full = _run_child("replay", config, day)
            bares.append(bare["seconds"])
            fulls.append(full["seconds"])
            ratios.append(full["seconds"] / bare["seconds"])
        bare_s, full_s = statistics.median(bares), statistics.median(fulls)
        print(f"bare json.loads pass : {bare_s:.3f} s ({lines / bare_s:,.0f} lines/s)")
        print(
            f"full replay          : {full_s:.3f} s ({lines / full_s:,.0f} events/s), "
            f"{full['incidents']} incidents, {full['rejected']} rejected"
        )
        print(
            f"replay / json.loads  : {statistics.median(ratios):.2f}  (target <= 5; runs: "
            + ", ".join(f"{r:.2f}" for r in ratios)
            + ")"
        )
        print(
            f"peak RSS during replay: {full['rss_mb']:.1f} MB "
            f"(process after imports: {full['baseline_mb']:.1f} MB)"
        )
        busy = Path(tmp) / "active.jsonl"
        write_active(busy, settings, active)
        state = _run_child("replay", config, busy)
        print(
            f"{active:,} concurrently active calls: peak RSS {state['rss_mb']:.1f} MB "
            f"(target <= 150), process after imports {state['baseline_mb']:.1f} MB"
        )
    return 0


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3])
