"""storage on a real SQLite file and a real throwaway PostgreSQL (tests/pg.py), same tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TypeVar

import pytest

from storage import repo
from storage.config import StorageConfig
from storage.db import Database
from storage.errors import StorageUnavailable, UnknownJob, UnknownOutboxItem, UnsupportedDatabase
from storage.views import (
    PRIORITY_RANK,
    AuditKind,
    AuditRecord,
    InstanceRecord,
    JobState,
    OutboxKind,
    OutboxRecord,
    OutboxState,
    RecordOutcome,
    StudyDetail,
    StudyState,
)

T = TypeVar("T")

T0 = datetime(2024, 3, 1, 8, 0, 0, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64
CR = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/var/fracnode.db"  # the parent directory does not exist yet
    else:
        url = request.getfixturevalue("postgres_url")
    database = Database(StorageConfig(url, busy_timeout_s=20.0))
    database.create_all()
    yield database
    database.dispose()


def rec(
    sop: str,
    *,
    study: str = "1.2.3",
    series: str | None = None,
    sha: str = SHA_A,
    at: datetime = T0,
    body_part: str | None = "WRIST",
) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study,
        series_uid=series or f"{study}.1",
        sop_uid=sop,
        sop_class_uid=CR,
        transfer_syntax_uid=EXPLICIT,
        path=f"{study}/{sop}.dcm",
        size_bytes=1234,
        sha256=sha,
        modality="CR",
        body_part=body_part,
        calling_ae="PACS",
        received_at=at,
    )


def race(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(i)`` in ``n`` threads released together by a barrier; re-raise any error."""
    barrier = threading.Barrier(n)

    def run(i: int) -> T:
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n), timeout=120))


def ready_study(db: Database, uid: str = "1.2.3", *, max_attempts: int = 3) -> None:
    repo.record_instance(db, rec(f"{uid}.1.1", study=uid))
    assert repo.promote_quiet_studies(db, 5, T0 + timedelta(seconds=10), max_attempts=max_attempts) == [uid]


def finish(
    db: Database,
    job_id: int,
    revision: int,
    priority: str = "routine",
    *,
    groups: Sequence[str] = (),
    outbox: Sequence[OutboxRecord] = (),
) -> bool:
    return repo.finish_job(
        db, job_id, revision=revision, priority=priority, score=0.1, outcome_json="{}",
        groups=groups, outbox=outbox, now=T0 + timedelta(minutes=1),
    )


def study(db: Database, uid: str = "1.2.3") -> StudyDetail:
    detail = repo.get_study(db, uid)
    assert detail is not None
    return detail


# --- instances -------------------------------------------------------------------------------


def test_new_duplicate_replaced(db: Database) -> None:
    first = repo.record_instance(db, rec("1.1"))
    assert (first.outcome, first.reopened, first.revision, first.state) == (
        RecordOutcome.NEW, False, 1, StudyState.RECEIVING,
    )
    later = T0 + timedelta(seconds=30)
    duplicate = repo.record_instance(db, rec("1.1", at=later))
    assert duplicate.outcome is RecordOutcome.DUPLICATE
    detail = study(db)
    assert detail.study.last_received_at == T0  # a duplicate does not hold the window open
    assert detail.study.instance_count == 1
    assert detail.changes == ()

    replaced = repo.record_instance(db, rec("1.1", sha=SHA_B, at=later))
    assert replaced.outcome is RecordOutcome.REPLACED
    detail = study(db)
    assert detail.study.instance_count == 1
    assert detail.study.last_received_at == later
    assert [(c.sop_uid, c.old_sha256, c.new_sha256, c.calling_ae) for c in detail.changes] == [
        ("1.1", SHA_A, SHA_B, "PACS")
    ]
    assert repo.existing_sha256(db, "1.1") == SHA_B
    assert repo.existing_sha256(db, "9.9") is None
    (instance,) = repo.study_instances(db, "1.2.3")
    assert (instance.sha256, instance.replaced_count, instance.body_part) == (SHA_B, 1, "WRIST")
    assert detail.series[0].instance_count == 1


