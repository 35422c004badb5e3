"""Runs fuzz inputs against a `fracnode serve` process and judges what the node did with them.

Shared by ``tests/test_fuzz.py`` (a few hundred inputs) and ``bench/fuzz.py`` (10,000 and more).
A batch is: every input sent as is on its own association (``tests.rawdicom``), then one
well-formed study sent by a normal pynetdicom SCU, which must be analysed and whose results must
arrive at the destination. After the campaign, :meth:`FuzzCampaign.settle` waits until every
acknowledged input's study has ended (done or failed) and classifies it.

A node that died, or whose good study was not analysed in time, is restarted (same spool and
database) so the campaign goes on; every restart is counted - a correct node needs none.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from storage import repo
from storage.views import StudyDetail
from tests.fuzzgen import PHI_MARKERS, Expect, FuzzInput, Kind, well_formed
from tests.nodeharness import (
    TERMINAL_STATES,
    CountingDestination,
    NodeProcess,
    analysed,
    delivered_sop_uids,
    failure_reason,
    send_datasets,
)
from tests.rawdicom import Reply, StoreOutcome, store_bytes

SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True, slots=True)
class InputResult:
    input: FuzzInput
    outcome: StoreOutcome

    @property
    def acknowledged(self) -> bool:
        return self.outcome.reply is Reply.STATUS and self.outcome.status in SUCCESS_STATUSES

    @property
    def refused(self) -> bool:
        """A failure status; or A-ABORT when the C-STORE request itself was malformed (its
        Affected SOP Instance UID is empty once NUL padding is removed), as PS3.7 allows."""
        if self.outcome.reply is Reply.STATUS:
            return self.outcome.status not in SUCCESS_STATUSES
        return self.outcome.reply is Reply.ABORTED and not self.input.sop_uid.strip("\x00 ")

    @property
    def status_text(self) -> str:
        if self.outcome.reply is Reply.STATUS:
            return f"0x{self.outcome.status or 0:04X}"
        return self.outcome.reply.value


@dataclass(frozen=True, slots=True)
class GoodStudy:
    study_uid: str
    analysed: bool
    delivered: bool
    seconds: float
    detail: str  # what was missing when it was not analysed and delivered


@dataclass(frozen=True, slots=True)
class Settled:
    """What became of one acknowledged input."""

    result: InputResult
    study_uid: str | None
    state: str  # done / failed / processing / ... / "missing" (acknowledged but not stored)
    outcome: str  # analysed / not_analysed / failed / stuck / lost
    reason: str | None


@dataclass
class FuzzCampaign:
    node: NodeProcess
    destination: CountingDestination
    good_timeout_s: float = 90.0
    results: list[InputResult] = field(default_factory=list)
    good: list[GoodStudy] = field(default_factory=list)
    restarts: int = 0
    deaths: int = 0
    _good_index: int = 0

    # -- sending ----------------------------------------------------------------------------
    def send(self, item: FuzzInput) -> InputResult:
        try:
            outcome = store_bytes(
                self.node.dicom_port,
                item.sop_class,
                item.sop_uid,
                item.transfer_syntax,
                item.data,
                timeout=60,
            )
        except OSError:
            outcome = StoreOutcome(Reply.RESET)
        result = InputResult(item, outcome)
        self.results.append(result)
        return result

    def ensure_running(self) -> None:
        """Restart a node that died (counted): the campaign measures, it does not stop."""
        if not self.node.alive():
            self.deaths += 1
            self.restart()

    def restart(self) -> None:
        self.restarts += 1
        self.node.stop()
        self.node.start()

    def run_batch(self, inputs: list[FuzzInput]) -> GoodStudy:
        for item in inputs:
            self.send(item)
            self.ensure_running()
        good = self.good_study()
        if not good.analysed or not self.node.healthy():
            self.ensure_running()
            if self.node.alive():
                self.restart()  # a stuck worker: only a restart brings the next studies through
        return good

    # -- the well-formed study after each batch -----------------------------------------------
    def good_dataset(self) -> Dataset:
        import random

        self._good_index += 1
        ds = well_formed(random.Random(f"good:{self._good_index}"), 900_000 + self._good_index)
        return ds

    def good_study(self) -> GoodStudy:
        ds = self.good_dataset()
        study_uid = str(ds.StudyInstanceUID)
        started = time.monotonic()
        sent = send_datasets(self.node.dicom_port, [ds], calling="GOODSCU")
        if not sent or sent[0].status != 0:
            good = GoodStudy(
                study_uid, False, False, 0.0, f"C-STORE answered {sent[0].status if sent else None}"
            )
            self.good.append(good)
            return good
        db = self.node.database()
        detail: StudyDetail | None = None
        try:
            deadline = started + self.good_timeout_s
            while time.monotonic() < deadline:
                detail = repo.get_study(db, study_uid)
                if (
                    detail is not None
                    and detail.study.state in TERMINAL_STATES
                    and (not analysed(detail) or self._delivered(detail))
                ):
                    break
                if not self.node.alive():
                    break
                time.sleep(0.25)
        finally:
            db.dispose()
        seconds = time.monotonic() - started
        ok = analysed(detail)
        delivered = detail is not None and ok and self._delivered(detail)
        what = "" if ok and delivered else _describe(detail)
        good = GoodStudy(study_uid, ok, delivered, seconds, what)
        self.good.append(good)
        return good

    def _delivered(self, detail: StudyDetail) -> bool:
        wanted = {i.sop_instance_uid for i in detail.outbox if i.kind == "dicom"}
        received = set(self.destination.counts())
        return bool(wanted) and wanted == delivered_sop_uids(detail) and wanted <= received

    # -- after the campaign -----------------------------------------------------------------
    def acknowledged(self) -> list[InputResult]:
        return [r for r in self.results if r.acknowledged]

    def stored_study_of(self, sop_uids: list[str]) -> dict[str, str]:
        """SOP Instance UID -> the study the node filed it under (read from its database)."""
        path = self.node.directory / "fracnode.db"
        out: dict[str, str] = {}
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as con:
            for start in range(0, len(sop_uids), 500):
                chunk = sop_uids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = con.execute(
                    "SELECT i.sop_instance_uid, s.study_instance_uid FROM instance i "
                    f"JOIN study s ON s.id = i.study_id WHERE i.sop_instance_uid IN ({marks})",
                    chunk,
                ).fetchall()
                out.update({str(a): str(b) for a, b in rows})
        return out

    def settle(self, timeout_s: float) -> list[Settled]:
        """Wait until every acknowledged input's study is done or failed; classify each."""
        return self.settle_inputs(
            [r for r in self.acknowledged() if r.input.expect is not Expect.REFUSED], timeout_s
        )

    def settle_inputs(self, acknowledged: list[InputResult], timeout_s: float) -> list[Settled]:
        studies = self.stored_study_of([r.input.sop_uid for r in acknowledged])
        db = self.node.database()
        try:
            deadline = time.monotonic() + timeout_s
            details: dict[str, StudyDetail | None] = {}
            pending = set(studies.values())
            while True:
                for uid in list(pending):
                    detail = repo.get_study(db, uid)
                    details[uid] = detail
                    if detail is not None and detail.study.state in TERMINAL_STATES:
                        pending.discard(uid)
                if not pending or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
        finally:
            db.dispose()
        settled: list[Settled] = []
        for result in acknowledged:
            found = studies.get(result.input.sop_uid)
            detail = details.get(found) if found is not None else None
            if found is None or detail is None:
                settled.append(Settled(result, found, "missing", "lost", None))
                continue
            state = str(detail.study.state)
            if state not in TERMINAL_STATES:
                settled.append(Settled(result, found, state, "stuck", _describe(detail)))
            elif analysed(detail):
                settled.append(Settled(result, found, state, "analysed", None))
            else:
                outcome = "failed" if state == "failed" else "not_analysed"
                settled.append(Settled(result, found, state, outcome, failure_reason(detail)))
        return settled

    def refused_but_stored(self) -> list[InputResult]:
        """Inputs that must be refused: any that was acknowledged, or stored anyway."""
        must = [r for r in self.results if r.input.expect is Expect.REFUSED]
        stored = self.stored_study_of([r.input.sop_uid for r in must if r.input.sop_uid.isascii()])
        return [r for r in must if not r.refused or r.input.sop_uid in stored]

    def phi_leaks(self, study_uids: list[str]) -> list[str]:
        """Where a marker of patient data appears: the node's log, API responses, the CLI."""
        places: dict[str, str] = {"serve.log": self.node.log_text()}
        if self.node.alive():
            for path in ("/worklist?limit=1000", "/metrics"):
                places[path] = self.node.get(path).text
            for uid in study_uids:
                places[f"/studies/{uid}"] = self.node.get(f"/studies/{uid}").text
        listing = self.node.cli("studies", "list", "--limit", "100000")
        places["fracnode studies list"] = listing.stdout + listing.stderr
        return [
            f"{marker} in {where}"
            for where, text in places.items()
            for marker in PHI_MARKERS
            if marker in text
        ]


def _describe(detail: StudyDetail | None) -> str:
    if detail is None:
        return "the node has no such study"
    jobs = [(str(j.state), j.attempts, (j.last_error or "")[:120]) for j in detail.jobs]
    outputs = Counter(str(i.state) for i in detail.outbox)
    return f"state {detail.study.state}, jobs {jobs}, outputs {dict(outputs)}"


def summary_rows(results: list[InputResult]) -> dict[str, Counter[str]]:
    """Kind -> Counter of replies (statuses), for the report tables."""
    table: dict[str, Counter[str]] = {}
    for r in results:
        table.setdefault(r.input.kind.value, Counter())[r.status_text] += 1
    return table


def outcomes_by_kind(settled: list[Settled]) -> dict[str, Counter[str]]:
    table: dict[str, Counter[str]] = {}
    for s in settled:
        table.setdefault(s.result.input.kind.value, Counter())[s.outcome] += 1
    return table


def reasons(settled: list[Settled]) -> Counter[str]:
    """Processing failures by reason (the first 80 characters, numbers kept)."""
    return Counter(
        (s.reason or "(no reason)")[:80] for s in settled if s.outcome in ("failed", "not_analysed")
    )


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


ALL_KINDS = tuple(Kind)
