"""A DICOM upper-layer client written by hand (PS3.8 9.3), for bytes no library would send.

pynetdicom's SCU decodes and re-encodes what it sends, so a mutated dataset would be repaired
(or refused) on this side of the wire. :class:`RawAssociation` builds A-ASSOCIATE-RQ, P-DATA-TF
and A-RELEASE-RQ PDUs itself and sends an already-encoded dataset exactly as given, in P-DATA
fragments of at most the negotiated length; it reads the A-ASSOCIATE-AC/RJ and the C-STORE
response and returns the DIMSE status. Malformed PDUs are sent with :meth:`RawAssociation.send_raw`.

Outcomes are values, not exceptions: :class:`StoreOutcome` says whether a status came back, or
the node aborted (A-ABORT), closed, reset, or did not answer in time.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from dataclasses import dataclass
from enum import StrEnum

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07


class Reply(StrEnum):
    STATUS = "status"  # a C-STORE-RSP came back
    ABORTED = "aborted"  # the node sent A-ABORT
    CLOSED = "closed"  # the node closed the connection (FIN) without a PDU
    RESET = "reset"  # connection reset (RST)
    TIMEOUT = "timeout"  # nothing within the timeout
    REJECTED = "rejected"  # A-ASSOCIATE-RJ
    PROTOCOL = "protocol"  # an unexpected PDU


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    reply: Reply
    status: int | None = None
    seconds: float = 0.0


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def associate_rq(
    called: str,
    calling: str,
    contexts: list[tuple[int, str, list[str]]],
    max_pdu: int = 1_048_576,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing ``(id, abstract syntax, transfer syntaxes)``."""
    items = _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode("ascii")) + b"".join(
            _item(0x40, s.encode("ascii")) for s in syntaxes
        )
        items += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID.encode("ascii"))
    items += _item(0x50, user)
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode("ascii")
        + calling.ljust(16).encode("ascii")
        + bytes(32)
        + items
    )
    return struct.pack(">BBL", A_ASSOCIATE_RQ, 0, len(body)) + body