@pytest.mark.parametrize("same_bytes", [True, False], ids=["same-bytes", "different-bytes"])
def test_same_sop_from_8_threads(db: Database, same_bytes: bool) -> None:
    shas = [SHA_A if same_bytes else f"{i:064x}" for i in range(8)]
    results = race(8, lambda i: repo.record_instance(db, rec("1.1", sha=shas[i])))
    outcomes = Counter(r.outcome for r in results)
    later = RecordOutcome.DUPLICATE if same_bytes else RecordOutcome.REPLACED
    assert outcomes == {RecordOutcome.NEW: 1, later: 7}
    detail = study(db)
    assert detail.study.instance_count == 1
    assert len(repo.study_instances(db, "1.2.3")) == 1
    assert len(detail.changes) == (0 if same_bytes else 7)


def test_many_instances_of_one_new_study_lose_no_count(db: Database) -> None:
    def send(i: int) -> None:
        for k in range(6):
            repo.record_instance(db, rec(f"1.{i}.{k}", series=f"1.2.3.{i % 2}"))

    race(8, send)
    detail = study(db)
    assert detail.study.instance_count == 48
    assert sorted(s.instance_count for s in detail.series) == [24, 24]


# --- quiet window and jobs ---------------------------------------------------------------------


def test_promotion_waits_for_the_quiet_window(db: Database) -> None:
    repo.record_instance(db, rec("1.1"))
    repo.record_instance(db, rec("1.2", at=T0 + timedelta(seconds=3)))
    assert repo.promote_quiet_studies(db, 5, T0 + timedelta(seconds=7)) == []
    assert repo.promote_quiet_studies(db, 5, T0 + timedelta(seconds=8)) == ["1.2.3"]
    assert repo.promote_quiet_studies(db, 5, T0 + timedelta(seconds=9)) == []
    detail = study(db)
    assert detail.study.state is StudyState.READY
    assert detail.study.ready_at == T0 + timedelta(seconds=8)
    assert [(j.revision, j.state) for j in detail.jobs] == [(1, JobState.PENDING)]


def test_two_promoters_racing_enqueue_each_study_once(db: Database) -> None:
    uids = [f"1.2.{n}" for n in range(20)]
    for uid in uids:
        repo.record_instance(db, rec(f"{uid}.9", study=uid))
    results = race(2, lambda i: repo.promote_quiet_studies(db, 5, T0 + timedelta(seconds=10)))
    promoted = results[0] + results[1]
    assert sorted(promoted) == sorted(uids)  # every study once, none twice
    assert repo.queue_depth(db)["pending"] == 20


def test_arrival_while_ready_supersedes_the_pending_job(db: Database) -> None:
    ready_study(db)
    result = repo.record_instance(db, rec("1.2.3.1.2", at=T0 + timedelta(seconds=20)))
    assert (result.reopened, result.revision, result.state) == (False, 2, StudyState.RECEIVING)
    assert repo.claim_job(db, "w", T0 + timedelta(seconds=21), 60) is None
    assert repo.promote_quiet_studies(db, 5, T0 + timedelta(seconds=30)) == ["1.2.3"]
    jobs = study(db).jobs
    assert [(j.revision, j.state) for j in jobs] == [(1, JobState.SUPERSEDED), (2, JobState.PENDING)]
    job = repo.claim_job(db, "w", T0 + timedelta(seconds=31), 60)
    assert job is not None and job.revision == 2


def test_claim_from_4_threads_one_wins(db: Database) -> None:
    ready_study(db)
    claims = race(4, lambda i: repo.claim_job(db, f"worker-{i}", T0 + timedelta(seconds=11), 60))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    (job,) = winners
    assert (job.state, job.attempts, job.study_uid, job.revision) == (JobState.RUNNING, 1, "1.2.3", 1)
    assert job.lease_until == T0 + timedelta(seconds=71)
    assert study(db).study.state is StudyState.PROCESSING
    assert repo.queue_depth(db)["running"] == 1


def test_claims_take_each_job_once(db: Database) -> None:
    for n in range(6):
        ready_study(db, f"1.2.{n}")

    def drain(i: int) -> list[int]:
        taken = []
        while (job := repo.claim_job(db, f"w{i}", T0 + timedelta(seconds=11), 60)) is not None:
            taken.append(job.id)
        return taken

    taken = [job_id for ids in race(4, drain) for job_id in ids]
    assert len(taken) == 6 and len(set(taken)) == 6


