"""Build a study's result objects, write them durably, and list what the outbox must deliver.

One TID 1500 SR per study revision and one Secondary Capture per analysed source frame
(``node.results``), plus an HL7 ORU^R01 for the RIS when one is configured. Files go to
``<results>/<study uid>/<revision>/`` with the same atomic, fsynced write as the spool; their
UIDs are derived from (study, model versions, revision), so rebuilding the same revision gives
the same files and the outbox's identity keys make re-enqueuing them a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from inference.values import ImageResult, Priority, StudyResult
from node.analysis import Analysis
from node.results.gradcam import build_gradcam_scs
from node.results.gsps import build_gsps
from node.results.overlay import build_overlays
from node.results.sr import build_sr
from node.results.summary import build_summary
from node.spool import write_durably
from storage.views import OutboxKind, OutboxRecord

log = logging.getLogger(__name__)

# PS3.7 C-STORE Priority (0000,0700).
DIMSE_MEDIUM = 0x0000
DIMSE_HIGH = 0x0001


@dataclass(frozen=True, slots=True)
class OutputConfig:
    directory: Path
    software_version: str
    destinations: tuple[str, ...]  # destination names from the settings
    sc_transfer_syntax: str = "explicit"
    summary_sc: bool = False
    gsps: bool = False
    hl7_destination: str | None = None  # "hl7" when a RIS endpoint is configured


@dataclass(frozen=True, slots=True)
class WrittenResult:
    files: tuple[tuple[str, Path], ...]  # (SOP Instance UID, path)
    outbox: tuple[OutboxRecord, ...]


def _save(ds: Dataset, path: Path) -> None:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    write_durably(path, buffer.getvalue())


def build_objects(analysis: Analysis, config: OutputConfig) -> list[Dataset]:
    """The SR and the overlays of one analysed study (no files written)."""
    result = analysis.result
    frames: dict[tuple[str, int], NDArray[np.float32]] = analysis.frames
    objects: list[Dataset] = [build_sr(result, analysis.sources, software_version=config.software_version)]
    if result.groups:
        objects.extend(
            build_overlays(
                result,
                analysis.sources,
                frames,
                software_version=config.software_version,
                transfer_syntax=config.sc_transfer_syntax,
            )
        )
        if config.summary_sc:
            objects.append(
                build_summary(
                    result,
                    analysis.sources,
                    software_version=config.software_version,
                    transfer_syntax=config.sc_transfer_syntax,
                )
            )
        if config.gsps:
            objects.extend(build_gsps(result, analysis.sources, software_version=config.software_version))
        if analysis.explanations:
            objects.extend(
                build_gradcam_scs(
                    result, analysis.sources, analysis.explanations, software_version=config.software_version
                )
            )
    return objects


def write_result(
    analysis: Analysis,
    config: OutputConfig,
    *,
    signal: bool,
    hl7_message: bytes | None = None,
) -> WrittenResult:
    """Write the objects and return the outbox records for every destination.

    ``signal`` is False when this revision's priority is lower than the one already signalled:
    its DICOM objects still go out (they supersede the older result in the PACS) but no new HL7
    message is pushed (the lower priority is recorded with the study instead).
    """
    result = analysis.result
    directory = config.directory / result.study_instance_uid / str(result.revision)
    written: list[tuple[str, Path]] = []
    for ds in build_objects(analysis, config):
        sop_uid = str(ds.SOPInstanceUID)
        path = directory / f"{sop_uid}.dcm"
        _save(ds, path)
        written.append((sop_uid, path))
    priority = DIMSE_HIGH if result.priority is Priority.URGENT else DIMSE_MEDIUM
    records: list[OutboxRecord] = [
        OutboxRecord(
            study_uid=result.study_instance_uid,
            revision=result.revision,
            kind=OutboxKind.DICOM,
            destination=destination,
            payload_path=str(path),
            sop_instance_uid=sop_uid,
            dimse_priority=priority,
        )
        for destination in config.destinations
        for sop_uid, path in written
    ]
    if hl7_message is not None and signal and config.hl7_destination is not None:
        path = directory / "oru.hl7"
        write_durably(path, hl7_message)
        records.append(
            OutboxRecord(
                study_uid=result.study_instance_uid,
                revision=result.revision,
                kind=OutboxKind.HL7,
                destination=config.hl7_destination,
                payload_path=str(path),
            )
        )
    return WrittenResult(tuple(written), tuple(records))


def routing_summary(image: ImageResult) -> dict[str, object]:
    """How an image's region was decided: source, region, confidence and, when the image
    classifier was asked, its answer (also when it was not trusted)."""
    r = image.routing
    out: dict[str, object] = {
        "sop_instance_uid": image.sop_instance_uid,
        "frame": image.frame,
        "region": str(r.region),
        "source": str(r.source),
        "confidence": round(r.confidence, 3),
        "out_of_group": r.out_of_group,
    }
    if r.guess is not None:
        out["image_classifier"] = {"region": str(r.guess), "confidence": round(r.guess_confidence or 0.0, 3)}
    if r.low_confidence:
        out["low_confidence"] = True
    return out


def summary(result: StudyResult) -> dict[str, object]:
    """The result as plain data for the study record and the API (no patient data)."""
    return {
        "revision": result.revision,
        "priority": str(result.priority),
        "priority_notes": list(result.priority_notes),
        "score": result.score,
        "groups": [
            {
                "group": str(g.group),
                "outcome": str(g.outcome),
                "probability": g.probability,
                "operating_point": g.operating_point,
                "regions": [str(r) for r in g.regions],
                "out_of_group": g.out_of_group,
                "models": [
                    {"name": c.name, "version": c.version, "device_uid": c.device_uid} for c in g.models
                ],
                "images": len(g.images),
                "boxes": sum(len(i.boxes) for i in g.images),
                "reason": g.reason,
                "routing": [routing_summary(i) for i in g.images],
            }
            for g in result.groups
        ],
        "not_analysed": [
            {
                "sop_instance_uid": i.sop_instance_uid,
                "frame": i.frame,
                "region": str(i.routing.region),
                "reason": i.error or i.routing.reason,
                **routing_summary(i),
            }
            for i in result.not_analysed
        ],
    }


def group_names(result: StudyResult) -> Sequence[str]:
    return [str(g.group) for g in result.groups]
