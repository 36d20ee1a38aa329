"""The ``antifraud`` command line: the one composition root for every mode."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from dispatcher import logs
from dispatcher.errors import ConfigError, DispatcherError
from dispatcher.settings import Settings, load_settings

DEFAULT_CONFIG = "config/hengnan.toml"


def _settings(path: str) -> Settings:
    return load_settings(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args.config)
    except ConfigError as exc:
        print(f"config {args.config}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(settings.summary())
    return 0


def _write(text: str, target: str) -> None:
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text, encoding="utf-8")


def cmd_replay(args: argparse.Namespace) -> int:
    from adapters.replay import replay
    from adapters.report import dump_report

    settings = _settings(args.config)
    report = asyncio.run(
        replay(Path(args.recording), settings, Path(args.store) if args.store else None, args.until)
    )
    _write(dump_report(report), args.report)
    if args.summary:
        from dispatcher.summary import render_summary

        print(render_summary(report), file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dispatcher.bench import run_replay_bench

    return run_replay_bench(_settings(args.config), events=args.events, active=args.active)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="antifraud", description="Real-time anti-fraud alert dispatcher."
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log level for the JSON log on stderr",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a deployment and print its summary")
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    p.set_defaults(func=cmd_check_config, quiet=True)

    p = sub.add_parser("replay", help="replay a recording in virtual time and write the report")
    p.add_argument("recording")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--report", default="-", help="report file, or - for stdout (default)")
    p.add_argument("--store", help="SQLite store to keep the state in (default: a temporary one)")
    p.add_argument("--until", type=float, help="stop after the lines up to this `at`")
    p.add_argument(
        "--summary",
        action="store_true",
        help="also print a readable summary of the report on stderr",
    )
    p.set_defaults(func=cmd_replay, quiet=True)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("replay", help="replay a synthetic day and print throughput and memory")
    b.add_argument("--config", default=DEFAULT_CONFIG)
    b.add_argument("--events", type=int, default=100_000)
    b.add_argument(
        "--active",
        type=int,
        default=100_000,
        help="concurrently active calls for the memory figure",
    )
    b.set_defaults(func=cmd_bench, quiet=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level or ("warning" if getattr(args, "quiet", False) else "info")
    logs.configure(level)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except DispatcherError as exc:
        print(f"antifraud: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
