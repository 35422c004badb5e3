"""Crash figures (issue 11, item 5): kill -9 at random moments while 4 associations send 500
instances and results are exported to a storage SCP that counts what it receives.

The scenario is ``tests/crashrun.py`` (the test runs it with 200 instances and 5 kills).
Prints: kills (when, and whether instances were still arriving), instances acknowledged and
lost (acknowledged but not in the database or not whole in the spool), how the studies ended,
result objects expected (every DICOM outbox item) against those received, re-sends (the same SOP
Instance UID received more than once), and the time from the last restart until every study
was processed and every result delivered.

    nice .venv/bin/python bench/crash.py [--studies 50] [--per-study 10] [--senders 4] [--kills 8]
        [--seed 11] [--json var/bench/crash.json]
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

from tests import crashrun  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--per-study", type=int, default=10)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--recovery-bound", type=float, default=90.0, help="seconds after the last restart")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fracnode-crash-") as tmp:
        report = crashrun.run(
            Path(tmp),
            studies=args.studies,
            per_study=args.per_study,
            senders=args.senders,
            kills=args.kills,
            seed=args.seed,
            recovery_bound_s=args.recovery_bound,
        )
        log_tail = report.log.read_text(errors="replace")[-2000:] if report.recovered_within_s is None else ""
    figures = {
        "date": f"{datetime.now(UTC):%Y-%m-%d}",
        "machine": f"{platform.machine()}, python {platform.python_version()}",
        "instances": report.instances,
        "studies": report.studies,
        "senders": args.senders,
        "kills": len(report.kills),
        "kills_while_sending": sum(1 for k in report.kills if k.sending),
        "kill_moments_s": [round(k.at_s, 1) for k in report.kills],
        "acknowledged": len(report.acknowledged),
        "lost": len(report.lost),
        "study_states": dict(report.states),
        "not_analysed": len(report.not_analysed),
        "results_expected": len(report.expected_results),
        "results_received_distinct": len(set(report.received)),
        "results_missing": len(report.missing_at_destination),
        "results_unexpected": len(report.unexpected_at_destination),
        "resends": report.resends,
        "undelivered_items": len(report.undelivered_items),
        "recovered_after_last_restart_s": (
            round(report.recovered_within_s, 1) if report.recovered_within_s is not None else None
        ),
        "recovery_bound_s": report.recovery_bound_s,
        "sender_failures": dict(report.sender_failures),
        "peak_rss_gb": round(report.peak_rss / 1e9, 3),
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if log_tail:
        print("\nnode log tail:\n" + log_tail)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    ok = (
        not report.lost
        and report.recovered_within_s is not None
        and not report.missing_at_destination
        and report.states == {"done": report.studies}
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
