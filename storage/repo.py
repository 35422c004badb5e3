"""Every query fracnode runs. Each function takes the :class:`Database` first, runs ONE short
transaction, and returns values from :mod:`storage.views`, never ORM objects.

Lifecycle of a study::

    record_instance        -> receiving   (revision 1, or revision + 1 when it had left receiving)
    promote_quiet_studies  -> ready       + one pending Job for (study, revision)
    claim_job              -> processing  (job running, leased to one worker)
    finish_job             -> done        (unless the revision moved on: superseded)
    fail_job               -> ready again (job pending after a back-off) | failed (job dead/failed)

Atomicity, and why each choice holds on both backends:

* SQLite: every read-write transaction starts with ``BEGIN IMMEDIATE`` (see :mod:`storage.db`),
  so writers are serialised for the whole transaction, across threads and processes alike;
  read-then-write is safe and ``FOR UPDATE`` (which SQLite lacks) is not needed.
* PostgreSQL (READ COMMITTED): inserts that may race use ``INSERT ... ON CONFLICT DO NOTHING``
  on a unique key; a row that is read and then written is locked first (``SELECT ... FOR
  UPDATE``); queues are claimed with ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP
  LOCKED LIMIT 1) RETURNING``, so two workers never block on, nor both take, the same row.
  State changes are ``UPDATE ... WHERE state = <expected>``: a concurrent transaction that
  changed the row first makes the re-checked condition false, so a transition happens once.
* Lock order is job before study everywhere a job and its study are both locked
  (claim, finish, fail, resume); ``record_instance`` and ``promote_quiet_studies`` lock studies
  and never wait on a job row. A deadlock or serialization failure that still happens (two
  promoters, an instance moving between studies) is retried by :func:`_retried`.

Errors: :class:`storage.errors.StorageError` and subclasses (``UnknownJob``,
``UnknownOutboxItem``, ``UnknownStudy``, ``StorageUnavailable``); ``ValueError`` for invalid
arguments such as a naive datetime.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import Session, SQLModel, col, select

from storage.db import Database
from storage.errors import TransientConflict, UnknownJob, UnknownOutboxItem, UnknownStudy
from storage.tables import AuditEvent, Instance, InstanceChange, Job, OutboxItem, Series, Study
from storage.views import (
    PRIORITY_RANK,
    WORKLIST_ORDER,
    AuditKind,
    AuditRecord,
    AuditView,
    ChangeView,
    InstanceRecord,
    InstanceView,
    JobState,
    JobView,
    OutboxRecord,
    OutboxState,
    OutboxView,
    RecordOutcome,
    RecordResult,
    SeriesView,
    StudyDetail,
    StudyState,
    StudyView,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_RETRIES = 5
_MAX_ERROR_CHARS = 2000
# PS3.7 C-STORE priority values in the order the outbox sends them: HIGH, MEDIUM, LOW.
_DIMSE_HIGH, _DIMSE_MEDIUM = 1, 0


def _retried(fn: Callable[P, T]) -> Callable[P, T]:
    """Re-run the whole transaction after a deadlock or serialization failure (PostgreSQL)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except TransientConflict:
                attempt += 1
                if attempt >= _RETRIES:
                    raise
                log.info("%s: transient conflict, retry %d", fn.__name__, attempt)
                time.sleep(random.uniform(0.0, 0.01 * 2**attempt))

    return wrapper


def utc_now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC), got {value.isoformat()}")
    return value.astimezone(UTC)


def _insert_ignore(
    s: Session, model: type[SQLModel], values: dict[str, Any], keys: tuple[str, ...], returning: bool = False
) -> Any:
    """``INSERT ... ON CONFLICT (keys) DO NOTHING [RETURNING id]``; the result, or its first row.

    The statement is built once per dialect and shape and executed with ``values`` as
    parameters: building an ORM ``insert().values()`` per call cost about 1 ms, more than the
    statement itself.
    """
    statement = _insert_ignore_statement(s.get_bind().dialect.name, model, keys, returning)
    result = s.exec(statement, params=values)
    return result.first() if returning else None


@functools.cache
def _insert_ignore_statement(
    dialect: str, model: type[SQLModel], keys: tuple[str, ...], returning: bool
) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = model.__table__  # type: ignore[attr-defined]
    statement = insert(table).on_conflict_do_nothing(index_elements=list(keys))
    return statement.returning(table.c.id) if returning else statement


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Ingest