def test_lease_expiry_and_resume(db: Database) -> None:
    ready_study(db, max_attempts=2)
    job = repo.claim_job(db, "w1", T0 + timedelta(seconds=11), 30)
    assert job is not None
    assert repo.renew_lease(db, job.id, "w1", T0 + timedelta(seconds=20), 30)
    assert not repo.renew_lease(db, job.id, "someone-else", T0 + timedelta(seconds=20), 30)
    assert repo.resume_interrupted(db, T0 + timedelta(seconds=49)) == 0  # lease runs to 50 s
    assert repo.resume_interrupted(db, T0 + timedelta(seconds=51)) == 1
    detail = study(db)
    assert detail.study.state is StudyState.READY
    assert detail.jobs[0].state is JobState.PENDING
    again = repo.claim_job(db, "w2", T0 + timedelta(seconds=52), 30)
    assert again is not None and (again.id, again.attempts) == (job.id, 2)
    # Interrupted again with no attempts left: dead, study failed, nothing loops.
    assert repo.resume_interrupted(db, T0 + timedelta(seconds=53), all_running=True) == 0
    detail = study(db)
    assert detail.jobs[0].state is JobState.DEAD
    assert detail.study.state is StudyState.FAILED


def test_late_arrival_reopens_a_done_study_and_supersedes_a_running_one(db: Database) -> None:
    ready_study(db)
    job = repo.claim_job(db, "w", T0 + timedelta(seconds=11), 60)
    assert job is not None
    assert finish(db, job.id, 1, "urgent", groups=["upper-distal"])
    assert study(db).study.state is StudyState.DONE

    late = repo.record_instance(db, rec("1.2.3.1.2", at=T0 + timedelta(minutes=5)))
    assert (late.outcome, late.reopened, late.revision, late.state) == (
        RecordOutcome.NEW, True, 2, StudyState.RECEIVING,
    )
    view = study(db).study
    assert (view.reopened, view.priority) == (True, "urgent")  # the last result stays visible

    assert repo.promote_quiet_studies(db, 5, T0 + timedelta(minutes=6)) == ["1.2.3"]
    job2 = repo.claim_job(db, "w", T0 + timedelta(minutes=6), 60)
    assert job2 is not None and job2.revision == 2
    # A replaced instance arrives while revision 2 is processing: its result is superseded.
    again = repo.record_instance(db, rec("1.2.3.1.2", sha=SHA_B, at=T0 + timedelta(minutes=7)))
    assert (again.outcome, again.revision) == (RecordOutcome.REPLACED, 3)
    outbox = [OutboxRecord("1.2.3", 2, OutboxKind.DICOM, "PACS", "out/sr.dcm", "9.1")]
    assert not finish(db, job2.id, 2, "routine", outbox=outbox)
    detail = study(db)
    assert detail.study.state is StudyState.RECEIVING and detail.study.revision == 3
    assert detail.study.priority == "urgent"  # untouched by the superseded result
    assert [j.state for j in detail.jobs] == [JobState.DONE, JobState.DONE]
    assert repo.list_outbox(db) == []  # a superseded result is never sent


def test_finish_is_applied_once_with_its_outbox(db: Database) -> None:
    ready_study(db)
    job = repo.claim_job(db, "w", T0 + timedelta(seconds=11), 60)
    assert job is not None
    items = [
        OutboxRecord("1.2.3", 1, OutboxKind.DICOM, "PACS", "out/sr.dcm", "9.1", dimse_priority=1),
        OutboxRecord("1.2.3", 1, OutboxKind.HL7, "RIS", "out/oru.hl7"),
    ]
    assert finish(db, job.id, 1, "review", outbox=items, groups=["lower-distal", "upper-distal"])
    assert not finish(db, job.id, 1, "review", outbox=items)  # already done: nothing applied
    detail = study(db)
    assert detail.study.groups == ("lower-distal", "upper-distal")
    assert len(detail.outbox) == 2
    with pytest.raises(UnknownJob):
        finish(db, 999_999, 1)
    with pytest.raises(ValueError, match="priority"):
        finish(db, job.id, 1, "extremely-urgent")


