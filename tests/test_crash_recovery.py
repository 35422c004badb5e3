"""Crash and outage figures with real peers (issue 11, item 5).

- kill -9 of `fracnode serve` at random (seeded) moments, at least 5 times, while 4 associations
  send 200 instances and results are exported to a storage SCP that counts what it receives:
  nothing acknowledged is lost, every study is processed, every result object arrives (a re-send
  after a kill carries the same SOP Instance UID). Recovery uses the production path only:
  start-up resume and the running node's lease reaper (no ``all_running``).
- A destination that is down and then comes back receives everything.
- A destination that always refuses (status 0xA700, or association rejected) ends in dead
  letters, visible in ``fracnode outbox list`` and in ``/metrics``.

``bench/crash.py`` runs the kill scenario with 500 instances and prints its figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from storage import repo
from tests import crashrun
from tests.dicomgen import make_dataset
from tests.nodeharness import CountingDestination, NodeOptions, NodeProcess, send_datasets, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_kill_9_at_random_moments_loses_nothing_and_delivers_every_result(tmp_path: Path) -> None:
    report = crashrun.run(tmp_path, studies=50, per_study=4, senders=4, kills=5, seed=11)
    kills = [(round(k.at_s, 1), k.sending, k.acknowledged) for k in report.kills]
    print(
        f"\nkills (at s, sending, acknowledged): {kills}\n"
        f"acknowledged {len(report.acknowledged)}/{report.instances}, lost {len(report.lost)}, "
        f"states {dict(report.states)}, results expected {len(report.expected_results)}, "
        f"received {sum(report.received.values())} ({report.resends} re-sends), "
        f"recovered in {report.recovered_within_s} s, sender failures {dict(report.sender_failures)}"
    )
    assert len(report.kills) == 5
    assert any(k.sending for k in report.kills), "at least one kill must land while instances arrive"
    assert report.unacknowledged_after_deadline == 0, "the senders got every instance acknowledged"
    assert not report.lost, f"{len(report.lost)} acknowledged instances lost: {report.lost[:5]}"
    assert report.recovered_within_s is not None, (
        f"not every study was processed and delivered within {report.recovery_bound_s:.0f} s of the "
        f"last restart: states {dict(report.states)}, undelivered {report.undelivered_items[:10]}"
    )
    assert report.states == {"done": report.studies}
    assert not report.not_analysed, report.not_analysed[:5]
    assert not report.missing_at_destination, f"{len(report.missing_at_destination)} results never arrived"
    assert not report.unexpected_at_destination, "the destination got objects the node never queued"
    assert not report.undelivered_items


def test_destination_down_then_up_receives_everything(tmp_path: Path) -> None:
    destination = CountingDestination()  # not started: the PACS is down
    node = NodeProcess(
        tmp_path / "node",
        NodeOptions(extra=destination.toml("pacs"), export_base_delay_s=0.5, export_max_delay_s=1.0),
    )
    node.start()
    db = node.database()
    try:
        ds = make_dataset(rows=96, cols=80)
        (sent,) = send_datasets(node.dicom_port, [ds])
        assert sent.status == 0
        study_uid = str(ds.StudyInstanceUID)

        def retried() -> bool:
            detail = repo.get_study(db, study_uid)
            return (
                detail is not None
                and detail.study.state == "done"
                and bool(detail.outbox)
                and all(i.attempts >= 2 and i.state == "pending" for i in detail.outbox)
            )

        wait_until(retried, 90, "failed deliveries scheduled again while the destination is down")
        assert node.metric("fracnode_export_retries_total", {"destination": "pacs"}) >= 2
        destination.start()
        wait_until(
            lambda: all(i.state == "delivered" for i in repo.get_study(db, study_uid).outbox),  # type: ignore[union-attr]
            60,
            "every result delivered after the destination came back",
        )
        detail = repo.get_study(db, study_uid)
        assert detail is not None
        expected = {str(i.sop_instance_uid) for i in detail.outbox}
        assert set(destination.counts()) == expected
        assert node.metric("fracnode_export_dead_letters_total", {"destination": "pacs"}) == 0
    finally:
        db.dispose()
        node.close()
        destination.stop()


def test_destination_that_always_refuses_ends_in_dead_letters(tmp_path: Path) -> None:
    full = CountingDestination(status=0xA700)  # Refused: Out of Resources, every time
    closed = CountingDestination(reject=True)  # rejects every association
    node = NodeProcess(
        tmp_path / "node",
        NodeOptions(
            extra=full.toml("full") + closed.toml("closed"),
            export_max_attempts=3,
            export_base_delay_s=0.2,
            export_max_delay_s=0.5,
        ),
    )
    with full, closed:
        node.start()
        db = node.database()
        try:
            ds = make_dataset(rows=96, cols=80)
            (sent,) = send_datasets(node.dicom_port, [ds])
            assert sent.status == 0
            study_uid = str(ds.StudyInstanceUID)

            def all_dead() -> bool:
                detail = repo.get_study(db, study_uid)
                return (
                    detail is not None
                    and bool(detail.outbox)
                    and {i.destination for i in detail.outbox} == {"full", "closed"}
                    and all(i.state == "dead" for i in detail.outbox)
                )

            wait_until(all_dead, 120, "every delivery given up as a dead letter")
            detail = repo.get_study(db, study_uid)
            assert detail is not None
            per_destination = {
                name: [i for i in detail.outbox if i.destination == name] for name in ("full", "closed")
            }
            assert all(i.attempts == 3 for i in detail.outbox)
            assert all(i.last_status == 0xA700 for i in per_destination["full"])
            # Each attempt reached the refusing SCP: 3 C-STOREs per object, all answered 0xA700.
            assert all(n == 3 for n in full.counts().values())
            assert closed.counts() == {}

            listed = node.cli("outbox", "list", "--state", "dead")
            assert listed.returncode == 0, listed.stderr
            rows = [line for line in listed.stdout.splitlines() if study_uid in line]
            assert len(rows) == len(detail.outbox) and all(" dead " in row for row in rows)
            assert any("0xA700" in row for row in rows)

            time.sleep(0.5)
            for name, items in per_destination.items():
                dead = node.metric("fracnode_export_dead_letters_total", {"destination": name})
                assert dead == len(items), (name, dead)
            assert node.healthy()
        finally:
            db.dispose()
            node.close()
