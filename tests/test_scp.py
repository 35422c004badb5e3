"""The C-STORE SCP against real senders (pynetdicom and dcmtk storescu) on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import struct
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.status import StoreStatus
from storage import repo
from tests.dicomgen import ALL_SYNTAXES, CT_STORAGE, encode, make_dataset, write
from tests.nodeproc import InProcessNode, start_in_process, storescu


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta, as a sender puts it on the wire."""
    raw = path.read_bytes()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_length = int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[132 + 12 + meta_length :]


def fixture_for(syntax: UID, directory: Path, **kwargs: object) -> Path:
    bits = 8 if syntax == JPEGBaseline8Bit else 12
    ds = encode(make_dataset(bits_stored=bits, **kwargs), syntax)  # type: ignore[arg-type]
    return write(ds, directory / f"{syntax.name.replace(' ', '_')}.dcm")


@pytest.fixture(autouse=True)
def _send_files_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom otherwise decodes a file and re-encodes it, repairing a truncated one."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_with_pynetdicom(path: Path, port: int, called: str = "FRACNODE", calling: str = "TESTSCU") -> int:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association not established"
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(status.Status)


def stored_path(node: InProcessNode, path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return node.spool.root / f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def received(node: InProcessNode, outcome: str, sop_class: str = "dx") -> float:
    value = node.registry.get_sample_value(
        "fracnode_instances_received_total", {"sop_class": sop_class, "outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize("syntax", ALL_SYNTAXES, ids=lambda s: UID(s).keyword or str(s))
def test_every_transfer_syntax_from_pynetdicom(node: InProcessNode, tmp_path: Path, syntax: UID) -> None:
    path = fixture_for(syntax, tmp_path)
    assert send_with_pynetdicom(path, node.port) == StoreStatus.SUCCESS
    stored = stored_path(node, path)
    assert dataset_bytes(stored) == dataset_bytes(path)
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == syntax
    assert received(node, "stored") == 1


@pytest.mark.parametrize("syntax", ALL_SYNTAXES, ids=lambda s: UID(s).keyword or str(s))
def test_every_transfer_syntax_from_storescu(node: InProcessNode, tmp_path: Path, syntax: UID) -> None:
    path = fixture_for(syntax, tmp_path)
    result = storescu(path, node.port)
    assert result.returncode == 0, result.stderr
    stored = stored_path(node, path)
    assert dataset_bytes(stored) == dataset_bytes(path)


def test_real_cr_files_and_resend_with_different_bytes(
    node: InProcessNode, rg3_files: dict[str, Path], tmp_path: Path
) -> None:
    # The three RG3 files are one study and series in three encodings, but each file carries its
    # own SOP Instance UID (...1.1..., ...1.2..., ...1.3...): three instances, no re-send.
    for name in ("RG3_UNCR", "RG3_J2KR", "RG3_J2KI"):
        result = storescu(rg3_files[name], node.port)
        assert result.returncode == 0, result.stderr
    ds = pydicom.dcmread(rg3_files["RG3_UNCR"], stop_before_pixels=True)
    study_uid = str(ds.StudyInstanceUID)
    detail = repo.get_study(node.db, study_uid)
    assert detail is not None and detail.study.instance_count == 3 and detail.changes == ()
    assert received(node, "stored", "cr") == 3

    # A true re-send with different bytes: RG3_UNCR re-encoded (RLE) under its own SOP Instance UID.
    resent = write(
        encode(pydicom.dcmread(rg3_files["RG3_UNCR"]), UID("1.2.840.10008.1.2.5")), tmp_path / "rle.dcm"
    )
    # pynetdicom sends the file's dataset bytes unchanged (storescu re-encodes group lengths).
    assert send_with_pynetdicom(resent, node.port) == StoreStatus.SUCCESS
    detail = repo.get_study(node.db, study_uid)
    assert detail is not None and detail.study.instance_count == 3
    assert [c.sop_uid for c in detail.changes] == [str(ds.SOPInstanceUID)]
    instance = next(
        i for i in repo.study_instances(node.db, study_uid) if i.sop_uid == str(ds.SOPInstanceUID)
    )
    assert dataset_bytes(node.spool.root / instance.path) == dataset_bytes(resent)
    assert received(node, "replaced", "cr") == 1


def test_duplicate_is_acknowledged_once(node: InProcessNode, tmp_path: Path) -> None:
    path = fixture_for(ExplicitVRLittleEndian, tmp_path)
    assert send_with_pynetdicom(path, node.port) == StoreStatus.SUCCESS
    assert send_with_pynetdicom(path, node.port) == StoreStatus.SUCCESS
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    detail = repo.get_study(node.db, str(ds.StudyInstanceUID))
    assert detail is not None and detail.study.instance_count == 1 and detail.changes == ()
    assert received(node, "duplicate") == 1


def test_unknown_sop_class_is_not_accepted(node: InProcessNode, tmp_path: Path) -> None:
    ds = make_dataset()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE
    path = write(ds, tmp_path / "ct.dcm")
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CT_STORAGE, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FRACNODE")
    # pynetdicom aborts an association in which no context was accepted.
    assert not assoc.is_established or assoc.accepted_contexts == []
    if assoc.is_established:
        assoc.release()
    result = storescu(path, node.port)
    assert result.returncode != 0 or "no presentation context" in (result.stdout + result.stderr).lower()
    assert repo.list_studies(node.db) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"SOPInstanceUID": "1.2.3.abc"}, StoreStatus.CANNOT_UNDERSTAND_INVALID_UID),
        ({"StudyInstanceUID": "1.2.3." + "4" * 70}, StoreStatus.CANNOT_UNDERSTAND_INVALID_UID),
        ({"SeriesInstanceUID": "../../etc"}, StoreStatus.CANNOT_UNDERSTAND_INVALID_UID),
        ({"StudyInstanceUID": None}, StoreStatus.CANNOT_UNDERSTAND_MISSING_UID),
    ],
)
def test_bad_uids_are_refused(
    node: InProcessNode, tmp_path: Path, change: dict[str, str | None], expected: int
) -> None:
    ds = make_dataset()
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "bad.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert send_with_pynetdicom(path, node.port) == expected
    assert repo.list_studies(node.db) == []
    assert not any(p.is_file() for p in node.spool.root.rglob("*.dcm"))
    assert received(node, "rejected") == 1


