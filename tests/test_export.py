"""C-STORE SCU: real associations on 127.0.0.1 against a pynetdicom SCP started here, and Orthanc.

The files sent are the node's own results (TID 1500 SR, Secondary Captures) built from generated
radiographs, so a transfer-syntax or SOP-class problem in them would show here too.
"""

from __future__ import annotations

import random
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, JPEGLSLossless, SecondaryCaptureImageStorage
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from inference.values import Box
from node.export import (
    AssociationRejectedError,
    DestinationUnreachableError,
    NoPresentationContextError,
    Peer,
    Priority,
    SendOutcome,
    StoreStatus,
    backoff_delay,
    is_delivered,
    peer_for,
    send_files,
)
from node.results.gsps import build_gsps
from node.results.overlay import build_overlays
from node.results.sr import build_sr
from node.results.summary import build_summary
from node.settings import Destination
from tests.orthanc import OrthancServer
from tests.resultgen import frames_of, study_result, wrist_sources

CALLING = "FRACNODE"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"


@dataclass
class Received:
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    priority: int


@dataclass
class Scp:
    """A pynetdicom storage SCP on 127.0.0.1 that records what it stores and answers ``status``."""

    port: int
    status: int = StoreStatus.SUCCESS
    ae_title: str = "PACS"
    sop_classes: tuple[str, ...] = ()  # empty: what the node sends and receives (SR, SC, GSPS, DX, CR)
    require_called_aet: bool = False
    tls: ssl.SSLContext | None = None
    received: list[Received] = field(default_factory=list)
    associations: int = 0
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Scp:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = self.require_called_aet
        classes = self.sop_classes or (
            COMPREHENSIVE_3D_SR,
            SecondaryCaptureImageStorage,
            GSPS,
            DX_PRESENTATION,
            CR,
        )
        for sop_class in classes:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.maximum_pdu_size = 1_048_576
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=self.tls,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_ESTABLISHED, self._on_established)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_established(self, event: Event) -> None:
        with self._lock:
            self.associations += 1

    def _on_store(self, event: Event) -> int:
        request = event.request
        with self._lock:
            self.received.append(
                Received(
                    sop_instance_uid=str(request.AffectedSOPInstanceUID),
                    sop_class_uid=str(request.AffectedSOPClassUID),
                    transfer_syntax=str(event.context.transfer_syntax),
                    priority=int(request.Priority),
                )
            )
        return int(self.status)


@pytest.fixture
def scp_factory(port: int) -> Iterator[Callable[..., Scp]]:
    started: list[Scp] = []

    def start(**kwargs: object) -> Scp:
        scp = Scp(port=port, **kwargs).start()  # type: ignore[arg-type]
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


@dataclass(frozen=True)
class ResultFiles:
    study_uid: str
    sources: tuple[Path, ...]
    sr: Path
    scs: tuple[Path, ...]  # JPEG-LS overlays
    extras: tuple[Path, ...]  # the summary SC and the GSPS

    @property
    def results(self) -> list[Path]:
        return [self.sr, *self.scs]


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def result_files(tmp_path: Path) -> ResultFiles:
    """A two-image DX study and every result object built for it, written to files."""
    sources = wrist_sources(2)
    result = study_result(sources, boxes=[(Box(10, 20, 40, 60, 0.81),), ()])
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    scs = build_overlays(
        result, by_uid, frames_of(sources), software_version="test", transfer_syntax="jpeg-ls"
    )
    extras = [build_summary(result, by_uid, software_version="test")]
    extras += build_gsps(result, by_uid, software_version="test")
    return ResultFiles(
        study_uid=result.study_instance_uid,
        sources=tuple(_save(ds, tmp_path / f"dx{i}.dcm") for i, ds in enumerate(sources)),
        sr=_save(build_sr(result, by_uid, software_version="test"), tmp_path / "sr.dcm"),
        scs=tuple(_save(ds, tmp_path / f"sc{i}.dcm") for i, ds in enumerate(scs)),
        extras=tuple(_save(ds, tmp_path / f"extra{i}.dcm") for i, ds in enumerate(extras)),
    )


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_one_association_each_file_in_its_own_syntax(
    scp_factory: Callable[..., Scp], port: int, result_files: ResultFiles
) -> None:
    scp = scp_factory()
    outcomes = send_files(
        Peer("PACS", "127.0.0.1", port), result_files.results, calling_ae=CALLING, priority=Priority.HIGH
    )
    assert outcomes == [SendOutcome(_uid(path), 0, True, None) for path in result_files.results]
    assert scp.associations == 1
    syntaxes = {r.sop_instance_uid: (r.sop_class_uid, r.transfer_syntax) for r in scp.received}
    assert syntaxes[_uid(result_files.sr)][0] == COMPREHENSIVE_3D_SR
    for sc in result_files.scs:
        assert syntaxes[_uid(sc)] == (SecondaryCaptureImageStorage, JPEGLSLossless)  # not transcoded
    assert {r.priority for r in scp.received} == {Priority.HIGH}


