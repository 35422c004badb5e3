"""The DICOM association server: C-STORE of radiographs and C-ECHO (PS3.4 Annex A, B).

Accepts CR, DX (for presentation and for processing) and Secondary Capture (single and
multi-frame grayscale / true colour) in every transfer syntax the pixel pipeline decodes; any
other SOP class is refused at presentation-context negotiation. Security defaults: the called AE
title must match, an optional calling-AE allow-list, a peer-address allow-list (connections from
other hosts are closed before association negotiation, like a firewall) and DICOM TLS (PS3.15
Annex B.1, TLS 1.2 or later, optional client certificates) on a second port or the main one.

One bad peer must never silence the node, so every network resource is bounded:

- Time. The whole A-ASSOCIATE-RQ (after the TLS handshake, when there is one) must arrive within
  ``acse_timeout_s`` of the connection (the ARTIM timer of PS3.8 9.1.5); after it each PDU must
  arrive completely within ``network_timeout_s`` of the read that starts it, and an association
  silent for ``network_timeout_s`` is aborted (pynetdicom's idle timer). pynetdicom reads a PDU
  with blocking ``recv`` calls and checks its timers only between PDUs, so a peer that stops
  after three bytes, or trickles one byte a second, held a thread and a slot forever: the
  :class:`PduGuard` does every read against a deadline.
- Slots. ``max_associations`` counts associations exactly, here, under one lock: the (N+1)th
  A-ASSOCIATE-RQ is answered with A-ASSOCIATE-RJ rejected-transient, local limit exceeded
  (PS3.8 9.3.4). Connections that have no association yet (TLS handshake, waiting for the
  request) hold no association slot; at most ``max_pending_connections`` of them are open at
  once, and the next is closed at accept. A slot is freed when its association ends, and a
  connection that closes before its request arrived ends its thread at once instead of after
  pynetdicom's ``acse_timeout`` wait.
- Size. A PDU whose declared length exceeds what the node negotiated is answered with A-ABORT
  and the connection closed instead of being buffered: pynetdicom trusts the declared length.

Refusals are counted in ``associations_rejected{reason}``: ``host`` (not allowed),
``connections`` (too many pending), ``tls`` (handshake failed, e.g. no client certificate),
``timeout`` (the request did not arrive in time), and the ACSE reasons of ``node.ingest``
(``ae_title``, ``called_ae``, ``limit``).

Errors: :class:`ScpError` <- :class:`TlsSetupError` (the certificate, key or CA file cannot be
loaded; raised by ``DicomServer`` at construction, ``path`` names the file set).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
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
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

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

_P_DATA_TF = 0x04
_PDU_TYPES = range(0x01, 0x08)
# Association-control PDUs carry no datasets; 64 KiB holds 128 presentation contexts with room.
_CONTROL_PDU_LIMIT = 65_536
_RECV_CHUNK = 65_536
# How long the A-ABORT of a closing connection may take to leave; the peer may not be reading.
_ABORT_SEND_TIMEOUT_S = 1.0
# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-transient, service provider (presentation), local limit.
_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)


def _abort_pdu(reason: int) -> bytes:
    """A-ABORT PDU (PS3.8 9.3.8), source 2 (service provider) and the given reason."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


_ABORT_INVALID_PDU = _abort_pdu(0x06)  # invalid PDU parameter value
_ABORT_NOT_SPECIFIED = _abort_pdu(0x00)


class ScpError(Exception):
    """The association server cannot be set up."""