def test_finish_from_4_threads_applies_once(db: Database) -> None:
    """Read-then-write transactions racing: on SQLite this needs BEGIN IMMEDIATE (a deferred
    BEGIN fails the losers with "database is locked"), on PostgreSQL the row lock."""
    ready_study(db)
    job = repo.claim_job(db, "w", T0 + timedelta(seconds=11), 60)
    assert job is not None
    applied = race(4, lambda i: finish(db, job.id, 1, PRIORITY_RANK[i]))
    assert sorted(applied) == [False, False, False, True]
    assert study(db).study.priority == PRIORITY_RANK[applied.index(True)]


def test_fail_job_retries_then_dies(db: Database) -> None:
    ready_study(db, max_attempts=2)
    t = T0 + timedelta(seconds=11)
    job = repo.claim_job(db, "w", t, 60)
    assert job is not None
    assert repo.fail_job(db, job.id, "decode error", t, retry_delay_s=5) is JobState.PENDING
    assert study(db).study.state is StudyState.READY
    assert repo.claim_job(db, "w", t + timedelta(seconds=4), 60) is None  # back-off
    job = repo.claim_job(db, "w", t + timedelta(seconds=5), 60)
    assert job is not None and job.attempts == 2
    assert repo.fail_job(db, job.id, "decode error again", t, retry_delay_s=5) is JobState.DEAD
    detail = study(db)
    assert detail.study.state is StudyState.FAILED
    assert detail.study.error == "decode error again"
    assert detail.jobs[0].last_error == "decode error again"
    assert repo.fail_job(db, job.id, "late", t, retry_delay_s=5) is JobState.DEAD  # ended: unchanged
    assert repo.queue_depth(db)["dead"] == 1
    assert [(j.id, j.study_uid) for j in repo.list_jobs(db, state=JobState.DEAD)] == [(job.id, "1.2.3")]
    assert repo.list_jobs(db, state=JobState.PENDING) == []


def test_permanent_failure_and_superseded_failure(db: Database) -> None:
    ready_study(db, "1.2.1")
    job = repo.claim_job(db, "w", T0 + timedelta(seconds=11), 60)
    assert job is not None
    assert repo.fail_job(db, job.id, "no pixel data", T0, retry_delay_s=None) is JobState.FAILED
    assert study(db, "1.2.1").study.state is StudyState.FAILED

    ready_study(db, "1.2.2")
    job = repo.claim_job(db, "w", T0 + timedelta(seconds=11), 60)
    assert job is not None
    repo.record_instance(db, rec("1.2.2.1.5", study="1.2.2", at=T0 + timedelta(seconds=12)))
    assert repo.fail_job(db, job.id, "boom", T0, retry_delay_s=1) is JobState.SUPERSEDED
    assert study(db, "1.2.2").study.state is StudyState.RECEIVING


# --- outbox ------------------------------------------------------------------------------------


def dicom_item(sop: str, priority: int = 0, destination: str = "PACS") -> OutboxRecord:
    return OutboxRecord("1.2.3", 1, OutboxKind.DICOM, destination, f"out/{sop}.dcm", sop, priority)


