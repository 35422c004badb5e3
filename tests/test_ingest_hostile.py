"""Malformed C-STOREs get a named status, never pynetdicom's 0xC211, and the node keeps serving.

Real associations on 127.0.0.1. The files are written byte by byte where pydicom would refuse to
write them (undefined-length sequences nested thousands deep, a sequence whose bytes are not
items) and sent unchanged (``STORE_SEND_CHUNKED_DATASET``: pynetdicom reads only the file meta).
A full database is SQLite's own "database or disk is full" (``PRAGMA max_page_count``).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import event

from node.ingest import MAX_NESTING, StoreHandler
from node.metrics import Metrics
from node.scp import DicomServer, ScpConfig
from node.spool import Spool, SpoolConfig
from node.status import StoreStatus
from storage import repo
from storage.config import StorageConfig
from storage.db import Database
from tests.conftest import free_port
from tests.dicomgen import make_dataset, write
from tests.nodeproc import InProcessNode

_SQ_TAG = struct.pack("<HH", 0x5200, 0x9229)  # Shared Functional Groups Sequence: after every
# attribute make_dataset writes except the pixel data, so element order stays ascending


@pytest.fixture(autouse=True)
def _send_files_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def _send(path: Path, port: int) -> int:
    meta = read_file_meta_info(path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(status.Status)


def _echo(port: int) -> int:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACNODE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _file_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _insert_before_pixels(ds: Dataset, element: bytes, path: Path) -> Path:
    data = _file_bytes(ds)
    at = data.rfind(b"\xe0\x7f\x10\x00O")  # (7FE0,0010) OB/OW, the last element
    assert at > 0
    path.write_bytes(data[:at] + element + data[at:])
    return path


def _undefined_nesting(depth: int) -> bytes:
    item_start, item_end = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    inner = b""
    for _ in range(depth):
        inner = (
            _SQ_TAG + b"SQ\0\0\xff\xff\xff\xff" + item_start + inner + item_end + b"\xfe\xff\xdd\xe0\0\0\0\0"
        )
    return inner


def _defined_nesting(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(inner)) + inner
        inner = _SQ_TAG + b"SQ\0\0" + struct.pack("<I", len(item)) + item
    return inner


def _no_files(node: InProcessNode) -> bool:
    return not any(p.is_file() for p in node.spool.root.rglob("*.dcm"))


def test_binary_vr_on_modality_cannot_be_understood(node: InProcessNode, tmp_path: Path) -> None:
    ds = make_dataset()
    del ds.Modality
    ds.add(DataElement(Tag("Modality"), "OB", b"\x01\x02\xff\xfe"))
    assert _send(write(ds, tmp_path / "ob.dcm"), node.port) == StoreStatus.CANNOT_UNDERSTAND
    assert repo.list_studies(node.db) == [] and _no_files(node)


def test_binary_vr_on_a_uid_is_an_invalid_uid(node: InProcessNode, tmp_path: Path) -> None:
    ds = make_dataset()
    del ds.SeriesInstanceUID
    ds.add(DataElement(Tag("SeriesInstanceUID"), "OB", b"1.2.3\x00"))
    assert _send(write(ds, tmp_path / "uid.dcm"), node.port) == StoreStatus.CANNOT_UNDERSTAND_INVALID_UID


def test_a_sequence_whose_bytes_are_not_items(node: InProcessNode, tmp_path: Path) -> None:
    element = _SQ_TAG + b"SQ\0\0" + struct.pack("<I", 4) + b"DX\0\0"
    path = _insert_before_pixels(make_dataset(), element, tmp_path / "sq.dcm")
    assert _send(path, node.port) == StoreStatus.CANNOT_UNDERSTAND


def test_undefined_length_sequences_nested_past_the_stack(node: InProcessNode, tmp_path: Path) -> None:
    path = _insert_before_pixels(make_dataset(), _undefined_nesting(3000), tmp_path / "deep.dcm")
    assert _send(path, node.port) == StoreStatus.CANNOT_UNDERSTAND
    assert _echo(node.port) == 0  # still serving
    assert _send(write(make_dataset(), tmp_path / "ok.dcm"), node.port) == StoreStatus.SUCCESS


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 400])
def test_defined_length_sequences_nested_too_deep(node: InProcessNode, tmp_path: Path, depth: int) -> None:
    path = _insert_before_pixels(make_dataset(), _defined_nesting(depth), tmp_path / "deep.dcm")
    assert _send(path, node.port) == StoreStatus.CANNOT_UNDERSTAND
    assert _no_files(node)


def test_nesting_within_the_limit_is_stored(node: InProcessNode, tmp_path: Path) -> None:
    path = _insert_before_pixels(make_dataset(), _defined_nesting(MAX_NESTING), tmp_path / "ok.dcm")
    assert _send(path, node.port) == StoreStatus.SUCCESS


@pytest.fixture
def small_inflate_node(tmp_path: Path) -> Iterator[InProcessNode]:
    """A node whose handler refuses datasets that inflate past 1 MiB."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    db = Database(StorageConfig(url=f"sqlite:///{tmp_path / 'node.db'}"))
    db.create_all()
    spool = Spool(SpoolConfig(tmp_path / "spool", 0, 0.0))
    config = ScpConfig("FRACNODE", "127.0.0.1", free_port(), 1_048_576, 4, 10, 20, 20, (), ("127.0.0.1",))
    server = DicomServer(config, StoreHandler(spool, db, metrics, max_inflated_bytes=1_048_576), metrics)
    server.start()
    yield InProcessNode(server, db, spool, metrics, registry, server.port)
    server.stop()
    db.dispose()