class TlsSetupError(ScpError):
    """A TLS certificate, key or CA file cannot be loaded; ``path`` names it."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"TLS file {path}: {reason}")
        self.path = path


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """DICOM TLS for incoming associations (PS3.15 B.1; TLS 1.2 or later, as BCP 195 asks).

    ``port`` None: the main port speaks TLS only; otherwise a second listener (2762 is the
    port IANA registered for DICOM over TLS). ``ca_file`` set: a client must present a
    certificate signed by it, or the handshake fails.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    port: int | None = None


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
    max_pending_connections: int = 32
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class Load:
    """Open connections of the server and how many of them hold an association slot."""

    connections: int
    associations: int

    @property
    def pending(self) -> int:
        return self.connections - self.associations


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The server's TLS context: TLS 1.2 minimum, no renegotiation, client certificates if asked."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise TlsSetupError(tls.cert_file, f"certificate or key {tls.key_file} unusable: {exc}") from exc
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise TlsSetupError(tls.ca_file, f"CA certificates unusable: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class PduGuard:
    """Replaces an AssociationSocket's ``recv``: every PDU bounded in length and arrival time.

    pynetdicom reads a PDU as ``recv(6)`` (type, reserved, length) then ``recv(length)``, each a
    loop of blocking socket reads. Here each read waits at most until the PDU's deadline: the
    first PDU (the A-ASSOCIATE-RQ) until ``request_deadline``, every later one until
    ``pdu_timeout_s`` after its header read began. Past it the connection is shut (with an
    A-ABORT once associated; a late request is just closed, as on ARTIM expiry, PS3.8 AA-2) and
    the short read returned, which pynetdicom takes for a closed connection, the contract of
    ``AssociationSocket.recv``; so are all later reads. The header is checked against the
    negotiated maximum before the body is read, and after an unknown PDU type (which pynetdicom
    answers with A-ABORT) the connection reads as closed.
    """

    def __init__(
        self,
        assoc_socket: Any,
        *,
        max_pdu: int,
        request_deadline: float,
        pdu_timeout_s: float,
        on_violation: Callable[[int, int], None],
        on_timeout: Callable[[bool], None],
    ) -> None:
        self._socket = assoc_socket
        self._max_pdu = max_pdu
        self._pdu_timeout_s = pdu_timeout_s
        self._deadline = request_deadline
        self._on_violation = on_violation
        self._on_timeout = on_timeout
        self._expect_header = True
        self._pdus_read = 0
        self._finished = False
        raw: socket.socket | None = assoc_socket.socket
        if raw is not None:
            # Sends are bounded too: a peer that stops reading cannot hold the DUL thread.
            raw.settimeout(pdu_timeout_s)
        assoc_socket.recv = self

    def __call__(self, nr_bytes: int) -> bytearray:
        raw: socket.socket | None = self._socket.socket
        if raw is None or self._finished:
            return bytearray()
        header = self._expect_header
        if header and self._pdus_read:
            self._deadline = time.monotonic() + self._pdu_timeout_s
        data, expired = self._read(raw, nr_bytes)
        if expired:
            self._finished = True
            self._on_timeout(self._pdus_read == 0)
            self._close(raw, _ABORT_NOT_SPECIFIED if self._pdus_read else None)
            return data
        if not header:
            self._expect_header = True
            self._pdus_read += 1
            return data
        if nr_bytes == 6 and len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", bytes(data))
            if pdu_type not in _PDU_TYPES:
                # pynetdicom sends A-ABORT without reading a body and would then read what
                # follows as PDUs until ARTIM expires: the connection reads as closed instead.
                self._finished = True
                return data
            limit = self._max_pdu if pdu_type == _P_DATA_TF else max(self._max_pdu, _CONTROL_PDU_LIMIT)
            if length > limit:
                self._finished = True
                self._on_violation(pdu_type, length)
                self._close(raw, _ABORT_INVALID_PDU)
                return bytearray()
            self._expect_header = False
        return data

    def _read(self, raw: socket.socket, nr_bytes: int) -> tuple[bytearray, bool]:
        """Up to ``nr_bytes`` before the deadline; ``(data, True)`` when the deadline passed."""
        data = bytearray()
        try:
            while len(data) < nr_bytes:
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    return data, True
                raw.settimeout(remaining)
                chunk = raw.recv(min(_RECV_CHUNK, nr_bytes - len(data)))
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            return data, True
        except OSError:
            log.debug("connection reset while reading a PDU")
        finally:
            with suppress(OSError):  # already closed
                raw.settimeout(self._pdu_timeout_s)
        return data, False

    def _close(self, raw: socket.socket, abort: bytes | None) -> None:
        try:
            if abort is not None:
                raw.settimeout(_ABORT_SEND_TIMEOUT_S)
                raw.sendall(abort)
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            log.debug("peer went away before the connection was shut")


class _Limiter:
    """Open connections and association slots, counted exactly under one lock.

    A connection is pending until its association takes a slot; pending ones are capped
    separately so that stalled sockets never take association slots and never exhaust threads
    or file descriptors either.
    """

    def __init__(self, max_associations: int, max_pending: int) -> None:
        self._max_associations = max_associations
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._connections: set[object] = set()
        self._associations: set[object] = set()

    def open_connection(self, connection: object) -> bool:
        with self._lock:
            if len(self._connections) - len(self._associations) >= self._max_pending:
                return False
            self._connections.add(connection)
            return True

    def close_connection(self, connection: object) -> None:
        with self._lock:
            self._connections.discard(connection)

    def take_association(self, assoc: object) -> bool:
        with self._lock:
            if assoc in self._associations:
                return True
            if len(self._associations) >= self._max_associations:
                return False
            self._associations.add(assoc)
            return True

    def free_association(self, assoc: object) -> None:
        with self._lock:
            self._associations.discard(assoc)

    def load(self) -> Load:
        with self._lock:
            return Load(len(self._connections), len(self._associations))


class _Gate:
    """What every connection passes before and while it is an association: one per DicomServer."""

    def __init__(self, config: ScpConfig, metrics: Metrics, limiter: _Limiter) -> None:
        self.config = config
        self.metrics = metrics
        self.limiter = limiter
        self.networks = tuple(ipaddress.ip_network(h, strict=False) for h in config.allowed_hosts)

    def refuse(self, reason: str, host: str, detail: str) -> None:
        log.warning("connection from %s refused (%s): %s", host, reason, detail)
        self.metrics.associations_rejected.labels(reason=reason).inc()

    def admit(self, request: Any, host: str) -> bool:
        """At accept, on the listener's thread: allowed host and a free pending slot."""
        if self.networks:
            try:
                address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
            except ValueError:
                address = None
            if address is None or not any(address in net for net in self.networks):
                self.refuse("host", host, "host not in dicom.allowed_hosts")
                return False
        if not self.limiter.open_connection(request):
            self.refuse(
                "connections",
                host,
                f"{self.config.max_pending_connections} connections are already waiting for an association",
            )
            return False
        return True

    def handshake(self, sock: ssl.SSLSocket, host: str, deadline: float) -> bool:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.do_handshake()
        except TimeoutError:
            self.refuse("timeout", host, f"TLS handshake not complete within {self.config.acse_timeout_s} s")
            return False
        except OSError as exc:  # ssl.SSLError included: plain DICOM, no or an untrusted certificate
            self.refuse("tls", host, f"TLS handshake failed: {exc}")
            return False
        return True

    def guard(self, assoc: Any, host: str, request_deadline: float) -> None:
        cfg = self.config

        def violation(pdu_type: int, length: int) -> None:
            log.warning(
                "aborting association from %s: PDU type 0x%02X declares %d bytes, more than negotiated",
                host,
                pdu_type,
                length,
            )
            self.metrics.pdu_aborts.inc()

        def timeout(requesting: bool) -> None:
            if requesting:
                detail = f"association request not complete within {cfg.acse_timeout_s} s"
                self.refuse("timeout", host, detail)
            else:
                log.warning(
                    "aborting association from %s: a PDU did not arrive within %s s",
                    host,
                    cfg.network_timeout_s,
                )

        PduGuard(
            assoc.dul.socket,
            max_pdu=cfg.max_pdu_bytes,
            request_deadline=request_deadline,
            pdu_timeout_s=cfg.network_timeout_s,
            on_violation=violation,
            on_timeout=timeout,
        )


class _RequestHandler(RequestHandler):
    """One connection, on its own thread, from accept until its association has ended.

    pynetdicom's handler starts the association thread and returns; this one does the TLS
    handshake here (pynetdicom does it on the listener's thread, where one silent peer blocks
    every other connection), installs the :class:`PduGuard`, then waits for the association
    so that the connection is counted until it is over.
    """

    server: _NodeServer

    def handle(self) -> None:
        opened = time.monotonic()
        gate = self.server.gate
        host = str(self.client_address[0])
        deadline = opened + gate.config.acse_timeout_s
        if isinstance(self.request, ssl.SSLSocket) and not gate.handshake(self.request, host, deadline):
            return
        assoc = self._create_association()
        gate.guard(assoc, host, deadline)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        try:
            assoc.join()
        finally:
            gate.limiter.free_association(assoc)


class _NodeServer(ThreadedAssociationServer):
    """A listener whose connections pass the :class:`_Gate`; TLS when it has an ``ssl_context``."""

    daemon_threads = True  # connection threads live as long as their association

    def __init__(self, *args: Any, gate: _Gate, **kwargs: Any) -> None:
        self.gate = gate
        # socketserver listens with a backlog of 5: a burst of connects (16 senders at once)
        # overflowed it and the dropped SYNs came back only after the client's 1 s retransmit.
        cfg = gate.config
        self.request_queue_size = min(cfg.max_associations + cfg.max_pending_connections, socket.SOMAXCONN)
        kwargs["request_handler"] = _RequestHandler
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.gate.admit(request, str(client_address[0]))

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.gate.limiter.close_connection(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.shutdown_request(request)
            self.gate.limiter.close_connection(request)


class DicomServer:
    """Owns the pynetdicom AE and its listeners; ``start()`` returns once they listen.

    One listener on ``port`` (TLS when ``tls.port`` is None), and a TLS one on ``tls.port`` when
    set; both share the association limit.
    """

    def __init__(self, config: ScpConfig, handler: StoreHandler, metrics: Metrics) -> None:
        self.config = config
        self.handler = handler
        self.metrics = metrics
        self._ssl_context = server_context(config.tls) if config.tls is not None else None
        self._limiter = _Limiter(config.max_associations, config.max_pending_connections)
        self._gate = _Gate(config, metrics, self._limiter)
        self._servers: list[tuple[_NodeServer, threading.Thread]] = []
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        ae.maximum_pdu_size = cfg.max_pdu_bytes
        # The limit is enforced in _on_requested; pynetdicom's own count (every acceptor thread,
        # pending ones included, so it refused real senders while stalled sockets were open)
        # stays above what the gate lets in.
        ae.maximum_associations = cfg.max_associations + cfg.max_pending_connections
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
        """The main listener's port (plain DICOM, or TLS when TLS has no port of its own)."""
        if not self._servers:
            return self.config.port
        return int(self._servers[0][0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The port that speaks TLS, None without TLS."""
        tls = self.config.tls
        if tls is None:
            return None
        if tls.port is None:
            return self.port
        if len(self._servers) < 2:
            return tls.port
        return int(self._servers[1][0].server_address[1])

    def load(self) -> Load:
        return self._limiter.load()

    def _handlers(self) -> list[Any]:
        h = self.handler
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
            (evt.EVT_C_STORE, h.handle_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, h.handle_accepted),
            (evt.EVT_REJECTED, h.handle_rejected),
            (evt.EVT_REJECTED, self._free_slot),
            (evt.EVT_RELEASED, lambda event: h.handle_closed(event, "released")),
            (evt.EVT_RELEASED, self._free_slot),
            (evt.EVT_ABORTED, lambda event: h.handle_closed(event, "aborted")),
            (evt.EVT_ABORTED, self._free_slot),
        ]

    def _on_echo(self, event: Any) -> int:
        self.metrics.echoes.inc()
        return 0x0000

    def _on_requested(self, event: Any) -> None:
        """A-ASSOCIATE-RQ received: take a slot, or reject with local limit exceeded."""
        assoc = event.assoc
        if assoc.is_aborted or not isinstance(assoc.requestor.primitive, A_ASSOCIATE):
            return  # the connection closed before a request arrived (_on_connection_closed)
        if self._limiter.take_association(assoc):
            return
        assoc.requestor.ae_title = assoc.requestor.primitive.calling_ae_title  # as ACSE would
        assoc.acse.send_reject(*_REJECT_LOCAL_LIMIT)
        self.handler.handle_rejected(event)  # metric reason "limit" and the audit record
        assoc.kill()  # what pynetdicom does after its own rejections: the RJ leaves, then close

    def _free_slot(self, event: Any) -> None:
        self._limiter.free_association(event.assoc)

    def _on_connection_closed(self, event: Any) -> None:
        assoc = event.assoc
        self._limiter.free_association(assoc)
        if assoc.requestor.primitive is None and not assoc.is_aborted:
            # Closed before an A-ASSOCIATE-RQ arrived (bad PDU, deadline, peer gone): the DUL
            # issues nothing to the user (PS3.8 AA-5) and pynetdicom's acceptor would wait
            # acse_timeout for a request. Hand it the A-P-ABORT indication so it ends now.
            assoc.is_aborted = True
            assoc.dul.to_user_queue.put(A_P_ABORT())

    def start(self) -> None:
        cfg = self.config
        tls = cfg.tls
        listeners: list[tuple[int, ssl.SSLContext | None, str]] = []
        if tls is None or tls.port is not None:
            listeners.append((cfg.port, None, "dicom-server"))
        if tls is not None:
            tls_port = cfg.port if tls.port is None else tls.port
            listeners.append((tls_port, self._ssl_context, "dicom-tls-server"))
        for port, context, name in listeners:
            server = self.ae.make_server(
                (cfg.host, port),
                ssl_context=context,
                evt_handlers=self._handlers(),
                server_class=_NodeServer,
                gate=self._gate,
            )
            assert isinstance(server, _NodeServer)
            # What AE.start_server does for the servers it makes, so AE.shutdown() stops them too.
            self.ae._servers.append(server)
            thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
            thread.start()
            self._servers.append((server, thread))
            log.info(
                "DICOM server %s listening on %s:%d%s",
                cfg.ae_title,
                cfg.host,
                int(server.server_address[1]),
                " (TLS)" if context is not None else "",
            )

    def stop(self) -> None:
        self.ae.shutdown()  # ends open associations, shuts the listeners down, closes their sockets
        for _, thread in self._servers:
            thread.join(timeout=10)
        self._servers = []
