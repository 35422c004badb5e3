"""The long fuzz campaign (issue 11, item 4): ``tests/test_fuzz.py``'s generators, 10,000+ inputs.

Starts a counting storage SCP and ``fracnode serve`` (bundled models, defaults but for short
quiet windows and export delays), then sends batches that mix every kind of
``tests.fuzzgen`` (each input on its own association, bytes as generated) plus malformed PDUs on
the raw socket, and after every batch one well-formed study that must be analysed and delivered.
At the end it waits for every acknowledged input's study to end and prints:

- inputs by kind and the replies (DIMSE statuses, or aborted/closed/reset/timeout);
- what became of acknowledged inputs (analysed / not analysed / failed / stuck / lost), and the
  processing failures by reason;
- malformed PDUs by how the node ended the connection;
- node deaths and restarts needed (a correct node needs 0), RSS watchdog kills, peak RSS;
- well-formed studies analysed and delivered after their batch, and their latency;
- patient-data markers found in the log, API or CLI (must be none).

    nice .venv/bin/python bench/fuzz.py [--count 10000] [--seed 20261204] [--batch 240]
        [--pdus-per-batch 12] [--json var/bench/fuzz.json]

A node that died or whose good study did not come through in ``--good-timeout`` s is restarted
(counted) so that the campaign can finish and report everything it found.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzgen import FuzzInput, campaign  # noqa: E402
from tests.fuzzrun import FuzzCampaign, outcomes_by_kind, reasons, summary_rows  # noqa: E402
from tests.nodeharness import CountingDestination, NodeOptions, NodeProcess  # noqa: E402
from tests.rawdicom import hostile_pdu, send_hostile  # noqa: E402


def _table(title: str, rows: dict[str, Counter[str]]) -> str:
    columns = sorted({c for counter in rows.values() for c in counter})
    width = max([len(k) for k in rows] + [len(title)])
    lines = [f"{title:<{width}}  " + "  ".join(f"{c:>10}" for c in columns) + f"  {'total':>7}"]
    for key in sorted(rows):
        counter = rows[key]
        cells = "  ".join(f"{counter.get(c, 0):>10}" for c in columns)
        lines.append(f"{key:<{width}}  {cells}  {sum(counter.values()):>7}")
    totals = Counter[str]()
    for counter in rows.values():
        totals.update(counter)
    lines.append(
        f"{'all':<{width}}  "
        + "  ".join(f"{totals.get(c, 0):>10}" for c in columns)
        + f"  {sum(totals.values()):>7}"
    )
    return "\n".join(lines)


def _batch(
    run: FuzzCampaign,
    node: NodeProcess,
    inputs: list[FuzzInput],
    pdu_rng: random.Random,
    pdu_replies: dict[str, Counter[str]],
    pdus: int,
) -> None:
    """``pdus`` malformed PDUs on the raw socket, then the batch and its well-formed study."""
    for _ in range(pdus):
        label, payload, after_associate = hostile_pdu(pdu_rng)
        try:
            closed = send_hostile(node.dicom_port, payload, associate_first=after_associate, bound=30.0)
            reply = closed.reply.value
        except OSError as exc:
            reply = f"error:{type(exc).__name__}"
        pdu_replies.setdefault(label.split(":")[0], Counter())[reply] += 1
        run.ensure_running()
    run.run_batch(inputs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=10_000, help="dataset inputs in all")
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--batch", type=int, default=240, help="inputs between two well-formed studies")
    parser.add_argument("--pdus-per-batch", type=int, default=12, help="malformed PDUs per batch")
    parser.add_argument("--good-timeout", type=float, default=300.0)
    parser.add_argument("--settle", type=float, default=600.0, help="seconds to wait for the last studies")
    parser.add_argument("--workdir", type=Path, default=None, help="node directory (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="start no new batch after this long (the report gives the exact count sent); Ctrl-C too",
    )
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="fracnode-fuzz-"))
    destination = CountingDestination()
    destination.start()
    node = NodeProcess(root / "node", NodeOptions(extra=destination.toml("pacs"), max_associations=16))
    started = time.monotonic()
    node.start()
    run = FuzzCampaign(node, destination, good_timeout_s=args.good_timeout)
    pdu_rng = random.Random(f"pdu:{args.seed}")
    pdu_replies: dict[str, Counter[str]] = {}
    sent = 0
    print(f"fuzz campaign: {args.count} inputs, seed {args.seed}, batches of {args.batch}, node in {root}")
    try:
        stopped = ""
        for number, inputs in enumerate(campaign(args.count, args.seed, args.batch), start=1):
            if args.max_minutes is not None and time.monotonic() - started > args.max_minutes * 60:
                stopped = f"stopped after {args.max_minutes:g} min (--max-minutes)"
                break
            try:
                _batch(run, node, inputs, pdu_rng, pdu_replies, args.pdus_per_batch)
            except KeyboardInterrupt:
                stopped = "interrupted"
                break
            sent += len(inputs)
            good = run.good[-1]
            acknowledged = sum(1 for r in run.results[-len(inputs) :] if r.acknowledged)
            print(
                f"batch {number:>3}: {sent:>6} inputs, {acknowledged:>3} acknowledged, good study "
                f"{'analysed+delivered' if good.analysed and good.delivered else 'NOT ' + good.detail[:80]} "
                f"in {good.seconds:5.1f} s, RSS {node.rss() / 1e9:.2f} GB (peak {node.peak_rss / 1e9:.2f}), "
                f"restarts {run.restarts}, {time.monotonic() - started:6.0f} s",
                flush=True,
            )
        settled = run.settle(args.settle)
        study_uids = sorted({s.study_uid for s in settled if s.study_uid} | {g.study_uid for g in run.good})
        leaks = run.phi_leaks(study_uids)
        elapsed = time.monotonic() - started
        outcomes = outcomes_by_kind(settled)
        replies = summary_rows(run.results)
        goods = run.good
        good_ok = [g for g in goods if g.analysed and g.delivered]
        failures = reasons(settled)
        print()
        print(
            f"machine: {platform.machine()} {platform.node()}, python {platform.python_version()}; "
            f"date {datetime.now(UTC):%Y-%m-%d}; elapsed {elapsed:.0f} s"
        )
        print(
            f"inputs: {len(run.results)} datasets + {sum(sum(c.values()) for c in pdu_replies.values())} "
            f"malformed PDUs; seed {args.seed}" + (f"; {stopped}" if stopped else "")
        )
        print()
        print(_table("replies by kind", replies))
        print()
        print(_table("acknowledged inputs", outcomes))
        print()
        print("processing failures by reason:")
        for reason, count in failures.most_common(25):
            print(f"  {count:>6}  {reason}")
        print()
        print(_table("malformed PDUs", pdu_replies))
        print()
        latencies = [g.seconds for g in good_ok]
        print(
            f"well-formed studies analysed and delivered after their batch: {len(good_ok)}/{len(goods)}"
            + (
                f" (median {statistics.median(latencies):.1f} s, max {max(latencies):.1f} s)"
                if latencies
                else ""
            )
        )
        print(
            f"node deaths: {run.deaths}; restarts needed: {run.restarts}; RSS watchdog kills: "
            f"{node.watchdog_kills}; peak RSS: {node.peak_rss / 1e9:.2f} GB"
        )
        print(f"patient-data markers found: {len(leaks)}" + (f" ({leaks[:5]})" if leaks else ""))
        stuck = [s for s in settled if s.outcome in ("stuck", "lost")]
        if stuck:
            print(f"stuck or lost: {len(stuck)}, e.g. {[(s.result.input.label, s.state) for s in stuck[:5]]}")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps(
                    {
                        "date": f"{datetime.now(UTC):%Y-%m-%d}",
                        "machine": platform.machine(),
                        "count": len(run.results),
                        "seed": args.seed,
                        "stopped": stopped or None,
                        "elapsed_s": round(elapsed),
                        "replies_by_kind": replies,
                        "outcomes_by_kind": outcomes,
                        "failure_reasons": dict(failures.most_common()),
                        "malformed_pdus": pdu_replies,
                        "good_studies": [len(good_ok), len(goods)],
                        "deaths": run.deaths,
                        "restarts": run.restarts,
                        "watchdog_kills": node.watchdog_kills,
                        "peak_rss_bytes": node.peak_rss,
                        "phi_leaks": leaks,
                        "stuck_or_lost": [(s.result.input.label, s.state) for s in stuck],
                    },
                    indent=2,
                )
            )
        ok = not stuck and not leaks and run.restarts == 0 and len(good_ok) == len(goods)
        return 0 if ok else 1
    finally:
        node.close()
        destination.stop()


if __name__ == "__main__":
    raise SystemExit(main())
