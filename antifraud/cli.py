"""The ``antifraud`` command line: every mode, wired by ``antifraud.bootstrap``."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from antifraud import bootstrap
from dispatcher import logs
from dispatcher.errors import ConfigError, DispatcherError, RecordingError
from dispatcher.settings import Settings

if TYPE_CHECKING:
    from adapters.mqtt import BrokerURL

DEFAULT_CONFIG = "config/hengnan.toml"


def _settings(path: str) -> Settings:
    return bootstrap.settings(path)


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


def _broker(args: argparse.Namespace, settings: Settings) -> BrokerURL:
    return bootstrap.broker(settings, args.broker)


def cmd_broker_credentials(args: argparse.Namespace) -> int:
    from adapters.access import write_broker_files

    settings = _settings(args.config)
    accounts = write_broker_files(settings, Path(args.out), frozenset(args.rotate))
    roles: dict[str, int] = {}
    for account in accounts:
        roles[account.role] = roles.get(account.role, 0) + 1
    print(
        f"{args.out}: credentials.csv (mode 0600), mosquitto.passwd (mode 0600), acl — "
        + ", ".join(f"{n} {role}" for role, n in roles.items())
    )
    if args.rotate:
        print(
            f"new password for {', '.join(sorted(set(args.rotate)))}: reload the broker "
            "(kill -HUP) to cut the old one off, then provision the new one from credentials.csv"
        )
    return 0


def _run_until_signalled(main: Callable[[asyncio.Event], Awaitable[object]]) -> None:
    """Run ``main(stop)``; SIGINT or SIGTERM sets ``stop`` for a clean shutdown."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def _store(value: str) -> str | Path:
    """A ``--store``: a PostgreSQL URL as it is, else a path (which would fold a URL's //)."""
    from adapters.journal import is_postgres

    return value if is_postgres(value) else Path(value)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args.config)
    broker = _broker(args, settings)
    store = _store(args.store or settings.service.store)
    service = bootstrap.live_service(settings, broker, store)
    _run_until_signalled(service.run)
    return 0


def cmd_handset(args: argparse.Namespace) -> int:
    from tools.handset import Handset, auto_script, run_handset

    settings = _settings(args.config)
    if args.unit not in settings.units:
        print(f"antifraud: unknown unit {args.unit!r} (see {settings.path})", file=sys.stderr)
        return 1
    script = None
    if args.auto:
        script = auto_script(
            args.accept_after,
            args.arrive_after,
            args.report_after,
            args.outcome,
            decline=args.decline,
        )
    url = args.broker or settings.service.broker
    password = None
    if args.password_file:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"antifraud: cannot read {args.password_file}: {exc.strerror}", file=sys.stderr)
            return 1
    from adapters.mqtt import PASSWORD_ENV, BrokerURL

    # the screen is the guard's: the handset's JSON log goes to a file when asked, to
    # stderr only when a log level is asked for, and nowhere otherwise
    if args.log_file:
        log_file = Path(args.log_file).open("a", encoding="utf-8")  # noqa: SIM115
        logs.configure(args.log_level or "info", log_file)
    elif args.log_level is None:
        logs.configure("critical", io.StringIO())
    secret = os.environ.get(PASSWORD_ENV) or password
    broker = BrokerURL.parse(url, secret, args.unit if secret else None, args.ca_file)
    handset = Handset(settings, args.unit, broker, script)
    print(
        f"{args.unit}（{settings.units[args.unit].name}）@ {handset.broker}："
        + ("自动回复" if script else "按键：1 接受，2 拒绝，3 已到达，4 反馈结果，q 退出")
    )
    asyncio.run(run_handset(handset, interactive=not args.auto))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from adapters.recorder import record

    settings = _settings(args.config)
    broker = _broker(args, settings)

    async def main(stop: asyncio.Event) -> None:
        count = await record(settings, broker, Path(args.out), stop, args.duration)
        print(f"recorded {count} message(s) to {args.out}", file=sys.stderr)

    _run_until_signalled(main)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from adapters.report import dump_report, live_report, write_output

    settings = _settings(args.config)
    report = asyncio.run(live_report(_store(args.store), settings))
    write_output(dump_report(report), args.report)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tools.demo import DEFAULT_RECORDING, run_demo, stopping

    settings = _settings(args.config)
    recording = Path(args.recording) if args.recording else DEFAULT_RECORDING

    async def demo() -> int:
        # SIGTERM (and SIGINT) end the demo as a person would expect: its broker stopped,
        # its temporary files removed
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def stop() -> None:
            # asked until it takes: a cancellation arriving just as an inner wait_for ends
            # is lost on Python 3.11, and the demo would play its case to the end; once the
            # demo is cleaning up (its broker, its files), it is left to finish that
            if not task.done() and not stopping():
                task.cancel()
                loop.call_later(1.0, stop)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        return await run_demo(
            settings,
            recording,
            args.broker,
            args.speed,
            sys.stdout,
            console_port=args.console,
            linger_s=args.linger if args.console else 0.0,
        )

    try:
        return asyncio.run(demo())
    except asyncio.CancelledError:
        print("demo stopped; its broker and temporary files are gone", file=sys.stderr)
        return 143