def test_sop_class_mismatch(node: InProcessNode, tmp_path: Path) -> None:
    ds = make_dataset()
    path = write(ds, tmp_path / "dx.dcm")
    # The file meta (and so the request) says Secondary Capture; the dataset says DX.
    tampered = pydicom.dcmread(path)
    tampered.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    tampered.save_as(path, enforce_file_format=False)  # True would re-sync the meta from the dataset
    assert pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID.endswith(".1.1.7")
    assert send_with_pynetdicom(path, node.port) == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


@pytest.mark.parametrize("cut", [1, 100, 5000])
def test_truncated_dataset(node: InProcessNode, tmp_path: Path, cut: int) -> None:
    path = write(make_dataset(), tmp_path / "whole.dcm")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-cut])
    assert send_with_pynetdicom(truncated, node.port) == StoreStatus.CANNOT_UNDERSTAND
    assert repo.list_studies(node.db) == []


def test_truncated_encapsulated_pixel_data(node: InProcessNode, tmp_path: Path) -> None:
    path = fixture_for(UID("1.2.840.10008.1.2.5"), tmp_path)  # RLE
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(path.read_bytes()[:-4])
    assert send_with_pynetdicom(truncated, node.port) == StoreStatus.CANNOT_UNDERSTAND


def test_disk_watermark_refuses_with_out_of_resources(tmp_path: Path) -> None:
    running = start_in_process(tmp_path, min_free_fraction=1.0)
    try:
        path = fixture_for(ExplicitVRLittleEndian, tmp_path)
        assert send_with_pynetdicom(path, running.port) == StoreStatus.OUT_OF_RESOURCES
        assert repo.list_studies(running.db) == []
        # The node keeps serving.
        assert _echo(running.port) == 0
    finally:
        running.server.stop()
        running.db.dispose()


def _echo(port: int, called: str = "FRACNODE", calling: str = "TESTSCU") -> int | None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_echo(node: InProcessNode) -> None:
    assert _echo(node.port) == 0
    assert node.registry.get_sample_value("fracnode_echoes_total") == 1


