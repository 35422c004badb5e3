"""Workers: claim a ready study from the durable job queue, analyse it, write its results,
hand them to the outbox, and record the outcome.

A claim is one atomic database operation (``storage.repo.claim_job``) so several threads,
processes or machines can share the queue. Database sessions are short: none is open while
images are decoded, models run or files are written. A job whose study received new instances
meanwhile finishes as superseded; the new revision has its own job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
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
from node.hl7 import accession_number_of, build_oru
from node.logcontext import log_context
from node.metrics import Metrics, NotAnalysedReason
from node.modelset import ModelSet
from node.outputs import OutputConfig, summary, write_result
from node.redact import safe_reason
from node.spool import Spool
from node.supervision import LeaseBook, LoopThread, Supervisor
from storage import repo
from storage.db import Database
from storage.views import JobState, JobView

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    threads: int = 1
    lease_seconds: float = 30.0  # renewed by the supervisor while the job runs
    retry_delay_s: float = 30.0
    idle_poll_s: float = 1.0
    hl7_sending_application: str = "FRACNODE"
    hl7_sending_facility: str = ""
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
        leases: LeaseBook | None = None,
    ) -> None:
        self.leases = leases if leases is not None else LeaseBook()
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
        """Claim and process one job; False when the queue is empty.

        The job's boundary: an exception of any type becomes a recorded failed attempt of this
        job (its reason names the exception's type, never its text, which may quote a dataset
        value); ``max_attempts`` (counted by the queue) decides when the study is given up as
        failed, and the worker goes on with the next job either way.
        """
        job = repo.claim_job(self.db, worker_id, self.clock(), self.config.lease_seconds)
        if job is None:
            return False
        self.leases.hold_job(job.id, worker_id)
        with log_context(study=job.study_uid, job=job.id, revision=job.revision):
            return self._run_claimed(job, worker_id)

    def _run_claimed(self, job: JobView, worker_id: str) -> bool:
        try:
            self.process(job, worker_id)
        except Exception as exc:  # noqa: BLE001 - the job's boundary (see above)
            reason = failure_reason(exc)
            log.error(
                "study processing failed (attempt %d of %d): %s", job.attempts, job.max_attempts, reason
            )
            self.metrics.processing_failures.labels(stage="report").inc()
            state = repo.fail_job(
                self.db, job.id, reason, self.clock(), self.config.retry_delay_s, worker_id=worker_id
            )
            if state in (JobState.DEAD, JobState.FAILED):
                self.metrics.studies_failed.inc()
                log.error("study given up after %d attempts: %s", job.attempts, reason)
        finally:
            self.leases.release_job(job.id)
        return True

    def process(self, job: JobView, worker_id: str | None = None) -> StudyResult:
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
            worker_id=worker_id,
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
        accession = accession_number_of(sources.values())
        message = build_oru(
            result,
            accession_number=accession,
            sending_app=self.config.hl7_sending_application,
            sending_facility=self.config.hl7_sending_facility,
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
    """``threads`` supervised loop threads running :meth:`StudyProcessor.run_once`, woken when
    studies are ready; a dead or stuck thread is replaced by the :class:`Supervisor`."""

    def __init__(self, processor: StudyProcessor, threads: int, idle_poll_s: float, name: str) -> None:
        self.processor = processor
        self.threads = threads
        self.idle_poll_s = idle_poll_s
        self.name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._loops: list[LoopThread] = []

    def wake(self) -> None:
        self._wake.set()

    def _slot(self, index: int, generation: int) -> LoopThread:
        return self._loop(index, generation)

    def _loop(self, index: int, generation: int) -> LoopThread:
        suffix = f"-r{generation}" if generation else ""
        return LoopThread(
            "worker",
            f"{self.name}-{index}{suffix}",
            self.processor.run_once,
            idle_s=self.idle_poll_s,
            wake=self._wake,
            stop=self._stop,
        )

    def start(self, supervisor: Supervisor | None = None) -> None:
        for index in range(self.threads):
            if supervisor is not None:
                slot = functools.partial(self._slot, index)
                self._loops.append(supervisor.supervise(f"worker-{index}", slot))
            else:
                loop = self._loop(index, 0)
                loop.start()
                self._loops.append(loop)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for loop in self._loops:
            loop.join(timeout=60)


def failure_reason(exc: BaseException) -> str:
    """What a failed attempt records: :func:`node.redact.safe_reason` (type, package, a fixed
    description; this node's value-free reasons kept), never the exception's own text."""
    return safe_reason(exc)[:500]


def results_directory(spool_directory: Path) -> Path:
    return spool_directory.parent / "results"