def cmd_backup(args: argparse.Namespace) -> int:
    from adapters.journal import is_postgres

    if is_postgres(args.store):
        print(
            "antifraud: a PostgreSQL store is backed up with PostgreSQL's own tools: "
            "pg_dump --format=custom, or continuous archiving (docs/operations.md, "
            "'A PostgreSQL store: active/standby')",
            file=sys.stderr,
        )
        return 1
    source, target = Path(args.store), Path(args.out)
    if not source.is_file():
        print(f"antifraud: {source}: no such store", file=sys.stderr)
        return 1
    if target.exists() and not args.force:
        print(f"antifraud: {target} exists (use --force to replace it)", file=sys.stderr)
        return 1

    async def main() -> None:
        async with bootstrap.store(source) as store:
            await store.backup(target)

    asyncio.run(main())
    print(f"{source} -> {target}: a consistent copy, integrity checked")
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    from aiohttp import web

    from adapters.console import Console, Users
    from adapters.mqtt import PASSWORD_ENV, BrokerURL
    from adapters.reading import StoreRef

    settings = _settings(args.config)
    store = StoreRef(args.store or settings.service.store)
    store.check()  # history is read from it: a damaged or foreign store is refused now
    password = None
    if args.password_file:
        password = Path(args.password_file).read_text(encoding="utf-8").strip()
    secret = os.environ.get(PASSWORD_ENV) or password
    broker = BrokerURL.parse(
        args.broker or settings.service.broker,
        secret,
        settings.access.console_user if secret else None,
        args.ca_file,
    )
    users = Users(Path(settings.console.users_file))
    if not users.load():
        first = settings.access.operators[0] if settings.access.operators else "ID"
        print(
            f"antifraud: no operator can log in yet: set a password with "
            f"`antifraud console-user --operator {first}`",
            file=sys.stderr,
        )
    console = Console(
        settings,
        broker,
        store,
        users,
        secure_cookies=settings.console.secure_cookies,
        session_hours=settings.console.session_hours,
    )
    print(f"operator console on http://{args.host}:{args.port}/ (broker {broker})")
    web.run_app(console.app, host=args.host, port=args.port, print=None)
    return 0


