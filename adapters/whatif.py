"""``antifraud whatif``: replay recordings under the current and a candidate configuration and
report what changes, incident by incident (docs/whatif.md).

Each recording replays into a temporary store of its own, once per configuration; the two
SPEC §6 reports are compared by ``dispatcher.comparison``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from adapters.report import write_output
from dispatcher import logs
from dispatcher.comparison import compare, render_table, summarize
from dispatcher.errors import RecordingError
from dispatcher.settings import Settings, load_settings

DEFAULT_BASELINE = "config/hengnan.toml"


def _check_recordings(recordings: list[str]) -> None:
    """Every recording readable and named once, before minutes go into replaying the others."""
    seen: set[str] = set()
    for name in recordings:
        if name in seen:
            raise RecordingError(f"{name}: named twice")
        seen.add(name)
        try:
            with Path(name).open("rb"):
                pass
        except OSError as exc:
            raise RecordingError(f"{name}: cannot read the recording: {exc.strerror}") from None


async def whatif(
    recordings: list[str],
    baseline: Settings,
    candidate: Settings,
) -> dict[str, Any]:
    """The what-if report of ``recordings``: each replayed under both configurations."""
    from adapters.replay import replay

    _check_recordings(recordings)
    entries: list[dict[str, Any]] = []
    before: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []
    for name in recordings:
        # a temporary store each (replay's default): the runs share nothing
        old = (await replay(Path(name), baseline))["incidents"]
        new = (await replay(Path(name), candidate))["incidents"]
        entries.extend(compare(name, old, new))
        before.extend(old)
        after.extend(new)
    return {
        "recordings": recordings,
        "baseline_config": str(baseline.path),
        "candidate_config": str(candidate.path),
        "incidents": entries,
        "summary": summarize(entries, before, after),
    }


def cmd_whatif(args: argparse.Namespace) -> int:
    # both configurations are checked before anything is replayed; a bad one raises
    # ConfigError naming its file and every problem, which the command line prints
    if args.log_level is None:
        # a unit's reply recorded for an offer the candidate makes later, or not at all, is
        # refused in its replay: expected here, so not logged line by line
        logs.configure("error")
    baseline = load_settings(args.baseline)
    candidate = load_settings(args.config)
    report = asyncio.run(whatif(args.recordings, baseline, candidate))
    write_output(json.dumps(report, ensure_ascii=False, indent=2) + "\n", args.report)
    if args.summary:
        print(render_table(report), file=sys.stderr)
    return 0


def add_whatif_parser(sub: Any) -> None:
    """Register ``whatif`` on the command line's subcommands."""
    p = sub.add_parser(
        "whatif",
        help="replay recordings under the current and a candidate config and report what changes",
    )
    p.add_argument("recordings", nargs="+", metavar="RECORDING", help="recordings to replay")
    p.add_argument(
        "--config", required=True, metavar="CANDIDATE", help="the candidate deployment's TOML file"
    )
    p.add_argument(
        "--baseline",
        default=DEFAULT_BASELINE,
        metavar="CURRENT",
        help=f"the current deployment's TOML file (default {DEFAULT_BASELINE})",
    )
    p.add_argument(
        "--report", default="-", metavar="PATH", help="report file, or - for stdout (default)"
    )
    p.add_argument(
        "--summary",
        action="store_true",
        help="also print a one-screen table, baseline beside candidate, on stderr",
    )
    p.set_defaults(func=cmd_whatif, quiet=True)
