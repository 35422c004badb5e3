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
:class:`node.spool.SpoolFullError` -> 0xA700; other spool or database failures -> 0x0110.
Logs name the SOP class and status, never patient names or IDs.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from node.metrics import Metrics, sop_class_label
from node.spool import Spool, SpoolError, SpoolFullError, sha256_hex
from node.status import StoreStatus
from node.uids import is_valid_uid
from storage import repo
from storage.db import Database
from storage.errors import StorageError
from storage.views import AuditKind, AuditRecord, InstanceRecord, RecordOutcome

log = logging.getLogger(__name__)

_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED_LENGTH = 0xFFFFFFFF


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


def read_identity(stream: bytes, *, implicit_vr: bool, little_endian: bool, deflated: bool) -> Identity:
    """Parse the top-level elements of an encoded dataset (no pixel decoding) and check it is whole."""
    try:
        ds = decode(BytesIO(stream), implicit_vr, little_endian, deflated)
        _check_complete(ds, stream, deflated)
        values = {
            k: _text(ds, k)
            for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        }
        modality = _text(ds, "Modality")
        body_part = _text(ds, "BodyPartExamined")
    except IngestError:
        raise
    except (
        InvalidDicomError,
        ValueError,
        EOFError,
        struct.error,
        KeyError,
        TypeError,
        AttributeError,
        OverflowError,
        IndexError,
        NotImplementedError,
    ) as exc:
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
        modality=modality,
        body_part=(body_part or "")[:64] or None,
    )


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip().rstrip("\x00")


def _check_complete(ds: Dataset, stream: bytes, deflated: bool) -> None:
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
    if isinstance(pixel, RawDataElement) and pixel.length == _UNDEFINED_LENGTH and not deflated:
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
    ) -> None:
        self.spool = spool
        self.db = db
        self.metrics = metrics
        self.clock = clock
        self._tallies: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()

    # -- C-STORE ---------------------------------------------------------------------------
    def handle_store(self, event: Any) -> int:
        started = time.perf_counter()
        context = event.context
        request = event.request
        tally = self._tally(event.assoc)
        stream: bytes = event.encoded_dataset(include_meta=False)
        label = sop_class_label(str(request.AffectedSOPClassUID))
        status, outcome = self._store(event, stream, context, request, tally)
        self.metrics.instances_received.labels(sop_class=label, outcome=outcome).inc()
        if status == StoreStatus.SUCCESS:
            self.metrics.bytes_received.inc(len(stream))
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

        digest = sha256_hex(stream)
        try:
            if repo.existing_sha256(self.db, identity.sop_uid) == digest:
                return StoreStatus.SUCCESS, "duplicate"
            data = event.encoded_dataset(include_meta=True)
            stored = self.spool.write(identity.study_uid, identity.series_uid, identity.sop_uid, data)
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
        except SpoolFullError as exc:
            log.error("C-STORE refused: %s -> 0x%04X", exc, StoreStatus.OUT_OF_RESOURCES)
            return StoreStatus.OUT_OF_RESOURCES, "out_of_resources"
        except (SpoolError, StorageError) as exc:
            log.error("C-STORE failed: %s -> 0x%04X", exc, StoreStatus.PROCESSING_FAILURE)
            return StoreStatus.PROCESSING_FAILURE, "failed"
        if result.reopened:
            log.info("a late instance re-opened a processed study (now revision %d)", result.revision)
        return StoreStatus.SUCCESS, {
            RecordOutcome.NEW: "stored",
            RecordOutcome.DUPLICATE: "duplicate",
            RecordOutcome.REPLACED: "replaced",
        }[result.outcome]

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