def cmd_console_user(args: argparse.Namespace) -> int:
    import getpass

    from adapters.console import Users

    settings = _settings(args.config)
    if args.operator not in settings.access.operators:
        print(
            f"antifraud: {args.operator!r} is not an operator of {settings.path} "
            f"([access] operators: {', '.join(settings.access.operators)})",
            file=sys.stderr,
        )
        return 1
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.operator}: ")
        if getpass.getpass("again: ") != password:
            print("antifraud: the two passwords differ", file=sys.stderr)
            return 1
    if len(password) < 8:
        print("antifraud: a password needs at least 8 characters", file=sys.stderr)
        return 1
    Users(Path(settings.console.users_file)).set_password(args.operator, password)
    print(f"{args.operator}: password set in {settings.console.users_file}")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from dispatcher.protocol import write_documents

    for path in write_documents(Path(args.out)):
        print(path)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from adapters.replay import replay
    from adapters.report import dump_report, write_output

    settings = _settings(args.config)
    if args.publish:
        from adapters.mqtt import BrokerURL
        from adapters.recorder import publish_recording

        count = asyncio.run(
            publish_recording(Path(args.recording), BrokerURL.parse(args.publish), args.speed)
        )
        print(f"published {count} message(s) to {args.publish}", file=sys.stderr)
        return 0
    skipped: list[RecordingError] | None = [] if args.skip_bad_lines else None
    report = asyncio.run(
        replay(
            Path(args.recording),
            settings,
            _store(args.store) if args.store else None,
            args.until,
            skipped,
        )
    )
    for error in skipped or ():
        print(f"skipped: {error}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} line(s) that are not recording lines", file=sys.stderr)
    write_output(dump_report(report), args.report)
    if args.summary:
        from dispatcher.summary import render_summary

        print(render_summary(report), file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tools.bench_replay import run_replay_bench, run_wave_bench

    if args.wave:
        return run_wave_bench(_settings(args.config), args.wave, args.events)

    return run_replay_bench(
        _settings(args.config), events=args.events, active=args.active, repeat=args.repeat
    )


def cmd_bench_live(args: argparse.Namespace) -> int:
    from tools.bench_live import run_live_bench

    return asyncio.run(
        run_live_bench(
            _settings(args.config), args.events, args.samples, args.rate, args.postgresql
        )
    )


def cmd_bench_escalation(args: argparse.Namespace) -> int:
    from tools.bench_escalation import run_escalation_bench

    return asyncio.run(
        run_escalation_bench(_settings(args.config), args.samples, args.idle, args.postgresql)
    )


def cmd_bench_flood(args: argparse.Namespace) -> int:
    from tools.bench_flood import run_flood_bench

    return asyncio.run(
        run_flood_bench(_settings(args.config), args.samples, args.flood, args.calls, args.check)
    )


def cmd_bench_takeover(args: argparse.Namespace) -> int:
    from tools.bench_ha import run

    return run(args)


def cmd_bench_regions(args: argparse.Namespace) -> int:
    from tools.sim_regions import main as simulate

    return simulate(args.extra)


def cmd_bench_pgdriver(args: argparse.Namespace) -> int:
    from tools.bench_pgdriver import run_bench

    return run_bench(args)


CONFIG_HELP = f"the deployment's TOML file (default {DEFAULT_CONFIG})"
PG_SERVER = os.environ.get("ANTIFRAUD_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
PG_SERVER_HELP = (
    "the PostgreSQL server, without a database (default $ANTIFRAUD_PG_SERVER or "
    "postgresql://postgres@127.0.0.1:5432); the benchmark makes its databases and drops them"
)
BROKER_HELP = (
    "mqtt://[user@]host[:port] or mqtts://…; a clustered broker's nodes separated by commas "
    "(default: the config's service.broker)"
)


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
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.set_defaults(func=cmd_check_config, quiet=True)

    p = sub.add_parser("replay", help="replay a recording in virtual time and write the report")
    p.add_argument("recording", help="the recording: JSON Lines, one inbound message a line")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--report", default="-", help="report file, or - for stdout (default)")
    p.add_argument("--store", help="SQLite store to keep the state in (default: a temporary one)")
    p.add_argument("--until", type=float, help="stop after the lines up to this `at`")
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="pass over lines that are not recording lines (such as a last line cut short by "
        "a crash), each named on stderr, instead of stopping",
    )
    p.add_argument(
        "--summary",
        action="store_true",
        help="also print a readable summary of the report on stderr",
    )
    p.add_argument(
        "--publish",
        metavar="URL",
        help="instead: publish the recording onto this broker at its own pace",
    )
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="with --publish: play this many times faster (default 1)",
    )
    p.set_defaults(func=cmd_replay, quiet=True)

    from adapters.whatif import add_whatif_parser

    add_whatif_parser(sub)

    from adapters.stats import add_stats_parser

    add_stats_parser(sub)

    from adapters.export import add_export_parser

    add_export_parser(sub)

    p = sub.add_parser("run", help="run the dispatcher on a live broker")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--broker", help=BROKER_HELP)
    p.add_argument(
        "--store",
        help="SQLite store's path, or postgresql://user@host:port/dbname (password in "
        "PGPASSWORD or a PGPASSFILE); default: the config's service.store",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("handset", help="a terminal handset for one unit")
    p.add_argument("--unit", required=True, help="the unit id (units.csv), also its username")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--broker", help=BROKER_HELP)
    p.add_argument(
        "--auto",
        action="store_true",
        help="reply automatically after the delays below instead of keys",
    )
    p.add_argument(
        "--accept-after",
        type=float,
        default=5.0,
        metavar="S",
        help="with --auto: accept an offer after S seconds (default 5)",
    )
    p.add_argument(
        "--arrive-after",
        type=float,
        default=60.0,
        metavar="S",
        help="with --auto: report arrival S seconds after accepting (default 60)",
    )
    p.add_argument(
        "--report-after",
        type=float,
        default=60.0,
        metavar="S",
        help="with --auto: report the outcome S seconds after arriving (default 60)",
    )
    p.add_argument(
        "--outcome",
        default="dissuaded",
        choices=["dissuaded", "not_home", "loss", "false_alarm"],
        help="with --auto: the outcome reported (default dissuaded)",
    )
    p.add_argument("--decline", action="store_true", help="with --auto: decline every offer")
    p.add_argument(
        "--password-file",
        help="the unit's broker password (the username is the "
        "unit id); or set ANTIFRAUD_BROKER_PASSWORD",
    )
    p.add_argument("--ca-file", help="CA certificate for an mqtts:// broker")
    p.add_argument(
        "--log-file",
        metavar="PATH",
        help="append the handset's JSON log here (otherwise it is not written, unless "
        "--log-level asks for it on stderr)",
    )
    p.set_defaults(func=cmd_handset, quiet=True)

    p = sub.add_parser("record", help="record live inbound traffic as a replayable recording")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--broker", help=BROKER_HELP)
    p.add_argument("--out", required=True, help="a new file for the recording (never overwritten)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("report", help="the report (docs/contract.md) of a live dispatcher's store")
    p.add_argument("--store", required=True, help="the live dispatcher's SQLite store")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--report", default="-", help="report file, or - for stdout (default)")
    p.set_defaults(func=cmd_report, quiet=True)

    p = sub.add_parser("demo", help="the seed case, live, on a real broker, in under a minute")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--broker", help="use this broker instead of starting a private one")
    p.add_argument("--speed", type=float, default=60.0, help="clock speed (default 60x)")
    p.add_argument("--recording", help="another recording to play (default: the seed case)")
    p.add_argument(
        "--console",
        type=int,
        metavar="PORT",
        help="also serve the operator console on 127.0.0.1:PORT to watch the case",
    )
    p.add_argument(
        "--linger",
        type=float,
        default=120.0,
        metavar="S",
        help="with --console: keep it up this long after the case ends",
    )
    p.set_defaults(func=cmd_demo, quiet=True)

    p = sub.add_parser("console", help="the operator console (a web page)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--broker", help=BROKER_HELP)
    p.add_argument("--store", help="the dispatcher's store, read for history")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    p.add_argument("--password-file", help="the console's broker password")
    p.add_argument("--ca-file", help="CA certificate for an mqtts:// broker")
    p.set_defaults(func=cmd_console)

    p = sub.add_parser("console-user", help="set an operator's console password")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--operator", required=True, help="the operator id that logs in")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input instead of asking",
    )
    p.set_defaults(func=cmd_console_user, quiet=True)

    p = sub.add_parser("backup", help="a consistent copy of a store, even while it is in use")
    p.add_argument("--store", required=True, help="the store to copy (it may be in use)")
    p.add_argument("--out", required=True, help="the copy's path")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_backup, quiet=True)

    p = sub.add_parser(
        "broker-credentials", help="passwords, a Mosquitto password file and ACL for the deployment"
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    p.add_argument("--out", required=True, help="folder for credentials.csv, mosquitto.passwd, acl")
    p.add_argument(
        "--rotate",
        action="append",
        default=[],
        metavar="USER",
        help="give USER a new password (a lost radio: its unit id); repeatable",
    )
    p.set_defaults(func=cmd_broker_credentials, quiet=True)

    p = sub.add_parser("schemas", help="write the JSON Schemas and AsyncAPI document")
    p.add_argument("--out", default="docs", help="folder (default: docs)")
    p.set_defaults(func=cmd_schemas, quiet=True)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("replay", help="replay a synthetic day and print throughput and memory")
    b.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    b.add_argument(
        "--events", type=int, default=100_000, help="events of the synthetic day (default 100,000)"
    )
    b.add_argument(
        "--active",
        type=int,
        default=100_000,
        help="concurrently active calls for the memory figure",
    )
    b.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is shown)")
    b.add_argument(
        "--wave",
        type=int,
        metavar="N",
        help="instead: a scam wave of N door-knock cases within ten minutes (and one of N/10), "
        "against the clean day of --events",
    )
    b.set_defaults(func=cmd_bench, quiet=True)
    b = bench.add_parser("live", help="the dispatcher on a private Mosquitto: rate and latency")
    b.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    b.add_argument(
        "--events", type=int, default=20_000, help="events of the backlog drained (default 20,000)"
    )
    b.add_argument("--samples", type=int, default=1000, help="latency samples (a p99 wants many)")
    b.add_argument("--rate", type=float, default=500.0, help="background events/s")
    b.add_argument(
        "--postgresql",
        metavar="SERVER",
        nargs="?",
        const=PG_SERVER,
        help="also run (b) and (c) on a PostgreSQL store (a database made on SERVER and "
        "dropped; default server $ANTIFRAUD_PG_SERVER or postgresql://postgres@127.0.0.1:5432) "
        "and print its figures as ratios to the SQLite store's of the same run",
    )
    b.set_defaults(func=cmd_bench_live, quiet=True)
    b = bench.add_parser(
        "escalation", help="one escalation's work in-process, after chosen idle pauses"
    )
    b.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    b.add_argument("--samples", type=int, default=300, help="escalations per pause")
    b.add_argument(
        "--idle",
        type=float,
        nargs="+",
        default=[0.0, 2.0, 20.0, 100.0],
        metavar="MS",
        help="idle pauses before each escalation, in ms (default: 0 2 20 100)",
    )
    b.add_argument(
        "--postgresql",
        metavar="SERVER",
        nargs="?",
        const=PG_SERVER,
        help="also on a PostgreSQL store (a database made on SERVER and dropped), after the "
        "SQLite rows of the same run",
    )
    b.set_defaults(func=cmd_bench_escalation, quiet=True)
    b = bench.add_parser(
        "flood",
        help="escalate → offer while one handset floods, on a private production-config broker",
    )
    b.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    b.add_argument(
        "--samples",
        type=int,
        default=200,
        help="escalations timed unloaded, and again during the flood (default 200)",
    )
    b.add_argument(
        "--flood",
        type=int,
        default=30_000,
        help="garbage messages of one flooder run; runs follow one another for the whole "
        "flooded phase (default 30,000)",
    )
    b.add_argument(
        "--calls",
        type=int,
        default=100,
        help="call warnings of other residents spread among each phase's samples; during "
        "the flood each must open its incident (default 100)",
    )
    b.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when the target is missed (by default the figures are printed, exit 0)",
    )
    b.set_defaults(func=cmd_bench_flood, quiet=True)
    b = bench.add_parser(
        "takeover",
        help="active/standby on PostgreSQL: the serving instance killed, frozen or cut off; "
        "how long until the escalation's offer (tools/bench_ha.py)",
    )
    b.add_argument("--config", default=DEFAULT_CONFIG, help=CONFIG_HELP)
    b.add_argument("--server", default=PG_SERVER, help=PG_SERVER_HELP)
    b.add_argument("--rounds", type=int, default=20, help="disruptions of each kind (default 20)")
    b.add_argument("--kinds", default="kill,freeze,cut", help="of kill,freeze,cut (default all)")
    b.add_argument("--ttl", type=float, default=4.0, help="the lease's TTL, s (default 4)")
    b.set_defaults(func=cmd_bench_takeover, quiet=True)
    b = bench.add_parser(
        "pgdriver",
        help="psycopg 3 against asyncpg on the PostgreSQL store's own transactions",
    )
    b.add_argument("--server", default=PG_SERVER, help=PG_SERVER_HELP)
    b.add_argument("--small", type=int, default=2000, help="small commits a driver")
    b.add_argument("--large", type=int, default=100, help="large commits a driver")
    b.set_defaults(func=cmd_bench_pgdriver, quiet=True)
    b = bench.add_parser(
        "regions",
        add_help=False,
        help="N workers serving M regions on fenced leases, simulated with faults "
        "(docs/scale.md; its options: antifraud bench regions --help)",
    )
    b.set_defaults(func=cmd_bench_regions, quiet=True, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # a command that hands its options to a tool of its own (bench regions) takes the rest
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
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
    except BrokenPipeError:
        # the reader went away (`antifraud report … | head`): what is left is not wanted,
        # and the interpreter must not fail once more flushing it at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a shell reports a command ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
