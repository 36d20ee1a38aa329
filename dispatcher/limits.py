"""Per-source rate limiting with bounded memory (a pure token bucket on the given time)."""

from __future__ import annotations

from collections import OrderedDict


class RateLimiter:
    """At most ``rate`` messages a second per key, with bursts of up to ``burst``.

    Keys are remembered least-recently-used first and at most ``max_keys`` of them, so a
    flood of made-up sources cannot grow memory; a forgotten key starts again with a full
    bucket. Time is whatever the caller says it is (virtual in a replay).
    """

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self.rate, self.burst, self.max_keys = rate, float(burst), max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def allow(self, key: str, now: float) -> bool:
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
