"""Which flagged numbers contacted each subscriber recently, with bounded memory."""

from __future__ import annotations

from collections import deque


class ContactLog:
    """Per subscriber, the recent contacts by flagged numbers as ``(at, counterpart)``.

    A contact counts from its ``call.started``. Entries older than ``horizon_s`` are dropped as
    new ones arrive, each subscriber keeps at most ``per_subscriber`` entries (the newest), a
    subscriber whose history has expired is forgotten, and at most ``max_subscribers`` are
    kept (the longest-known is forgotten first), so memory stays bounded even under a flood.
    """

    def __init__(
        self, horizon_s: float, per_subscriber: int, max_subscribers: int = 500_000
    ) -> None:
        self.horizon_s = horizon_s
        self.per_subscriber = per_subscriber
        self.max_subscribers = max_subscribers
        self._log: dict[str, deque[tuple[float, str]]] = {}

    def record(self, subscriber: str, counterpart: str, at: float) -> None:
        entries = self._log.get(subscriber)
        if entries is None:
            if len(self._log) >= self.max_subscribers:  # forget the longest-known subscriber
                del self._log[next(iter(self._log))]
            entries = self._log[subscriber] = deque(maxlen=self.per_subscriber)
        entries.append((at, counterpart))
        self._expire(subscriber, entries, at)

    def distinct(self, subscriber: str, now: float, window_s: float) -> int:
        entries = self._log.get(subscriber)
        if not entries:
            return 0
        since = now - window_s
        return len({number for at, number in entries if since <= at <= now})

    def prune(self, now: float) -> None:
        """Forget every subscriber whose contacts are all older than the horizon."""
        for subscriber in [s for s, e in self._log.items() if e[-1][0] < now - self.horizon_s]:
            del self._log[subscriber]

    def _expire(self, subscriber: str, entries: deque[tuple[float, str]], now: float) -> None:
        since = now - self.horizon_s
        while entries and entries[0][0] < since:
            entries.popleft()
        if not entries:
            del self._log[subscriber]

    def __len__(self) -> int:
        return sum(len(e) for e in self._log.values())
