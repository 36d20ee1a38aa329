"""Per-source rate limiting with bounded memory (a pure token bucket on the given time)."""

from __future__ import annotations

from rules.bounded import trim


class RateLimiter:
    """At most ``rate`` messages a second per key, with bursts of up to ``burst``.

    At most ``max_keys`` keys are remembered; past that the longest-known is forgotten, so a
    flood of made-up sources cannot grow memory (a forgotten key starts again with a full
    bucket, which only ever favours the sender). Time is whatever the caller says it is
    (virtual in a replay). Buckets are updated in place: this runs for every message.
    """

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self.rate, self.burst, self.max_keys = rate, float(burst), max_keys
        self._buckets: dict[str, list[float]] = {}  # key -> [tokens, at]

    def allow(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            trim(self._buckets, self.max_keys - 1)  # the longest-known go first
            self._buckets[key] = [self.burst - 1.0, now]
            return True
        tokens, at = bucket
        if now > at:
            tokens += (now - at) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def __len__(self) -> int:
        return len(self._buckets)
