"""Bounded network resources of the SCP against real sockets on 127.0.0.1 (issue 11).

Peers that stall, trickle, abort or crowd the node: each test starts a real ``DicomServer``
with timeouts of a second or two and checks that the node closes what it must, frees what it
holds, and keeps serving real senders. The waits below are liveness bounds several times the
configured timeouts, not measurements; bench/scp_limits.py measures the close times.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation

from node.ingest import StoreHandler
from node.metrics import Metrics
from node.scp import DicomServer, Load, ScpConfig, TlsConfig
from node.spool import Spool, SpoolConfig
from storage.config import StorageConfig
from storage.db import Database
from tests.conftest import free_port
from tests.nodeproc import InProcessNode

ACSE_S = 1.0
NETWORK_S = 1.5
# Liveness bound for "the node closes it": many times the timeouts, for a loaded 2-core machine.
CLOSE_WITHIN_S = 20.0


def start_limited(
    tmp_path: Path,
    *,
    max_associations: int = 3,
    max_pending: int = 32,
    acse_timeout_s: float = ACSE_S,
    network_timeout_s: float = NETWORK_S,
    max_pdu_bytes: int = 65_536,
    tls: TlsConfig | None = None,
) -> InProcessNode:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    db = Database(StorageConfig(url=f"sqlite:///{tmp_path / 'node.db'}"))
    db.create_all()
    spool = Spool(SpoolConfig(tmp_path / "spool", 0, 0.0))
    config = ScpConfig(
        ae_title="FRACNODE",
        host="127.0.0.1",
        port=free_port(),
        max_pdu_bytes=max_pdu_bytes,
        max_associations=max_associations,
        acse_timeout_s=acse_timeout_s,
        dimse_timeout_s=10,
        network_timeout_s=network_timeout_s,
        allowed_calling_aets=(),
        allowed_hosts=("127.0.0.1",),
        max_pending_connections=max_pending,
        tls=tls,
    )
    server = DicomServer(config, StoreHandler(spool, db, metrics), metrics)
    server.start()
    return InProcessNode(server, db, spool, metrics, registry, server.port)


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[InProcessNode]:
    running = start_limited(tmp_path)
    yield running
    running.server.stop()
    running.db.dispose()


def rejected(node: InProcessNode, reason: str) -> float:
    value = node.registry.get_sample_value("fracnode_associations_rejected_total", {"reason": reason})
    return value or 0.0


def wait_for(condition: Callable[[], bool], within: float = CLOSE_WITHIN_S) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        time.sleep(0.05)


IDLE = Load(connections=0, associations=0)


def settled(node: InProcessNode, load: Load = IDLE) -> None:
    """Wait until the server holds exactly ``load``: its threads and slots are all given back."""
    wait_for(lambda: node.server.load() == load)


def association_request(called: str = "FRACNODE", calling: str = "RAWSCU") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification, encoded by pynetdicom."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", 2)
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def read_until_closed(sock: socket.socket, within: float = CLOSE_WITHIN_S) -> bytes:
    """Everything the node sends until it closes the connection; fails if it never does."""
    sock.settimeout(within)
    chunks = []
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        except TimeoutError as exc:
            raise AssertionError(f"the node kept the connection open for {within} s") from exc
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(CLOSE_WITHIN_S)
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        assert chunk, "connection closed before a PDU arrived"
        header += chunk
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "connection closed inside a PDU"
        body += chunk
    return pdu_type, body


def stalled_socket(port: int, data: bytes = b"\x01\x00\x00") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def associate(port: int, calling: str = "TESTSCU") -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 15
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="FRACNODE")


def echo(port: int) -> bool:
    assoc = associate(port)
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def test_stalled_request_is_closed(limited: InProcessNode) -> None:
    with stalled_socket(limited.port) as sock:  # three bytes of an A-ASSOCIATE-RQ header, then nothing
        reply = read_until_closed(sock)
    assert reply == b"", "a late request is closed without a reply (ARTIM expiry, PS3.8 AA-2)"
    assert rejected(limited, "timeout") == 1
    settled(limited)
    assert echo(limited.port)


def test_trickled_request_is_closed(limited: InProcessNode) -> None:
    request = association_request()
    sent = 0
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:

        def trickle() -> None:
            nonlocal sent
            try:
                for byte in request:
                    sock.sendall(bytes([byte]))
                    sent += 1
                    time.sleep(0.1)
            except OSError:
                return  # the node closed the connection

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        reply = read_until_closed(sock)
    assert reply == b"" and sent < len(request), "the request was still trickling in when it was cut"
    assert rejected(limited, "timeout") == 1
    settled(limited)


def test_trickled_pdu_inside_an_association_is_aborted(limited: InProcessNode) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(association_request())
        pdu_type, _ = read_pdu(sock)
        assert pdu_type == 0x02, "A-ASSOCIATE-AC expected"
        assert limited.server.load() == Load(connections=1, associations=1)
        sock.sendall(struct.pack(">BBL", 0x04, 0, 200))  # a P-DATA-TF of 200 bytes, one byte at a time
        stop = threading.Event()

        def trickle() -> None:
            try:
                while not stop.wait(0.1):
                    sock.sendall(b"\x00")
            except OSError:
                return

        threading.Thread(target=trickle, daemon=True).start()
        reply = read_until_closed(sock)
        stop.set()
    assert reply[:1] == b"\x07", "an established association is ended with A-ABORT"
    settled(limited)
    assert limited.registry.get_sample_value("fracnode_associations_active") == 0
    assert rejected(limited, "timeout") == 0  # not a refused request: an aborted association


def test_silent_association_is_aborted(limited: InProcessNode) -> None:
    assoc = associate(limited.port)
    assert assoc.is_established
    wait_for(lambda: not assoc.is_established)
    assert assoc.is_aborted
    settled(limited)


def test_stalled_sockets_take_no_association_slot(tmp_path: Path) -> None:
    # 5 s for the request: the stalled sockets are surely still open while the real ones associate,
    # which stay idle for longer than that.
    node = start_limited(tmp_path, acse_timeout_s=5.0, network_timeout_s=60.0)
    stalled = [stalled_socket(node.port) for _ in range(20)]
    try:
        held = [associate(node.port) for _ in range(3)]
        assert all(a.is_established for a in held), "stalled connections took association slots"
        assert node.server.load() == Load(connections=23, associations=3)
        extra = associate(node.port)
        assert extra.is_rejected  # the limit counts the three real associations only
        for sock in stalled:
            assert read_until_closed(sock) == b""
        assert rejected(node, "timeout") == 20
        settled(node, Load(connections=3, associations=3))
        for assoc in held:
            assoc.release()
        settled(node)
        assert echo(node.port)
    finally:
        for sock in stalled:
            sock.close()
        node.server.stop()
        node.db.dispose()


def test_pending_connections_are_capped(tmp_path: Path) -> None:
    node = start_limited(tmp_path, max_pending=4)
    stalled = [stalled_socket(node.port) for _ in range(6)]
    try:
        for sock in stalled:
            assert read_until_closed(sock) == b""
        # Four waited for the request deadline; the other two were closed at accept.
        assert rejected(node, "connections") == 2
        assert rejected(node, "timeout") == 4
        settled(node)
        assert echo(node.port)
    finally:
        for sock in stalled:
            sock.close()
        node.server.stop()
        node.db.dispose()


def test_aborted_connections_free_their_slots_at_once(tmp_path: Path) -> None:
    # acse_timeout 30 s: a thread or slot left to pynetdicom's own waits would outlive the checks.
    node = start_limited(tmp_path, max_associations=2, acse_timeout_s=30, network_timeout_s=30)
    try:
        for garbage in (b"\x09\x00\x00\x00\x00\x02ab", struct.pack(">BBL", 0x01, 0, 0xFFFFFF00)):
            for _ in range(10):
                with stalled_socket(node.port, garbage) as sock:
                    assert read_until_closed(sock)[:1] == b"\x07"  # A-ABORT, then closed
        assert node.registry.get_sample_value("fracnode_pdu_aborts_total") == 10
        # Established associations that the peer aborts, one after another, with two slots.
        for _ in range(10):
            assoc = associate(node.port)
            assert assoc.is_established, "an aborted association's slot was not given back"
            assoc.abort()
        settled(node)
        assert rejected(node, "limit") == 0 and rejected(node, "timeout") == 0
        assert echo(node.port)
    finally:
        node.server.stop()
        node.db.dispose()


def test_association_limit_is_exact(limited: InProcessNode) -> None:
    attempts = 10
    barrier = threading.Barrier(attempts)
    results: list[Association] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        assoc = associate(limited.port)
        with lock:
            results.append(assoc)

    threads = [threading.Thread(target=attempt) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    established = [a for a in results if a.is_established]
    refused = [a for a in results if a.is_rejected]
    assert len(results) == attempts
    assert len(established) == 3 and len(refused) == attempts - 3
    for assoc in refused:
        rj = assoc.acceptor.primitive
        assert rj is not None
        # rejected-transient, service provider (presentation), local limit exceeded (PS3.8 9.3.4)
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    assert rejected(limited, "limit") == attempts - 3
    settled(limited, Load(connections=3, associations=3))
    established[0].release()
    settled(limited, Load(connections=2, associations=2))
    assert echo(limited.port)
    for assoc in established[1:]:
        assoc.release()
    settled(limited)
