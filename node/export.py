"""C-STORE SCU: sends result files (SR, Secondary Captures, GSPS) to a destination (PS3.4 B, PS3.7 9.1.1).

One association carries a batch; each file is proposed in its own transfer syntax, so nothing is
transcoded (a JPEG-LS Secondary Capture stays JPEG-LS). An uncompressed little endian file is also
offered in the other uncompressed little endian syntax, which pynetdicom converts to losslessly.
Warning statuses count as delivered (PS3.4 B.2.3: 0xB000 coercion of data elements, 0xB006
elements discarded, 0xB007 data set does not match SOP class); anything else is a failure that
the outbox records with its status and retries with :func:`backoff_delay`.

Error tree (each carries ``destination``, "AE@host:port")::

    ExportError(Exception)                 nothing was sent in this call
    ├── DestinationUnreachableError        no TCP connection (refused, timed out, TLS handshake)
    ├── AssociationRejectedError           A-ASSOCIATE-RJ; ``result``, ``source``, ``reason``
    ├── AssociationAbortedError            connected, then aborted before the association was up
    └── NoPresentationContextError         the peer accepted none of the proposed contexts

Per-file trouble once the association is up (a failure status, a context the peer refused for
that file, an abort half-way through the batch) does not raise: it comes back as a
:class:`SendOutcome` with ``delivered=False`` and the reason.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext, build_context

from node.settings import Destination

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # presentation context IDs are odd numbers 1-255 (PS3.8 9.3.2.2)
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class StoreStatus(IntEnum):
    """C-STORE response statuses the SCU acts on (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB006
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122


DELIVERED_STATUSES = frozenset(
    {
        StoreStatus.SUCCESS,
        StoreStatus.COERCION_OF_DATA_ELEMENTS,
        StoreStatus.ELEMENTS_DISCARDED,
        StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    }
)


class Priority(IntEnum):
    """DIMSE priority (PS3.7 9.1.1.1.7), with pynetdicom's values."""

    MEDIUM = 0
    HIGH = 1
    LOW = 2


@dataclass(frozen=True, slots=True)
class Peer:
    """A C-STORE SCP to send to; ``tls`` is a client context when the link is TLS (PS3.15 B.1)."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What happened to one file: the status the peer returned (None: never answered)."""

    sop_instance_uid: str
    status: int | None
    delivered: bool
    error: str | None


class ExportError(Exception):
    """Nothing was sent: the association to ``destination`` could not be used."""

    def __init__(self, message: str, *, destination: str) -> None:
        super().__init__(f"{destination}: {message}")
        self.destination = destination


class DestinationUnreachableError(ExportError):
    """No connection: the peer is down, the port is wrong, or the TLS handshake failed."""


class AssociationRejectedError(ExportError):
    """The peer rejected the association (PS3.8 7.1.1.9: result, source, reason)."""

    def __init__(self, *, destination: str, result: int, source: int, reason: int) -> None:
        super().__init__(
            f"association rejected (result 0x{result:02X}, source 0x{source:02X}, reason 0x{reason:02X})",
            destination=destination,
        )
        self.result = result
        self.source = source
        self.reason = reason


class AssociationAbortedError(ExportError):
    """The connection opened but the association was aborted before it was established."""


class NoPresentationContextError(ExportError):
    """The peer accepted none of the SOP class / transfer syntax pairs proposed."""


def is_delivered(status: int) -> bool:
    """Success and the three warning statuses of PS3.4 B.2.3 mean the peer keeps the object."""
    return status in DELIVERED_STATUSES


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first failure).

    Exponential with "equal jitter": the ceiling ``min(max_s, base_s * 2**(attempt - 1))`` and a
    delay drawn uniformly from its upper half, so retries spread out (many results failing together
    do not return together) yet never come back sooner than half the ceiling.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    if base_s < 0 or max_s < 0:
        raise ValueError("delays must be >= 0")
    ceiling = min(max_s, math.ldexp(base_s, min(attempt - 1, 1000)))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


@dataclass(frozen=True, slots=True)
class _File:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax: UID


def send_files(
    peer: Peer,
    paths: Sequence[Path],
    *,
    calling_ae: str,
    priority: int = Priority.LOW,
    max_pdu: int = 1_048_576,
    connection_timeout_s: float = 10.0,
    acse_timeout_s: float = 30.0,
    dimse_timeout_s: float = 60.0,
    network_timeout_s: float = 60.0,
) -> list[SendOutcome]:
    """Store every file at ``paths`` on ``peer`` and return one outcome per path, in order.

    One association per at most :data:`MAX_CONTEXTS` distinct (SOP class, transfer syntax) pairs
    (in practice one for a study's results). Raises an :class:`ExportError` when an association
    cannot be used at all; per-file failures are outcomes, never exceptions. A file that cannot
    be read as DICOM raises :class:`ValueError` before anything is sent: that is a bug upstream,
    not a destination problem.
    """
    files = [_read_meta(Path(path)) for path in paths]
    outcomes: dict[int, SendOutcome] = {}
    for batch in _batches(files):
        outcomes.update(
            _send_batch(
                peer,
                batch,
                calling_ae=calling_ae,
                priority=int(priority),
                max_pdu=max_pdu,
                timeouts=(connection_timeout_s, acse_timeout_s, dimse_timeout_s, network_timeout_s),
            )
        )
    return [outcomes[index] for index in range(len(files))]


