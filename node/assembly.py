"""Study assembly: a study is ready once no instance of it has arrived for a quiet window.

All state is in the database (``storage.repo.promote_quiet_studies`` is one atomic step per
study), so several node processes can run the assembler at once and a restart loses nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from node.metrics import Metrics
from node.supervision import LoopThread, Supervisor
from storage import repo
from storage.db import Database

log = logging.getLogger(__name__)


class StudyAssembler:
    """Promotes quiet studies to ``ready`` (with a pending job) every ``poll_seconds``."""

    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        *,
        quiet_seconds: float,
        poll_seconds: float,
        on_ready: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_attempts: int = 3,
    ) -> None:
        self.max_attempts = max_attempts
        self.db = db
        self.metrics = metrics
        self.quiet_seconds = quiet_seconds
        self.poll_seconds = poll_seconds
        self.on_ready = on_ready
        self.clock = clock
        self._stop = threading.Event()
        self._loop: LoopThread | None = None

    def tick(self) -> list[str]:
        """One promotion pass; returns the study UIDs that became ready."""
        ready = repo.promote_quiet_studies(
            self.db, self.quiet_seconds, self.clock(), max_attempts=self.max_attempts
        )
        if ready:
            self.metrics.studies_ready.inc(len(ready))
            log.info("%d studies ready after a quiet window of %.1f s", len(ready), self.quiet_seconds)
            self.on_ready()
        return ready

    def _step(self, _worker_id: str) -> bool:
        self.tick()
        return False  # wait poll_seconds before the next pass

    def _make_loop(self, generation: int) -> LoopThread:
        suffix = f"-r{generation}" if generation else ""
        return LoopThread(
            "assembler", f"study-assembler{suffix}", self._step, idle_s=self.poll_seconds, stop=self._stop
        )

    def start(self, supervisor: Supervisor | None = None) -> None:
        if supervisor is not None:
            self._loop = supervisor.supervise("assembler", self._make_loop)
        else:
            self._loop = self._make_loop(0)
            self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        if self._loop is not None:
            self._loop.join(timeout=10)