def test_a_deflate_bomb_is_refused(small_inflate_node: InProcessNode, tmp_path: Path) -> None:
    node = small_inflate_node
    small = make_dataset()
    small.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    assert _send(write(small, tmp_path / "small.dcm"), node.port) == StoreStatus.SUCCESS
    bomb = make_dataset()
    block = bomb.private_block(0x0009, "FRACNODE TEST", create=True)
    block.add_new(0x10, "OB", bytes(8 * 1024**2))  # 8 MiB of zeros deflate to ~8 KB
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = write(bomb, tmp_path / "bomb.dcm")
    assert path.stat().st_size < 64 * 1024
    assert _send(path, node.port) == StoreStatus.CANNOT_UNDERSTAND
    assert len(repo.list_studies(node.db)) == 1


def test_a_full_database_is_out_of_resources_and_leaves_no_orphan(
    node: InProcessNode, tmp_path: Path
) -> None:
    assert _send(write(make_dataset(), tmp_path / "first.dcm"), node.port) == StoreStatus.SUCCESS
    with node.db.engine.connect() as connection:
        pages = int(connection.exec_driver_sql("PRAGMA page_count").scalar() or 0)

    def cap(dbapi_connection: object, record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        cursor.execute(f"PRAGMA max_page_count = {pages}")
        cursor.close()

    node.db.engine.dispose()
    event.listen(node.db.engine, "connect", cap)
    statuses = [_send(write(make_dataset(), tmp_path / f"{i}.dcm"), node.port) for i in range(40)]
    assert StoreStatus.OUT_OF_RESOURCES in statuses, "the capped database never filled up"
    assert set(statuses) == {StoreStatus.SUCCESS, StoreStatus.OUT_OF_RESOURCES}
    first_refusal = statuses.index(StoreStatus.OUT_OF_RESOURCES)
    assert all(s == StoreStatus.OUT_OF_RESOURCES for s in statuses[first_refusal:])
    files = sorted(str(p.relative_to(node.spool.root)) for p in node.spool.root.rglob("*.dcm"))
    rows = sorted(i.path for s in repo.list_studies(node.db) for i in repo.study_instances(node.db, s.uid))
    assert files == rows  # every file has its row, none is left over
    assert not [
        d for d in node.spool.root.iterdir() if d.is_dir() and d.name != ".tmp" and not any(d.iterdir())
    ]
    assert (
        node.registry.get_sample_value(
            "fracnode_instances_received_total", {"sop_class": "dx", "outcome": "out_of_resources"}
        )
        == 40 - first_refusal
    )
