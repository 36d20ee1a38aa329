"""``antifraud bench flood``: escalate → offer while one handset floods, on the production broker.

All figures come from one run against one private Mosquitto running the shipped production
config (``config/mosquitto/production.conf``) with the deployment's generated credentials and
ACL (``adapters.broker.SecureBroker``):

- **the dispatcher**: the live service (``adapters/live/``) in this process, on a temporary
  store, logged in as the dispatcher over the broker's loopback listener;
- **the victim**: guard G-YJ-CH-02's handset, a process of its own (as a real handset is its
  own device) logged in with that guard's credentials and subscribed to its dispatches; it
  stamps each offer's arrival with the monotonic clock this process also reads;
- **the flooder**: guard G-YJ-CH-01's credentials, Mosquitto's own client (``mosquitto_pub
  -l``) sending ``flood`` garbage lines at full speed (QoS 0, the fastest a client can send)
  on that guard's own replies topic, started again the moment each run ends, for the whole
  loaded phase: the flood is sustained, not a burst that is over after the first samples;
- **the call source** (``app-warning-hengnan``) and **the operators' consoles** (``op-01``,
  ``op-02``, taking turns), in this process, each with its own credentials.

Each sample: the source sends a flagged call of Chen's long enough to open an incident; once
the dispatcher holds it, a console publishes ``operator.escalate`` and the time until the
victim's handset receives its offer is measured; the console then closes the incident. Call
warnings of other residents (each opening an incident of its own) are spread among the
samples. Samples start at least ``pace`` apart, so that neither an operator nor Chen goes
over their channel's rate (the dispatcher would rightly refuse them). First ``samples``
unloaded, then ``samples`` during the flood, the same wave each time. The target: during the
flood every call warning opens its incident and escalate → offer p99 stays within ``TARGET``
× its unloaded p99.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiomqtt import Client

from adapters.broker import SecureBroker, secure_broker
from adapters.live import Clock, LiveService
from adapters.mqtt import PASSWORD_ENV, open_client
from dispatcher.errors import BrokerError
from dispatcher.model import incident_of_call
from dispatcher.outbound import Topics
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings
from tools.bench_live import CHEN, FLAGGED, _child, call_bytes, event_bytes, percentile

TARGET = 10.0  # escalate → offer p99 during the flood, at most this many times its unloaded p99
FLOODER = "G-YJ-CH-01"
VICTIM = "G-YJ-CH-02"  # the other guard of 春晖小区, Chen's compound
SOURCE = "app-warning-hengnan"
OPERATORS = ("op-01", "op-02")
WAIT_S = 30.0  # the longest any one step of a sample may take before the run is given up


def stranger(n: int) -> str:
    """A resident not in the registry: a flagged call of theirs opens an incident of its own."""
    return f"+86139{n:08d}"


def garbage(count: int) -> bytes:
    """``count`` lines of garbage, each different (not valid UTF-8, not JSON)."""
    return b"".join(b"garbage %d \xff{\n" % i for i in range(count))


@dataclass
class Flood:
    """``mosquitto_pub -l`` runs, one after the other while ``running``, each sending the
    lines of ``lines`` on the flooder's replies topic."""

    secure: SecureBroker
    topic: str
    lines: Path
    per_run: int
    runs: int = 0  # completed
    started_at: float = 0.0
    ended_at: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return self.runs * self.per_run

    @property
    def seconds(self) -> float:
        return self.ended_at - self.started_at

    async def run(self, running: asyncio.Event) -> None:
        """Flood until ``running`` is cleared; the run under way then ends on its own, so
        that every message counted as sent was sent."""
        client = shutil.which("mosquitto_pub")
        if client is None:
            raise BrokerError("mosquitto_pub is needed (apt-get install mosquitto-clients)")
        self.started_at = time.perf_counter()
        while running.is_set():
            with self.lines.open("rb") as stdin:
                process = await asyncio.create_subprocess_exec(
                    client,
                    *("-h", "127.0.0.1", "-p", str(self.secure.local_port)),
                    *("-u", FLOODER, "-P", self.secure.passwords[FLOODER], "-i", FLOODER),
                    *("-t", self.topic, "-q", "0", "-l"),
                    stdin=stdin,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                _, err = await process.communicate()
            if process.returncode != 0:
                self.failures.append(err.decode(errors="replace").strip())
                if len(self.failures) >= 3:
                    raise BrokerError(f"mosquitto_pub failed: {self.failures[-1]}")
                continue
            self.runs += 1
        self.ended_at = time.perf_counter()


@dataclass
class Phase:
    latencies_ms: list[float]
    calls_sent: int
    calls_opened: int


class Bench:
    def __init__(self, settings: Settings, secure: SecureBroker, service: LiveService) -> None:
        self.settings = settings
        self.secure = secure
        self.service = service
        self.topics = Topics(settings.service.prefix)
        self.offers: dict[str, float] = {}
        self.arrived = asyncio.Event()

    @property
    def runtime(self) -> Runtime:
        assert self.service.runtime is not None
        return self.service.runtime

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not condition():
            if time.monotonic() > deadline:
                raise BrokerError(f"the benchmark gave up: {what} after {WAIT_S:g} s")
            await asyncio.sleep(0.002)

    async def listen(self, handset: asyncio.subprocess.Process) -> None:
        assert handset.stdout is not None
        async for line in handset.stdout:
            at, kind, value = line.decode().split()
            if kind == "offer":
                self.offers[value] = float(at)
                self.arrived.set()

    def pace(self, samples: int) -> float:
        """Seconds between the starts of samples: each operator's actions (two a sample,
        the consoles taking turns) within 80 % of its rate, and Chen's calls (one a sample,
        over both phases and the warm-up) within her burst and rate."""
        limits = self.settings.limits
        operators = 2 / (len(OPERATORS) * limits.rate_per_party * 0.8)
        calls = 2 * samples + 1
        chen = (calls - 0.8 * limits.burst_per_subscriber) / (limits.rate_per_subscriber * calls)
        return max(operators, chen, 0.0)

    async def sample(self, source: Client, consoles: list[Client], n: int) -> float:
        """ms from the console's escalate to the victim's offer, for Chen's ``n``-th call;
        the incident is closed after, so that the next call opens a new one."""
        calls = self.topics.calls(self.settings.service.region)
        operator, console = OPERATORS[n % len(OPERATORS)], consoles[n % len(OPERATORS)]
        actions, console_source = self.topics.actions(operator), f"console/{operator}"
        call = f"F-{n}"
        incident = incident_of_call(call)
        await source.publish(calls, call_bytes("progress", call, CHEN, FLAGGED, 200), qos=1)
        await self.until(lambda: incident in self.runtime.state.incidents, f"{incident} opened")
        escalate = event_bytes("operator.escalate", {"incident_id": incident}, console_source)
        sent = time.perf_counter()
        await console.publish(actions, escalate, qos=1)
        deadline = time.monotonic() + WAIT_S
        while incident not in self.offers:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), max(0.0, deadline - time.monotonic()))
        close = {"incident_id": incident, "outcome": "false_alarm"}
        await console.publish(actions, event_bytes("operator.close", close, console_source), qos=1)
        await self.until(
            lambda: CHEN not in self.runtime.state.open_by_subscriber, f"{incident} closed"
        )
        return (self.offers[incident] - sent) * 1000

    async def phase(
        self, source: Client, consoles: list[Client], first: int, samples: int, calls: int
    ) -> Phase:
        """``samples`` escalations with ``calls`` call warnings of other residents spread
        among them; Chen's calls are numbered from ``first``, the others' from it too."""
        topic = self.topics.calls(self.settings.service.region)
        latencies: list[float] = []
        ids: list[str] = []
        pace = self.pace(samples)
        started = time.perf_counter()
        for i in range(samples):
            await asyncio.sleep(max(0.0, started + i * pace - time.perf_counter()))
            for k in range(calls * i // samples, calls * (i + 1) // samples):
                call = f"W-{first + k}"
                ids.append(incident_of_call(call))
                body = call_bytes("progress", call, stranger(first + k), FLAGGED, 200)
                await source.publish(topic, body, qos=1)
            latencies.append(await self.sample(source, consoles, first + i))
        incidents = self.runtime.state.incidents
        with contextlib.suppress(BrokerError):
            await self.until(lambda: all(i in incidents for i in ids), "every call's incident")
        return Phase(latencies, len(ids), sum(i in incidents for i in ids))


@contextlib.asynccontextmanager
async def dispatching(
    settings: Settings, secure: SecureBroker, store: Path
) -> AsyncIterator[LiveService]:
    service = LiveService(settings, secure.url("dispatcher", tls=False), store, Clock())
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 30)
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def cpu_pressure() -> str:
    """How much runnable work waited for a core over the last 10 s (Linux PSI): the share
    of a shared machine others took before the run, which its figures depend on."""
    try:
        line = Path("/proc/pressure/cpu").read_text(encoding="ascii").splitlines()[0]
    except (OSError, IndexError):
        return "not known"
    fields = dict(field.split("=") for field in line.split()[1:])
    return f"{fields.get('avg10', '?')} % (some avg10)"


