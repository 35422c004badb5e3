"""Many senders at once against `fracnode serve` (issue 11, item 7).

Shared by ``tests/test_load.py`` (20 x 10 instances) and ``bench/load.py`` (20 x 100). Every
sender opens its association, and when all of them are established (``dicom.max_associations``
is set to the number of senders) the extra associations tried meanwhile must each be refused
cleanly with A-ASSOCIATE-RJ - not reset, not left hanging. Then all senders send their studies
(``per_study`` instances each) concurrently; each C-STORE is timed on the sender's side. The node's
RSS is sampled every 50 ms from start-up to the last result delivered.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from storage import repo
from tests.dicomgen import DX_PRESENTATION, make_dataset
from tests.nodeharness import CountingDestination, NodeOptions, NodeProcess, analysed, wait_until
from tests.rawdicom import RawAssociation


def _uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(120) | (1 << 119)}"


@dataclass
class LoadSender:
    name: str
    datasets: list[Dataset]
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    established: bool = False
    error: str | None = None

    def run(self, port: int, barrier: threading.Barrier) -> None:
        ae = AE(ae_title=self.name)
        ae.maximum_pdu_size = 1_048_576
        ae.acse_timeout = 30
        ae.dimse_timeout = 120
        ae.network_timeout = 120
        ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="FRACNODE", max_pdu=1_048_576)
        self.established = assoc.is_established
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:
            self.error = "barrier broken"
        if not assoc.is_established:
            self.error = self.error or "association not established"
            return
        try:
            for ds in self.datasets:
                started = time.perf_counter()
                status = assoc.send_c_store(ds)
                self.latencies.append(time.perf_counter() - started)
                code = int(status.Status) if status is not None and "Status" in status else None
                self.statuses[f"0x{code:04X}" if code is not None else "none"] += 1
                if not assoc.is_established:
                    self.error = "association dropped"
                    break
        finally:
            if assoc.is_established:
                assoc.release()


@dataclass
class LoadReport:
    senders: int
    per_sender: int
    size: tuple[int, int]
    extra_attempts: Counter[str]  # how each association beyond the limit ended
    statuses: Counter[str]
    latencies: list[float]
    send_seconds: float
    stored: int
    studies: int
    analysed: int
    delivered_results: int
    expected_results: int
    processed_seconds: float | None  # from the first C-STORE to the last result delivered
    idle_rss: int
    peak_rss: int
    errors: list[str]

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")

    @property
    def p95(self) -> float:
        return self.percentile(0.95)


def run(
    root: Path,
    *,
    senders: int,
    per_sender: int,
    per_study: int,
    rows: int,
    cols: int,
    extra: int,
    seed: int,
    process_timeout_s: float,
) -> LoadReport:
    rng = random.Random(seed)
    destination = CountingDestination()
    destination.start()
    node = NodeProcess(
        root / "node",
        NodeOptions(
            quiet_seconds=2.0,
            max_associations=senders,
            extra=destination.toml("pacs"),
            dimse_timeout_s=120,
            network_timeout_s=120,
        ),
    )
    node.start()
    time.sleep(2.0)
    idle_rss = node.rss()
    workers: list[LoadSender] = []
    study_uids: list[str] = []
    for k in range(senders):
        datasets: list[Dataset] = []
        for first in range(0, per_sender, per_study):
            study_uid, series_uid = _uid(rng), _uid(rng)
            study_uids.append(study_uid)
            for i in range(min(per_study, per_sender - first)):
                datasets.append(
                    make_dataset(
                        rows=rows,
                        cols=cols,
                        study_uid=study_uid,
                        series_uid=series_uid,
                        sop_uid=_uid(rng),
                        instance_number=i + 1,
                        seed=(k + i) % 5,
                    )
                )
        workers.append(LoadSender(f"LOAD{k:02d}", datasets))
    barrier = threading.Barrier(senders + 1)
    threads = [
        threading.Thread(target=w.run, args=(node.dicom_port, barrier), name=w.name, daemon=True)
        for w in workers
    ]
    db = node.database()
    try:
        for thread in threads:
            thread.start()
        barrier.wait(timeout=120)  # every sender holds an established association now
        started = time.monotonic()
        extra_attempts: Counter[str] = Counter()
        for _ in range(extra):
            with RawAssociation(node.dicom_port, timeout=15) as assoc:
                refused = assoc.associate(str(DX_PRESENTATION), str(ExplicitVRLittleEndian), calling="EXTRA")
                extra_attempts[refused.value if refused is not None else "accepted"] += 1
                if refused is None:
                    assoc.release()
        for thread in threads:
            thread.join(timeout=process_timeout_s)
        send_seconds = time.monotonic() - started

        def processed() -> bool:
            details = [repo.get_study(db, uid) for uid in study_uids]
            return all(
                d is not None
                and d.study.state in ("done", "failed")
                and d.study.instance_count == per_study
                and bool(d.outbox)
                and all(i.state == "delivered" for i in d.outbox)
                for d in details
            )

        processed_seconds: float | None
        try:
            wait_until(processed, process_timeout_s, "every study processed and delivered", interval=1.0)
            processed_seconds = time.monotonic() - started
        except AssertionError:
            processed_seconds = None
        details = [repo.get_study(db, uid) for uid in study_uids]
        expected = {
            str(i.sop_instance_uid) for d in details if d is not None for i in d.outbox if i.kind == "dicom"
        }
        return LoadReport(
            senders=senders,
            per_sender=per_sender,
            size=(rows, cols),
            extra_attempts=extra_attempts,
            statuses=sum((w.statuses for w in workers), Counter()),
            latencies=[x for w in workers for x in w.latencies],
            send_seconds=send_seconds,
            stored=sum(d.study.instance_count for d in details if d is not None),
            studies=len(study_uids),
            analysed=sum(1 for d in details if analysed(d)),
            delivered_results=len(expected & set(destination.counts())),
            expected_results=len(expected),
            processed_seconds=processed_seconds,
            idle_rss=idle_rss,
            peak_rss=node.peak_rss,
            errors=[f"{w.name}: {w.error}" for w in workers if w.error],
        )
    finally:
        db.dispose()
        node.close()
        destination.stop()
