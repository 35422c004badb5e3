"""The ``fracnode`` command line.

Each command lives in a module of :mod:`node.commands` that defines
``register(subparsers) -> None``; the parser it adds sets ``handler`` to a function
``(args, settings) -> int``. Usage errors, invalid settings and :class:`CliError` exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pydicom.config

from node import __version__
from node.logcontext import ContextFilter
from node.redact import ValueFreeLogFilter
from node.settings import Settings, SettingsError, load_settings

log = logging.getLogger(__name__)

# One line per command module; keep the order of `fracnode --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "node.commands.serve",
    "node.commands.dicom_tools",
    "node.commands.studies",
    "node.commands.outbox",
    "node.commands.demo",
    "node.commands.evaluate",
    "node.commands.explain",
    "node.commands.train",
    "node.commands.calibrate",
    "node.commands.models",
    "node.commands.route",
    "node.commands.config",
)


class CliError(Exception):
    """A problem the operator can fix (bad path, unreachable peer): printed, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fracnode",
        description="DICOM node for fracture AI on radiographs. Results are not for diagnostic use.",
    )
    parser.add_argument("--version", action="version", version=f"fracnode {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="fracnode.toml to read (default: $FRACNODE_CONFIG, else ./fracnode.toml when present)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def configure_logging(level: str) -> None:
    """Logging for the whole process, once, from ``main``.

    No dataset value may reach the log: pydicom and highdicom quote the values they reject in
    their warnings, so warnings are routed into logging and :class:`ValueFreeLogFilter` on the
    handler withholds the text of those libraries' records; pydicom's reader is told not to
    validate (and so not to warn about) values it only reads (``reading_validation_mode``).
    """
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(ValueFreeLogFilter())  # first: it may replace the message
        handler.addFilter(ContextFilter())
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # pynetdicom logs every PDU at INFO; its warnings and errors are what an operator needs.
    # pynetdicom logs every PDU and highdicom every copied module at INFO; their warnings and
    # errors are what an operator needs.
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings: Settings = load_settings(args.config)
    except SettingsError as exc:
        print(f"fracnode: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.logging.level)
    try:
        return int(args.handler(args, settings))
    except CliError as exc:
        print(f"fracnode: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
