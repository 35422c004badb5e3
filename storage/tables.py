"""The sqlmodel tables. No patient name or ID is stored anywhere: a study is its UID.

Datetimes go through :class:`UtcDateTime`, so both backends hand back the same aware UTC
value that was stored: PostgreSQL keeps ``timestamptz``; SQLite keeps naive UTC text in a
fixed-width format, which also makes its text comparisons chronological.

Enum columns are VARCHAR holding the StrEnum values (no native PostgreSQL enum types, so a
new state needs no ``ALTER TYPE``).

Uniqueness that the queries rely on for race-freedom:
``study.study_instance_uid``, ``series.series_instance_uid``, ``instance.sop_instance_uid``,
``job (study_id, revision)`` (one job per revision) and ``outbox (destination, payload_key)``
(re-enqueuing the same result is a no-op).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from storage.views import AuditKind, JobState, OutboxKind, OutboxState, StudyState

UID = sa.String(64)
AE = sa.String(16)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """An aware datetime in, the same instant in UTC out, on SQLite and PostgreSQL alike."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: storage takes aware UTC datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _enum(enum: type[StrEnum]) -> sa.Enum:
    return sa.Enum(
        enum,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


def _when(nullable: bool = False, **kwargs: Any) -> Any:
    return Field(default=None, sa_type=UtcDateTime, nullable=nullable, **kwargs)


class Study(SQLModel, table=True):
    __tablename__ = "study"

    id: int | None = Field(default=None, primary_key=True)
    study_instance_uid: str = Field(sa_type=UID, unique=True)
    state: StudyState = Field(sa_type=_enum(StudyState), index=True)
    revision: int = 1
    reopened: bool = False
    instance_count: int = 0
    first_received_at: datetime = _when(index=True)
    last_received_at: datetime = _when(index=True)
    ready_at: datetime | None = _when(nullable=True)
    completed_at: datetime | None = _when(nullable=True)
    priority: str | None = Field(default=None, sa_type=sa.String(16))
    score: float | None = None
    signalled_priority: str | None = Field(default=None, sa_type=sa.String(16))
    outcome_json: str | None = Field(default=None, sa_type=sa.Text)
    # ",upper-distal,lower-middle,": the groups in outcome_json, for a LIKE filter.
    groups: str | None = Field(default=None, sa_type=sa.String(256))
    error: str | None = Field(default=None, sa_type=sa.Text)


class Series(SQLModel, table=True):
    __tablename__ = "series"

    id: int | None = Field(default=None, primary_key=True)
    series_instance_uid: str = Field(sa_type=UID, unique=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    modality: str | None = Field(default=None, sa_type=sa.String(16))
    body_part: str | None = Field(default=None, sa_type=sa.String(64))


class Instance(SQLModel, table=True):
    __tablename__ = "instance"

    id: int | None = Field(default=None, primary_key=True)
    sop_instance_uid: str = Field(sa_type=UID, unique=True)
    series_id: int = Field(foreign_key="series.id", index=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    sop_class_uid: str = Field(sa_type=UID)
    transfer_syntax_uid: str = Field(sa_type=UID)
    path: str = Field(sa_type=sa.Text)
    size_bytes: int = Field(sa_type=sa.BigInteger)
    sha256: str = Field(sa_type=sa.String(64))
    received_at: datetime = _when()
    replaced_count: int = 0


class InstanceChange(SQLModel, table=True):
    __tablename__ = "instance_change"

    id: int | None = Field(default=None, primary_key=True)
    sop_instance_uid: str = Field(sa_type=UID, index=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    old_sha256: str = Field(sa_type=sa.String(64))
    new_sha256: str = Field(sa_type=sa.String(64))
    at: datetime = _when()
    calling_ae: str = Field(sa_type=AE)


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_event"

    id: int | None = Field(default=None, primary_key=True)
    kind: AuditKind = Field(sa_type=_enum(AuditKind))
    calling_ae: str = Field(sa_type=AE)
    called_ae: str = Field(sa_type=AE)
    peer_address: str = Field(sa_type=sa.String(64))
    at: datetime = _when(index=True)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    status: int | None = None
    outcome: str = Field(default="", sa_type=sa.String(32))
    detail: str | None = Field(default=None, sa_type=sa.Text)


class Job(SQLModel, table=True):
    __tablename__ = "job"
    __table_args__ = (
        sa.UniqueConstraint("study_id", "revision", name="uq_job_study_revision"),
        sa.Index("ix_job_claim", "state", "available_at"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    study_id: int = Field(foreign_key="study.id", index=True)
    revision: int
    state: JobState = Field(sa_type=_enum(JobState))
    attempts: int = 0
    max_attempts: int
    created_at: datetime = _when()
    available_at: datetime = _when()  # not claimed before this (retry back-off)
    claimed_at: datetime | None = _when(nullable=True)
    claimed_by: str | None = Field(default=None, sa_type=sa.String(128))
    lease_until: datetime | None = _when(nullable=True)
    finished_at: datetime | None = _when(nullable=True)
    last_error: str | None = Field(default=None, sa_type=sa.Text)


class OutboxItem(SQLModel, table=True):
    __tablename__ = "outbox"
    __table_args__ = (
        sa.UniqueConstraint("destination", "payload_key", name="uq_outbox_destination_payload"),
        sa.Index("ix_outbox_claim", "state", "next_attempt_at"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    study_uid: str = Field(sa_type=UID, index=True)
    revision: int
    kind: OutboxKind = Field(sa_type=_enum(OutboxKind))
    destination: str = Field(sa_type=sa.String(64))
    payload_key: str = Field(sa_type=sa.String(160))
    payload_path: str = Field(sa_type=sa.Text)
    sop_instance_uid: str | None = Field(default=None, sa_type=UID)
    dimse_priority: int = 0
    state: OutboxState = Field(sa_type=_enum(OutboxState))
    attempts: int = 0
    next_attempt_at: datetime = _when()
    claimed_by: str | None = Field(default=None, sa_type=sa.String(128))
    lease_until: datetime | None = _when(nullable=True)
    last_status: int | None = None
    last_error: str | None = Field(default=None, sa_type=sa.Text)
    created_at: datetime = _when()
    delivered_at: datetime | None = _when(nullable=True)
