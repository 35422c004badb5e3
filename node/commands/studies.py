"""``fracnode studies list`` / ``show UID``: what the node holds, without patient names."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime
from typing import Any

from node.cli import CliError
from node.database import open_database
from node.settings import Settings
from node.uids import is_valid_uid
from storage import repo


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("studies", help="list the studies the node holds")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="one line per study: state, counts, timestamps")
    listing.add_argument("--state", default=None, help="only studies in this state")
    listing.add_argument("--limit", type=positive_int, default=100, help="at most this many (default 100)")
    listing.add_argument("--offset", type=non_negative_int, default=0, help="skip this many first (paging)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=list_studies)
    show = actions.add_parser("show", help="one study in detail")
    show.add_argument("uid", help="Study Instance UID")
    show.set_defaults(handler=show_study)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def list_studies(args: argparse.Namespace, settings: Settings) -> int:
    db = open_database(settings)
    try:
        try:
            studies = repo.list_studies(db, state=args.state, limit=args.limit, offset=args.offset)
            total = repo.count_studies(db, state=args.state)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    finally:
        db.dispose()
    note = page_note(len(studies), total, args.offset)
    if args.json:
        print(json.dumps([_plain(s) for s in studies], indent=2))
        print(note, file=sys.stderr)
        return 0
    header = (
        f"{'STUDY INSTANCE UID':<64}  {'STATE':<10} {'REV':>3} {'INST':>4}  {'LAST RECEIVED':<19}  PRIORITY"
    )
    print(header)
    for s in studies:
        last = s.last_received_at.isoformat(timespec="seconds")[:19] if s.last_received_at else "-"
        print(
            f"{s.uid:<64}  {s.state:<10} {s.revision:>3} {s.instance_count:>4}  "
            f"{last:<19}  {s.priority or '-'}"
        )
    print(note)
    return 0


def page_note(count: int, total: int, offset: int) -> str:
    """The line under a listing: which rows of how many, and how to see the rest."""
    if count == 0:
        return f"no rows at offset {offset} of {total}" if total else "nothing to list"
    more = offset + count < total
    tail = f"; more with --offset {offset + count}" if more else ""
    return f"rows {offset + 1}-{offset + count} of {total}{tail}"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def show_study(args: argparse.Namespace, settings: Settings) -> int:
    if not is_valid_uid(args.uid):
        raise CliError(f"{args.uid!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    db = open_database(settings)
    try:
        detail = repo.get_study(db, args.uid)
    finally:
        db.dispose()
    if detail is None:
        raise CliError(f"no study {args.uid} on this node")
    print(json.dumps(_plain(detail), indent=2))
    return 0
