"""Keep the node's long-running threads alive, their leases fresh and the dead ones' work moving.

- :class:`LoopThread`: one named thread that runs a step function again and again. Every pass
  is a boundary: an exception of any type is logged by :func:`node.redact.safe_reason` (its
  type and a fixed description: exception text may carry a dataset value) and the loop
  carries on. Each pass beats a heartbeat; a step busy for longer than a bound is *stuck*.
- :class:`LeaseBook`: the jobs and outbox items this process holds. The supervisor renews
  their leases while the holder is alive and not stuck, so a lease can be short (tens of
  seconds) and a killed process's work is retried within about one lease.
- :class:`Supervisor`: a thread that, every tick, replaces dead or stuck loop threads (a stuck
  one is abandoned: its lease stops being renewed, its job is reaped and retried, and its late
  result is dropped because the job is no longer its own), renews held leases, reaps expired
  leases of every process (``storage.repo.reap_expired_leases``) and runs other periodic
  duties. :meth:`Supervisor.liveness` is what ``/healthz`` reports.

Nothing here raises: every failure is logged, counted and retried at the next tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from node.metrics import Metrics
from node.redact import safe_reason
from storage import repo
from storage.db import Database

log = logging.getLogger(__name__)

Step = Callable[[str], bool]  # (worker id) -> True when it did some work


class LoopThread:
    """A thread that calls ``step(worker_id)`` until stopped; waits ``idle_s`` when idle."""

    def __init__(
        self,
        component: str,
        name: str,
        step: Step,
        *,
        idle_s: float,
        wake: threading.Event | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.component = component
        self.name = name
        self.step = step
        self.idle_s = idle_s
        self.wake = wake if wake is not None else threading.Event()
        self.stop_event = stop if stop is not None else threading.Event()
        self.abandoned = threading.Event()
        self.last_beat = time.monotonic()
        self.busy_since: float | None = None
        self.failures = 0
        self.slot = name  # the supervisor's slot this thread fills
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def busy_for(self, now: float) -> float:
        return 0.0 if self.busy_since is None else now - self.busy_since

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set() and not self.abandoned.is_set():
            self.last_beat = time.monotonic()
            self.busy_since = self.last_beat
            try:
                busy = self.step(self.name)
            except Exception as exc:  # noqa: BLE001 - the loop's boundary: no exception ends it
                self.failures += 1
                log.error("%s: pass failed with %s; carrying on", self.name, safe_reason(exc))
                busy = False
            finally:
                self.busy_since = None
                self.last_beat = time.monotonic()
            if not busy:
                self.wake.wait(self.idle_s)
                self.wake.clear()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)


@dataclass
class LeaseBook:
    """Leases this process holds: ``{job id: worker id}`` and ``{outbox item id: worker id}``."""

    jobs: dict[int, str] = field(default_factory=dict)
    items: dict[int, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hold_job(self, job_id: int, worker_id: str) -> None:
        with self._lock:
            self.jobs[job_id] = worker_id

    def release_job(self, job_id: int) -> None:
        with self._lock:
            self.jobs.pop(job_id, None)

    def hold_item(self, item_id: int, worker_id: str) -> None:
        with self._lock:
            self.items[item_id] = worker_id

    def release_item(self, item_id: int) -> None:
        with self._lock:
            self.items.pop(item_id, None)

    def snapshot(self) -> tuple[dict[int, str], dict[int, str]]:
        with self._lock:
            return dict(self.jobs), dict(self.items)


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    tick_s: float = 2.0
    stuck_after_s: float = 600.0  # a pass busy for longer is stuck: replaced, its lease let go
    job_lease_s: float = 30.0
    outbox_lease_s: float = 30.0
    reap_every_s: float = 10.0
    probe_every_s: float = 15.0


@dataclass
class _Periodic:
    name: str
    every_s: float
    duty: Callable[[], None]
    due: float = 0.0


class Supervisor:
    """Watches loop threads, renews this process's leases, reaps everyone's expired leases."""

    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        leases: LeaseBook,
        config: SupervisorConfig,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.leases = leases
        self.config = config
        self.clock = clock
        self.loops: list[LoopThread] = []
        self._factories: dict[str, Callable[[int], LoopThread]] = {}
        self._generation: dict[str, int] = {}
        self._periodic: list[_Periodic] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_tick = time.monotonic()
        self.reaped_jobs = 0
        self.reaped_items = 0
        self.every(config.job_lease_s / 3.0, "lease renewal", self.renew_leases)
        self.every(config.reap_every_s, "lease reaper", self.reap)

    # -- registration ------------------------------------------------------------------------

    def supervise(self, slot: str, factory: Callable[[int], LoopThread]) -> LoopThread:
        """Start ``factory(0)`` now and ``factory(n)`` whenever generation ``n - 1`` dies or sticks."""
        self._factories[slot] = factory
        self._generation[slot] = 0
        loop = factory(0)
        loop.slot = slot
        self.loops.append(loop)
        loop.start()
        return loop

    def every(self, every_s: float, name: str, duty: Callable[[], None]) -> None:
        self._periodic.append(_Periodic(name=name, every_s=max(every_s, 0.1), duty=duty))

    # -- duties ------------------------------------------------------------------------------

    def _holder_ok(self, worker_id: str, now: float) -> bool:
        for loop in self.loops:
            if loop.name == worker_id:
                fresh = loop.busy_for(now) < self.config.stuck_after_s
                return loop.alive and not loop.abandoned.is_set() and fresh
        return False

    def renew_leases(self) -> None:
        jobs, items = self.leases.snapshot()
        now_m, now = time.monotonic(), self.clock()
        for job_id, worker_id in jobs.items():
            if self._holder_ok(worker_id, now_m):
                repo.renew_lease(self.db, job_id, worker_id, now, self.config.job_lease_s)
        for item_id, worker_id in items.items():
            if self._holder_ok(worker_id, now_m):
                repo.renew_outbox_lease(self.db, item_id, worker_id, now, self.config.outbox_lease_s)

    def reap(self) -> None:
        jobs, items = repo.reap_expired_leases(self.db, self.clock())
        if jobs or items:
            log.warning("reaped expired leases: %d jobs and %d deliveries back in the queue", jobs, items)
            self.reaped_jobs += jobs
            self.reaped_items += items
            self.metrics.leases_reaped.labels(kind="job").inc(jobs)
            self.metrics.leases_reaped.labels(kind="outbox").inc(items)

    def check_loops(self) -> None:
        now = time.monotonic()
        for index, loop in enumerate(list(self.loops)):
            if loop.stop_event.is_set():
                continue
            dead = not loop.alive
            stuck = loop.busy_for(now) >= self.config.stuck_after_s
            if not dead and not stuck:
                continue
            slot = loop.slot
            log.error(
                "%s %s (%s): starting a replacement",
                loop.name,
                "died" if dead else f"is stuck for {loop.busy_for(now):.0f} s",
                loop.component,
            )
            loop.abandoned.set()
            self.metrics.thread_restarts.labels(component=loop.component).inc()
            self._generation[slot] += 1
            replacement = self._factories[slot](self._generation[slot])
            replacement.slot = slot
            self.loops[index] = replacement
            replacement.start()

    def tick(self) -> None:
        self.last_tick = time.monotonic()
        try:
            self.check_loops()
        except Exception as exc:  # noqa: BLE001 - the supervisor must outlive any failure
            log.error("supervisor: thread check failed with %s", safe_reason(exc))
        for duty in self._periodic:
            if self.last_tick < duty.due:
                continue
            duty.due = self.last_tick + duty.every_s
            try:
                duty.duty()
            except Exception as exc:  # noqa: BLE001 - e.g. the database is away: next tick
                log.error("supervisor: %s failed with %s", duty.name, safe_reason(exc))

    # -- health ------------------------------------------------------------------------------

    def liveness(self) -> dict[str, bool | str]:
        """Every supervised thread alive and not stuck, and the supervisor itself ticking."""
        now = time.monotonic()
        checks: dict[str, bool | str] = {}
        silent = now - self.last_tick
        ticking = silent < max(10.0, 5 * self.config.tick_s)
        checks["supervisor"] = True if ticking else f"no tick for {silent:.0f} s"
        for loop in self.loops:
            if loop.stop_event.is_set():
                continue
            if not loop.alive:
                checks[loop.name] = "dead"
            elif loop.busy_for(now) >= self.config.stuck_after_s:
                checks[loop.name] = f"stuck for {loop.busy_for(now):.0f} s"
            else:
                checks[loop.name] = True
        return checks

    def components_alive(self, component: str) -> bool:
        now = time.monotonic()
        loops = [loop for loop in self.loops if loop.component == component and not loop.stop_event.is_set()]
        return bool(loops) and all(
            loop.alive and loop.busy_for(now) < self.config.stuck_after_s for loop in loops
        )

    # -- lifetime ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            self.tick()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
