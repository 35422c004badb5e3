"""The values that go into and come out of :mod:`storage.repo`: StrEnums and frozen dataclasses.

Nothing here is an ORM object, so a value can cross threads and outlive its session. No
field holds a patient name or ID: studies are known by their Study Instance UID only.
Datetimes are timezone-aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class StudyState(StrEnum):
    """``receiving`` -> ``ready`` (quiet window passed, job enqueued) -> ``processing`` ->
    ``done`` | ``failed``; a new or changed instance sends any later state back to ``receiving``."""

    RECEIVING = "receiving"
    READY = "ready"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class JobState(StrEnum):
    PENDING = "pending"  # waiting for a worker (from available_at on)
    RUNNING = "running"  # claimed; lease_until bounds how long the claim holds
    DONE = "done"  # finished; the result was applied or found superseded
    FAILED = "failed"  # a permanent error: fail_job(retry_delay_s=None); study failed
    DEAD = "dead"  # attempts exhausted; study failed
    SUPERSEDED = "superseded"  # never ran: newer instances arrived while it was pending


class OutboxState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    DEAD = "dead"


class OutboxKind(StrEnum):
    DICOM = "dicom"  # a C-STORE of payload_path to a destination AE
    HL7 = "hl7"  # an HL7 v2 message in payload_path to the RIS


class AuditKind(StrEnum):
    ASSOCIATION = "association"
    STORE = "store"
    ECHO = "echo"
    REJECTED = "rejected"


class RecordOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing changed
    REPLACED = "replaced"  # same SOP Instance UID, different bytes: row updated, change kept


# Worklist priorities, most urgent first. The same strings as inference.values.PRIORITY_ORDER
# (storage may not import inference; a test keeps the two equal).
PRIORITY_RANK: tuple[str, ...] = ("urgent", "review", "routine", "not_analysed")
# The worklist's default order: NOT ANALYSED above ROUTINE, so a study the node could not read
# is never hidden below the normal ones (``worklist.not_analysed`` = "below_routine" restores
# PRIORITY_RANK's order). Signalling ("never lower a priority") keeps PRIORITY_RANK.
WORKLIST_ORDER: tuple[str, ...] = ("urgent", "review", "not_analysed", "routine")

# PS3.7 C-STORE Priority (0000,0700): LOW 0x0002, MEDIUM 0x0000, HIGH 0x0001.
DIMSE_PRIORITIES: frozenset[int] = frozenset({0, 1, 2})


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One received instance as the C-STORE handler saw it, after the spool file was written."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str  # relative to the spool directory
    size_bytes: int
    sha256: str
    modality: str | None
    body_part: str | None  # the raw BodyPartExamined value
    calling_ae: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class RecordResult:
    """What :func:`storage.repo.record_instance` did.

    ``reopened``: a study that had started processing (processing, done, failed) went back to
    receiving. ``revision`` is the study's revision after the call; a result computed for an
    older revision is superseded.
    """

    outcome: RecordOutcome
    reopened: bool
    revision: int
    state: StudyState


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Who sent what when; never a patient identifier in ``detail``."""

    kind: AuditKind
    calling_ae: str
    called_ae: str
    peer_address: str
    at: datetime
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    status: int | None = None  # DIMSE status, or None for association-level events
    outcome: str = ""  # e.g. "accepted", "aborted", "released", "rejected"
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class AuditView:
    id: int
    kind: AuditKind
    calling_ae: str
    called_ae: str
    peer_address: str
    at: datetime
    stored: int
    duplicates: int
    failed: int
    status: int | None
    outcome: str
    detail: str | None


@dataclass(frozen=True, slots=True)
class StudyView:
    uid: str
    state: StudyState
    revision: int
    reopened: bool
    instance_count: int
    first_received_at: datetime
    last_received_at: datetime
    ready_at: datetime | None
    completed_at: datetime | None
    priority: str | None
    score: float | None
    signalled_priority: str | None
    outcome_json: str | None
    groups: tuple[str, ...]
    error: str | None


@dataclass(frozen=True, slots=True)
class SeriesView:
    uid: str
    modality: str | None
    body_part: str | None
    instance_count: int


@dataclass(frozen=True, slots=True)
class InstanceView:
    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    sha256: str
    modality: str | None
    body_part: str | None
    received_at: datetime
    replaced_count: int


@dataclass(frozen=True, slots=True)
class ChangeView:
    """A re-sent SOP Instance UID that came with different bytes."""

    sop_uid: str
    old_sha256: str
    new_sha256: str
    at: datetime
    calling_ae: str


@dataclass(frozen=True, slots=True)
class JobView:
    id: int
    study_uid: str
    revision: int
    state: JobState
    attempts: int
    max_attempts: int
    created_at: datetime
    available_at: datetime
    claimed_at: datetime | None
    claimed_by: str | None
    lease_until: datetime | None
    finished_at: datetime | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One result to deliver. ``identity`` makes re-enqueuing the same result a no-op:
    a DICOM payload is known by its SOP Instance UID, an HL7 message by study and revision
    (pass ``key`` to send more than one message per revision)."""

    study_uid: str
    revision: int
    kind: OutboxKind
    destination: str
    payload_path: str
    sop_instance_uid: str | None = None
    dimse_priority: int = 0
    key: str | None = None

    def __post_init__(self) -> None:
        if self.dimse_priority not in DIMSE_PRIORITIES:
            raise ValueError(f"dimse_priority must be 0, 1 or 2, not {self.dimse_priority}")
        if self.kind is OutboxKind.DICOM and not self.sop_instance_uid:
            raise ValueError("a DICOM outbox item needs its SOP Instance UID")
        if self.revision < 1:
            raise ValueError("revisions start at 1")

    @property
    def identity(self) -> str:
        if self.key is not None:
            return f"{self.kind}:{self.key}"
        if self.kind is OutboxKind.DICOM:
            return f"dicom:{self.sop_instance_uid}"
        return f"{self.kind}:{self.study_uid}:{self.revision}"


@dataclass(frozen=True, slots=True)
class OutboxView:
    id: int
    study_uid: str
    revision: int
    kind: OutboxKind
    destination: str
    payload_path: str
    sop_instance_uid: str | None
    dimse_priority: int
    state: OutboxState
    attempts: int
    next_attempt_at: datetime
    claimed_by: str | None
    lease_until: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class StudyDetail:
    """Everything the API shows about one study."""

    study: StudyView
    series: tuple[SeriesView, ...]
    changes: tuple[ChangeView, ...]
    jobs: tuple[JobView, ...]
    outbox: tuple[OutboxView, ...]
