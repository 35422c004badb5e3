"""kill -9 at random moments while senders store and the node processes and exports.

Shared by ``tests/test_crash_recovery.py`` (200 instances, 5 kills) and ``bench/crash.py``
(500 instances, 8 kills). The scenario, with real peers only:

- ``senders`` pynetdicom associations send studies of ``per_study`` instances; each sender owns
  its studies and sends them in order. A sender whose association drops (the node was killed)
  reconnects and sends again, from the first instance not yet acknowledged, as a PACS would.
- A killer thread waits a random time (seeded) after each start, sends SIGKILL, and restarts
  ``fracnode serve`` on the same spool and database at once.
- Results go to a :class:`~tests.nodeharness.CountingDestination`, which counts every C-STORE
  by SOP Instance UID: a re-send after a kill carries the same UID and shows as a duplicate.

:func:`run` returns a :class:`CrashReport`: what was acknowledged and what of it the database
and spool hold, how each study ended, the result objects expected (every DICOM outbox item)
against those received, re-sends, and the time from the last restart until the last study was
processed and delivered.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from storage import repo
from storage.views import StudyDetail
from tests.dicomgen import DX_PRESENTATION, make_dataset
from tests.nodeharness import CountingDestination, NodeOptions, NodeProcess, analysed, wait_until


def _uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(120) | (1 << 119)}"


def make_studies(count: int, per_study: int, seed: int) -> list[list[Dataset]]:
    rng = random.Random(seed)
    studies: list[list[Dataset]] = []
    for s in range(count):
        study_uid, series_uid = _uid(rng), _uid(rng)
        studies.append(
            [
                make_dataset(
                    rows=96,
                    cols=80,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=_uid(rng),
                    instance_number=i + 1,
                    seed=(s + i) % 5,
                )
                for i in range(per_study)
            ]
        )
    return studies


@dataclass
class Sender:
    """One SCU thread: sends its datasets in order, reconnecting after the node was killed."""

    name: str
    port: int
    datasets: list[Dataset]
    deadline: float
    acknowledged: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0

    def run(self) -> None:
        index = 0
        while index < len(self.datasets) and time.monotonic() < self.deadline:
            ae = AE(ae_title=self.name)
            ae.acse_timeout = 10
            ae.dimse_timeout = 30
            ae.network_timeout = 30
            ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", self.port, ae_title="FRACNODE")
            if not assoc.is_established:
                self.failures["associate"] += 1
                time.sleep(0.5)
                continue
            self.reconnects += 1
            try:
                while index < len(self.datasets):
                    ds = self.datasets[index]
                    try:
                        status = assoc.send_c_store(ds)
                    except (RuntimeError, ValueError, OSError, AttributeError):
                        self.failures["exception"] += 1
                        break
                    code = int(status.Status) if status is not None and "Status" in status else None
                    if code == 0:
                        self.acknowledged.append(str(ds.SOPInstanceUID))
                        index += 1
                    else:
                        self.failures[f"0x{code:04X}" if code is not None else "no response"] += 1
                        break
                    if not assoc.is_established:
                        break
            finally:
                if assoc.is_established:
                    assoc.release()


@dataclass(frozen=True, slots=True)
class Kill:
    at_s: float  # since the scenario started
    after_start_s: float  # since that node had started
    sending: bool  # senders were still sending
    acknowledged: int  # instances acknowledged at the moment of the kill
    studies_done: int


@dataclass
class CrashReport:
    instances: int
    studies: int
    kills: list[Kill]
    acknowledged: set[str]
    lost: list[str]  # acknowledged but not in the database, or not whole in the spool
    states: Counter[str]  # study state -> count
    not_analysed: list[str]
    expected_results: set[str]  # SOP Instance UIDs of every DICOM outbox item
    received: Counter[str]  # at the destination, by SOP Instance UID
    undelivered_items: list[str]
    recovered_within_s: float | None  # last restart -> every study processed and delivered
    recovery_bound_s: float
    unacknowledged_after_deadline: int
    sender_failures: Counter[str]
    peak_rss: int
    log: Path

    @property
    def resends(self) -> int:
        return sum(n - 1 for n in self.received.values() if n > 1)

    @property
    def missing_at_destination(self) -> set[str]:
        return self.expected_results - set(self.received)

    @property
    def unexpected_at_destination(self) -> set[str]:
        return set(self.received) - self.expected_results


def _finished(detail: StudyDetail | None) -> bool:
    if detail is None or detail.study.state not in ("done", "failed"):
        return False
    items = [i for i in detail.outbox if i.kind == "dicom" and i.revision == detail.study.revision]
    return detail.study.state == "failed" or (bool(items) and all(i.state == "delivered" for i in items))


def run(
    root: Path,
    *,
    studies: int,
    per_study: int,
    senders: int,
    kills: int,
    seed: int,
    recovery_bound_s: float = 90.0,
    kill_window_s: tuple[float, float] = (0.5, 5.0),
) -> CrashReport:
    rng = random.Random(seed)
    data = make_studies(studies, per_study, seed)
    study_uids = [str(s[0].StudyInstanceUID) for s in data]
    destination = CountingDestination()
    destination.start()
    node = NodeProcess(root / "node", NodeOptions(quiet_seconds=1.0, extra=destination.toml("pacs")))
    started = time.monotonic()
    node.start()
    deadline = started + 600
    workers = [
        Sender(f"SENDER{k}", node.dicom_port, [ds for s in data[k::senders] for ds in s], deadline)
        for k in range(senders)
    ]
    threads = [threading.Thread(target=w.run, name=w.name, daemon=True) for w in workers]
    for thread in threads:
        thread.start()

    db = node.database()
    killed: list[Kill] = []
    try:
        for _ in range(kills):
            since_start = rng.uniform(*kill_window_s)
            time.sleep(since_start)
            sending = any(t.is_alive() for t in threads)
            done = sum(1 for uid in study_uids if _finished(repo.get_study(db, uid)))
            node.kill9()
            killed.append(
                Kill(
                    at_s=time.monotonic() - started,
                    after_start_s=since_start,
                    sending=sending,
                    acknowledged=sum(len(w.acknowledged) for w in workers),
                    studies_done=done,
                )
            )
            node.start()
        restarted_at = time.monotonic()
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        recovered: float | None = None
        try:
            wait_until(
                lambda: all(_finished(repo.get_study(db, uid)) for uid in study_uids),
                timeout=recovery_bound_s + max(0.0, time.monotonic() - restarted_at),
                what="every study processed and delivered",
                interval=0.5,
            )
            recovered = time.monotonic() - restarted_at
        except AssertionError:
            recovered = None
        # Give deliveries in flight a moment, then read what the node and the destination hold.
        time.sleep(1.0)
        acknowledged = {uid for w in workers for uid in w.acknowledged}
        instances = {i.sop_uid: i for uid in study_uids for i in repo.study_instances(db, uid)}
        lost = []
        for uid in sorted(acknowledged):
            found = instances.get(uid)
            if found is None:
                lost.append(uid)
                continue
            ds = pydicom.dcmread(node.directory / "spool" / found.path)
            if str(ds.SOPInstanceUID) != uid or len(ds.PixelData) != 96 * 80 * 2:
                lost.append(uid)
        details = {uid: repo.get_study(db, uid) for uid in study_uids}
        states = Counter(str(d.study.state) if d else "missing" for d in details.values())
        expected = {
            str(i.sop_instance_uid)
            for d in details.values()
            if d is not None
            for i in d.outbox
            if i.kind == "dicom" and i.sop_instance_uid
        }
        undelivered = [
            f"{i.study_uid} r{i.revision} {i.state} attempts={i.attempts} {i.last_error or ''}"
            for d in details.values()
            if d is not None
            for i in d.outbox
            if i.state != "delivered"
        ]
        return CrashReport(
            instances=studies * per_study,
            studies=studies,
            kills=killed,
            acknowledged=acknowledged,
            lost=lost,
            states=states,
            not_analysed=[uid for uid, d in details.items() if not analysed(d)],
            expected_results=expected,
            received=destination.counts(),
            undelivered_items=undelivered,
            recovered_within_s=recovered,
            recovery_bound_s=recovery_bound_s,
            unacknowledged_after_deadline=studies * per_study - len(acknowledged),
            sender_failures=sum((w.failures for w in workers), Counter()),
            peak_rss=node.peak_rss,
            log=node.log,
        )
    finally:
        db.dispose()
        node.close()
        destination.stop()
