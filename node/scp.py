"""The DICOM association server: C-STORE of radiographs and C-ECHO (PS3.4 Annex A, B).

Accepts CR, DX (for presentation and for processing) and Secondary Capture (single and
multi-frame grayscale / true colour) in every transfer syntax the pixel pipeline decodes; any
other SOP class is refused at presentation-context negotiation. Security defaults: the called AE
title must match, an optional calling-AE allow-list, a peer-address allow-list (connections from
other hosts are closed before association negotiation, like a firewall), a maximum number of
associations and ACSE/DIMSE/network timeouts. A PDU whose declared length exceeds what the node
negotiated is answered with A-ABORT and the connection closed instead of being buffered —
pynetdicom itself trusts the declared length (STACK-NOTES).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.ingest import StoreHandler
from node.metrics import Metrics

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: dict[str, UID] = {
    "CR": UID("1.2.840.10008.5.1.4.1.1.1"),
    "DX for presentation": UID("1.2.840.10008.5.1.4.1.1.1.1"),
    "DX for processing": UID("1.2.840.10008.5.1.4.1.1.1.1.1"),
    "Secondary Capture": UID("1.2.840.10008.5.1.4.1.1.7"),
    "Multi-frame Grayscale Byte SC": UID("1.2.840.10008.5.1.4.1.1.7.2"),
    "Multi-frame Grayscale Word SC": UID("1.2.840.10008.5.1.4.1.1.7.3"),
    "Multi-frame True Color SC": UID("1.2.840.10008.5.1.4.1.1.7.4"),
}

TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# A-ABORT PDU (PS3.8 9.3.8): source 2 (service provider), reason 6 (invalid PDU parameter value).
_ABORT_INVALID_PDU = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)
_P_DATA_TF = 0x04
# Association-control PDUs carry no datasets; 64 KiB holds 128 presentation contexts with room.
_CONTROL_PDU_LIMIT = 65_536


@dataclass(frozen=True, slots=True)
class ScpConfig:
    ae_title: str
    host: str
    port: int
    max_pdu_bytes: int
    max_associations: int
    acse_timeout_s: float
    dimse_timeout_s: float
    network_timeout_s: float
    allowed_calling_aets: tuple[str, ...]
    allowed_hosts: tuple[str, ...]


class PduLengthGuard:
    """Wraps an AssociationSocket's ``recv`` and aborts on a PDU longer than negotiated.

    pynetdicom reads a PDU as ``recv(6)`` (type, reserved, length) then ``recv(length)``; the
    guard sees each header before the body is read.
    """

    def __init__(self, assoc_socket: Any, max_pdu: int, on_violation: Callable[[int, int], None]) -> None:
        self._socket = assoc_socket
        self._recv = assoc_socket.recv
        self._max_pdu = max_pdu
        self._on_violation = on_violation
        self._expect_header = True
        assoc_socket.recv = self

    def __call__(self, nr_bytes: int) -> bytearray:
        data: bytearray = self._recv(nr_bytes)
        if not self._expect_header:
            self._expect_header = True
            return data
        if nr_bytes == 6 and len(data) == 6:
            self._expect_header = False
            pdu_type, _, length = struct.unpack(">BBL", bytes(data))
            limit = self._max_pdu if pdu_type == _P_DATA_TF else max(self._max_pdu, _CONTROL_PDU_LIMIT)
            if length > limit:
                self._on_violation(pdu_type, length)
                self._abort()
                raise ConnectionAbortedError(f"PDU of {length} bytes exceeds the negotiated {limit}")
        return data

    def _abort(self) -> None:
        raw: socket.socket | None = getattr(self._socket, "socket", None)
        if raw is None:
            return
        try:
            raw.sendall(_ABORT_INVALID_PDU)
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            log.debug("peer went away before the A-ABORT was sent")


class _HostFilteringServer(ThreadedAssociationServer):
    """socketserver's ``verify_request`` hook: connections from other hosts are closed at once."""

    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    on_refused: Callable[[str], None] = staticmethod(lambda host: None)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self.allowed_networks:
            return True
        host = str(client_address[0])
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None and any(address in net for net in self.allowed_networks):
            return True
        self.on_refused(host)
        return False


class DicomServer:
    """Owns the pynetdicom AE and its listening server; ``start()`` returns once it listens."""

    def __init__(self, config: ScpConfig, handler: StoreHandler, metrics: Metrics) -> None:
        self.config = config
        self.handler = handler
        self.metrics = metrics
        self._server: _HostFilteringServer | None = None
        self._thread: threading.Thread | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = cfg.max_pdu_bytes
        ae.maximum_associations = cfg.max_associations
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.require_called_aet = True
        ae.require_calling_aet = list(cfg.allowed_calling_aets)
        for uid in STORAGE_SOP_CLASSES.values():
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    def _handlers(self) -> list[Any]:
        h = self.handler
        return [
            (evt.EVT_CONN_OPEN, self._on_connection_open),
            (evt.EVT_C_STORE, h.handle_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, h.handle_accepted),
            (evt.EVT_REJECTED, h.handle_rejected),
            (evt.EVT_RELEASED, lambda event: h.handle_closed(event, "released")),
            (evt.EVT_ABORTED, lambda event: h.handle_closed(event, "aborted")),
        ]

    def _on_echo(self, event: Any) -> int:
        self.metrics.echoes.inc()
        return 0x0000

    def _on_connection_open(self, event: Any) -> None:
        def violation(pdu_type: int, length: int) -> None:
            log.warning(
                "aborting association from %s: PDU type 0x%02X declares %d bytes, more than negotiated",
                event.address[0],
                pdu_type,
                length,
            )
            self.metrics.pdu_aborts.inc()

        PduLengthGuard(event.assoc.dul.socket, self.config.max_pdu_bytes, violation)

    def start(self) -> None:
        cfg = self.config
        networks = tuple(ipaddress.ip_network(h, strict=False) for h in cfg.allowed_hosts)

        def refused(host: str) -> None:
            log.warning("connection from %s refused: host not in dicom.allowed_hosts", host)
            self.metrics.associations_rejected.labels(reason="host").inc()

        server = self.ae.make_server(
            (cfg.host, cfg.port),
            evt_handlers=self._handlers(),
            server_class=_HostFilteringServer,
        )
        assert isinstance(server, _HostFilteringServer)
        server.allowed_networks = networks
        server.on_refused = refused
        # What AE.start_server does for the servers it makes, so AE.shutdown() stops this one too.
        self.ae._servers.append(server)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-server", daemon=True)
        self._thread.start()
        log.info("DICOM server %s listening on %s:%d", cfg.ae_title, cfg.host, self.port)

    def stop(self) -> None:
        self.ae.shutdown()  # shuts the server down, closes its socket, ends open associations
        self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