def test_wrong_called_ae_is_rejected(node: InProcessNode) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SOMEONE_ELSE")
    assert assoc.is_rejected
    assert (
        node.registry.get_sample_value("fracnode_associations_rejected_total", {"reason": "called_ae"}) == 1
    )
    deadline = time.monotonic() + 10  # the acceptor's thread writes the audit after replying
    while not (events := repo.list_audit(node.db)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(e.kind, e.outcome, e.called_ae) for e in events] == [
        ("rejected", "rejected: called_ae", "SOMEONE_ELSE")
    ]


def test_calling_ae_allow_list(tmp_path: Path) -> None:
    running = start_in_process(tmp_path, allowed_calling_aets=("PACS",))
    try:
        assert _echo(running.port, calling="INTRUDER") is None
        assert _echo(running.port, calling="PACS") == 0
        assert (
            running.registry.get_sample_value("fracnode_associations_rejected_total", {"reason": "ae_title"})
            == 1
        )
    finally:
        running.server.stop()
        running.db.dispose()


def test_host_allow_list_closes_other_hosts(tmp_path: Path) -> None:
    running = start_in_process(tmp_path, allowed_hosts=("10.255.255.1",))
    try:
        assert _echo(running.port) is None
        assert (
            running.registry.get_sample_value("fracnode_associations_rejected_total", {"reason": "host"}) == 1
        )
    finally:
        running.server.stop()
        running.db.dispose()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_oversize_association_request_pdu_is_aborted(node: InProcessNode) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFF00))  # A-ASSOCIATE-RQ claiming ~4 GiB
        reply = _read_all(sock)
    assert reply[:1] == b"\x07", "expected an A-ABORT PDU"
    assert node.registry.get_sample_value("fracnode_pdu_aborts_total") == 1
    assert _echo(node.port) == 0  # still serving


def test_oversize_p_data_pdu_is_aborted(tmp_path: Path) -> None:
    running = start_in_process(tmp_path, max_pdu_bytes=16384)
    try:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", running.port, ae_title="FRACNODE")
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        raw.sendall(struct.pack(">BBL", 0x04, 0, 16385 + 6))  # P-DATA-TF above the negotiated 16 KiB
        assoc.dul.socket.socket = None  # keep pynetdicom off the socket; we read the reply ourselves
        raw.settimeout(10)
        reply = _read_all(raw)
        assert reply[:1] == b"\x07"
        assert running.registry.get_sample_value("fracnode_pdu_aborts_total") == 1
        assert _echo(running.port) == 0
    finally:
        running.server.stop()
        running.db.dispose()


def test_storescu_is_installed() -> None:
    assert shutil.which("storescu"), "dcmtk is a test dependency installed by `make test`"


def test_send_cli_proposes_each_files_own_syntax(node: InProcessNode, tmp_path: Path) -> None:
    from tests.nodeproc import fracnode

    paths = [fixture_for(s, tmp_path / "files" / str(i)) for i, s in enumerate(ALL_SYNTAXES[:4])]
    (tmp_path / "files" / "notes.txt").write_text("not DICOM")
    result = fracnode("send", "--port", str(node.port), str(tmp_path / "files"))
    assert result.returncode == 0, result.stdout + result.stderr
    for path in paths:
        assert dataset_bytes(stored_path(node, path)) == dataset_bytes(path)
    assert "4 of 4 sent" in result.stdout and "not a DICOM file" in result.stdout


def test_echo_cli(node: InProcessNode) -> None:
    from tests.nodeproc import fracnode

    ok = fracnode("echo", "127.0.0.1", str(node.port), "--ae", "FRACNODE")
    assert ok.returncode == 0 and "success" in ok.stdout
    bad = fracnode("echo", "127.0.0.1", str(node.port), "--ae", "WRONG", "--timeout", "5")
    assert bad.returncode == 2 and "no association" in bad.stderr


def test_generated_uid_is_valid() -> None:
    from node.uids import is_valid_uid

    assert is_valid_uid(str(generate_uid()))
    assert (
        not is_valid_uid("1..2")
        and not is_valid_uid(".1")
        and not is_valid_uid("1.2.")
        and not is_valid_uid("")
    )
