"""The C-STORE handler: validate the identity of a received instance, write it durably, index
it, and only then answer Success.

The handler never decodes pixel data (STACK-NOTES: the sender waits on it). It parses the
top-level elements to read the UIDs and checks the stream is complete, writes the encoded dataset
exactly as received (the spool's atomic, fsynced write), records study/series/instance in one short
transaction, and returns a :class:`~node.status.StoreStatus`. A re-sent SOP Instance UID with the
same bytes is acknowledged without a second record; with different bytes the stored copy is
replaced and the change recorded.

Exceptions become statuses here and nowhere else:
:class:`IngestError` (base, carries ``status``) ->
:class:`UnreadableDatasetError` (0xC000), :class:`MissingUidError` (0xC001),
:class:`InvalidUidError` (0xC003), :class:`SopClassMismatchError` (0xA900);
:class:`node.spool.SpoolFullError` -> 0xA700; other spool failures -> 0x0110.
Database failures: :class:`storage.errors.StorageUnavailable` (SQLite "database or disk is full",
a lock held past the busy timeout, PostgreSQL unreachable) -> 0xA700 Out of Resources, which a
sender retries later; any other :class:`storage.errors.StorageError` -> 0x0110. Either way the
spool file just written for a new instance is removed again, so no file is left without its
row. Anything else raised while handling the request (a bug, or a parser failure nobody
foresaw) -> 0x0110 as well: no exception reaches pynetdicom, whose own answer would be 0xC211.

What "cannot understand" (0xC000) covers: a stream pydicom cannot parse whatever it raises
(including ``RecursionError`` from undefined-length sequences nested past Python's stack), one
cut short, a sequence nested deeper than :data:`MAX_NESTING` or that cannot be parsed, a
deflated stream that inflates past ``max_inflated_bytes`` (a deflate bomb: the stream is inflated
here with that bound, never by pynetdicom's unbounded ``zlib.decompress``), and a Modality or
Body Part Examined that is not text (sent with a binary VR). A UID that is not text is invalid
(0xC003).

Logs name the SOP class, the status and the kind of failure (:func:`node.redact.safe_reason`),
never a value of the dataset, a patient name or ID.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from node import received
from node.logcontext import log_context
from node.metrics import Metrics, sop_class_label
from node.redact import safe_reason
from node.spool import Spool, SpoolError, SpoolFullError, sha256_hex
from node.status import StoreStatus
from node.uids import is_valid_uid
from storage import repo
from storage.db import Database
from storage.errors import StorageError, StorageUnavailable
from storage.views import AuditKind, AuditRecord, InstanceRecord, RecordOutcome

log = logging.getLogger(__name__)

_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
# Sequences in a radiograph go a few levels deep (a code item's modifier); 16 is generous and
# far below what Python's parser recursion tolerates.
MAX_NESTING = 16
# A deflated dataset larger than this once inflated is refused (PS3.5 A.5: deflate is for
# non-pixel objects; a deflated radiograph of 100 Mpx at 16 bits is 200 MB).
MAX_INFLATED_BYTES = 256 * 1024**2


class IngestError(Exception):
    status: StoreStatus = StoreStatus.CANNOT_UNDERSTAND


class UnreadableDatasetError(IngestError):
    status = StoreStatus.CANNOT_UNDERSTAND


class MissingUidError(IngestError):
    status = StoreStatus.CANNOT_UNDERSTAND_MISSING_UID


class InvalidUidError(IngestError):
    status = StoreStatus.CANNOT_UNDERSTAND_INVALID_UID


class SopClassMismatchError(IngestError):
    status = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS


@dataclass(frozen=True, slots=True)
class Identity:
    """What the node needs to know about an instance before it is stored."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str | None
    body_part: str | None


