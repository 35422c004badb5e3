"""The outbox runner: delivers results persisted in the database, with retries.

Each item is claimed atomically (``storage.repo.claim_outbox``), sent (C-STORE to a DICOM
destination proposing the object's own transfer syntax, or an HL7 message over MLLP), and
marked delivered or failed. A failure is retried after an exponential backoff with jitter until
``max_attempts``, then the item becomes a dead letter (``fracnode outbox list/retry/purge``).
Warning statuses 0xB000, 0xB006, 0xB007 count as delivered. A restart resumes the outbox: the
items are rows, not memory.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from node.export import ExportError, Peer, backoff_delay, send_files
from node.hl7 import Hl7DeliveryError, send_mllp
from node.logcontext import log_context
from node.metrics import Metrics
from node.redact import safe_reason
from node.supervision import LeaseBook, LoopThread, Supervisor
from storage import repo
from storage.db import Database
from storage.views import OutboxKind, OutboxState, OutboxView

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutboxConfig:
    calling_ae_title: str
    max_attempts: int
    base_delay_s: float
    max_delay_s: float
    max_pdu: int = 1_048_576
    hl7_host: str | None = None
    hl7_port: int = 2575
    hl7_timeout_s: float = 10.0
    lease_seconds: float = 30.0  # renewed by the supervisor while a delivery runs


class OutboxRunner:
    def __init__(
        self,
        db: Database,
        peers: Mapping[str, Peer],
        config: OutboxConfig,
        metrics: Metrics,
        *,
        poll_seconds: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        leases: LeaseBook | None = None,
        name: str = "outbox",
    ) -> None:
        self.leases = leases if leases is not None else LeaseBook()
        self.name = name
        self.db = db
        self.peers = dict(peers)
        self.config = config
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.clock = clock
        self.rng = rng or random.Random()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._loop: LoopThread | None = None

    def wake(self) -> None:
        self._wake.set()

    def run_once(self, worker_id: str = "outbox") -> bool:
        item = repo.claim_outbox(self.db, self.clock(), worker_id, lease_seconds=self.config.lease_seconds)
        if item is None:
            return False
        self.leases.hold_item(item.id, worker_id)
        try:
            with log_context(
                item=item.id, destination=item.destination, study=item.study_uid, revision=item.revision
            ):
                return self._attempt(item)
        finally:
            self.leases.release_item(item.id)

    def _attempt(self, item: OutboxView) -> bool:
        try:
            status, error = self._deliver(item)
        except Exception as exc:  # noqa: BLE001 - a delivery's boundary: record it, carry on
            status, error = None, f"delivery failed with {safe_reason(exc)}"
        now = self.clock()
        if error is None:
            repo.outbox_delivered(self.db, item.id, status if status is not None else 0, now)
            self.metrics.export_attempt(item.destination, sent=True)
            self._observe_latency(item.study_uid, item.revision, now)
            return True
        attempt = item.attempts  # the claim counted this attempt
        will_retry = attempt < self.config.max_attempts
        next_at = None
        if will_retry:
            delay = backoff_delay(attempt, self.config.base_delay_s, self.config.max_delay_s, self.rng)
            next_at = now + timedelta(seconds=delay)
        repo.outbox_failed(self.db, item.id, status, error[:500], now, next_at)
        self.metrics.export_attempt(item.destination, sent=False, will_retry=will_retry)
        log.warning(
            "delivery failed (attempt %d of %d): %s%s",
            attempt,
            self.config.max_attempts,
            error,
            "" if will_retry else " -> dead letter",
        )
        return True

    def _observe_latency(self, study_uid: str, revision: int, now: datetime) -> None:
        """Study latency: from ready to the last result of its revision acknowledged."""
        detail = repo.get_study(self.db, study_uid)
        if detail is None or detail.study.ready_at is None or detail.study.revision != revision:
            return
        items = [i for i in detail.outbox if i.revision == revision]
        if items and all(i.state == OutboxState.DELIVERED for i in items):
            self.metrics.study_latency.observe(max(0.0, (now - detail.study.ready_at).total_seconds()))

    def _deliver(self, item: OutboxView) -> tuple[int | None, str | None]:
        path = Path(item.payload_path)
        if not path.is_file():
            return None, f"payload {path} is missing"
        if item.kind == OutboxKind.HL7:
            if self.config.hl7_host is None:
                return None, "no HL7 endpoint configured (hl7.host)"
            try:
                with self.metrics.time_stage("send"):
                    send_mllp(
                        self.config.hl7_host,
                        self.config.hl7_port,
                        path.read_bytes().decode("utf-8"),  # HL7 segments end in CR: no newline translation
                        self.config.hl7_timeout_s,
                    )
            except Hl7DeliveryError as exc:
                return None, str(exc)
            return 0, None
        peer = self.peers.get(item.destination)
        if peer is None:
            return None, f"destination {item.destination!r} is not configured"
        try:
            with self.metrics.time_stage("send"):
                (outcome,) = send_files(
                    peer,
                    [path],
                    calling_ae=self.config.calling_ae_title,
                    priority=item.dimse_priority,
                    max_pdu=self.config.max_pdu,
                )
        except ExportError as exc:
            return None, str(exc)
        if outcome.delivered:
            return outcome.status, None
        return outcome.status, outcome.error or f"status 0x{(outcome.status or 0):04X}"

    def _make_loop(self, generation: int) -> LoopThread:
        suffix = f"-r{generation}" if generation else ""
        return LoopThread(
            "outbox",
            f"{self.name}{suffix}",
            self.run_once,
            idle_s=self.poll_seconds,
            wake=self._wake,
            stop=self._stop,
        )

    def start(self, supervisor: Supervisor | None = None) -> None:
        if supervisor is not None:
            self._loop = supervisor.supervise("outbox", self._make_loop)
        else:
            self._loop = self._make_loop(0)
            self._loop.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._loop is not None:
            self._loop.join(timeout=60)
