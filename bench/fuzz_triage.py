"""Tracebacks for fuzz inputs that a node gave up on (the node logs only the exception type).

Regenerates inputs with ``tests.fuzzgen`` (same kind, count and seed as the campaign), writes
each as a spool file would be written (file meta + the bytes as sent), and runs the worker's
stages in this process with the bundled models: ``analyse_study``, ``write_result`` (SR and SC
builders) and the HL7 ORU builder. Prints one traceback per distinct failure site, with the
inputs that reach it. For a developer's eyes: the tracebacks may quote dataset values.

    .venv/bin/python bench/fuzz_triage.py [--kind missing_attribute ...] [--count 24] [--seed 20261204]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry  # noqa: E402
from pydicom.dataset import FileMetaDataset  # noqa: E402
from pydicom.filewriter import write_file_meta_info  # noqa: E402
from pydicom.uid import UID  # noqa: E402

from inference.routing import load_keywords  # noqa: E402
from node import __version__  # noqa: E402
from node.analysis import AnalysisConfig, analyse_study  # noqa: E402
from node.hl7 import build_oru  # noqa: E402
from node.ingest import IngestError, read_identity  # noqa: E402
from node.metrics import Metrics  # noqa: E402
from node.outputs import OutputConfig, write_result  # noqa: E402
from node.service import load_models  # noqa: E402
from node.settings import Settings  # noqa: E402
from tests.fuzzgen import FuzzInput, Kind, generate  # noqa: E402


def spool_file(item: FuzzInput, directory: Path) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(item.sop_class)
    meta.MediaStorageSOPInstanceUID = UID(item.sop_uid if item.sop_uid.isascii() else "1.2.3")
    meta.TransferSyntaxUID = UID(item.transfer_syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.9.7433.1.1")
    path = directory / f"{item.index}.dcm"
    with path.open("wb") as fp:
        fp.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fp, meta)  # type: ignore[arg-type]
        fp.write(item.data)
    return path


def acknowledged(item: FuzzInput) -> bool:
    """Whether the node's C-STORE handler would store the input (its identity parses and is valid)."""
    syntax = UID(item.transfer_syntax)
    try:
        identity = read_identity(
            item.data, implicit_vr=syntax.is_implicit_VR, little_endian=True, deflated=syntax.is_deflated
        )
    except IngestError:
        return False
    return identity.sop_uid == item.sop_uid.strip(" \x00") and identity.sop_class_uid == item.sop_class


def process(item: FuzzInput, directory: Path, models: object, metrics: Metrics) -> str | None:
    """The worker's stages on one input; the traceback of the first failure, or None."""
    try:
        path = spool_file(item, directory)
        analysis = analyse_study(
            item.study_uid,
            1,
            [path],
            models=models,  # type: ignore[arg-type]
            keywords=load_keywords(None),
            config=AnalysisConfig(),
            metrics=metrics,
        )
        outputs = OutputConfig(
            directory=directory / "results", software_version=__version__, destinations=("pacs",)
        )
        write_result(analysis, outputs, signal=True, hl7_message=None)
        build_oru(
            analysis.result,
            accession_number=None,
            sending_app="FRACNODE",
            receiving_app="RIS",
            receiving_facility="HOSPITAL",
            control_id="FN1",
        )
    except Exception:  # noqa: BLE001 - collecting what the node's job boundary catches
        return traceback.format_exc(limit=-8)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", action="append", choices=[k.value for k in Kind], default=None)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=20261204)
    args = parser.parse_args()
    kinds = [Kind(k) for k in args.kind] if args.kind else list(Kind)
    warnings.simplefilter("ignore")
    models = load_models(Settings())
    metrics = Metrics(CollectorRegistry())
    sites: dict[str, list[str]] = defaultdict(list)
    examples: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for item in generate(kind, args.count, args.seed):
                if not acknowledged(item):
                    continue
                found = process(item, Path(tmp), models, metrics)
                if found is None:
                    continue
                lines = found.strip().splitlines()
                site = (
                    lines[-1].split(":")[0]
                    + " @ "
                    + next((line.strip() for line in reversed(lines) if line.strip().startswith("File")), "?")
                )
                sites[site].append(item.label)
                examples.setdefault(site, found)
    for site, labels in sorted(sites.items(), key=lambda kv: -len(kv[1])):
        print(f"=== {len(labels)} inputs: {site}")
        print("inputs:", sorted(set(labels))[:12])
        print(examples[site])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
