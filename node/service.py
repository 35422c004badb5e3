"""The running node: builds every component from the settings and owns their lifetimes.

receive (``node.scp``/``node.ingest``) -> assemble (``node.assembly``) -> process
(``node.worker``: route, preprocess, predict, aggregate, build SR/SC) -> send (``node.outbox``)
-> record. The HTTP API serves the worklist, health and ``/metrics`` beside them.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from node.assembly import StudyAssembler
from node.ingest import StoreHandler
from node.metrics import Metrics
from node.scp import DicomServer, ScpConfig
from node.settings import Settings
from node.spool import Spool, SpoolConfig
from storage import repo
from storage.config import StorageConfig
from storage.db import Database

log = logging.getLogger(__name__)


def storage_config(settings: Settings) -> StorageConfig:
    return StorageConfig(url=settings.database.url, busy_timeout_s=settings.database.busy_timeout_s)


def spool_config(settings: Settings) -> SpoolConfig:
    s = settings.spool
    return SpoolConfig(directory=Path(s.directory), min_free_bytes=s.min_free_bytes, min_free_fraction=s.min_free_fraction)


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
    )


def open_database(settings: Settings) -> Database:
    db = Database(storage_config(settings))
    db.create_all()
    return db


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
    _extras: list[Any] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        s = self.settings
        self.metrics = Metrics(self.registry)
        self.db = open_database(s)
        self.spool = Spool(spool_config(s))
        handler = StoreHandler(self.spool, self.db, self.metrics)
        self.server = DicomServer(scp_config(s), handler, self.metrics)
        self.assembler = StudyAssembler(
            self.db,
            self.metrics,
            quiet_seconds=s.assembly.quiet_seconds,
            poll_seconds=s.assembly.poll_seconds,
        )

    def start(self) -> None:
        removed = self.spool.clean_temporary()
        if removed:
            log.info("removed %d partial spool writes left by an earlier crash", removed)
        resumed = repo.resume_interrupted(self.db, datetime.now(UTC))
        if resumed:
            log.info("resumed %d interrupted jobs", resumed)
        self.server.start()
        self.assembler.start()

    def stop(self) -> None:
        self.assembler.stop()
        for extra in reversed(self._extras):
            extra.stop()
        self.server.stop()
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