def test_outbox_claim_deliver_fail_retry_purge(db: Database) -> None:
    now = T0
    items = [dicom_item("9.low", 2), dicom_item("9.medium", 0), dicom_item("9.high", 1)]
    assert repo.enqueue_outbox(db, items, now=now) == 3
    assert repo.enqueue_outbox(db, items, now=now) == 0  # idempotent
    assert repo.enqueue_outbox(db, [dicom_item("9.high", 1, destination="ARCHIVE")], now=now) == 1

    claimed = [repo.claim_outbox(db, now, "s", destination="PACS") for _ in range(4)]
    assert [c.sop_instance_uid if c else None for c in claimed] == ["9.high", "9.medium", "9.low", None]
    high, medium, low, _ = claimed
    assert high is not None and medium is not None and low is not None
    assert (high.state, high.attempts, high.claimed_by) == (OutboxState.SENDING, 1, "s")

    repo.outbox_delivered(db, high.id, 0x0000, now)
    retry_at = now + timedelta(seconds=30)
    assert repo.outbox_failed(db, medium.id, 0xA700, "out of resources", now, retry_at) is OutboxState.PENDING
    assert repo.outbox_failed(db, low.id, None, "association rejected", now, None) is OutboxState.DEAD
    assert repo.claim_outbox(db, now + timedelta(seconds=29), "s", destination="PACS") is None
    again = repo.claim_outbox(db, retry_at, "s", destination="PACS")
    assert again is not None and (again.id, again.attempts, again.last_status) == (medium.id, 2, 0xA700)

    by_id = {item.id: item for item in repo.list_outbox(db)}
    assert by_id[high.id].state is OutboxState.DELIVERED and by_id[high.id].last_status == 0
    assert by_id[high.id].delivered_at == now
    assert [i.id for i in repo.list_outbox(db, OutboxState.DEAD)] == [low.id]
    assert repo.outbox_depth(db) == {"pending": 1, "sending": 1, "delivered": 1, "dead": 1}

    # A sender that died: its item comes back after the lease.
    assert repo.resume_outbox(db, retry_at + timedelta(seconds=10)) == 0
    assert repo.resume_outbox(db, retry_at + timedelta(seconds=301)) == 1

    assert repo.retry_outbox(db, now=retry_at) == 1  # every dead item
    revived = {i.id: i for i in repo.list_outbox(db)}[low.id]
    assert (revived.state, revived.attempts, revived.next_attempt_at) == (OutboxState.PENDING, 0, retry_at)
    assert repo.retry_outbox(db, [high.id], now=retry_at) == 0  # delivered stays delivered

    with pytest.raises(ValueError):
        repo.purge_outbox(db, [OutboxState.SENDING])
    assert repo.purge_outbox(db, [OutboxState.DELIVERED]) == 1
    assert repo.outbox_depth(db)["delivered"] == 0
    with pytest.raises(UnknownOutboxItem):
        repo.outbox_delivered(db, high.id, 0, now)


def test_outbox_claim_from_4_threads(db: Database) -> None:
    repo.enqueue_outbox(db, [dicom_item("9.1")], now=T0)
    claims = race(4, lambda i: repo.claim_outbox(db, T0, f"s{i}"))
    assert sum(c is not None for c in claims) == 1


def test_outbox_identity() -> None:
    hl7 = OutboxRecord("1.2.3", 2, OutboxKind.HL7, "RIS", "out/a.hl7")
    assert hl7.identity == "hl7:1.2.3:2"
    assert dicom_item("9.1").identity == "dicom:9.1"
    with pytest.raises(ValueError):
        OutboxRecord("1.2.3", 1, OutboxKind.DICOM, "PACS", "out/x.dcm")  # no SOP UID
    with pytest.raises(ValueError):
        dicom_item("9.1", priority=3)


# --- worklist and priorities -------------------------------------------------------------------


def test_worklist_order_and_filters(db: Database) -> None:
    plan = [  # uid, minutes after T0, priority, score, groups
        ("1.2.1", 0, "routine", 0.2, ["upper-distal"]),
        ("1.2.2", 1, "urgent", 0.7, ["lower-distal"]),
        ("1.2.3", 2, "urgent", 0.9, ["upper-distal", "lower-middle"]),
        ("1.2.4", 3, "review", 0.5, ["upper-distal"]),
        ("1.2.5", 4, "not_analysed", None, []),
        ("1.2.6", 5, "urgent", 0.7, ["upper_distal"]),  # "_" must not act as a LIKE wildcard
    ]
    for uid, minutes, priority, score, groups in plan:
        at = T0 + timedelta(minutes=minutes)
        repo.record_instance(db, rec(f"{uid}.1.1", study=uid, at=at))
        repo.promote_quiet_studies(db, 5, at + timedelta(seconds=10))
        job = repo.claim_job(db, "w", at + timedelta(seconds=10), 60)
        assert job is not None and job.study_uid == uid
        repo.finish_job(db, job.id, revision=1, priority=priority, score=score, outcome_json="{}",
                        groups=groups, now=at + timedelta(seconds=20))
    repo.record_instance(db, rec("1.2.7.1.1", study="1.2.7", at=T0))  # still receiving

    order = [s.uid for s in repo.worklist(db)]
    assert order == ["1.2.3", "1.2.2", "1.2.6", "1.2.4", "1.2.5", "1.2.1", "1.2.7"]  # NOT ANALYSED above
    below = [s.uid for s in repo.worklist(db, order=PRIORITY_RANK)]
    assert below == ["1.2.3", "1.2.2", "1.2.6", "1.2.4", "1.2.1", "1.2.5", "1.2.7"]
    with pytest.raises(ValueError):
        repo.worklist(db, order=("urgent", "review"))
    paged = [s.uid for offset in (0, 3, 6) for s in repo.worklist(db, limit=3, offset=offset)]
    assert paged == order
    assert repo.count_worklist(db) == {
        "urgent": 3, "review": 1, "not_analysed": 1, "routine": 1, "pending": 1, "total": 7
    }
    assert repo.count_worklist(db, group="upper-distal")["total"] == 3
    assert repo.count_studies(db) == 7 and repo.count_studies(db, state=StudyState.RECEIVING) == 1
    assert [s.uid for s in repo.worklist(db, group="upper-distal")] == ["1.2.3", "1.2.4", "1.2.1"]
    assert [s.uid for s in repo.worklist(db, states=[StudyState.RECEIVING])] == ["1.2.7"]
    window = repo.worklist(db, since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3))
    assert [s.uid for s in window] == ["1.2.3", "1.2.2"]
    assert [s.uid for s in repo.worklist(db, limit=2)] == ["1.2.3", "1.2.2"]
    assert [s.uid for s in repo.list_studies(db, state=StudyState.DONE, limit=2)] == ["1.2.6", "1.2.5"]


