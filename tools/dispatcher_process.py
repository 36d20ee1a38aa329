"""``antifraud run`` as a process of its own, for the tests and benchmarks that kill, freeze,
cut off or time a real dispatcher: started, signalled, stopped, its JSON log read back.

Its log goes to ``log`` (appended to: a restarted process adds to it), or, with ``on_event``,
is read as it is written, each JSON line handed to ``on_event`` as it comes (for figures
timed from what the process says), or else nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

STOP_WITHIN_S = 30.0  # after SIGTERM, before SIGKILL


class DispatcherProcess:
    def __init__(
        self,
        config: Path,
        broker: str,
        store: str | Path,
        *,
        name: str = "dispatcher",
        log: Path | None = None,
        level: str = "info",
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.name, self.log, self.on_event = name, log, on_event
        self.args = [
            sys.executable,
            "-m",
            "antifraud.cli",
            "--log-level",
            level,
            "run",
            "--config",
            str(config),
            "--broker",
            broker,
            "--store",
            str(store),
        ]
        self.process: asyncio.subprocess.Process | None = None
        self.frozen = False
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        out: int | IO[str]
        err: int | IO[str]
        with contextlib.ExitStack() as files:
            if self.on_event is not None:
                out, err = asyncio.subprocess.DEVNULL, asyncio.subprocess.PIPE
            elif self.log is not None:
                out = err = files.enter_context(self.log.open("a"))
            else:
                out = err = asyncio.subprocess.DEVNULL
            self.process = await asyncio.create_subprocess_exec(*self.args, stdout=out, stderr=err)
        if self.on_event is not None:
            self._reader = asyncio.create_task(self._read())
        self.frozen = False

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        assert self.on_event is not None
        async for raw in self.process.stderr:
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict):
                    self.on_event(line)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def send(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def freeze(self) -> None:
        """SIGSTOP: alive to the operating system, silent to everyone else."""
        self.send(signal.SIGSTOP)
        self.frozen = True

    def wake(self) -> None:
        self.send(signal.SIGCONT)
        self.frozen = False

    async def kill(self) -> None:
        """SIGKILL: no goodbye, no last commit."""
        assert self.process is not None
        self.send(signal.SIGKILL)
        await self.process.wait()
        self.frozen = False
        await self._drained()

    async def stop(self, strict: bool = True) -> None:
        """SIGTERM (woken first if frozen). One that has not stopped within
        ``STOP_WITHIN_S`` is killed, and, if ``strict``, ``TimeoutError`` says so."""
        late = False
        if self.running:
            assert self.process is not None
            self.send(signal.SIGCONT)
            self.send(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_WITHIN_S)
            except TimeoutError:
                late = True
                self.send(signal.SIGKILL)
                await self.process.wait()
            self.frozen = False
        await self._drained()
        if late and strict:
            raise TimeoutError(f"{self.name} did not stop within {STOP_WITHIN_S:g} s of SIGTERM")

    async def _drained(self) -> None:
        if self._reader is not None:
            await self._reader
            self._reader = None

    def events(self) -> list[dict[str, Any]]:
        """The JSON lines of its log so far (a last line still being written is not one)."""
        assert self.log is not None
        text = self.log.read_text(encoding="utf-8")
        lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
        return [json.loads(line) for line in lines if line.startswith("{")]

    def standing_by(self) -> bool:
        """Whether its log's last word on the lease is that it stands by."""
        said = [e["event"] for e in self.events() if e.get("event") in ("standing_by", "serving")]
        return bool(said) and said[-1] == "standing_by"
