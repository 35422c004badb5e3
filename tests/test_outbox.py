"""The outbox runner against real destinations: down then up, and one that always refuses."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt

from node.export import Peer
from node.metrics import Metrics
from node.outbox import OutboxConfig, OutboxRunner
from storage import repo
from storage.config import StorageConfig
from storage.db import Database
from storage.views import InstanceRecord, OutboxKind, OutboxRecord, OutboxState
from tests.conftest import free_port
from tests.dicomgen import DX_PRESENTATION, make_dataset, write
from tests.nodeproc import fracnode


class Destination:
    """A pynetdicom storage SCP that counts what it receives and answers ``status``."""

    def __init__(self, port: int, status: int = 0x0000) -> None:
        self.port = port
        self.status = status
        self.received: list[str] = []
        self._lock = threading.Lock()
        self.ae = AE(ae_title="PACS")
        self.ae.add_supported_context(DX_PRESENTATION, ExplicitVRLittleEndian)
        self.server: Any = None

    def _store(self, event: Any) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def start(self) -> None:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def stop(self) -> None:
        self.ae.shutdown()

    def __enter__(self) -> Destination:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(StorageConfig(url=f"sqlite:///{tmp_path / 'node.db'}"))
    database.create_all()
    yield database  # type: ignore[misc]
    database.dispose()


def _record_source(db: Database, ds: Dataset) -> None:
    """The study an outbox item belongs to, as the C-STORE handler would have recorded it."""
    repo.record_instance(
        db,
        InstanceRecord(
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ExplicitVRLittleEndian),
            path="x.dcm",
            size_bytes=1,
            sha256="0" * 64,
            modality="DX",
            body_part="WRIST",
            calling_ae="TEST",
            received_at=datetime.now(UTC),
        ),
    )


def _enqueue(db: Database, tmp_path: Path, destination: str = "pacs") -> str:
    ds = make_dataset()
    path = write(ds, tmp_path / "result.dcm")
    _record_source(db, ds)
    repo.enqueue_outbox(
        db,
        [
            OutboxRecord(
                study_uid=str(ds.StudyInstanceUID),
                revision=1,
                kind=OutboxKind.DICOM,
                destination=destination,
                payload_path=str(path),
                sop_instance_uid=str(ds.SOPInstanceUID),
                dimse_priority=1,
            )
        ],
    )
    return str(ds.SOPInstanceUID)


def _runner(db: Database, port: int, registry: CollectorRegistry, attempts: int = 3) -> OutboxRunner:
    return OutboxRunner(
        db,
        {"pacs": Peer(ae_title="PACS", host="127.0.0.1", port=port)},
        OutboxConfig(calling_ae_title="FRACNODE", max_attempts=attempts, base_delay_s=0.05, max_delay_s=0.2),
        Metrics(registry),
        rng=random.Random(0),
    )


def _drain(runner: OutboxRunner, until: float = 10.0) -> None:
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        if not runner.run_once() and all(
            item.state in (OutboxState.DELIVERED, OutboxState.DEAD) for item in repo.list_outbox(runner.db)
        ):
            return
        time.sleep(0.05)


def test_destination_down_then_up_is_delivered_once(db: Database, tmp_path: Path) -> None:
    port = free_port()
    registry = CollectorRegistry()
    runner = _runner(db, port, registry, attempts=5)
    sop_uid = _enqueue(db, tmp_path)

    assert runner.run_once()  # nobody listens: a failed attempt, scheduled again
    (item,) = repo.list_outbox(db)
    assert item.state == OutboxState.PENDING and item.attempts == 1 and item.last_error
    assert registry.get_sample_value("fracnode_export_retries_total", {"destination": "pacs"}) == 1

    with Destination(port) as destination:
        _drain(runner)
    (item,) = repo.list_outbox(db)
    assert item.state == OutboxState.DELIVERED and item.last_status == 0
    assert destination.received == [sop_uid]
    assert (
        registry.get_sample_value("fracnode_exports_total", {"destination": "pacs", "outcome": "sent"}) == 1
    )


def test_refusing_destination_ends_in_dead_letter_and_can_be_retried(db: Database, tmp_path: Path) -> None:
    port = free_port()
    registry = CollectorRegistry()
    runner = _runner(db, port, registry, attempts=3)
    _enqueue(db, tmp_path)
    with Destination(port, status=0xA700) as destination:
        _drain(runner)
    (item,) = repo.list_outbox(db)
    assert item.state == OutboxState.DEAD and item.attempts == 3 and item.last_status == 0xA700
    assert len(destination.received) == 3
    assert registry.get_sample_value("fracnode_export_dead_letters_total", {"destination": "pacs"}) == 1

    config = tmp_path / "fracnode.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "node.db"}"\n')
    listed = fracnode("outbox", "list", "--state", "dead", config=config)
    assert listed.returncode == 0 and "0xA700" in listed.stdout and "dead" in listed.stdout
    retried = fracnode("outbox", "retry", config=config)
    assert retried.returncode == 0 and "1 items" in retried.stdout
    (item,) = repo.list_outbox(db)
    assert item.state == OutboxState.PENDING and item.attempts == 0
    unknown = fracnode("outbox", "retry", "999", config=config)
    assert unknown.returncode == 2


def test_warning_status_counts_as_delivered(db: Database, tmp_path: Path) -> None:
    port = free_port()
    runner = _runner(db, port, CollectorRegistry())
    _enqueue(db, tmp_path)
    with Destination(port, status=0xB000):
        _drain(runner)
    (item,) = repo.list_outbox(db)
    assert item.state == OutboxState.DELIVERED and item.last_status == 0xB000


def test_hl7_result_goes_through_the_same_outbox(db: Database, tmp_path: Path) -> None:
    from node.hl7 import build_oru
    from tests.test_hl7 import MllpListener, urgent_study

    result = urgent_study()
    ds = make_dataset(study_uid=result.study_instance_uid)
    _record_source(db, ds)
    message = build_oru(
        result,
        accession_number="ACC1",
        sending_app="FRACNODE",
        receiving_app="RIS",
        receiving_facility="HOSPITAL",
        control_id="T1",
    )
    payload = tmp_path / "oru.hl7"
    payload.write_bytes(str(message).encode("utf-8"))  # segments end in CR: no text-mode newline handling
    repo.enqueue_outbox(
        db,
        [
            OutboxRecord(
                study_uid=result.study_instance_uid,
                revision=1,
                kind=OutboxKind.HL7,
                destination="hl7",
                payload_path=str(payload),
            )
        ],
    )
    port = free_port()
    registry = CollectorRegistry()
    runner = OutboxRunner(
        db,
        {},
        OutboxConfig(
            calling_ae_title="FRACNODE",
            max_attempts=5,
            base_delay_s=0.05,
            max_delay_s=0.1,
            hl7_host="127.0.0.1",
            hl7_port=port,
            hl7_timeout_s=2.0,
        ),
        Metrics(registry),
        rng=random.Random(0),
    )
    assert runner.run_once()  # the RIS is down: retried later
    assert repo.list_outbox(db)[0].state == OutboxState.PENDING
    with MllpListener(port) as listener:
        _drain(runner)
    (item,) = repo.list_outbox(db)
    assert item.state == OutboxState.DELIVERED
    assert len(listener.received) == 1 and str(listener.received[0]) == str(message)
    assert registry.get_sample_value("fracnode_exports_total", {"destination": "hl7", "outcome": "sent"}) == 1