_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def read_identity(
    stream: bytes,
    *,
    implicit_vr: bool,
    little_endian: bool,
    deflated: bool,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
) -> Identity:
    """Parse the top-level elements of an encoded dataset (no pixel decoding) and check it is whole.

    Raises :class:`IngestError` subclasses only.
    """
    try:
        if deflated:
            stream = _inflate(stream, max_inflated_bytes)
            implicit_vr, little_endian = False, True
        ds = decode(BytesIO(stream), implicit_vr, little_endian, False)
        _check_complete(ds, stream)
        _check_nesting(ds, 1)
        values = {keyword: _identity_text(ds, keyword, InvalidUidError, received.uid) for keyword in _UIDS}
        modality = _identity_text(ds, "Modality", UnreadableDatasetError, received.text)
        body_part = _identity_text(ds, "BodyPartExamined", UnreadableDatasetError, received.text)
    except IngestError:
        raise
    # pydicom's reader raises whatever the bytes provoke (ValueError, struct.error, OSError,
    # BytesLengthException, RecursionError for nesting bombs...): all of it means the dataset
    # cannot be understood. The exception's text may quote values: only its type is kept.
    except Exception as exc:  # noqa: BLE001
        raise UnreadableDatasetError(f"the dataset cannot be parsed ({type(exc).__name__})") from exc
    for keyword, value in values.items():
        if not value:
            raise MissingUidError(f"{keyword} is missing")
        if not is_valid_uid(value):
            raise InvalidUidError(f"{keyword} is not digits and dots of at most 64 characters")
    return Identity(
        study_uid=values["StudyInstanceUID"] or "",
        series_uid=values["SeriesInstanceUID"] or "",
        sop_uid=values["SOPInstanceUID"] or "",
        sop_class_uid=values["SOPClassUID"] or "",
        modality=(modality or "")[:16] or None,
        body_part=(body_part or "")[:64] or None,
    )


def _identity_text(
    ds: Dataset, keyword: str, not_text: type[IngestError], read: Callable[[Dataset, str], str | None]
) -> str | None:
    """``keyword`` read with ``read``; ``None`` when absent or empty; ``not_text`` raised when the
    element holds something else (a binary VR, a sequence, several values)."""
    if keyword not in ds or _is_empty(ds.get_item(keyword)):
        return None
    value = read(ds, keyword)
    if value is None:
        raise not_text(f"{keyword} is not text")
    return value


def _is_empty(element: DataElement | RawDataElement | None) -> bool:
    if element is None:
        return True
    if isinstance(element, RawDataElement):
        return element.length == 0
    value: object = element.value
    return value is None or value == "" or value == b"" or (isinstance(value, list) and not value)


