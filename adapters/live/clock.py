"""The live service's sense of time: the runtime's clock and the inbound rate."""

from __future__ import annotations

import time
from collections.abc import Callable


class Rate:
    """Inbound messages per second, counted over windows of ``window`` seconds: ``busy`` once
    the last window counted more than ``limit`` a second."""

    def __init__(self, limit: float, window: float = 0.25) -> None:
        self.limit = limit
        self.window = window
        self.busy = False
        self._since: float | None = None
        self._count = 0

    def add(self, count: int, now: float) -> None:
        if self._since is None:
            self._since = now
        elif now - self._since >= self.window:
            self.busy = self._count / (now - self._since) > self.limit
            self._since, self._count = now, 0
        self._count += count


class Clock:
    """The runtime's seconds: wall-clock time, or time running ``speed`` times faster from
    ``start`` (the demo plays a 25-minute case in under a minute, timers included).

    The wall clock is read once, when the clock is made; from then on it advances with the
    monotonic clock, so a step of the system clock (an NTP correction, a virtual machine
    resumed) neither fires every pending timer at once nor holds them back (decisions.md 46).
    """

    def __init__(
        self,
        speed: float = 1.0,
        start: float | None = None,
        *,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.speed = speed
        self._monotonic = monotonic
        wall_now, monotonic_now = wall(), monotonic()
        self.start = wall_now if start is None else start
        self._started = monotonic_now - (wall_now - self.start)  # ``start`` on that clock

    def now(self) -> float:
        return self.start + (self._monotonic() - self._started) * self.speed

    def real_seconds(self, clock_seconds: float) -> float:
        return clock_seconds / self.speed