def p_data(context_id: int, fragment: bytes, *, command: bool, last: bool) -> bytes:
    """One P-DATA-TF PDU with one PDV (PS3.8 9.3.5, E.2)."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, header) + fragment
    return struct.pack(">BBL", P_DATA_TF, 0, len(pdv)) + pdv


def release_rq() -> bytes:
    return struct.pack(">BBL", A_RELEASE_RQ, 0, 4) + bytes(4)


def _implicit(group: int, element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", group, element, len(value)) + value


def c_store_rq(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """The C-STORE-RQ command set (PS3.7 9.3.1.1) in Implicit VR Little Endian, written byte by
    byte so that a malformed Affected SOP Instance UID goes out exactly as given."""
    body = (
        _implicit(0x0000, 0x0002, sop_class.encode("latin-1"))
        + _implicit(0x0000, 0x0100, struct.pack("<H", 0x0001))
        + _implicit(0x0000, 0x0110, struct.pack("<H", message_id & 0xFFFF))
        + _implicit(0x0000, 0x0700, struct.pack("<H", 0))
        + _implicit(0x0000, 0x0800, struct.pack("<H", 0x0000))
        + _implicit(0x0000, 0x1000, sop_instance.encode("latin-1", "replace"))
    )
    return _implicit(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def _status_of(command: bytes) -> int | None:
    """(0000,0900) Status from an Implicit VR LE command set."""
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHL", command, offset)
        offset += 8
        if (group, element) == (0x0000, 0x0900) and length == 2:
            return int(struct.unpack_from("<H", command, offset)[0])
        offset += length
    return None


class RawAssociation:
    """One TCP connection to an SCP, driven PDU by PDU."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.max_pdu = 16_384
        self.accepted: dict[int, str] = {}  # context id -> transfer syntax

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> bool:
        """Write ``data`` as is; False when the node has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _recv_exact(self, count: int) -> bytes | None:
        chunks = b""
        while len(chunks) < count:
            chunk = self.sock.recv(count - len(chunks))
            if not chunk:
                return None
            chunks += chunk
        return chunks

    def read_pdu(self) -> tuple[Reply | None, int, bytes]:
        """(None, type, body) for a PDU, or (reason, 0, b"") when none can be read."""
        try:
            header = self._recv_exact(6)
            if header is None:
                return Reply.CLOSED, 0, b""
            pdu_type, _, length = struct.unpack(">BBL", header)
            if length > 64 * 1024 * 1024:
                return Reply.PROTOCOL, pdu_type, b""
            body = self._recv_exact(length)
            if body is None:
                return Reply.CLOSED, 0, b""
            return None, pdu_type, body
        except TimeoutError:
            return Reply.TIMEOUT, 0, b""
        except ConnectionResetError:
            return Reply.RESET, 0, b""
        except OSError:
            return Reply.RESET, 0, b""

    def associate(
        self, sop_class: str, syntax: str, *, called: str = "FRACNODE", calling: str = "RAWSCU"
    ) -> Reply | None:
        """Negotiate one context (id 1); None when accepted, else why not."""
        self.send_raw(associate_rq(called, calling, [(1, sop_class, [syntax])]))
        reason, pdu_type, body = self.read_pdu()
        if reason is not None:
            return reason
        if pdu_type == A_ASSOCIATE_RJ:
            return Reply.REJECTED
        if pdu_type == A_ABORT:
            return Reply.ABORTED
        if pdu_type != A_ASSOCIATE_AC:
            return Reply.PROTOCOL
        self._parse_ac(body)
        return None if 1 in self.accepted else Reply.REJECTED

    def _parse_ac(self, body: bytes) -> None:
        offset = 68  # protocol version, reserved, AE titles, 32 reserved bytes
        while offset + 4 <= len(body):
            item_type, _, length = struct.unpack_from(">BBH", body, offset)
            value = body[offset + 4 : offset + 4 + length]
            offset += 4 + length
            if item_type == 0x21 and len(value) >= 4:
                context_id, result = value[0], value[2]
                syntax = value[8 : 8 + struct.unpack_from(">H", value, 6)[0]] if len(value) >= 8 else b""
                if result == 0:
                    self.accepted[context_id] = syntax.rstrip(b"\x00").decode("ascii", "replace")
            elif item_type == 0x50:
                sub = 0
                while sub + 4 <= len(value):
                    sub_type, _, sub_length = struct.unpack_from(">BBH", value, sub)
                    if sub_type == 0x51 and sub_length == 4:
                        peer_max = struct.unpack_from(">L", value, sub + 4)[0]
                        self.max_pdu = peer_max or 1_048_576
                    sub += 4 + sub_length

    def c_store(self, sop_class: str, sop_instance: str, dataset: bytes, message_id: int = 1) -> StoreOutcome:
        """Send a C-STORE-RQ and ``dataset`` (already encoded) on context 1; read the response."""
        started = time.perf_counter()
        command = c_store_rq(sop_class, sop_instance, message_id)
        if not self.send_raw(p_data(1, command, command=True, last=True)):
            return StoreOutcome(Reply.RESET, seconds=time.perf_counter() - started)
        chunk = max(1024, self.max_pdu - 6)
        pieces = [dataset[i : i + chunk] for i in range(0, len(dataset), chunk)] or [b""]
        for index, piece in enumerate(pieces):
            if not self.send_raw(p_data(1, piece, command=False, last=index == len(pieces) - 1)):
                break
        return self.read_store_response(started)

    def read_store_response(self, started: float | None = None) -> StoreOutcome:
        started = time.perf_counter() if started is None else started
        command = b""
        while True:
            reason, pdu_type, body = self.read_pdu()
            elapsed = time.perf_counter() - started
            if reason is not None:
                return StoreOutcome(reason, seconds=elapsed)
            if pdu_type == A_ABORT:
                return StoreOutcome(Reply.ABORTED, seconds=elapsed)
            if pdu_type != P_DATA_TF:
                return StoreOutcome(Reply.PROTOCOL, seconds=elapsed)
            offset = 0
            while offset + 6 <= len(body):
                length, _, header = struct.unpack_from(">LBB", body, offset)
                command += body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if header & 0x01 and header & 0x02:
                    return StoreOutcome(Reply.STATUS, _status_of(command), elapsed)

    def release(self) -> bool:
        """A-RELEASE-RQ; True when A-RELEASE-RP came back."""
        if not self.send_raw(release_rq()):
            return False
        reason, pdu_type, _ = self.read_pdu()
        return reason is None and pdu_type == A_RELEASE_RP


def store_bytes(
    port: int, sop_class: str, sop_instance: str, syntax: str, dataset: bytes, *, timeout: float = 60.0
) -> StoreOutcome:
    """One association, one C-STORE of ``dataset`` exactly as given, then release."""
    with RawAssociation(port, timeout=timeout) as assoc:
        refused = assoc.associate(sop_class, syntax)
        if refused is not None:
            return StoreOutcome(refused)
        outcome = assoc.c_store(sop_class, sop_instance, dataset)
        if outcome.reply is Reply.STATUS:
            assoc.release()
        return outcome


@dataclass(frozen=True, slots=True)
class Closed:
    """How a hostile connection ended: ``reply`` and after how many seconds (None: still open)."""

    reply: Reply
    seconds: float | None


def wait_closed(sock: socket.socket, bound: float, started: float) -> Closed:
    """Read until the node closes, aborts or resets the connection, or ``bound`` s have passed."""
    sock.settimeout(0.5)
    while time.monotonic() - started < bound:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return Closed(Reply.RESET, time.monotonic() - started)
        if not data:
            return Closed(Reply.CLOSED, time.monotonic() - started)
        if data[0] == A_ABORT:
            return Closed(Reply.ABORTED, time.monotonic() - started)
    return Closed(Reply.TIMEOUT, None)


def hostile_pdu(rng: random.Random) -> tuple[str, bytes, bool]:
    """(label, bytes, send after an association?) of one malformed PDU that must end the
    connection at once: a declared length beyond the maximum, an unknown type, garbage."""
    choice = rng.randrange(5)
    if choice == 0:
        pdu_type = rng.choice((0x01, 0x04, 0x05, 0x07))
        length = rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 0x10000000, 1_048_576 + 1))
        return (
            f"declared-length:{pdu_type}:{length}",
            struct.pack(">BBL", pdu_type, 0, length) + bytes(32),
            (pdu_type == P_DATA_TF),
        )
    if choice == 1:
        pdu_type = rng.choice((0x00, 0x08, 0x42, 0xFF))
        return f"unknown-type:{pdu_type}", struct.pack(">BBL", pdu_type, 0, 4) + bytes(4), False
    if choice == 2:
        size = rng.choice((1, 7, 64, 4096))
        return f"garbage:{size}", bytes(rng.getrandbits(8) for _ in range(size)), False
    if choice == 3:
        pdu_type = rng.choice((0x01, 0x02, 0x03, 0x05, 0x06, 0x07))
        body = bytes(rng.getrandbits(8) for _ in range(rng.choice((4, 10, 68, 200))))
        return f"garbage-body:{pdu_type}", struct.pack(">BBL", pdu_type, 0, len(body)) + body, False
    body = bytes(rng.getrandbits(8) for _ in range(rng.choice((6, 40, 300))))
    return f"garbage-p-data:{len(body)}", struct.pack(">BBL", P_DATA_TF, 0, len(body)) + body, True


def send_hostile(port: int, payload: bytes, *, associate_first: bool, bound: float) -> Closed:
    """Send ``payload`` (after negotiating a DX context when asked) and wait for the node to end
    the connection; a refused association counts as ended."""
    with RawAssociation(port, timeout=bound) as assoc:
        if associate_first:
            refused = assoc.associate("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
            if refused is not None:
                return Closed(refused, 0.0)
        started = time.monotonic()
        assoc.send_raw(payload)
        return wait_closed(assoc.sock, bound, started)