def _inflate(stream: bytes, limit: int) -> bytes:
    """Deflated Explicit VR Little Endian (PS3.5 A.5) inflated, refused past ``limit`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(stream, limit + 1)
    except zlib.error as exc:
        raise UnreadableDatasetError("the deflated dataset cannot be inflated") from exc
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise UnreadableDatasetError(f"the deflated dataset inflates to more than {limit} bytes")
    return inflated


def _is_sequence(tag: BaseTag, element: DataElement | RawDataElement) -> bool:
    vr = element.VR
    if vr is None:  # implicit VR: the dictionary's, and pydicom reads undefined length as SQ
        if isinstance(element, RawDataElement) and element.length == _UNDEFINED_LENGTH:
            return int(tag) != _PIXEL_DATA
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return False
    return vr == "SQ"


def _check_nesting(ds: Dataset, depth: int) -> None:
    """Parse every sequence (pydicom defers defined-length ones) down to :data:`MAX_NESTING`."""
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        if element is None or not _is_sequence(tag, element):
            continue
        if depth > MAX_NESTING:
            raise UnreadableDatasetError(f"sequences nested deeper than {MAX_NESTING} levels")
        value = ds[tag].value
        if not isinstance(value, Sequence):
            continue
        for item in value:
            if isinstance(item, Dataset):
                _check_nesting(item, depth + 1)


def _check_complete(ds: Dataset, stream: bytes) -> None:
    """pydicom reads a truncated stream silently: check declared lengths against what arrived."""
    if len(ds) == 0:
        raise UnreadableDatasetError("the dataset holds no elements")
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.value is None:
            continue
        if raw.length != _UNDEFINED_LENGTH and len(raw.value) != raw.length:
            raise UnreadableDatasetError(
                f"element {tag} is truncated ({len(raw.value)} of {raw.length} bytes)"
            )
    pixel = ds.get_item(0x7FE00010)
    if isinstance(pixel, RawDataElement) and pixel.length == _UNDEFINED_LENGTH:
        last_tag = max(ds.keys())
        if last_tag == 0x7FE00010 and not stream.endswith(_SEQUENCE_DELIMITER):
            raise UnreadableDatasetError("encapsulated pixel data ends without its sequence delimiter")


@dataclass
class _AssociationTally:
    calling_ae: str
    called_ae: str
    peer: str
    stored: int = 0
    duplicates: int = 0
    replaced: int = 0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)


def _reject_reason(assoc: Any, tally: _AssociationTally) -> str:
    """Which of the acceptor's checks (pynetdicom's ACSE negotiation) refused the association."""
    allowed = [title.strip() for title in assoc.ae.require_calling_aet]
    if allowed and tally.calling_ae not in allowed:
        return "ae_title"
    if tally.called_ae != str(assoc.acceptor.ae_title).strip():
        return "called_ae"
    return "limit"


class StoreHandler:
    """Handles C-STORE and association events for the SCP (one instance per server)."""

    def __init__(
        self,
        spool: Spool,
        db: Database,
        metrics: Metrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_inflated_bytes: int = MAX_INFLATED_BYTES,
    ) -> None:
        self.spool = spool
        self.db = db
        self.metrics = metrics
        self.clock = clock
        self.max_inflated_bytes = max_inflated_bytes
        self._tallies: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()

    # -- C-STORE ---------------------------------------------------------------------------
    def handle_store(self, event: Any) -> int:
        started = time.perf_counter()
        tally = self._tally(event.assoc)
        label = "unknown"
        size = 0
        try:
            request = event.request
            label = sop_class_label(str(request.AffectedSOPClassUID))
            stream: bytes = event.encoded_dataset(include_meta=False)
            size = len(stream)
            with log_context(calling_ae=tally.calling_ae):
                status, outcome = self._store(event, stream, event.context, request, tally)
        # The one place nothing may escape: pynetdicom would answer 0xC211 and log the
        # traceback with whatever the exception quotes.
        except Exception as exc:  # noqa: BLE001
            log.error(
                "C-STORE from %s failed: %s -> 0x%04X",
                tally.calling_ae,
                safe_reason(exc),
                StoreStatus.PROCESSING_FAILURE,
            )
            status, outcome = StoreStatus.PROCESSING_FAILURE, "failed"
        self.metrics.instances_received.labels(sop_class=label, outcome=outcome).inc()
        if status == StoreStatus.SUCCESS:
            self.metrics.bytes_received.inc(size)
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        with self._lock:
            tally.statuses[int(status)] = tally.statuses.get(int(status), 0) + 1
            if status != StoreStatus.SUCCESS:
                tally.failed += 1
            elif outcome == "duplicate":
                tally.duplicates += 1
            elif outcome == "replaced":
                tally.replaced += 1
            else:
                tally.stored += 1
        return int(status)

    def _store(
        self, event: Any, stream: bytes, context: Any, request: Any, tally: _AssociationTally
    ) -> tuple[StoreStatus, str]:
        syntax = UID(context.transfer_syntax)
        try:
            identity = read_identity(
                stream,
                implicit_vr=syntax.is_implicit_VR,
                little_endian=syntax.is_little_endian,
                deflated=syntax.is_deflated,
                max_inflated_bytes=self.max_inflated_bytes,
            )
            if identity.sop_class_uid != str(request.AffectedSOPClassUID):
                raise SopClassMismatchError("the dataset's SOP Class UID differs from the request's")
            if identity.sop_uid != str(request.AffectedSOPInstanceUID):
                raise SopClassMismatchError("the dataset's SOP Instance UID differs from the request's")
        except IngestError as exc:
            log.warning(
                "C-STORE rejected from %s (%s): %s -> 0x%04X", tally.calling_ae, tally.peer, exc, exc.status
            )
            return exc.status, "rejected"

        with log_context(study=identity.study_uid, instance=identity.sop_uid):
            return self._store_identified(event, stream, syntax, identity, tally)

    def _store_identified(
        self, event: Any, stream: bytes, syntax: UID, identity: Identity, tally: _AssociationTally
    ) -> tuple[StoreStatus, str]:
        digest = sha256_hex(stream)
        try:
            previous = repo.existing_sha256(self.db, identity.sop_uid)
        except StorageError as exc:
            return self._database_failed(exc)
        if previous == digest:
            return StoreStatus.SUCCESS, "duplicate"
        try:
            data = event.encoded_dataset(include_meta=True)
            stored = self.spool.write(identity.study_uid, identity.series_uid, identity.sop_uid, data)
        except SpoolFullError as exc:
            log.error("C-STORE refused: %s -> 0x%04X", exc, StoreStatus.OUT_OF_RESOURCES)
            return StoreStatus.OUT_OF_RESOURCES, "out_of_resources"
        except SpoolError as exc:
            log.error("C-STORE failed: %s -> 0x%04X", exc, StoreStatus.PROCESSING_FAILURE)
            return StoreStatus.PROCESSING_FAILURE, "failed"
        try:
            result = repo.record_instance(
                self.db,
                InstanceRecord(
                    study_uid=identity.study_uid,
                    series_uid=identity.series_uid,
                    sop_uid=identity.sop_uid,
                    sop_class_uid=identity.sop_class_uid,
                    transfer_syntax_uid=str(syntax),
                    path=stored.relative_path,
                    size_bytes=stored.size_bytes,
                    sha256=digest,
                    modality=identity.modality,
                    body_part=identity.body_part,
                    calling_ae=tally.calling_ae,
                    received_at=self.clock(),
                ),
            )
        except StorageError as exc:
            if previous is None:
                self._discard_unrecorded(stored.relative_path, identity.sop_uid)
            return self._database_failed(exc)
        if result.reopened:
            log.info("a late instance re-opened a processed study (now revision %d)", result.revision)
        return StoreStatus.SUCCESS, {
            RecordOutcome.NEW: "stored",
            RecordOutcome.DUPLICATE: "duplicate",
            RecordOutcome.REPLACED: "replaced",
        }[result.outcome]

    def _database_failed(self, exc: StorageError) -> tuple[StoreStatus, str]:
        """StorageUnavailable (disk full, lock timeout, no connection): Out of Resources, which a
        sender retries later; any other database error: processing failure."""
        if isinstance(exc, StorageUnavailable):
            log.error(
                "C-STORE refused, database unavailable: %s -> 0x%04X", exc, StoreStatus.OUT_OF_RESOURCES
            )
            return StoreStatus.OUT_OF_RESOURCES, "out_of_resources"
        log.error("C-STORE failed, database error: %s -> 0x%04X", exc, StoreStatus.PROCESSING_FAILURE)
        return StoreStatus.PROCESSING_FAILURE, "failed"

    def _discard_unrecorded(self, relative_path: str, sop_uid: str) -> None:
        """Remove the file of a new instance whose row could not be written, unless another
        association recorded the same instance meanwhile (then the file is its)."""
        try:
            recorded = repo.existing_sha256(self.db, sop_uid) is not None
        except StorageError:
            recorded = False  # the database is down: nobody else recorded it either
        if recorded:
            return
        try:
            self.spool.discard(relative_path)
        except OSError as exc:
            log.error("could not remove an unrecorded spool file: %s", safe_reason(exc))

    # -- association bookkeeping -----------------------------------------------------------
    def _tally(self, assoc: Any) -> _AssociationTally:
        key = id(assoc)
        with self._lock:
            tally = self._tallies.get(key)
            if tally is None:
                tally = _AssociationTally(
                    calling_ae=str(assoc.requestor.ae_title).strip(),
                    called_ae=str(assoc.acceptor.ae_title).strip(),
                    peer=f"{assoc.requestor.address}",
                )
                self._tallies[key] = tally
            return tally

    def handle_accepted(self, event: Any) -> None:
        self._tally(event.assoc)
        self.metrics.associations_active.inc()

    def handle_closed(self, event: Any, outcome: str) -> None:
        key = id(event.assoc)
        with self._lock:
            tally = self._tallies.pop(key, None)
        if tally is None:
            return
        self.metrics.associations_active.dec()
        self._audit(AuditKind.ASSOCIATION, tally, outcome)

    def handle_rejected(self, event: Any) -> None:
        assoc = event.assoc
        tally = _AssociationTally(
            calling_ae=str(assoc.requestor.ae_title).strip(),
            called_ae=str(getattr(assoc.requestor.primitive, "called_ae_title", "") or "").strip(),
            peer=f"{assoc.requestor.address}",
        )
        reason = _reject_reason(assoc, tally)
        log.warning(
            "association rejected (%s): calling AE %r, called AE %r, from %s",
            reason,
            tally.calling_ae,
            tally.called_ae,
            tally.peer,
        )
        self.metrics.associations_rejected.labels(reason=reason).inc()
        self._audit(AuditKind.REJECTED, tally, f"rejected: {reason}")

    def _audit(self, kind: AuditKind, tally: _AssociationTally, outcome: str) -> None:
        statuses = ",".join(f"0x{status:04X}:{count}" for status, count in sorted(tally.statuses.items()))
        detail = f"replaced={tally.replaced} statuses={statuses}" if statuses else None
        try:
            repo.add_audit(
                self.db,
                AuditRecord(
                    kind=kind,
                    calling_ae=tally.calling_ae,
                    called_ae=tally.called_ae,
                    peer_address=tally.peer,
                    at=self.clock(),
                    stored=tally.stored,
                    duplicates=tally.duplicates,
                    failed=tally.failed,
                    outcome=outcome,
                    detail=detail,
                ),
            )
        except StorageError as exc:
            log.error("could not write the audit record: %s", exc)