def peer_for(destination: Destination) -> Peer:
    """The :class:`Peer` of a configured destination, with a TLS client context when asked.

    The context verifies the server against ``tls_ca_file`` (the system store when unset) and
    presents ``tls_cert_file``/``tls_key_file`` when both are set (mutual TLS, PS3.15 B.1).
    """
    context: ssl.SSLContext | None = None
    if destination.tls:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(destination.tls_ca_file) if destination.tls_ca_file else None,
        )
        if destination.tls_cert_file is not None and destination.tls_key_file is not None:
            context.load_cert_chain(str(destination.tls_cert_file), str(destination.tls_key_file))
    return Peer(destination.ae_title, destination.host, destination.port, context)


def _read_meta(path: Path) -> _File:
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError) as exc:
        raise ValueError(f"{path} is not a readable DICOM file: {exc}") from exc
    try:
        return _File(
            path=path,
            sop_class_uid=UID(str(meta.MediaStorageSOPClassUID)),
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax=UID(str(meta.TransferSyntaxUID)),
        )
    except AttributeError as exc:
        raise ValueError(f"{path} lacks file meta information: {exc}") from exc


def _offered_syntaxes(syntax: UID) -> list[str | UID]:
    # A chunked send puts the file's bytes on the wire unchanged, so only its own syntax can
    # be used; otherwise pynetdicom can re-encode between the uncompressed syntaxes.
    if syntax in _UNCOMPRESSED and not pynetdicom_config.STORE_SEND_CHUNKED_DATASET:
        return [syntax, *(other for other in _UNCOMPRESSED if other != syntax)]
    return [syntax]


def _batches(files: Sequence[_File]) -> list[list[tuple[int, _File]]]:
    """Files grouped so no association needs more than ``MAX_CONTEXTS`` contexts."""
    batches: list[list[tuple[int, _File]]] = []
    pairs: set[tuple[UID, UID]] = set()
    for index, item in enumerate(files):
        pair = (item.sop_class_uid, item.transfer_syntax)
        if not batches or (pair not in pairs and len(pairs) == MAX_CONTEXTS):
            batches.append([])
            pairs = set()
        pairs.add(pair)
        batches[-1].append((index, item))
    return batches


def _contexts(batch: Sequence[tuple[int, _File]]) -> list[PresentationContext]:
    pairs = dict.fromkeys((item.sop_class_uid, item.transfer_syntax) for _, item in batch)
    return [build_context(sop_class, _offered_syntaxes(syntax)) for sop_class, syntax in pairs]


def _send_batch(
    peer: Peer,
    batch: Sequence[tuple[int, _File]],
    *,
    calling_ae: str,
    priority: int,
    max_pdu: int,
    timeouts: tuple[float, float, float, float],
) -> dict[int, SendOutcome]:
    destination = str(peer)
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout, ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = timeouts
    connected: list[bool] = []

    def on_open(event: Event) -> None:
        connected.append(True)

    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=_contexts(batch),
        ae_title=peer.ae_title,
        max_pdu=max_pdu,
        tls_args=(peer.tls, peer.host) if peer.tls is not None else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
    )
    if not assoc.is_established:
        raise _association_error(assoc, destination, connected=bool(connected))
    try:
        return _store_all(assoc, batch, priority, destination)
    finally:
        if assoc.is_established:
            assoc.release()


def _store_all(
    assoc: Association, batch: Sequence[tuple[int, _File]], priority: int, destination: str
) -> dict[int, SendOutcome]:
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    outcomes: dict[int, SendOutcome] = {}
    for position, (index, item) in enumerate(batch):
        if not assoc.is_established:
            outcomes[index] = SendOutcome(
                item.sop_instance_uid,
                None,
                False,
                f"association ended after {position} of {len(batch)} files",
            )
            continue
        offered = _offered_syntaxes(item.transfer_syntax)
        if not any((str(item.sop_class_uid), str(syntax)) in accepted for syntax in offered):
            outcomes[index] = SendOutcome(
                item.sop_instance_uid,
                None,
                False,
                f"{destination} accepted no presentation context for {item.sop_class_uid.name} "
                f"in {item.transfer_syntax.name}",
            )
            continue
        outcomes[index] = _store_one(assoc, item, priority, message_id=position + 1)
    return outcomes


def _store_one(assoc: Association, item: _File, priority: int, *, message_id: int) -> SendOutcome:
    try:
        response = assoc.send_c_store(item.path, msg_id=message_id, priority=priority)
    except (ValueError, AttributeError, OSError) as exc:
        return SendOutcome(item.sop_instance_uid, None, False, f"not sent: {exc}")
    status = response.get("Status") if response is not None else None
    if status is None:
        # pynetdicom returns an empty Dataset when the DIMSE timeout passed or the link dropped.
        return SendOutcome(item.sop_instance_uid, None, False, "no response (timeout or connection lost)")
    code = int(status)
    if is_delivered(code):
        return SendOutcome(item.sop_instance_uid, code, True, None)
    comment = response.get("ErrorComment")
    detail = f": {comment}" if comment else ""
    return SendOutcome(item.sop_instance_uid, code, False, f"C-STORE failed with status 0x{code:04X}{detail}")


def _association_error(assoc: Association, destination: str, *, connected: bool) -> ExportError:
    response = assoc.acceptor.primitive  # the A-ASSOCIATE-AC/RJ, when one arrived
    if assoc.is_rejected and response is not None:
        return AssociationRejectedError(
            destination=destination,
            result=int(response.result or 0),
            source=int(response.result_source or 0),
            reason=int(response.diagnostic or 0),
        )
    if response is not None and response.result == 0x00 and not assoc.accepted_contexts:
        # pynetdicom aborts an accepted association whose contexts were all refused.
        return NoPresentationContextError(
            "the peer accepted none of the proposed presentation contexts", destination=destination
        )
    if not connected:
        return DestinationUnreachableError(
            "no connection (peer down, wrong port or TLS failure)", destination=destination
        )
    return AssociationAbortedError("association aborted during negotiation", destination=destination)