@_retried
def record_instance(db: Database, rec: InstanceRecord) -> RecordResult:
    """Index one received instance: NEW, DUPLICATE (same SOP UID and sha256) or REPLACED.

    A DUPLICATE changes nothing, not even ``last_received_at`` (a PACS re-sending a study must
    not hold its quiet window open). NEW or REPLACED on a study that had left ``receiving``
    sends it back there with ``revision + 1``; a pending job of the old revision is marked
    superseded, a running one finishes as superseded (see :func:`finish_job`).
    ``reopened`` is set when the study had started processing.

    PostgreSQL: the study row is created with ON CONFLICT DO NOTHING and then locked FOR
    UPDATE, so every record_instance of one study is serialised on that row; the instance is
    inserted with ON CONFLICT DO NOTHING RETURNING id, and only when that inserts nothing is the
    existing row locked and compared. SQLite: BEGIN IMMEDIATE serialises the lot.
    """
    at = _aware(rec.received_at, "received_at")
    with db.session() as s:
        _insert_ignore(
            s,
            Study,
            dict(
                study_instance_uid=rec.study_uid,
                state=StudyState.RECEIVING,
                revision=1,
                reopened=False,
                instance_count=0,
                first_received_at=at,
                last_received_at=at,
            ),
            ("study_instance_uid",),
        )
        study = _locked_study(s, rec.study_uid)
        assert study.id is not None
        _insert_ignore(
            s,
            Series,
            dict(
                series_instance_uid=rec.series_uid,
                study_id=study.id,
                modality=rec.modality,
                body_part=rec.body_part,
            ),
            ("series_instance_uid",),
        )
        series = s.exec(select(Series).where(col(Series.series_instance_uid) == rec.series_uid)).one()
        assert series.id is not None
        if series.modality is None and rec.modality:
            series.modality = rec.modality
        if series.body_part is None and rec.body_part:
            series.body_part = rec.body_part

        instance_values = dict(
            series_id=series.id,
            study_id=study.id,
            sop_class_uid=rec.sop_class_uid,
            transfer_syntax_uid=rec.transfer_syntax_uid,
            path=rec.path,
            size_bytes=rec.size_bytes,
            sha256=rec.sha256,
            received_at=at,
        )
        inserted = _insert_ignore(
            s, Instance, {"sop_instance_uid": rec.sop_uid, **instance_values}, ("sop_instance_uid",), True
        )
        if inserted is not None:
            outcome = RecordOutcome.NEW
            study.instance_count += 1
        else:
            instance = s.exec(
                select(Instance).where(col(Instance.sop_instance_uid) == rec.sop_uid).with_for_update()
            ).one()
            if instance.sha256 == rec.sha256:
                return RecordResult(RecordOutcome.DUPLICATE, False, study.revision, study.state)
            outcome = RecordOutcome.REPLACED
            s.add(
                InstanceChange(
                    sop_instance_uid=rec.sop_uid,
                    study_id=study.id,
                    old_sha256=instance.sha256,
                    new_sha256=rec.sha256,
                    at=at,
                    calling_ae=rec.calling_ae,
                )
            )
            if instance.study_id != study.id:
                # The instance moved to another study (a corrected re-send): it counts there now.
                previous = s.get(Study, instance.study_id, with_for_update=True)
                if previous is not None:
                    previous.instance_count -= 1
                study.instance_count += 1
            for name, value in instance_values.items():
                setattr(instance, name, value)
            instance.replaced_count += 1
        reopened = _arrived(s, study, at)
        return RecordResult(outcome, reopened, study.revision, study.state)


def _locked_study(s: Session, uid: str) -> Study:
    study = s.exec(select(Study).where(col(Study.study_instance_uid) == uid).with_for_update()).first()
    if study is None:
        raise UnknownStudy(uid)
    return study


def _arrived(s: Session, study: Study, at: datetime) -> bool:
    """A NEW or REPLACED instance reached ``study`` (locked): move its window, re-open it."""
    study.first_received_at = min(study.first_received_at, at)
    study.last_received_at = max(study.last_received_at, at)
    if study.state == StudyState.RECEIVING:
        return False
    reopened = study.state != StudyState.READY
    study.revision += 1
    study.state = StudyState.RECEIVING
    study.ready_at = None
    if reopened:
        study.reopened = True
    s.exec(
        sa.update(Job)
        .where(col(Job.study_id) == study.id, col(Job.state) == JobState.PENDING)
        .values(
            state=JobState.SUPERSEDED,
            finished_at=at,
            last_error=f"superseded by revision {study.revision}",
        )
        .execution_options(synchronize_session=False)
    )
    return reopened


def existing_sha256(db: Database, sop_uid: str) -> str | None:
    """The sha256 of the bytes indexed for ``sop_uid``, or None when it was never received."""
    with db.session(read_only=True) as s:
        return s.exec(select(Instance.sha256).where(col(Instance.sop_instance_uid) == sop_uid)).first()


def add_audit(db: Database, event: AuditRecord) -> None:
    at = _aware(event.at, "at")
    with db.session() as s:
        s.add(
            AuditEvent(
                kind=event.kind,
                calling_ae=event.calling_ae,
                called_ae=event.called_ae,
                peer_address=event.peer_address,
                at=at,
                stored=event.stored,
                duplicates=event.duplicates,
                failed=event.failed,
                status=event.status,
                outcome=event.outcome,
                detail=event.detail,
            )
        )