def test_a_long_worklist_surfaces_every_not_analysed_study_on_its_first_page(db: Database) -> None:
    # 320 processed studies, 12 of them NOT ANALYSED and received first (the oldest): with the
    # default page of 200 every one of them is shown, and the total says 320.
    for n in range(320):
        uid = f"1.2.{n + 1}"
        at = T0 + timedelta(seconds=n)
        repo.record_instance(db, rec(f"{uid}.1.1", study=uid, at=at))
    repo.promote_quiet_studies(db, 5, T0 + timedelta(hours=1))
    for _ in range(320):
        job = repo.claim_job(db, "w", T0 + timedelta(hours=1), 60)
        assert job is not None
        number = int(job.study_uid.rsplit(".", 1)[1])
        priority = "not_analysed" if number <= 12 else ("routine" if number % 3 else "review")
        score = None if priority == "not_analysed" else 0.1
        repo.finish_job(db, job.id, revision=1, priority=priority, score=score, outcome_json="{}")
    page = repo.worklist(db)
    assert len(page) == 200 and repo.count_worklist(db)["total"] == 320
    shown = {s.uid for s in page if s.priority == "not_analysed"}
    assert shown == {f"1.2.{n}" for n in range(1, 13)}


def test_signalled_priority_never_downgrades(db: Database) -> None:
    repo.record_instance(db, rec("1.1"))
    assert repo.set_signalled_priority(db, "1.2.3", "review")
    assert repo.set_signalled_priority(db, "1.2.3", "urgent")
    assert not repo.set_signalled_priority(db, "1.2.3", "routine")
    assert not repo.set_signalled_priority(db, "1.2.3", "urgent")
    assert study(db).study.signalled_priority == "urgent"


def test_priority_rank_matches_inference() -> None:
    from inference.values import PRIORITY_ORDER

    assert PRIORITY_RANK == tuple(p.value for p in PRIORITY_ORDER)


# --- time, audit, errors -----------------------------------------------------------------------


def test_timestamps_round_trip(db: Database) -> None:
    at = datetime(2024, 7, 9, 23, 59, 58, 123456, tzinfo=timezone(timedelta(hours=2)))
    repo.record_instance(db, rec("1.1", at=at))
    view = study(db).study
    assert view.first_received_at == at
    assert view.first_received_at.tzinfo == UTC
    assert view.first_received_at.isoformat() == "2024-07-09T21:59:58.123456+00:00"
    with pytest.raises(ValueError, match="timezone-aware"):
        repo.record_instance(db, rec("1.2", at=datetime(2024, 1, 1)))


