"""``fracnode echo HOST PORT`` and ``fracnode send FILES_OR_DIRS``: operator SCU tools."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.cli import CliError
from node.export import Peer, send_files
from node.settings import Settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    _peer_arguments(echo)
    echo.set_defaults(handler=run_echo)

    send = sub.add_parser("send", help="C-STORE files to a DICOM peer in their own transfer syntax")
    send.add_argument("paths", nargs="+", type=Path, metavar="FILES_OR_DIRS")
    send.add_argument("--host", default=None, help="peer host (default: this node's dicom.host)")
    send.add_argument("--port", type=int, default=None, help="peer port (default: this node's dicom.port)")
    send.add_argument(
        "--ae",
        "--called-ae",
        dest="called_ae",
        default=None,
        help="called AE title (default: this node's dicom.ae_title)",
    )
    send.add_argument("--calling-ae", default="FRACNODE_SCU", help="our AE title")
    send.set_defaults(handler=run_send)


def _peer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--ae", "--called-ae", dest="called_ae", default="ANY-SCP", help="called AE title")
    parser.add_argument("--calling-ae", default="FRACNODE_SCU", help="our AE title")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds")


def run_echo(args: argparse.Namespace, settings: Settings) -> int:
    ae = AE(ae_title=args.calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate(args.host, args.port, ae_title=args.called_ae)
    if not assoc.is_established:
        raise CliError(f"no association with {args.called_ae} at {args.host}:{args.port}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code != 0:
        raise CliError(f"C-ECHO failed (status {code if code is None else hex(code)})")
    print(f"C-ECHO {args.called_ae} at {args.host}:{args.port}: success")
    return 0


def collect_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise CliError(f"{path}: no such file or directory")
    return files


def is_dicom_file(path: Path) -> bool:
    """A DICOM file (PS3.10): 128-byte preamble then "DICM"."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def run_send(args: argparse.Namespace, settings: Settings) -> int:
    files = []
    for path in collect_files(args.paths):
        if is_dicom_file(path):
            files.append(path)
        else:
            print(f"skipped         {path}  (not a DICOM file)")
    if not files:
        raise CliError("no DICOM files to send")
    # Send each file's bytes as they are on disk instead of decoding and re-encoding them.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    peer = Peer(
        ae_title=args.called_ae or settings.dicom.ae_title,
        host=args.host or settings.dicom.host,
        port=args.port or settings.dicom.port,
    )
    outcomes = send_files(peer, files, calling_ae=args.calling_ae, max_pdu=settings.dicom.max_pdu_bytes)
    failed = 0
    for path, outcome in zip(files, outcomes, strict=False):
        state = "ok" if outcome.delivered else "FAILED"
        status = "-" if outcome.status is None else f"0x{outcome.status:04X}"
        print(f"{state:<6} {status:<7} {path}{'  ' + outcome.error if outcome.error else ''}")
        failed += 0 if outcome.delivered else 1
    print(f"{len(files) - failed} of {len(files)} sent to {peer.ae_title} at {peer.host}:{peer.port}")
    return 0 if failed == 0 else 1