def list_audit(
    db: Database, *, since: datetime | None = None, kind: AuditKind | None = None, limit: int = 100
) -> list[AuditView]:
    """Newest first."""
    query = select(AuditEvent)
    if since is not None:
        query = query.where(col(AuditEvent.at) >= _aware(since, "since"))
    if kind is not None:
        query = query.where(col(AuditEvent.kind) == AuditKind(kind))
    query = query.order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc()).limit(limit)
    with db.session(read_only=True) as s:
        return [_audit_view(e) for e in s.exec(query).all()]


# ---------------------------------------------------------------------------------------------
# Job queue


@_retried
def promote_quiet_studies(
    db: Database, quiet_seconds: float, now: datetime, *, max_attempts: int = 3
) -> list[str]:
    """Studies quiet for ``quiet_seconds`` become ready with one pending job for their revision.

    One ``UPDATE study ... WHERE state = 'receiving' AND last_received_at <= cutoff RETURNING``:
    on PostgreSQL a second promoter racing for the same row waits for the first, re-checks the
    condition (no longer ``receiving``) and skips it; an instance recorded meanwhile holds the
    row lock and moves ``last_received_at``, so the study stays receiving. The job insert is
    ``ON CONFLICT (study_id, revision) DO NOTHING``, so a revision is never enqueued twice.
    """
    now = _aware(now, "now")
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    cutoff = now - timedelta(seconds=quiet_seconds)
    with db.session() as s:
        promoted = s.exec(
            sa.update(Study)
            .where(col(Study.state) == StudyState.RECEIVING, col(Study.last_received_at) <= cutoff)
            .values(state=StudyState.READY, ready_at=now)
            .returning(col(Study.id), col(Study.revision), col(Study.study_instance_uid))
            .execution_options(synchronize_session=False)
        ).all()
        for study_id, revision, _uid in promoted:
            _insert_ignore(
                s,
                Job,
                dict(
                    study_id=study_id,
                    revision=revision,
                    state=JobState.PENDING,
                    attempts=0,
                    max_attempts=max_attempts,
                    created_at=now,
                    available_at=now,
                ),
                ("study_id", "revision"),
            )
        return sorted(uid for _id, _rev, uid in promoted)


@_retried
def claim_job(db: Database, worker_id: str, now: datetime, lease_seconds: float) -> JobView | None:
    """Take the oldest available job, or None. Exactly one caller gets a given job.

    ``UPDATE job ... WHERE id = (SELECT ... FOR UPDATE OF job, study SKIP LOCKED LIMIT 1)
    RETURNING``: the sub-select locks the job AND its study without waiting (a study being
    written by record_instance is skipped, not waited for), so the study update that follows
    never blocks and the claim cannot deadlock. Only a job whose study is ``ready`` at that
    job's revision is eligible. SQLite runs the same statement under BEGIN IMMEDIATE.
    """
    now = _aware(now, "now")
    pick = aliased(Job, name="pick")
    candidate = (
        sa.select(col(pick.id))
        .join(Study, col(Study.id) == col(pick.study_id))
        .where(
            col(pick.state) == JobState.PENDING,
            col(pick.available_at) <= now,
            col(Study.state) == StudyState.READY,
            col(Study.revision) == col(pick.revision),
        )
        .order_by(col(pick.available_at), col(pick.id))
        .limit(1)
        .with_for_update(skip_locked=True, of=[pick, Study])
        .scalar_subquery()
    )
    with db.session() as s:
        job = s.exec(
            sa.update(Job)
            .where(col(Job.id) == candidate, col(Job.state) == JobState.PENDING)
            .values(
                state=JobState.RUNNING,
                attempts=col(Job.attempts) + 1,
                claimed_at=now,
                claimed_by=worker_id,
                lease_until=now + timedelta(seconds=lease_seconds),
            )
            .returning(Job)
            .execution_options(synchronize_session=False)
        ).scalars().first()
        if job is None:
            return None
        started = s.exec(
            sa.update(Study)
            .where(
                col(Study.id) == job.study_id,
                col(Study.revision) == job.revision,
                col(Study.state) == StudyState.READY,
            )
            .values(state=StudyState.PROCESSING)
            .execution_options(synchronize_session=False)
        )
        if started.rowcount != 1:  # the locks above make this unreachable; roll back if not
            raise TransientConflict(db.dialect, f"study of job {job.id} changed during the claim")
        return _job_view(job, _study_uid(s, job.study_id))


