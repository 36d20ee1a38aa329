"""One error root for the project, with subclasses grouped by who must react.

- ``ConfigError``: the person who wrote the deployment config must fix a file.
- ``InputError``: an inbound message was refused; it goes to the dead-letter topic.
- ``RecordingError``: a recording file handed to ``antifraud replay`` is malformed, or the
  file ``antifraud record`` should write already holds a recording.
- ``StoreError``: the store cannot be used (newer schema, another recording, IO);
  ``FlushError``, one of them: the disk refused to keep what was written, so the process stops;
  ``LeaseLost``, another: a PostgreSQL store's lease is another instance's now;
  ``StoreUnavailable``, another: its database does not answer (try again).
- ``BrokerError``: the MQTT broker is unreachable or dropped the connection.
"""

from __future__ import annotations


class DispatcherError(Exception):
    """Root of every error the dispatcher raises on purpose."""


class ConfigError(DispatcherError):
    """A deployment configuration problem; ``problems`` lists each one as ``file: key: what``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class InputError(DispatcherError):
    """An inbound message that must be dead-lettered; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class RecordingError(DispatcherError):
    """A recording line that is not a recording line at all (``file:line: what``), or a
    recording that cannot be written where asked (``file: what``)."""


class StoreError(DispatcherError):
    """The store cannot be opened or written."""


class FlushError(StoreError):
    """Flushing written transactions to the disk failed: nothing they cover may be
    acknowledged, and the store must not be used further."""


class LeaseLost(StoreError):
    """Another instance holds the store's lease now: this one must write nothing more, stop
    publishing and stand by (adapters/pgstore.py)."""


class StoreUnavailable(StoreError):
    """The store's database did not answer or dropped the connection: worth trying again,
    unlike a store that is damaged, foreign or another's."""


class BrokerError(DispatcherError):
    """The MQTT broker could not be reached or dropped the connection."""
