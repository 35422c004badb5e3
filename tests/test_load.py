"""Concurrent senders against `fracnode serve` (issue 11, item 7): 20 associations x 10 instances.

Everything sent is stored, processed and delivered; the associations beyond
``dicom.max_associations`` are refused with A-ASSOCIATE-RJ (not a reset, not a hang); the node's
peak RSS stays under a generous bound. Latencies and RSS figures are printed, not asserted:
``bench/load.py`` measures 20 x 100 and reports p50/p95 and peak RSS.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import loadrun

RSS_BOUND = int(1.5 * 1024**3)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_twenty_associations_stored_processed_and_refusals_above_the_limit_clean(tmp_path: Path) -> None:
    report = loadrun.run(
        tmp_path,
        senders=20,
        per_sender=10,
        per_study=5,
        rows=256,
        cols=256,
        extra=5,
        seed=7,
        process_timeout_s=240,
    )
    print(
        f"\n{report.senders} x {report.per_sender} instances of {report.size}: C-STORE p50 "
        f"{report.p50 * 1000:.0f} ms, p95 {report.p95 * 1000:.0f} ms; sent in {report.send_seconds:.1f} s, "
        f"processed and delivered in {report.processed_seconds} s; RSS idle {report.idle_rss / 1e9:.2f} GB, "
        f"peak {report.peak_rss / 1e9:.2f} GB; extra associations {dict(report.extra_attempts)}"
    )
    assert not report.errors, report.errors
    assert report.extra_attempts == {"rejected": 5}, report.extra_attempts
    assert report.statuses == {"0x0000": 200}, report.statuses
    assert report.stored == 200
    assert report.processed_seconds is not None, "not every study was processed and delivered in time"
    assert report.analysed == report.studies == 40
    assert report.delivered_results == report.expected_results > 0
    assert report.peak_rss < RSS_BOUND, f"peak RSS {report.peak_rss / 1e9:.2f} GB"