def renew_lease(db: Database, job_id: int, worker_id: str, now: datetime, lease_seconds: float) -> bool:
    """Extend a running job's lease; False when the job is no longer this worker's."""
    now = _aware(now, "now")
    with db.session() as s:
        result = s.exec(
            sa.update(Job)
            .where(
                col(Job.id) == job_id,
                col(Job.state) == JobState.RUNNING,
                col(Job.claimed_by) == worker_id,
            )
            .values(lease_until=now + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)


def renew_outbox_lease(
    db: Database, item_id: int, worker_id: str, now: datetime, lease_seconds: float
) -> bool:
    """Extend a ``sending`` item's lease; False when the item is no longer this sender's."""
    now = _aware(now, "now")
    with db.session() as s:
        result = s.exec(
            sa.update(OutboxItem)
            .where(
                col(OutboxItem.id) == item_id,
                col(OutboxItem.state) == OutboxState.SENDING,
                col(OutboxItem.claimed_by) == worker_id,
            )
            .values(lease_until=now + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)


def reap_expired_leases(db: Database, now: datetime) -> tuple[int, int]:
    """Jobs and deliveries whose lease expired (their process died or hung) go back to the
    queue: ``(jobs resumed, deliveries resumed)``. Safe to run in every process at any time."""
    return resume_interrupted(db, now), resume_outbox(db, now)


@_retried
def finish_job(
    db: Database,
    job_id: int,
    *,
    revision: int,
    priority: str,
    score: float | None,
    outcome_json: str,
    groups: Collection[str] = (),
    outbox: Sequence[OutboxRecord] = (),
    now: datetime | None = None,
    worker_id: str | None = None,
) -> bool:
    """Record a job's result; True when it was applied to the study.

    With ``worker_id``, a job that another worker claimed meanwhile (this worker's lease expired
    and the job was reaped and taken again) is left to that worker: False, nothing recorded.

    The job is ``done`` either way. The study is left alone (False) when its revision is no
    longer ``revision`` (late instances arrived: the result is superseded) or when the job had
    already ended (another worker finished it after a lease expiry). ``outbox`` items are
    enqueued in the same transaction, only when the result is applied, so a superseded result
    is never sent and an applied one is never lost between two commits.
    """
    if priority not in PRIORITY_RANK:
        raise ValueError(f"unknown priority {priority!r}; expected one of {PRIORITY_RANK}")
    when = _aware(now, "now") if now is not None else utc_now()
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise UnknownJob(job_id)
        if job.state not in (JobState.PENDING, JobState.RUNNING):
            return False
        if worker_id is not None and job.claimed_by != worker_id:
            log.info("job %d: taken over by %s; this result is dropped", job_id, job.claimed_by)
            return False
        job.state = JobState.DONE
        job.finished_at = when
        job.lease_until = None
        study = s.get(Study, job.study_id, with_for_update=True)
        assert study is not None  # foreign key
        if study.revision != revision or job.revision != revision:
            log.info("job %d: result for revision %d superseded by %d", job_id, revision, study.revision)
            return False
        study.state = StudyState.DONE
        study.priority = priority
        study.score = score
        study.outcome_json = outcome_json
        study.groups = f",{','.join(sorted(set(groups)))}," if groups else None
        study.completed_at = when
        study.error = None
        _enqueue(s, outbox, when)
        return True


@_retried
def fail_job(
    db: Database,
    job_id: int,
    error: str,
    now: datetime,
    retry_delay_s: float | None,
    worker_id: str | None = None,
) -> JobState:
    """Record a failed attempt and return the job's new state.

    ``pending`` again after ``retry_delay_s`` (study back to ready) while attempts remain;
    ``dead`` when ``max_attempts`` are spent and ``failed`` when ``retry_delay_s`` is None (a
    permanent error): both fail the study. ``superseded`` when newer instances arrived meanwhile
    (the new revision has its own job). A job that had already ended keeps its state.
    """
    now = _aware(now, "now")
    with db.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise UnknownJob(job_id)
        if job.state not in (JobState.PENDING, JobState.RUNNING):
            return job.state
        if worker_id is not None and job.claimed_by != worker_id:
            return job.state  # another worker holds it now
        study = s.get(Study, job.study_id, with_for_update=True)
        assert study is not None  # foreign key
        job.last_error = _clip(error)
        job.lease_until = None
        if study.revision != job.revision:
            job.state = JobState.SUPERSEDED
            job.finished_at = now
        elif retry_delay_s is None or job.attempts >= job.max_attempts:
            job.state = JobState.FAILED if retry_delay_s is None else JobState.DEAD
            job.finished_at = now
            _study_failed(study, _clip(error), now)
        else:
            job.state = JobState.PENDING
            job.available_at = now + timedelta(seconds=retry_delay_s)
            study.state = StudyState.READY
        return job.state


def _study_failed(study: Study, error: str, now: datetime) -> None:
    """Given up: the study stays on the worklist as NOT ANALYSED, with its reason."""
    study.state = StudyState.FAILED
    study.error = error
    study.priority = "not_analysed"
    study.completed_at = now


@_retried
def resume_interrupted(db: Database, now: datetime, *, all_running: bool = False) -> int:
    """Give running jobs whose lease expired (or, with ``all_running``, every running job: at
    start-up of the only node process) back to the queue; return how many went back to pending.

    A job of a superseded revision becomes ``superseded``; one whose attempts are spent becomes
    ``dead`` (a study that kills the process every time must not loop). Studies still in
    ``receiving`` are not touched: the quiet window promotes them. Jobs being finished right now
    are locked and skipped (SKIP LOCKED), not waited for.
    """
    now = _aware(now, "now")
    query = select(Job).where(col(Job.state) == JobState.RUNNING)
    if not all_running:
        query = query.where(col(Job.lease_until) < now)
    resumed = 0
    with db.session() as s:
        for job in s.exec(query.order_by(col(Job.id)).with_for_update(skip_locked=True)).all():
            study = s.get(Study, job.study_id, with_for_update=True)
            assert study is not None  # foreign key
            job.lease_until = None
            if study.revision != job.revision:
                job.state = JobState.SUPERSEDED
                job.finished_at = now
            elif job.attempts >= job.max_attempts:
                job.state = JobState.DEAD
                job.finished_at = now
                job.last_error = f"interrupted after {job.attempts} attempts"
                _study_failed(study, job.last_error, now)
            else:
                job.state = JobState.PENDING
                job.available_at = now
                study.state = StudyState.READY
                resumed += 1
    if resumed:
        log.info("resumed %d interrupted jobs", resumed)
    return resumed


def queue_depth(db: Database) -> dict[str, int]:
    """Jobs per state, every state present (zero when empty), for metrics."""
    with db.session(read_only=True) as s:
        rows = s.exec(select(Job.state, sa.func.count()).group_by(col(Job.state))).all()
    counts = {state.value: 0 for state in JobState}
    counts.update({JobState(state).value: int(n) for state, n in rows})
    return counts


def list_jobs(db: Database, *, state: JobState | None = None, limit: int = 100) -> list[JobView]:
    """Newest first."""
    query = select(Job, Study.study_instance_uid).join(Study, col(Study.id) == col(Job.study_id))
    if state is not None:
        query = query.where(col(Job.state) == JobState(state))
    with db.session(read_only=True) as s:
        rows = s.exec(query.order_by(col(Job.id).desc()).limit(limit)).all()
        return [_job_view(job, uid) for job, uid in rows]


# ---------------------------------------------------------------------------------------------
# Studies


def study_instances(db: Database, uid: str) -> list[InstanceView]:
    """The instances of a study with their spool paths, by series then SOP Instance UID."""
    query = (
        select(Instance, Series, Study.study_instance_uid)
        .join(Series, col(Series.id) == col(Instance.series_id))
        .join(Study, col(Study.id) == col(Instance.study_id))
        .where(col(Study.study_instance_uid) == uid)
        .order_by(col(Series.series_instance_uid), col(Instance.sop_instance_uid))
    )
    with db.session(read_only=True) as s:
        return [_instance_view(i, series, study_uid) for i, series, study_uid in s.exec(query).all()]


def list_studies(
    db: Database, *, state: StudyState | None = None, limit: int = 100, offset: int = 0
) -> list[StudyView]:
    """Most recently received first; ``offset``/``limit`` page through them (see
    :func:`count_studies` for the total)."""
    query = select(Study)
    if state is not None:
        query = query.where(col(Study.state) == StudyState(state))
    query = (
        query.order_by(col(Study.last_received_at).desc(), col(Study.id).desc())
        .offset(_offset(offset))
        .limit(limit)
    )
    with db.session(read_only=True) as s:
        return [_study_view(study) for study in s.exec(query).all()]


def count_studies(db: Database, *, state: StudyState | None = None) -> int:
    query = select(sa.func.count()).select_from(Study)
    if state is not None:
        query = query.where(col(Study.state) == StudyState(state))
    with db.session(read_only=True) as s:
        return int(s.exec(query).one())


def _offset(offset: int) -> int:
    if offset < 0:
        raise ValueError("offset must not be negative")
    return offset


def get_study(db: Database, uid: str) -> StudyDetail | None:
    with db.session(read_only=True) as s:
        study = s.exec(select(Study).where(col(Study.study_instance_uid) == uid)).first()
        if study is None:
            return None
        series_rows = s.exec(
            select(Series, sa.func.count(col(Instance.id)))
            .outerjoin(Instance, col(Instance.series_id) == col(Series.id))
            .where(col(Series.study_id) == study.id)
            .group_by(col(Series.id))
            .order_by(col(Series.series_instance_uid))
        ).all()
        changes = s.exec(
            select(InstanceChange)
            .where(col(InstanceChange.study_id) == study.id)
            .order_by(col(InstanceChange.at), col(InstanceChange.id))
        ).all()
        jobs = s.exec(select(Job).where(col(Job.study_id) == study.id).order_by(col(Job.id))).all()
        outbox = s.exec(
            select(OutboxItem).where(col(OutboxItem.study_uid) == uid).order_by(col(OutboxItem.id))
        ).all()
        return StudyDetail(
            study=_study_view(study),
            series=tuple(
                SeriesView(se.series_instance_uid, se.modality, se.body_part, int(n)) for se, n in series_rows
            ),
            changes=tuple(
                ChangeView(c.sop_instance_uid, c.old_sha256, c.new_sha256, c.at, c.calling_ae)
                for c in changes
            ),
            jobs=tuple(_job_view(job, uid) for job in jobs),
            outbox=tuple(_outbox_view(item) for item in outbox),
        )


def _worklist_filters(
    query: Any,
    states: Collection[StudyState] | None,
    group: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Any:
    if states is not None:
        query = query.where(col(Study.state).in_([StudyState(state) for state in states]))
    if group is not None:
        query = query.where(col(Study.groups).contains(f",{group},", autoescape=True))
    if since is not None:
        query = query.where(col(Study.first_received_at) >= _aware(since, "since"))
    if until is not None:
        query = query.where(col(Study.first_received_at) < _aware(until, "until"))
    return query


def worklist(
    db: Database,
    *,
    states: Collection[StudyState] | None = None,
    group: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 200,
    offset: int = 0,
    order: Sequence[str] = WORKLIST_ORDER,
) -> list[StudyView]:
    """Studies for the reading list: by priority in ``order`` (by default urgent, review,
    not_analysed, routine: a study the node could not read must not sink below the normal ones),
    then studies not yet processed; within a priority by score (highest first, none last), then
    first received. ``offset``/``limit`` page through it (:func:`count_worklist` gives the total).

    ``group`` keeps studies whose result names that anatomical group; ``since`` (inclusive) and
    ``until`` (exclusive) bound ``first_received_at``.
    """
    if sorted(order) != sorted(PRIORITY_RANK):
        raise ValueError(f"the worklist order must name each of {PRIORITY_RANK} once")
    rank = sa.case(
        {name: index for index, name in enumerate(order)},
        value=col(Study.priority),
        else_=len(order),
    )
    query = _worklist_filters(select(Study), states, group, since, until)
    query = (
        query.order_by(
            rank, col(Study.score).desc().nulls_last(), col(Study.first_received_at), col(Study.id)
        )
        .offset(_offset(offset))
        .limit(limit)
    )
    with db.session(read_only=True) as s:
        return [_study_view(study) for study in s.exec(query).all()]


def count_worklist(
    db: Database,
    *,
    states: Collection[StudyState] | None = None,
    group: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, int]:
    """How many studies the worklist with these filters holds, per priority (``None`` priority,
    not yet processed, under ``"pending"``) and in all (``"total"``)."""
    query = _worklist_filters(
        select(col(Study.priority), sa.func.count()).select_from(Study), states, group, since, until
    ).group_by(col(Study.priority))
    with db.session(read_only=True) as s:
        counts = {str(priority or "pending"): int(n) for priority, n in s.exec(query).all()}
    counts["total"] = sum(counts.values())
    return counts


@_retried
def set_signalled_priority(db: Database, uid: str, priority: str) -> bool:
    """Raise the study's signalled priority to ``priority``; True when it was raised (the node
    should signal), False when an equal or more urgent priority was already signalled: a
    priority that went out is never downgraded."""
    if priority not in PRIORITY_RANK:
        raise ValueError(f"unknown priority {priority!r}; expected one of {PRIORITY_RANK}")
    with db.session() as s:
        study = _locked_study(s, uid)
        current = study.signalled_priority
        if current is not None and PRIORITY_RANK.index(current) <= PRIORITY_RANK.index(priority):
            return False
        study.signalled_priority = priority
        return True


# ---------------------------------------------------------------------------------------------
# Outbox


def enqueue_outbox(db: Database, items: Sequence[OutboxRecord], *, now: datetime | None = None) -> int:
    """Enqueue results to deliver; return how many were new. An item already present for the
    same destination and payload identity is left as it is (ON CONFLICT DO NOTHING)."""
    when = _aware(now, "now") if now is not None else utc_now()
    with db.session() as s:
        return _enqueue(s, items, when)


def _enqueue(s: Session, items: Sequence[OutboxRecord], now: datetime) -> int:
    added = 0
    for item in items:
        row = _insert_ignore(
            s,
            OutboxItem,
            dict(
                study_uid=item.study_uid,
                revision=item.revision,
                kind=item.kind,
                destination=item.destination,
                payload_key=item.identity,
                payload_path=item.payload_path,
                sop_instance_uid=item.sop_instance_uid,
                dimse_priority=item.dimse_priority,
                state=OutboxState.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            ),
            ("destination", "payload_key"),
            True,
        )
        added += row is not None
    return added


@_retried
def claim_outbox(
    db: Database,
    now: datetime,
    worker_id: str,
    *,
    destination: str | None = None,
    lease_seconds: float = 300.0,
) -> OutboxView | None:
    """Take the next due item (DIMSE priority HIGH, MEDIUM, LOW, then oldest due), or None.

    Same single ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING``
    as :func:`claim_job`; only items with ``next_attempt_at <= now``.
    """
    now = _aware(now, "now")
    pick = aliased(OutboxItem, name="pick")
    priority = col(pick.dimse_priority)
    rank = sa.case((priority == _DIMSE_HIGH, 0), (priority == _DIMSE_MEDIUM, 1), else_=2)
    candidate = sa.select(col(pick.id)).where(
        col(pick.state) == OutboxState.PENDING, col(pick.next_attempt_at) <= now
    )
    if destination is not None:
        candidate = candidate.where(col(pick.destination) == destination)
    subquery = (
        candidate.order_by(rank, col(pick.next_attempt_at), col(pick.id))
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    with db.session() as s:
        item = s.exec(
            sa.update(OutboxItem)
            .where(col(OutboxItem.id) == subquery, col(OutboxItem.state) == OutboxState.PENDING)
            .values(
                state=OutboxState.SENDING,
                attempts=col(OutboxItem.attempts) + 1,
                claimed_by=worker_id,
                lease_until=now + timedelta(seconds=lease_seconds),
            )
            .returning(OutboxItem)
            .execution_options(synchronize_session=False)
        ).scalars().first()
        return None if item is None else _outbox_view(item)


def outbox_delivered(db: Database, item_id: int, status: int, now: datetime) -> None:
    """The destination acknowledged the payload with ``status`` (a success or warning status)."""
    now = _aware(now, "now")
    with db.session() as s:
        item = s.get(OutboxItem, item_id, with_for_update=True)
        if item is None:
            raise UnknownOutboxItem(item_id)
        item.state = OutboxState.DELIVERED
        item.delivered_at = now
        item.last_status = status
        item.last_error = None
        item.lease_until = None


def outbox_failed(
    db: Database,
    item_id: int,
    status: int | None,
    error: str,
    now: datetime,
    next_attempt_at: datetime | None,
) -> OutboxState:
    """A delivery attempt failed: pending again from ``next_attempt_at``, or dead when None."""
    _aware(now, "now")
    with db.session() as s:
        item = s.get(OutboxItem, item_id, with_for_update=True)
        if item is None:
            raise UnknownOutboxItem(item_id)
        item.last_status = status
        item.last_error = _clip(error)
        item.lease_until = None
        if next_attempt_at is None:
            item.state = OutboxState.DEAD
        else:
            item.state = OutboxState.PENDING
            item.next_attempt_at = _aware(next_attempt_at, "next_attempt_at")
        return item.state


@_retried
def resume_outbox(db: Database, now: datetime, *, all_sending: bool = False) -> int:
    """Items left ``sending`` by a dead sender (lease expired, or all at start-up) go back to
    pending, due now; return how many."""
    now = _aware(now, "now")
    condition: sa.ColumnElement[bool] = col(OutboxItem.state) == OutboxState.SENDING
    if not all_sending:
        condition = sa.and_(condition, col(OutboxItem.lease_until) < now)
    with db.session() as s:
        result = s.exec(
            sa.update(OutboxItem)
            .where(condition)
            .values(state=OutboxState.PENDING, next_attempt_at=now, lease_until=None)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)


def list_outbox(
    db: Database, state: OutboxState | None = None, *, limit: int = 500, offset: int = 0
) -> list[OutboxView]:
    """Oldest first; ``offset``/``limit`` page through them (:func:`count_outbox`)."""
    query = select(OutboxItem)
    if state is not None:
        query = query.where(col(OutboxItem.state) == OutboxState(state))
    query = query.order_by(col(OutboxItem.id)).offset(_offset(offset)).limit(limit)
    with db.session(read_only=True) as s:
        return [_outbox_view(item) for item in s.exec(query).all()]


def count_outbox(db: Database, state: OutboxState | None = None) -> int:
    query = select(sa.func.count()).select_from(OutboxItem)
    if state is not None:
        query = query.where(col(OutboxItem.state) == OutboxState(state))
    with db.session(read_only=True) as s:
        return int(s.exec(query).one())


def retry_outbox(db: Database, ids: Collection[int] | None = None, *, now: datetime | None = None) -> int:
    """Send again from now, with the attempt count reset: every dead item when ``ids`` is None,
    else the named items that are dead or pending. Return how many."""
    when = _aware(now, "now") if now is not None else utc_now()
    condition: sa.ColumnElement[bool]
    if ids is None:
        condition = col(OutboxItem.state) == OutboxState.DEAD
    else:
        condition = sa.and_(
            col(OutboxItem.id).in_(list(ids)),
            col(OutboxItem.state).in_([OutboxState.DEAD, OutboxState.PENDING]),
        )
    with db.session() as s:
        result = s.exec(
            sa.update(OutboxItem)
            .where(condition)
            .values(state=OutboxState.PENDING, next_attempt_at=when, attempts=0)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)


def purge_outbox(db: Database, states: Collection[OutboxState], *, before: datetime | None = None) -> int:
    """Delete items in ``states`` (created before ``before`` when given); return how many.
    ``sending`` cannot be purged: a sender is working on it."""
    wanted = {OutboxState(state) for state in states}
    if OutboxState.SENDING in wanted:
        raise ValueError("items being sent cannot be purged")
    condition: sa.ColumnElement[bool] = col(OutboxItem.state).in_(sorted(wanted))
    if before is not None:
        condition = sa.and_(condition, col(OutboxItem.created_at) < _aware(before, "before"))
    with db.session() as s:
        result = s.exec(sa.delete(OutboxItem).where(condition).execution_options(synchronize_session=False))
        return int(result.rowcount)


def outbox_depth(db: Database) -> dict[str, int]:
    """Outbox items per state, every state present, for metrics."""
    with db.session(read_only=True) as s:
        rows = s.exec(select(OutboxItem.state, sa.func.count()).group_by(col(OutboxItem.state))).all()
    counts = {state.value: 0 for state in OutboxState}
    counts.update({OutboxState(state).value: int(n) for state, n in rows})
    return counts


# ---------------------------------------------------------------------------------------------
# ORM rows -> views


def _study_uid(s: Session, study_id: int) -> str:
    return s.exec(select(Study.study_instance_uid).where(col(Study.id) == study_id)).one()


def _study_view(study: Study) -> StudyView:
    return StudyView(
        uid=study.study_instance_uid,
        state=StudyState(study.state),
        revision=study.revision,
        reopened=study.reopened,
        instance_count=study.instance_count,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        ready_at=study.ready_at,
        completed_at=study.completed_at,
        priority=study.priority,
        score=study.score,
        signalled_priority=study.signalled_priority,
        outcome_json=study.outcome_json,
        groups=tuple(g for g in (study.groups or "").split(",") if g),
        error=study.error,
    )


def _instance_view(instance: Instance, series: Series, study_uid: str) -> InstanceView:
    return InstanceView(
        sop_uid=instance.sop_instance_uid,
        series_uid=series.series_instance_uid,
        study_uid=study_uid,
        sop_class_uid=instance.sop_class_uid,
        transfer_syntax_uid=instance.transfer_syntax_uid,
        path=instance.path,
        size_bytes=instance.size_bytes,
        sha256=instance.sha256,
        modality=series.modality,
        body_part=series.body_part,
        received_at=instance.received_at,
        replaced_count=instance.replaced_count,
    )


def _job_view(job: Job, study_uid: str) -> JobView:
    assert job.id is not None
    return JobView(
        id=job.id,
        study_uid=study_uid,
        revision=job.revision,
        state=JobState(job.state),
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        created_at=job.created_at,
        available_at=job.available_at,
        claimed_at=job.claimed_at,
        claimed_by=job.claimed_by,
        lease_until=job.lease_until,
        finished_at=job.finished_at,
        last_error=job.last_error,
    )


def _outbox_view(item: OutboxItem) -> OutboxView:
    assert item.id is not None
    return OutboxView(
        id=item.id,
        study_uid=item.study_uid,
        revision=item.revision,
        kind=item.kind,
        destination=item.destination,
        payload_path=item.payload_path,
        sop_instance_uid=item.sop_instance_uid,
        dimse_priority=item.dimse_priority,
        state=OutboxState(item.state),
        attempts=item.attempts,
        next_attempt_at=item.next_attempt_at,
        claimed_by=item.claimed_by,
        lease_until=item.lease_until,
        last_status=item.last_status,
        last_error=item.last_error,
        created_at=item.created_at,
        delivered_at=item.delivered_at,
    )


def _audit_view(event: AuditEvent) -> AuditView:
    assert event.id is not None
    return AuditView(
        id=event.id,
        kind=AuditKind(event.kind),
        calling_ae=event.calling_ae,
        called_ae=event.called_ae,
        peer_address=event.peer_address,
        at=event.at,
        stored=event.stored,
        duplicates=event.duplicates,
        failed=event.failed,
        status=event.status,
        outcome=event.outcome,
        detail=event.detail,
    )