def test_destination_down_then_up_delivers_once(
    scp_factory: Callable[..., Scp], port: int, result_files: ResultFiles
) -> None:
    peer = Peer("PACS", "127.0.0.1", port)
    with pytest.raises(DestinationUnreachableError) as caught:
        send_files(peer, [result_files.sr], calling_ae=CALLING, connection_timeout_s=2)
    assert caught.value.destination == f"PACS@127.0.0.1:{port}"
    scp = scp_factory()
    (outcome,) = send_files(peer, [result_files.sr], calling_ae=CALLING)
    assert outcome.delivered and outcome.status == 0
    assert [r.sop_instance_uid for r in scp.received] == [_uid(result_files.sr)]


def test_rejecting_destination_reports_the_status(
    scp_factory: Callable[..., Scp], port: int, result_files: ResultFiles
) -> None:
    scp_factory(status=StoreStatus.OUT_OF_RESOURCES)
    outcomes = send_files(Peer("PACS", "127.0.0.1", port), result_files.results, calling_ae=CALLING)
    for outcome in outcomes:
        assert not outcome.delivered
        assert outcome.status == 0xA700
        assert outcome.error is not None and "0xA700" in outcome.error


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007])
def test_warning_statuses_count_as_delivered(
    scp_factory: Callable[..., Scp], port: int, result_files: ResultFiles, status: int
) -> None:
    scp_factory(status=status)
    (outcome,) = send_files(Peer("PACS", "127.0.0.1", port), [result_files.sr], calling_ae=CALLING)
    assert outcome == SendOutcome(_uid(result_files.sr), status, True, None)


def test_is_delivered() -> None:
    assert is_delivered(0x0000)
    assert all(is_delivered(s) for s in (0xB000, 0xB006, 0xB007))
    assert not any(is_delivered(s) for s in (0xA700, 0xA900, 0xC000, 0x0110, 0x0122, 0xB001, 0xFF00))


def test_association_rejected_names_the_reason(
    scp_factory: Callable[..., Scp], port: int, result_files: ResultFiles
) -> None:
    scp_factory(ae_title="PACS", require_called_aet=True)
    with pytest.raises(AssociationRejectedError) as caught:
        send_files(Peer("WRONG", "127.0.0.1", port), [result_files.sr], calling_ae=CALLING)
    error = caught.value
    assert (error.result, error.source, error.reason) == (0x01, 0x01, 0x07)  # called AE not recognised
    assert error.destination == f"WRONG@127.0.0.1:{port}"


def test_no_acceptable_context(scp_factory: Callable[..., Scp], port: int, result_files: ResultFiles) -> None:
    scp_factory(sop_classes=(CTImageStorage,))
    with pytest.raises(NoPresentationContextError):
        send_files(Peer("PACS", "127.0.0.1", port), result_files.results, calling_ae=CALLING)


def test_file_without_an_accepted_context_fails_alone(
    scp_factory: Callable[..., Scp], port: int, result_files: ResultFiles
) -> None:
    scp = scp_factory(sop_classes=(SecondaryCaptureImageStorage,))
    sr_outcome, *sc_outcomes = send_files(
        Peer("PACS", "127.0.0.1", port), result_files.results, calling_ae=CALLING
    )
    assert not sr_outcome.delivered and sr_outcome.status is None
    assert sr_outcome.error is not None and "no presentation context" in sr_outcome.error
    assert all(o.delivered for o in sc_outcomes)
    assert len(scp.received) == 2


