"""C-STORE ingest benchmark: the node's durable receive path against a bare pynetdicom SCP.

Both servers run in this process on 127.0.0.1 and receive the same images from the same
pynetdicom SCU in one association each, maximum PDU 1 MiB on both sides. The bare SCP
acknowledges without storing anything; fracnode parses the identity, writes the encoded dataset
with fsync + atomic rename + directory fsync, and records it in SQLite before answering. The
ratio of the two rates, measured in one run, is the cost of "nothing acknowledged is ever lost".

    .venv/bin/python bench/run.py [--images 40] [--size 2048]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dicomgen import DX_PRESENTATION, make_dataset  # noqa: E402
from tests.nodeproc import start_in_process  # noqa: E402

MAX_PDU = 1_048_576


def send_all(port: int, datasets: list[Any]) -> float:
    ae = AE(ae_title="BENCH")
    ae.maximum_pdu_size = MAX_PDU
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACNODE", max_pdu=MAX_PDU)
    assert assoc.is_established
    started = time.perf_counter()
    for ds in datasets:
        status = assoc.send_c_store(ds)
        assert status.Status == 0, hex(status.Status)
    elapsed = time.perf_counter() - started
    assoc.release()
    return elapsed


def bare_scp(port: int) -> AE:
    ae = AE(ae_title="FRACNODE")
    ae.maximum_pdu_size = MAX_PDU
    ae.add_supported_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    return ae


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()

    study, series = generate_uid(), generate_uid()
    pixels = np.random.default_rng(0).integers(0, 4096, size=(args.size, args.size), dtype=np.uint16)
    datasets = [
        make_dataset(
            study_uid=study,
            series_uid=series,
            rows=args.size,
            cols=args.size,
            pixels=pixels,
            instance_number=i,
        )
        for i in range(args.images)
    ]
    megabytes = args.images * pixels.nbytes / 1e6

    from tests.conftest import free_port

    bare_port = free_port()
    bare = bare_scp(bare_port)
    try:
        send_all(bare_port, datasets[:2])  # warm-up
        bare_s = send_all(bare_port, datasets)
    finally:
        bare.shutdown()

    with tempfile.TemporaryDirectory(
        dir=Path.cwd() / "var" if (Path.cwd() / "var").is_dir() else None
    ) as tmp:
        node = start_in_process(Path(tmp))
        try:
            node_s = send_all(node.port, datasets)
        finally:
            node.server.stop()
            node.db.dispose()

    print(f"machine: {platform.node()} {platform.machine()} python {platform.python_version()}")
    size = f"{args.size}x{args.size}"
    print(f"{args.images} DX images of {size} x 16 bit ({megabytes:.0f} MB), one association, PDU 1 MiB")
    for label, seconds in (
        ("bare pynetdicom SCP (stores nothing)", bare_s),
        ("fracnode durable ingest (fsync+db)", node_s),
    ):
        print(f"{label:<37} {args.images / seconds:7.1f} images/s {megabytes / seconds:7.1f} MB/s")
    print(f"ratio fracnode / bare: {bare_s / node_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
