"""Active/standby on a PostgreSQL store: any number of ``antifraud run`` on one store, one
serving.

Each process tries to take the store's lease (adapters/pgstore.py, ``Lease``) every
``TAKE_EVERY_S``; the one that has it serves: it connects the dispatcher's persistent MQTT
sessions, so the inbound messages queued for them move with the lease, and publishes what
the outbox holds unsent, also what the last holder committed and did not send (the same
CloudEvent ids: receivers drop the duplicates). It renews the lease every ``TTL / 4``. Its
term ends when

- a renewal finds the lease taken by another (it was frozen or cut off past the TTL),
- a write is fenced (``LeaseLost``: the same, seen by the database),
- no renewal got through before the local deadline (``Term``): it cannot know whether it
  still holds the lease, so it assumes not, before any standby may take it;
- the store fails (the database is unreachable, a flush failed);

and it then stops, says nothing more on the broker (the retained status and the sessions are
the next holder's), never reconnects its sessions, and stands by again. A clean stop
(SIGTERM) releases the lease, so a standby takes over at once rather than after the TTL.

In: the settings, the broker, the store's URL. Out: a ``LiveService`` for each term served,
and the log: ``standing_by`` (who serves), ``serving`` (this instance, its epoch),
``serving_stopped`` (why).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from adapters.live.clock import Clock
from adapters.live.heartbeat import HEARTBEAT_S
from adapters.live.service import LiveService
from adapters.mqtt import BrokerURL
from adapters.pgstore import LEASE_TTL_S, Lease, Term, conninfo, instance_name, keep
from dispatcher.errors import FlushError, LeaseLost, StoreError, StoreUnavailable
from dispatcher.settings import Settings

log = structlog.get_logger("live")

TAKE_EVERY_S = 0.5  # a standby tries to take the lease this often
UNAVAILABLE_LOG_S = 30.0  # while the database does not answer, said once this often


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


class Standby:
    """One process's part in active/standby: stand by, serve while the lease is held, stand
    by again. ``services`` lists the ``LiveService`` of each term served, the last one
    serving now (tests read them)."""

    def __init__(
        self,
        settings: Settings,
        broker: BrokerURL,
        url: str,
        *,
        clock: Clock | None = None,
        client_id: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        ttl_s: float = LEASE_TTL_S,
        instance: str | None = None,
    ) -> None:
        self.settings, self.broker, self.url = settings, broker, url
        self.clock, self.client_id, self.heartbeat_s = clock, client_id, heartbeat_s
        self.ttl_s = ttl_s
        conninfo(url)  # a URL that can never work is refused now, not retried for ever
        self.instance = instance or instance_name()
        self.lease = Lease(url, holder=self.instance, ttl_s=ttl_s)
        self.services: list[LiveService] = []
        self.serving = asyncio.Event()  # set while this instance serves

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        said: tuple[str, int] | None = None  # the holder last said to serve
        unavailable_said = 0.0  # when the database's absence was last logged
        try:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    fence = await self.lease.take()
                    current = None if fence is not None else await self.lease.current()
                except StoreUnavailable as exc:  # anything else is not worth waiting for
                    if sent - unavailable_said >= UNAVAILABLE_LOG_S:  # not twice a second
                        unavailable_said = sent
                        log.warning("store_unavailable", instance=self.instance, error=str(exc))
                    await self.lease.close()
                    await _pause(stop, TAKE_EVERY_S)
                    continue
                if unavailable_said:
                    unavailable_said = 0.0
                    log.info("store_available", instance=self.instance)
                if fence is None:
                    if current is not None and said != (current.holder, current.epoch):
                        said = (current.holder, current.epoch)
                        log.info(
                            "standing_by",
                            instance=self.instance,
                            serving=current.holder,
                            epoch=current.epoch,
                            since=current.since.isoformat(),
                        )
                    await _pause(stop, TAKE_EVERY_S)
                    continue
                said = None
                await self._serve(Term(fence, self.ttl_s, sent), stop)
        finally:
            await self.lease.close()

    async def _serve(self, term: Term, stop: asyncio.Event) -> None:
        fence = term.fence
        log.info(
            "serving", instance=self.instance, epoch=fence.epoch, since=fence.since.isoformat()
        )
        keeper = asyncio.create_task(keep(self.lease, term, self.ttl_s / 4), name="lease")
        service = LiveService(
            self.settings,
            self.broker,
            self.url,
            self.clock,
            client_id=self.client_id,
            heartbeat_s=self.heartbeat_s,
            term=term,
            instance=self.instance,
        )
        self.services.append(service)
        self.serving.set()
        try:
            await service.run(stop)
        except (LeaseLost, StoreUnavailable, FlushError) as exc:
            # the lease lost, the database unreachable, a flush failed: another instance, or
            # this one once the database answers, goes on from the store
            term.end(str(exc))
        except StoreError:  # a store that is not this dispatcher's (a replay's, a newer one)
            term.end("the store cannot be served")
            with contextlib.suppress(StoreError):
                await self.lease.release(fence)
            raise
        finally:
            self.serving.clear()
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            if term.valid():  # stopped, or failed otherwise: a standby goes on at once
                term.end("stopped")
                with contextlib.suppress(StoreError):
                    await self.lease.release(fence)
        if not stop.is_set():
            log.warning("serving_stopped", instance=self.instance, epoch=fence.epoch, why=term.why)
