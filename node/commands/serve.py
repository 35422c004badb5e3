"""``fracnode serve``: run the node until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

from node.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("serve", help="receive studies, analyse them and send results back")
    parser.set_defaults(handler=serve)


def serve(args: argparse.Namespace, settings: Settings) -> int:
    from node.service import Node  # the whole node (and torch) loads only for this command

    Node(settings).serve_forever()
    return 0
