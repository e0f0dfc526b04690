"""Following the registry: every model name with a version in the chosen stage is served under
that name; a newly promoted version replaces the old one without a restart, and a name that
leaves the stage stops being served. Requests already running finish on the version they began on.
A version whose files changed since it was registered is not loaded (the log says which files).

The registry is polled every ``poll_seconds``; ``poke()`` (the server wires it to SIGHUP) polls
at once. It is opened once (opening it runs its migrations) and reopened after a poll fails.
``on_sync`` is called after each poll that read the registry (the server is ready after the first).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Callable

from domaintune.errors import DomaintuneError
from domaintune.serve.metrics import Metrics
from domaintune.serve.pool import ModelPool

if TYPE_CHECKING:
    from domaintune.registry.store import ModelVersion, Registry

log = logging.getLogger("domaintune.serve")


class RegistryWatcher:
    """Keeps ``pool`` in step with the versions of ``registry_url`` in ``stage``."""

    def __init__(self, pool: ModelPool, registry_url: str | None, stage: str, poll_seconds: float,
                 metrics: Metrics | None = None, on_sync: Callable[[], None] | None = None):
        self.pool = pool
        self.registry_url = registry_url
        self.stage = stage
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self.on_sync = on_sync
        self.served: dict[str, int] = {}  # name → version this watcher routed
        self._failed: set[tuple[str, int]] = set()  # versions that would not load: not retried every poll
        self._wake = asyncio.Event()
        self._registry: Registry | None = None

    def poke(self) -> None:
        """Poll now rather than at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        """Poll until cancelled; a failed poll is logged and retried at the next one."""
        try:
            while True:
                try:
                    await self.sync()
                except Exception as exc:  # whatever the database raised, following must go on
                    log.error("registry poll failed: %s", exc, exc_info=not isinstance(exc, DomaintuneError))
                    self._disconnect()
                    if self.metrics is not None:
                        self.metrics.registry_errors.inc()
                else:
                    if self.on_sync is not None:
                        self.on_sync()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                except TimeoutError:
                    pass
                self._wake.clear()
        finally:
            self._disconnect()

    async def sync(self) -> None:
        """Load what is new in the stage and unload what left it."""
        wanted = {v.name: v for v in await asyncio.to_thread(self._versions)}
        for name, version in wanted.items():
            if self.served.get(name) == version.version or (name, version.version) in self._failed:
                continue
            try:
                # what was registered, reviewed and gated, or nothing: files changed since are refused
                await asyncio.to_thread(self._registry.require_unchanged, version)
                served = await asyncio.to_thread(self.pool.prepare, name, version.run_dir, version=version.version)
            except Exception as exc:  # a broken run is reported and skipped; the others keep being served
                self._failed.add((name, version.version))
                log.error("cannot serve %s: %s", version.ref, exc)
                continue
            self.pool.route(served)
            log.info("serving %s (%s)", version.ref, self.stage)
            self.served[name] = version.version
            self._count("load")
        for name in set(self.served) - set(wanted):
            self.pool.unload(name)
            del self.served[name]
            log.info("stopped serving %s: no version in %s", name, self.stage)
            self._count("unload")

    def _versions(self) -> list[ModelVersion]:
        if self._registry is None:
            from domaintune.registry.store import Registry

            self._registry = Registry(self.registry_url)
        return self._registry.list(stage=self.stage)

    def _disconnect(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    def _count(self, action: str) -> None:
        if self.metrics is not None:
            self.metrics.reloads.labels(action).inc()
            self.metrics.models.set(len(self.pool.routes))
