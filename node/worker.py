"""Workers: claim a ready study from the durable job queue, analyse it, write its results,
hand them to the outbox, and record the outcome.

A claim is one atomic database operation (``storage.repo.claim_job``) so several threads,
processes or machines can share the queue. Database sessions are short: none is open while
images are decoded, models run or files are written. A job whose study received new instances
meanwhile finishes as superseded; the new revision has its own job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset

from inference.priority import signal_decision
from inference.regions import Region
from inference.routing import KeywordTable
from inference.values import Priority, StudyResult
from node.analysis import AnalysisConfig, analyse_study
from node.hl7 import build_oru
from node.metrics import Metrics, NotAnalysedReason
from node.modelset import ModelSet
from node.outputs import OutputConfig, summary, write_result
from node.results.common import ResultBuildError
from node.spool import Spool
from storage import repo
from storage.db import Database
from storage.errors import StorageError
from storage.views import JobView

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    threads: int = 1
    lease_seconds: float = 900.0
    retry_delay_s: float = 30.0
    idle_poll_s: float = 1.0
    hl7_sending_application: str = "FRACNODE"
    hl7_receiving_application: str = "RIS"
    hl7_receiving_facility: str = "HOSPITAL"


class StudyProcessor:
    """Processes one claimed job end to end; shared by all worker threads (stateless)."""

    def __init__(
        self,
        db: Database,
        spool: Spool,
        models: ModelSet,
        keywords: KeywordTable,
        analysis: AnalysisConfig,
        outputs: OutputConfig,
        metrics: Metrics,
        config: WorkerConfig,
        on_outbox: Callable[[], None] = lambda: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.spool = spool
        self.models = models
        self.keywords = keywords
        self.analysis = analysis
        self.outputs = outputs
        self.metrics = metrics
        self.config = config
        self.on_outbox = on_outbox
        self.clock = clock

    def run_once(self, worker_id: str) -> bool:
        """Claim and process one job; False when the queue is empty."""
        job = repo.claim_job(self.db, worker_id, self.clock(), self.config.lease_seconds)
        if job is None:
            return False
        try:
            self.process(job)
        except (ResultBuildError, OSError, ValueError, RuntimeError) as exc:
            log.exception("study processing failed (job %d, revision %d)", job.id, job.revision)
            self.metrics.processing_failures.labels(stage="report").inc()
            repo.fail_job(
                self.db, job.id, f"{type(exc).__name__}: {exc}"[:500], self.clock(), self.config.retry_delay_s
            )
        return True

    def process(self, job: JobView) -> StudyResult:
        instances = repo.study_instances(self.db, job.study_uid)
        files = [self.spool.path(i.path) for i in instances]
        analysis = analyse_study(
            job.study_uid,
            job.revision,
            files,
            models=self.models,
            keywords=self.keywords,
            config=self.analysis,
            metrics=self.metrics,
        )
        result = analysis.result
        detail = repo.get_study(self.db, job.study_uid)
        previous = detail.study.signalled_priority if detail is not None else None
        signal, effective = signal_decision(Priority(previous) if previous else None, result.priority)
        if not signal:
            self.metrics.priority_lowering_withheld.labels(priority=str(effective)).inc()
            log.info(
                "revision %d is %s, lower than the signalled %s: recorded, not pushed",
                job.revision,
                result.priority,
                effective,
            )
        with self.metrics.time_stage("report"):
            hl7 = self._hl7(result, analysis.sources) if self.outputs.hl7_destination else None
            written = write_result(analysis, self.outputs, signal=signal, hl7_message=hl7)
        record = summary(result)
        record["effective_priority"] = str(effective)
        applied = repo.finish_job(
            self.db,
            job.id,
            revision=job.revision,
            priority=str(effective),
            score=result.score,
            outcome_json=json.dumps(record),
            groups=tuple(str(g.group) for g in result.groups),
            outbox=list(written.outbox),
        )
        if not applied:
            log.info("result of revision %d superseded by newer instances", job.revision)
            return result
        if signal:
            repo.set_signalled_priority(self.db, job.study_uid, str(effective))
        self.metrics.observe_study(result)
        if not result.groups:
            self.metrics.study_not_analysed(_reason_label(result))
        if written.outbox:
            self.on_outbox()
        log.info(
            "study processed: revision %d, priority %s, %d groups, %d objects",
            job.revision,
            result.priority,
            len(result.groups),
            len(written.files),
        )
        return result

    def _hl7(self, result: StudyResult, sources: dict[str, Dataset]) -> bytes:
        accession = next((str(ds.get("AccessionNumber", "") or "") for ds in sources.values()), "") or None
        message = build_oru(
            result,
            accession_number=accession,
            sending_app=self.config.hl7_sending_application,
            receiving_app=self.config.hl7_receiving_application,
            receiving_facility=self.config.hl7_receiving_facility,
            control_id=_control_id(result),
        )
        return str(message).encode("utf-8")


def _control_id(result: StudyResult) -> str:
    """MSH-10 (at most 20 characters), the same for the same study revision in every process."""
    digest = hashlib.sha256(result.study_instance_uid.encode("ascii")).hexdigest()
    return f"FN{int(digest[:15], 16) % 10**12:012d}R{result.revision}"[:20]


def _reason_label(result: StudyResult) -> NotAnalysedReason:
    """The bounded metric label of a study that no group could analyse."""
    if not result.not_analysed:
        return "no_images"
    if any(image.error for image in result.not_analysed):
        return "decode_failed"
    if any(image.routing.region in (Region.OTHER, Region.UNKNOWN) for image in result.not_analysed):
        return "region_not_supported"
    return "no_model"


class WorkerPool:
    """``threads`` threads running :meth:`StudyProcessor.run_once`, woken when studies are ready."""

    def __init__(self, processor: StudyProcessor, threads: int, idle_poll_s: float, name: str) -> None:
        self.processor = processor
        self.threads = threads
        self.idle_poll_s = idle_poll_s
        self.name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def wake(self) -> None:
        self._wake.set()

    def _run(self, worker_id: str) -> None:
        while not self._stop.is_set():
            try:
                busy = self.processor.run_once(worker_id)
            except StorageError as exc:
                log.error("worker %s: database unavailable, retrying: %s", worker_id, exc)
                busy = False
                time.sleep(self.idle_poll_s)
            if not busy:
                self._wake.wait(self.idle_poll_s)
                self._wake.clear()

    def start(self) -> None:
        for index in range(self.threads):
            thread = threading.Thread(
                target=self._run, args=(f"{self.name}-{index}",), name=f"worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=60)


def results_directory(spool_directory: Path) -> Path:
    return spool_directory.parent / "results"
