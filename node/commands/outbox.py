"""``fracnode outbox list / retry / purge``: the results waiting for, or given up on, delivery."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from node.cli import CliError
from node.commands.studies import non_negative_int, page_note, positive_int
from node.database import open_database
from node.settings import Settings
from storage import repo
from storage.views import OutboxState


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("outbox", help="results to deliver: list, retry dead letters, purge")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per item")
    listing.add_argument("--state", choices=[s.value for s in OutboxState], default=None)
    listing.add_argument("--limit", type=positive_int, default=500, help="at most this many (default 500)")
    listing.add_argument("--offset", type=non_negative_int, default=0, help="skip this many first (paging)")
    listing.set_defaults(handler=list_items)
    retry = actions.add_parser("retry", help="send items again now (default: every dead letter)")
    retry.add_argument("ids", nargs="*", type=int, help="outbox item ids")
    retry.set_defaults(handler=retry_items)
    purge = actions.add_parser("purge", help="delete delivered and/or dead items")
    purge.add_argument(
        "--state",
        action="append",
        choices=[OutboxState.DELIVERED.value, OutboxState.DEAD.value],
        required=True,
        help="state to purge (repeatable)",
    )
    purge.add_argument("--older-than-days", type=float, default=None)
    purge.set_defaults(handler=purge_items)


def list_items(args: argparse.Namespace, settings: Settings) -> int:
    db = open_database(settings)
    try:
        state = OutboxState(args.state) if args.state else None
        items = repo.list_outbox(db, state, limit=args.limit, offset=args.offset)
        total = repo.count_outbox(db, state)
    finally:
        db.dispose()
    print(
        f"{'ID':>6}  {'STATE':<9} {'KIND':<5} {'DESTINATION':<16} {'TRIES':>5} {'STATUS':<7} "
        f"{'NEXT ATTEMPT':<19}  STUDY / ERROR"
    )
    for item in items:
        status = "-" if item.last_status is None else f"0x{item.last_status:04X}"
        nxt = item.next_attempt_at.isoformat(timespec="seconds")[:19]
        print(
            f"{item.id:>6}  {item.state:<9} {item.kind:<5} {item.destination:<16} {item.attempts:>5} "
            f"{status:<7} {nxt:<19}  {item.study_uid} r{item.revision}"
            f"{'  ' + item.last_error if item.last_error else ''}"
        )
    print(page_note(len(items), total, args.offset))
    return 0


def retry_items(args: argparse.Namespace, settings: Settings) -> int:
    db = open_database(settings)
    try:
        count = repo.retry_outbox(db, args.ids or None)
    finally:
        db.dispose()
    if args.ids and count != len(args.ids):
        raise CliError(f"{count} of {len(args.ids)} items can be retried (unknown ids or already delivered)")
    print(f"{count} items will be sent again")
    return 0


def purge_items(args: argparse.Namespace, settings: Settings) -> int:
    before = None
    if args.older_than_days is not None:
        if args.older_than_days < 0:
            raise CliError("--older-than-days must be >= 0")
        before = datetime.now(UTC).timestamp() - args.older_than_days * 86400
    db = open_database(settings)
    try:
        count = repo.purge_outbox(
            db,
            [OutboxState(s) for s in args.state],
            before=datetime.fromtimestamp(before, UTC) if before is not None else None,
        )
    finally:
        db.dispose()
    print(f"{count} items purged")
    return 0