def _self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=fracnode-test",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_destination(
    scp_factory: Callable[..., Scp], port: int, result_files: ResultFiles, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    scp = scp_factory(tls=server)
    destination = Destination(
        name="pacs", ae_title="PACS", host="127.0.0.1", port=port, tls=True, tls_ca_file=cert
    )
    (outcome,) = send_files(peer_for(destination), [result_files.sr], calling_ae=CALLING)
    assert outcome.delivered
    assert len(scp.received) == 1
    untrusted = Peer("PACS", "127.0.0.1", port, ssl.create_default_context())  # system CAs only
    with pytest.raises(DestinationUnreachableError):
        send_files(untrusted, [result_files.sr], calling_ae=CALLING)


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(300.0, 2.0 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 2.0, 300.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 150  # jittered, not a constant
    assert backoff_delay(10_000, 2.0, 300.0, rng) <= 300.0  # no overflow on a huge attempt
    same = [backoff_delay(3, 1.0, 60.0, random.Random(1)) for _ in range(2)]
    assert same[0] == same[1]
    with pytest.raises(ValueError):
        backoff_delay(0, 1.0, 60.0, rng)


def test_unreadable_file_is_a_bug_not_a_destination_problem(tmp_path: Path, port: int) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with pytest.raises(ValueError, match="not a readable DICOM file"):
        send_files(Peer("PACS", "127.0.0.1", port), [junk], calling_ae=CALLING)


@pytest.mark.orthanc
def test_orthanc_keeps_one_copy_of_each_result(orthanc: OrthancServer, result_files: ResultFiles) -> None:
    for source in result_files.sources:
        orthanc.upload(source)
    peer = Peer(orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    everything = [*result_files.results, *result_files.extras]
    first = send_files(peer, everything, calling_ae=CALLING, max_pdu=131072)
    assert all(o.delivered for o in first), first
    instances = orthanc.wait_for(result_files.study_uid, lambda found: len(found) == 8)
    by_class: dict[str, int] = {}
    for instance in instances:
        by_class[instance.sop_class_uid] = by_class.get(instance.sop_class_uid, 0) + 1
    # 2 radiographs; the SR; 2 overlays and the summary; a GSPS per radiograph.
    assert by_class == {DX_PRESENTATION: 2, COMPREHENSIVE_3D_SR: 1, SecondaryCaptureImageStorage: 3, GSPS: 2}
    (sr,) = (i for i in instances if i.sop_class_uid == COMPREHENSIVE_3D_SR)
    tags = orthanc.tags(sr.orthanc_id)
    assert tags["SeriesDescription"] == "AI fracture analysis \u2014 not for diagnostic use"
    evidence = tags["CurrentRequestedProcedureEvidenceSequence"]
    assert isinstance(evidence, list)
    referenced = {
        item["ReferencedSOPInstanceUID"]
        for series in evidence[0]["ReferencedSeriesSequence"]
        for item in series["ReferencedSOPSequence"]
    }
    assert referenced == {_uid(path) for path in result_files.sources}

    again = send_files(peer, everything, calling_ae=CALLING, max_pdu=131072)
    assert all(o.delivered for o in again), again
    assert len(orthanc.instances_of_study(result_files.study_uid)) == 8  # the same UIDs: no copies


@pytest.mark.orthanc
def test_orthanc_forwards_radiographs_to_the_node(
    orthanc_factory: Callable[..., OrthancServer],
    scp_factory: Callable[..., Scp],
    port: int,
    result_files: ResultFiles,
    rg3_files: dict[str, Path],
) -> None:
    node = scp_factory(ae_title="FRACNODE")
    pacs = orthanc_factory(forward_port=port, forward_aet="FRACNODE")
    pacs.upload(result_files.sr)  # not a radiograph: stays in the PACS
    for path in (*result_files.sources, rg3_files["RG3_UNCR"]):
        pacs.upload(path)
    expected = {_uid(path) for path in result_files.sources} | {_uid(rg3_files["RG3_UNCR"])}
    deadline = 30.0
    waited = threading.Event()
    for _ in range(int(deadline / 0.1)):
        if {r.sop_instance_uid for r in node.received} >= expected:
            break
        waited.wait(0.1)
    assert {r.sop_instance_uid for r in node.received} == expected, pacs.log_tail()
    assert {r.sop_class_uid for r in node.received} == {DX_PRESENTATION, CR}
