"""``fracnode config show``: the effective configuration, secrets masked."""

from __future__ import annotations

import argparse
import json

from node.settings import Settings, effective_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("config", help="show the effective configuration")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print the effective configuration as JSON (secrets masked)")
    show.set_defaults(handler=show_config)


def show_config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(effective_config(settings), indent=2, sort_keys=True))
    return 0
