"""Which flagged numbers contacted each subscriber recently, with bounded memory."""

from __future__ import annotations

from collections import deque

from rules.bounded import forget_while, trim


class ContactLog:
    """Per subscriber, the recent contacts by flagged numbers as ``(at, counterpart)``.

    A contact counts from its ``call.started``. Entries older than ``horizon_s`` are dropped as
    new ones arrive, each subscriber keeps at most ``per_subscriber`` entries (the newest), a
    subscriber whose history has expired is forgotten, and at most ``max_subscribers`` are
    kept (the ones contacted longest ago are forgotten first: ``rules/bounded.py``), so
    memory stays bounded even under a flood.

    Subscribers are kept in the order of their latest contact, so that ``prune`` looks only
    at those it forgets (and the first one it keeps), not at every subscriber known: with
    hundreds of thousands in the horizon, that is the difference between a few entries and
    all of them every thousand events.
    """

    def __init__(
        self, horizon_s: float, per_subscriber: int, max_subscribers: int = 500_000
    ) -> None:
        self.horizon_s = horizon_s
        self.per_subscriber = per_subscriber
        self.max_subscribers = max_subscribers
        self._log: dict[str, deque[tuple[float, str]]] = {}

    def record(self, subscriber: str, counterpart: str, at: float) -> None:
        entries = self._log.pop(subscriber, None)  # to the end: its latest contact is now
        if entries is None:
            trim(self._log, self.max_subscribers - 1)  # forget the ones contacted longest ago
            entries = deque(maxlen=self.per_subscriber)
        self._log[subscriber] = entries
        entries.append((at, counterpart))
        self._expire(subscriber, entries, at)

    def distinct(self, subscriber: str, now: float, window_s: float) -> int:
        entries = self._log.get(subscriber)
        if not entries:
            return 0
        since = now - window_s
        return len({number for at, number in entries if since <= at <= now})

    def prune(self, now: float) -> None:
        """Forget the subscribers whose contacts are all older than the horizon, from the one
        contacted longest ago, up to the first whose latest contact is within it. (Events
        come a little out of order: one behind a newer one is forgotten at a later prune.
        Meanwhile it changes no count: ``distinct`` counts only contacts within its window,
        and no rule's window is longer than the horizon.)"""
        since = now - self.horizon_s
        forget_while(self._log, lambda entries: entries[-1][0] < since)

    def _expire(self, subscriber: str, entries: deque[tuple[float, str]], now: float) -> None:
        since = now - self.horizon_s
        while entries and entries[0][0] < since:
            entries.popleft()
        if not entries:
            del self._log[subscriber]

    def __len__(self) -> int:
        return sum(len(e) for e in self._log.values())
