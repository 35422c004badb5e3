"""The running node: builds every component from the settings and owns their lifetimes.

receive (``node.scp``/``node.ingest``) -> assemble (``node.assembly``) -> process
(``node.worker``: route, preprocess, predict, aggregate, build SR/SC) -> send (``node.outbox``)
-> record. The HTTP API serves the worklist, health and ``/metrics`` beside them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from inference.priority import PriorityPolicy
from inference.routing import BelowMinimum, load_keywords
from node import __version__
from node.analysis import AnalysisConfig
from node.api import ApiServer
from node.assembly import StudyAssembler
from node.database import open_database
from node.export import peer_for
from node.ingest import StoreHandler
from node.metrics import Metrics
from node.modelset import ModelSet, load_model_set
from node.outbox import OutboxConfig, OutboxRunner
from node.outputs import OutputConfig
from node.scp import DicomServer, ScpConfig, TlsConfig
from node.settings import DicomSettings, Settings
from node.spool import Spool, SpoolConfig
from node.supervision import LeaseBook, Supervisor, SupervisorConfig
from node.worker import StudyProcessor, WorkerConfig, WorkerPool, results_directory
from storage import repo
from storage.db import Database
from storage.errors import StorageError

log = logging.getLogger(__name__)


def _reachable(host: str, port: int, timeout: float = 2.0) -> bool | str:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as exc:
        return f"unreachable: {exc.strerror or exc}"


def spool_config(settings: Settings) -> SpoolConfig:
    s = settings.spool
    return SpoolConfig(
        directory=Path(s.directory), min_free_bytes=s.min_free_bytes, min_free_fraction=s.min_free_fraction
    )


def scp_config(settings: Settings) -> ScpConfig:
    d = settings.dicom
    return ScpConfig(
        ae_title=d.ae_title,
        host=d.host,
        port=d.port,
        max_pdu_bytes=d.max_pdu_bytes,
        max_associations=d.max_associations,
        acse_timeout_s=d.acse_timeout_s,
        dimse_timeout_s=d.dimse_timeout_s,
        network_timeout_s=d.network_timeout_s,
        allowed_calling_aets=tuple(d.allowed_calling_aets),
        allowed_hosts=tuple(d.allowed_hosts),
        max_pending_connections=d.max_pending_connections,
        tls=_tls_config(d),
    )


def _tls_config(d: DicomSettings) -> TlsConfig | None:
    if d.tls_cert_file is None or d.tls_key_file is None or not (d.tls_only or d.tls_port is not None):
        return None
    return TlsConfig(
        cert_file=d.tls_cert_file, key_file=d.tls_key_file, ca_file=d.tls_ca_file, port=d.tls_port
    )


def analysis_config(settings: Settings) -> AnalysisConfig:
    p = settings.pipeline
    return AnalysisConfig(
        max_pixels=p.max_pixels,
        aggregation=p.aggregation,
        batch_size=settings.worker.batch_size,
        stretch=p.stretch,
        clahe=p.clahe,
        gradcam=settings.export.gradcam_sc,
        priority=PriorityPolicy(
            cap_out_of_group=settings.priority.cap_out_of_group,
            cap_pixel_guessed=settings.priority.cap_pixel_guessed,
        ),
        min_image_confidence=settings.routing.min_image_confidence,
        below_minimum=BelowMinimum(settings.routing.below_minimum),
    )


def output_config(settings: Settings) -> OutputConfig:
    return OutputConfig(
        directory=results_directory(Path(settings.spool.directory)),
        software_version=__version__,
        destinations=tuple(d.name for d in settings.export.destinations),
        sc_transfer_syntax=settings.export.sc_transfer_syntax,
        summary_sc=settings.export.summary_sc,
        gsps=settings.export.gsps,
        hl7_destination="hl7" if settings.hl7.host else None,
    )


def outbox_config(settings: Settings) -> OutboxConfig:
    e = settings.export
    return OutboxConfig(
        calling_ae_title=e.calling_ae_title,
        max_attempts=e.max_attempts,
        base_delay_s=e.base_delay_s,
        max_delay_s=e.max_delay_s,
        max_pdu=settings.dicom.max_pdu_bytes,
        hl7_host=settings.hl7.host,
        hl7_port=settings.hl7.port,
        hl7_timeout_s=settings.hl7.timeout_s,
        lease_seconds=e.lease_seconds,
    )


def load_models(settings: Settings) -> ModelSet:
    m = settings.models
    return load_model_set(
        m.directory, device=m.device, include_bundled=m.include_bundled, allow_unproven=m.allow_unproven
    )


@dataclass
class Node:
    """Every long-lived component of a running node."""

    settings: Settings
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    db: Database = field(init=False)
    spool: Spool = field(init=False)
    metrics: Metrics = field(init=False)
    server: DicomServer = field(init=False)
    assembler: StudyAssembler = field(init=False)
    models: ModelSet = field(init=False)
    workers: WorkerPool | None = field(init=False, default=None)
    outbox: OutboxRunner = field(init=False)
    leases: LeaseBook = field(init=False)
    supervisor: Supervisor = field(init=False)
    destinations: dict[str, bool | str] = field(init=False, default_factory=dict)
    api: ApiServer | None = field(init=False, default=None)
    _stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        s = self.settings
        self.metrics = Metrics(self.registry)
        self.db = open_database(s)
        self.spool = Spool(spool_config(s))
        handler = StoreHandler(self.spool, self.db, self.metrics)
        self.server = DicomServer(scp_config(s), handler, self.metrics)
        self.metrics.build_info.info({"version": __version__})
        self.models = load_models(s) if s.worker.threads > 0 else ModelSet()
        self.metrics.set_models(self.models.cards())
        if s.worker.threads > 0 and not self.models.available:
            log.warning("no fracture model is installed: every study will be reported as not analysed")
        self.leases = LeaseBook()
        self.supervisor = Supervisor(
            self.db,
            self.metrics,
            self.leases,
            SupervisorConfig(
                stuck_after_s=s.worker.stuck_after_s,
                job_lease_s=s.worker.lease_seconds,
                outbox_lease_s=s.export.lease_seconds,
            ),
        )
        self.outbox = OutboxRunner(
            self.db,
            {d.name: peer_for(d) for d in s.export.destinations},
            outbox_config(s),
            self.metrics,
            leases=self.leases,
            name=f"outbox-{os.getpid()}",
        )
        self.supervisor.every(15.0, "destination probe", self.probe_destinations)
        if s.worker.threads > 0:
            processor = StudyProcessor(
                self.db,
                self.spool,
                self.models,
                load_keywords(s.routing.keywords_file),
                analysis_config(s),
                output_config(s),
                self.metrics,
                WorkerConfig(
                    threads=s.worker.threads,
                    lease_seconds=s.worker.lease_seconds,
                    retry_delay_s=s.worker.retry_delay_s,
                    hl7_sending_application=s.hl7.sending_application,
                    hl7_sending_facility=s.hl7.sending_facility,
                    hl7_receiving_application=s.hl7.receiving_application,
                    hl7_receiving_facility=s.hl7.receiving_facility,
                ),
                on_outbox=self.outbox.wake,
                leases=self.leases,
            )
            self.workers = WorkerPool(
                processor, s.worker.threads, idle_poll_s=1.0, name=f"worker-{os.getpid()}"
            )
        self.assembler = StudyAssembler(
            self.db,
            self.metrics,
            quiet_seconds=s.assembly.quiet_seconds,
            poll_seconds=s.assembly.poll_seconds,
            on_ready=self.workers.wake if self.workers is not None else (lambda: None),
            max_attempts=s.worker.max_attempts,
        )
        if s.api.enabled:
            token = s.api.token.get_secret_value() if s.api.token is not None else None
            self.api = ApiServer(
                db=self.db,
                metrics=self.metrics,
                readiness=self.readiness,
                liveness=self.liveness,
                worklist_order=s.worklist.order(),
                token=token,
                host=s.api.host,
                port=s.api.port,
                tls_cert_file=s.api.tls_cert_file,
                tls_key_file=s.api.tls_key_file,
            )

    def readiness(self) -> dict[str, bool | str]:
        """What /readyz reports: can this node receive and process? Database, spool, workers and
        models. The destinations are not part of it: a PACS outage must not take the node out
        of its own Service (the PACS could no longer send in); they are in /healthz details
        and the ``fracnode_destination_up`` metric."""
        checks: dict[str, bool | str] = {}
        try:
            repo.queue_depth(self.db)
            checks["database"] = True
        except StorageError as exc:
            checks["database"] = f"unavailable: {type(exc).__name__}"
        checks["spool"] = self._spool_writable()
        if self.settings.worker.threads > 0:
            checks["workers"] = True if self.supervisor.components_alive("worker") else "not alive"
            checks["models"] = True if self.models.available else "no fracture model installed"
        return checks

    def _spool_writable(self) -> bool | str:
        if self.spool.below_watermark():
            return "below the free-space watermark"
        try:
            self.spool.probe_write()
        except OSError as exc:
            return f"not writable: {exc.strerror or type(exc).__name__}"
        return True

    def liveness(self) -> dict[str, bool | str]:
        """What /healthz reports: every thread alive and not stuck (503 otherwise); the
        destinations' last probe is shown as detail and does not make it red."""
        checks = self.supervisor.liveness()
        for name, state in self.destinations.items():
            checks[f"destination:{name}"] = state
        return checks

    def probe_destinations(self) -> None:
        for name, peer in self.outbox.peers.items():
            state = _reachable(peer.host, peer.port)
            self.destinations[name] = state
            self.metrics.destination_up.labels(destination=name).set(1 if state is True else 0)

    def refresh_metrics(self) -> None:
        free, total = self.spool.disk_usage()
        self.metrics.refresh(
            queue_depth=repo.queue_depth(self.db),
            outbox_depth=repo.outbox_depth(self.db),
            spool_free_bytes=free,
            spool_capacity_bytes=total,
        )

    def start(self) -> None:
        removed = self.spool.clean_temporary()
        if removed:
            log.info("removed %d partial spool writes left by an earlier crash", removed)
        resumed = repo.resume_interrupted(self.db, datetime.now(UTC))
        if resumed:
            log.info("resumed %d interrupted jobs", resumed)
        resent = repo.resume_outbox(self.db, datetime.now(UTC))
        if resent:
            log.info("resumed %d interrupted deliveries", resent)
        self.server.start()
        self.assembler.start(self.supervisor)
        if self.workers is not None:
            self.workers.start(self.supervisor)
        self.outbox.start(self.supervisor)
        self.supervisor.start()
        if self.api is not None:
            self.api.start()
            log.info("HTTP API on http://%s:%d", self.settings.api.host, self.api.port)
        self._refresher = threading.Thread(target=self._refresh_loop, name="metrics-refresh", daemon=True)
        self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._stopped.wait(5.0):
            try:
                self.refresh_metrics()
            except (StorageError, OSError) as exc:
                log.warning("metrics refresh failed: %s", exc)

    def stop(self) -> None:
        self.supervisor.stop()
        self.server.stop()
        self.assembler.stop()
        if self.workers is not None:
            self.workers.stop()
        self.outbox.stop()
        if self.api is not None:
            self.api.stop()
        self.db.dispose()
        self._stopped.set()

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; a clean stop finishes the current C-STORE and job."""

        def request_stop(signum: int, frame: object) -> None:
            log.info("signal %d received, stopping", signum)
            self._stopped.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        self.start()
        self._stopped.wait()
        self.stop()