def test_audit(db: Database) -> None:
    event = AuditRecord(AuditKind.ASSOCIATION, "MODALITY", "FRACNODE", "127.0.0.1", T0,
                        stored=3, duplicates=1, outcome="released")
    repo.add_audit(db, event)
    repo.add_audit(db, AuditRecord(AuditKind.REJECTED, "STRANGER", "FRACNODE", "10.0.0.9",
                                   T0 + timedelta(seconds=1), outcome="rejected", detail="calling AE"))
    newest, oldest = repo.list_audit(db)
    assert (newest.kind, newest.calling_ae, newest.detail) == (AuditKind.REJECTED, "STRANGER", "calling AE")
    assert (oldest.stored, oldest.duplicates, oldest.failed, oldest.at) == (3, 1, 0, T0)
    assert [e.kind for e in repo.list_audit(db, kind=AuditKind.ASSOCIATION)] == [AuditKind.ASSOCIATION]


def test_urls(tmp_path: Path) -> None:
    for url in ("sqlite://", "sqlite:///:memory:", "mysql://x@localhost/db", "postgresql+psycopg2://x@h/db"):
        with pytest.raises(UnsupportedDatabase):
            Database(StorageConfig(url))
    mapped = Database(StorageConfig("postgresql://user@127.0.0.1:1/db"))
    assert (mapped.dialect, mapped.engine.url.drivername) == ("postgresql", "postgresql+psycopg")


def test_unreachable_postgres_is_storage_unavailable(port: int) -> None:
    db = Database(StorageConfig(f"postgresql://nobody@127.0.0.1:{port}/none", busy_timeout_s=2))
    with pytest.raises(StorageUnavailable):
        repo.record_instance(db, rec("1.1"))


def test_sqlite_lock_held_too_long_is_storage_unavailable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/f.db"
    holder = Database(StorageConfig(url))
    holder.create_all()
    impatient = Database(StorageConfig(url, busy_timeout_s=0.2))
    repo.record_instance(holder, rec("1.1"))
    with holder.session() as s:
        s.connection()  # BEGIN IMMEDIATE: the write lock is ours until the block ends
        with pytest.raises(StorageUnavailable):
            repo.record_instance(impatient, rec("1.2"))
        # Read-only sessions begin deferred and read the last committed state meanwhile.
        assert [v.uid for v in repo.list_studies(impatient)] == ["1.2.3"]
        assert repo.existing_sha256(impatient, "1.1") == SHA_A
    assert repo.record_instance(impatient, rec("1.2")).outcome is RecordOutcome.NEW


_CHILD = """
import sys, time
from datetime import UTC, datetime
from storage import repo
from storage.config import StorageConfig
from storage.db import Database
db = Database(StorageConfig(sys.argv[1]))
job = repo.claim_job(db, "doomed", datetime.now(UTC), 30)
assert job is not None
with db.session() as s:
    s.connection()  # holds SQLite's write lock / an open PostgreSQL transaction
    print("claimed", flush=True)
    time.sleep(120)
"""


def test_kill_9_while_processing_resumes(db: Database) -> None:
    repo.record_instance(db, rec("1.1", at=datetime.now(UTC) - timedelta(minutes=1)))
    repo.promote_quiet_studies(db, 5, datetime.now(UTC))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, db.config.url],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"claimed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert study(db).study.state is StudyState.PROCESSING
    # The production path: the dead process's 30 s lease is not renewed; before it expires the
    # reaper of a live process leaves the job alone, once it has expired it takes it back.
    assert repo.reap_expired_leases(db, datetime.now(UTC)) == (0, 0)
    later = datetime.now(UTC) + timedelta(seconds=31)
    assert repo.reap_expired_leases(db, later) == (1, 0)
    assert study(db).study.state is StudyState.READY
    job = repo.claim_job(db, "survivor", later, 60)
    assert job is not None and job.attempts == 2
    # The dead worker's late result (were it still running) would be dropped: not its job now.
    assert not repo.finish_job(
        db, job.id, revision=job.revision, priority="routine", score=None, outcome_json="{}",
        worker_id="doomed",
    )
    assert repo.record_instance(db, rec("1.2")).outcome is RecordOutcome.NEW  # no lock left behind


def test_state_filters_take_strings_and_reject_unknown_ones(db: Database) -> None:
    repo.record_instance(db, rec("1.1"))
    assert [s.uid for s in repo.list_studies(db, state="receiving")] == ["1.2.3"]  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        repo.list_studies(db, state="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        repo.worklist(db, states=["bogus"])  # type: ignore[list-item]
