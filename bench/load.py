"""Load figures (issue 11, item 7): 20 concurrent associations x 100 instances, with processing.

Starts a counting storage SCP and ``fracnode serve`` with the bundled models and
``dicom.max_associations`` equal to the number of senders; once every sender holds its
association, tries ``--extra`` more (each must get A-ASSOCIATE-RJ); then all senders send at
once. Prints the C-STORE latency per instance (p50, p95, max) seen by the senders, the
throughput, the time until every study was processed and every result delivered, and the node's
RSS (idle after start-up, peak sampled every 50 ms).

    nice .venv/bin/python bench/load.py [--senders 20] [--instances 100] [--per-study 10]
        [--size 512] [--extra 5] [--json var/bench/load.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import loadrun  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--instances", type=int, default=100, help="per sender")
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument("--size", type=int, default=512, help="rows and columns of each 12-bit image")
    parser.add_argument("--extra", type=int, default=5, help="associations tried beyond the limit")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fracnode-load-") as tmp:
        report = loadrun.run(
            Path(tmp),
            senders=args.senders,
            per_sender=args.instances,
            per_study=args.per_study,
            rows=args.size,
            cols=args.size,
            extra=args.extra,
            seed=args.seed,
            process_timeout_s=args.timeout,
        )
    total = args.senders * args.instances
    figures = {
        "date": f"{datetime.now(UTC):%Y-%m-%d}",
        "machine": f"{platform.machine()}, python {platform.python_version()}",
        "senders": args.senders,
        "instances": total,
        "image": f"{args.size}x{args.size} 12-bit",
        "statuses": dict(report.statuses),
        "stored": report.stored,
        "studies": report.studies,
        "analysed": report.analysed,
        "results_delivered": f"{report.delivered_results}/{report.expected_results}",
        "cstore_p50_ms": round(report.p50 * 1000, 1),
        "cstore_p95_ms": round(report.p95 * 1000, 1),
        "cstore_max_ms": round(max(report.latencies, default=0.0) * 1000, 1),
        "send_seconds": round(report.send_seconds, 1),
        "instances_per_second": round(total / report.send_seconds, 1) if report.send_seconds else None,
        "processed_and_delivered_seconds": (
            round(report.processed_seconds, 1) if report.processed_seconds is not None else None
        ),
        "rss_idle_gb": round(report.idle_rss / 1e9, 3),
        "rss_peak_gb": round(report.peak_rss / 1e9, 3),
        "extra_associations": dict(report.extra_attempts),
        "errors": report.errors,
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    ok = (
        report.stored == total
        and report.processed_seconds is not None
        and set(report.extra_attempts) == {"rejected"}
        and not report.errors
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
