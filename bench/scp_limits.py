"""How long bad peers hold a `fracnode serve` node, against the configured bounds (issue 11).

Starts ``fracnode serve`` (ingest only) on 127.0.0.1 and plays the peers that used to silence
it: a request that stalls after 3 bytes, a request trickled at 1 byte/s, a PDU trickled at
1 byte/s inside an association, a silent association, 16 stalled sockets beside a real sender,
20 bad PDUs followed by a real sender, and 24 simultaneous associations against
``max_associations = 16``. Prints each observed time next to its bound.

    .venv/bin/python bench/scp_limits.py [--acse 5] [--network 10] [--give-up S]

"inf" means the connection was still open when the bench gave up waiting.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import free_port  # noqa: E402
from tests.nodeproc import start_serve, write_config  # noqa: E402
from tests.test_scp_limits import association_request  # noqa: E402


def seconds_until_closed(sock: socket.socket, limit: float) -> float:
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return float("inf")
    return time.monotonic() - started


def trickle(sock: socket.socket, data: bytes, every: float = 1.0) -> None:
    def run() -> None:
        try:
            for byte in data:
                sock.sendall(bytes([byte]))
                time.sleep(every)
        except OSError:
            return

    threading.Thread(target=run, daemon=True).start()


def echo(port: int) -> tuple[bool, float]:
    started = time.monotonic()
    ae = AE(ae_title="BENCH")
    ae.acse_timeout = 30
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACNODE")
    ok = assoc.is_established and int(assoc.send_c_echo().Status) == 0
    if assoc.is_established:
        assoc.release()
    return ok, time.monotonic() - started


def read_pdu_type(sock: socket.socket) -> int:
    header = b""
    while len(header) < 6:
        header += sock.recv(6 - len(header))
    _, _, length = struct.unpack(">BBL", header)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return header[0]


class Rows:
    """Prints each result as it comes: a peer that is never closed shows up before the next."""

    def append(self, row: tuple[str, str, str]) -> None:
        name, bound, observed = row
        print(f"{name:50} {bound:>8} {observed:>14}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--acse", type=float, default=5.0, help="dicom.acse_timeout_s")
    parser.add_argument("--network", type=float, default=10.0, help="dicom.network_timeout_s")
    parser.add_argument("--give-up", type=float, help="stop waiting for a close after this many s")
    args = parser.parse_args()
    limit = args.give_up or 10 * max(args.acse, args.network) + 30
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {date.today()}")
    print(f"{'peer':50} {'bound s':>8} {'observed s':>14}", flush=True)
    rows = Rows()

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = write_config(Path(tmp) / "node", port, extra="[worker]\nthreads = 0\n")
        env = {
            "FRACNODE_DICOM__ACSE_TIMEOUT_S": str(args.acse),
            "FRACNODE_DICOM__NETWORK_TIMEOUT_S": str(args.network),
            "FRACNODE_DICOM__MAX_ASSOCIATIONS": "16",
        }
        node = start_serve(config, port, Path(tmp) / "serve.log", env=env)
        try:

            def connect(data: bytes = b"") -> socket.socket:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                if data:
                    sock.sendall(data)
                return sock

            with connect(b"\x01\x00\x00") as sock:
                took = seconds_until_closed(sock, limit)
            rows.append(("request stalled after 3 bytes", f"{args.acse:g}", f"{took:.2f}"))

            with connect() as sock:
                trickle(sock, association_request())
                took = seconds_until_closed(sock, limit)
            rows.append(("request trickled at 1 byte/s", f"{args.acse:g}", f"{took:.2f}"))

            with connect(association_request()) as sock:
                assert read_pdu_type(sock) == 0x02
                sock.sendall(struct.pack(">BBL", 0x04, 0, 200))
                trickle(sock, bytes(200))
                took = seconds_until_closed(sock, limit)
            rows.append(("P-DATA trickled at 1 byte/s in an association", f"{args.network:g}", f"{took:.2f}"))

            with connect(association_request()) as sock:
                assert read_pdu_type(sock) == 0x02
                took = seconds_until_closed(sock, limit)
            rows.append(("association silent after A-ASSOCIATE-AC", f"{args.network:g}", f"{took:.2f}"))

            opened = time.monotonic()
            stalled = [connect(b"\x01\x00\x00") for _ in range(16)]
            ok, took = echo(port)
            rows.append(
                ("C-ECHO beside 16 stalled sockets", "at once", f"{'ok' if ok else 'REFUSED'} {took:.2f}")
            )
            for s in stalled:
                seconds_until_closed(s, max(opened + limit - time.monotonic(), 0.01))
            took = time.monotonic() - opened
            took = took if took < limit else float("inf")
            rows.append(("  the 16 stalled sockets all closed after", f"{args.acse:g}", f"{took:.2f}"))
            for s in stalled:
                s.close()

            given_up = time.monotonic() + limit
            for _ in range(20):
                with connect(b"\x09\x00\x00\x00\x00\x02ab") as sock:  # unknown PDU type 0x09
                    seconds_until_closed(sock, max(given_up - time.monotonic(), 0.01))
            ok, took = echo(port)
            rows.append(
                ("C-ECHO right after 20 bad PDUs", "at once", f"{'ok' if ok else 'REFUSED'} {took:.2f}")
            )

            rows.append(("admitted of 24 simultaneous, max 16", "16", str(simultaneous(port, 24))))
        finally:
            node.stop()


def simultaneous(port: int, attempts: int) -> int:
    barrier = threading.Barrier(attempts)
    established: list[object] = []
    held: list[Callable[[], None]] = []
    lock = threading.Lock()

    def attempt() -> None:
        ae = AE(ae_title="BENCH")
        ae.acse_timeout = 30
        ae.add_requested_context(Verification)
        barrier.wait()
        assoc = ae.associate("127.0.0.1", port, ae_title="FRACNODE")
        with lock:
            if assoc.is_established:
                established.append(assoc)
                held.append(assoc.release)

    threads = [threading.Thread(target=attempt) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    count = len(established)
    for release in held:
        release()
    return count


if __name__ == "__main__":
    main()