def row(name: str, values: list[float]) -> str:
    figures = [percentile(values, q) for q in (0.5, 0.9, 0.99)] + [max(values)]
    return f"  {name:<9} {len(values):>7}  " + "  ".join(f"{v:>7.2f}" for v in figures)


async def run_flood_bench(
    settings: Settings, samples: int, flood: int, calls: int, check: bool = False
) -> int:
    if samples < 1 or flood < 1 or calls < 0:
        raise BrokerError("--samples and --flood must be at least 1, --calls at least 0")
    if settings.access.dispatcher_user != "dispatcher" or FLOODER not in settings.units:
        raise BrokerError("bench flood needs the example deployment (config/hengnan.toml)")
    gc.collect()
    gc.freeze()
    pressure = cpu_pressure()
    topics = Topics(settings.service.prefix)
    with (
        secure_broker(settings) as secure,
        tempfile.TemporaryDirectory(prefix="antifraud-bench-flood-") as tmp,
    ):
        print(
            f"broker: a private Mosquitto on 127.0.0.1:{secure.local_port} running "
            "config/mosquitto/production.conf (generated credentials and ACL); CPU pressure "
            f"before the run {pressure}"
        )
        lines = Path(tmp) / "garbage.txt"
        lines.write_bytes(garbage(flood))
        async with dispatching(settings, secure, Path(tmp) / "live.sqlite3") as service:
            bench = Bench(settings, secure, service)
            victim = secure.url(VICTIM, tls=False)
            handset = await _child(
                "handset_process",
                str(victim),
                topics.dispatches(VICTIM),
                env={**os.environ, PASSWORD_ENV: secure.passwords[VICTIM]},
            )
            listener = asyncio.create_task(bench.listen(handset))
            try:
                async with (
                    open_client(secure.url(SOURCE, tls=False)) as source,
                    open_client(secure.url(OPERATORS[0], tls=False)) as first,
                    open_client(secure.url(OPERATORS[1], tls=False)) as second,
                ):
                    consoles = [first, second]
                    await bench.sample(source, consoles, 0)  # warm-up, not counted
                    quiet = await bench.phase(source, consoles, 1_000, samples, calls)
                    runtime, stats = bench.runtime, service.stats
                    before = dict(runtime.counts), dict(stats)
                    floods = Flood(secure, topics.replies(FLOODER), lines, flood)
                    running = asyncio.Event()
                    running.set()
                    flooder = asyncio.create_task(floods.run(running))
                    try:
                        await bench.until(
                            lambda: stats["received"] > before[1]["received"] + 100,
                            "the flood reaching the dispatcher",
                        )
                        loaded = await bench.phase(source, consoles, 500_000, samples, calls)
                    finally:
                        running.clear()
                        await flooder
                    await bench.until(
                        lambda: not service.inbox.waiting,
                        "the flood's messages handled",
                    )
            finally:
                listener.cancel()
                if handset.returncode is None:
                    handset.kill()
                await handset.wait()
            after = dict(runtime.counts), dict(stats)
    delta = {k: after[0][k] - before[0][k] for k in ("rejected", "suppressed", "duplicates")}
    dropped = after[1]["dropped"] - before[1]["dropped"]
    received = delta["rejected"] + delta["suppressed"] + delta["duplicates"] + dropped
    print(
        f"flood: {FLOODER} sends garbage at full speed on its replies topic (mosquitto_pub -l, "
        f"QoS 0), {flood:,} messages a run, started again as each run ends"
    )
    print(
        f"  {floods.sent:,} sent in {floods.runs} runs over {floods.seconds:.1f} s "
        f"({floods.sent / max(floods.seconds, 1e-9):,.0f}/s); received by the dispatcher "
        f"{received:,}: {delta['suppressed']:,} counted unread, {delta['rejected']:,} "
        f"dead-lettered, {dropped:,} dropped over its queue bound; "
        f"{max(0, floods.sent - received):,} not forwarded by the broker"
    )
    print(f"escalate → offer at {VICTIM}'s handset (its own process), ms:")
    print(f"  {'':<9} {'samples':>7}  {'p50':>7}  {'p90':>7}  {'p99':>7}  {'max':>7}")
    print(row("unloaded", quiet.latencies_ms))
    print(row("flood", loaded.latencies_ms))
    ratio = percentile(loaded.latencies_ms, 0.99) / percentile(quiet.latencies_ms, 0.99)
    print(f"p99 flood / p99 unloaded = {ratio:.2f}  (target <= {TARGET:g})")
    print(
        f"call warnings of other residents: {loaded.calls_opened} of {loaded.calls_sent} opened "
        f"their incidents during the flood ({quiet.calls_opened} of {quiet.calls_sent} unloaded)"
    )
    passed = ratio <= TARGET and loaded.calls_opened == loaded.calls_sent
    verdict = "PASS" if passed else "FAIL"
    print(
        f"{verdict}: escalate → offer p99 {ratio:.2f} × unloaded (target <= {TARGET:g}), "
        f"{loaded.calls_opened} of {loaded.calls_sent} call warnings opened incidents"
    )
    return 1 if check and not passed else 0
