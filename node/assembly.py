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
from storage import repo
from storage.db import Database
from storage.errors import StorageError

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
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.quiet_seconds = quiet_seconds
        self.poll_seconds = poll_seconds
        self.on_ready = on_ready
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> list[str]:
        """One promotion pass; returns the study UIDs that became ready."""
        ready = repo.promote_quiet_studies(self.db, self.quiet_seconds, self.clock())
        if ready:
            self.metrics.studies_ready.inc(len(ready))
            log.info("%d studies ready after a quiet window of %.1f s", len(ready), self.quiet_seconds)
            self.on_ready()
        return ready

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.tick()
            except StorageError as exc:
                log.error("study assembly pass failed, retrying: %s", exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="study-assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
