"""Fractured FracAtlas `valid` hand and leg images, wrapped as DICOM and sent to a running
`fracnode serve` with the bundled models: how many of their delivered SRs carry a box that
overlaps a truth box (issue 12's end-to-end count; the figure goes into docs/models.md).

Each image becomes a one-image DX study (BodyPartExamined HAND or LEG, so routing is by the
header); results are delivered to a storage SCP; the SR objects that reached it are read back
from the node's outbox (the very files sent) and their TID 1500 image regions compared with
the image's YOLO truth boxes in source pixels. The SC of an image shows the same boxes as its
SR (both are drawn from one result), so an SR hit is an SC hit.

    .venv/bin/python -m pytest tests/test_e2e_boxes.py -s     # prints the counts
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.datasets import read_yolo_boxes
from storage.config import StorageConfig
from storage.db import Database
from tests.conftest import DATASETS
from tests.dicomgen import make_dataset
from tests.nodeharness import (
    CountingDestination,
    NodeOptions,
    NodeProcess,
    delivered_sop_uids,
    send_datasets,
    study_details,
    wait_until,
)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# At most this many images per region (hand, leg); valid has 49 hand and fewer leg-only fractures.
PER_REGION = int(os.environ.get("FRACNODE_E2E_BOXES", "6"))


def _valid_fractures(root: Path, region: str, count: int) -> list[tuple[Path, list[tuple[float, ...]]]]:
    out = []
    with (root / "labels.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["split"] != "valid" or row["fractured"] != "1" or row["region"] != region:
                continue
            path = root / "images" / row["image_id"]
            boxes = read_yolo_boxes(root / "yolo" / f"{path.stem}.txt")
            if path.is_file() and boxes:
                out.append((path, [tuple(b) for b in boxes]))
            if len(out) == count:
                break
    return out


def _dicom_of(path: Path, body_part: str) -> Dataset:
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L"), dtype=np.uint8)
    rows, cols = pixels.shape
    return make_dataset(
        rows=rows,
        cols=cols,
        bits_stored=8,
        pixels=pixels,
        body_part=body_part,
        study_description=f"XR {body_part}",
        series_description=f"{body_part} AP",
        view="AP",
        study_uid=generate_uid(),
        series_uid=generate_uid(),
    )


def _regions(sr: Dataset) -> Iterator[tuple[str, tuple[float, float, float, float]]]:
    """(referenced SOP Instance UID, bounding box in source pixels) of every SCOORD image region."""
    stack = list(getattr(sr, "ContentSequence", []))
    while stack:
        item = stack.pop()
        children = list(getattr(item, "ContentSequence", []))
        stack.extend(children)
        if getattr(item, "ValueType", None) != "SCOORD":
            continue
        xy = np.asarray(item.GraphicData, dtype=np.float64).reshape(-1, 2)
        refs = [
            str(ref.ReferencedSOPInstanceUID)
            for child in children
            for ref in getattr(child, "ReferencedSOPSequence", [])
        ]
        for ref in refs:
            yield ref, (xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@pytest.mark.slow
def test_fractured_valid_images_through_the_node_carry_boxes_on_their_fractures(tmp_path: Path) -> None:
    root = DATASETS / "fracatlas"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"../shared/datasets/fracatlas is not present ({root})")
    chosen = [(p, b, "HAND") for p, b in _valid_fractures(root, "hand", PER_REGION)]
    chosen += [(p, b, "LEG") for p, b in _valid_fractures(root, "leg", PER_REGION)]
    assert {body for _, _, body in chosen} == {"HAND", "LEG"}
    datasets = [_dicom_of(path, body_part) for path, _, body_part in chosen]

    with CountingDestination() as pacs:
        node = NodeProcess(tmp_path / "node", NodeOptions(extra=pacs.toml("pacs")))
        node.start()
        try:
            sent = send_datasets(node.dicom_port, datasets)
            assert [s.status for s in sent] == [0] * len(sent)
            db = Database(StorageConfig(f"sqlite:///{tmp_path / 'node' / 'fracnode.db'}"))
            uids = [str(ds.StudyInstanceUID) for ds in datasets]

            def all_delivered() -> bool:
                details = study_details(db, uids)
                return all(
                    d is not None and d.study.state == "done" and d.outbox
                    and len(delivered_sop_uids(d)) == len(d.outbox)
                    for d in details.values()
                )

            wait_until(all_delivered, 600, "every study analysed and delivered")
            details = study_details(db, uids)
        finally:
            node.stop()

    counts = {"HAND": [0, 0, 0, 0], "LEG": [0, 0, 0, 0]}  # images, with boxes, overlapping, IoU >= 0.3
    for (_, truth_norm, body_part), ds in zip(chosen, datasets, strict=True):
        detail = details[str(ds.StudyInstanceUID)]
        assert detail is not None
        objects = [pydicom.dcmread(item.payload_path) for item in detail.outbox if item.kind == "dicom"]
        srs = [o for o in objects if o.SOPClassUID == COMPREHENSIVE_3D_SR]
        assert len(srs) == 1, "one SR per analysed study"
        boxes = [box for ref, box in _regions(srs[0]) if ref == str(ds.SOPInstanceUID)]
        for x0, y0, x1, y1 in boxes:  # every box maps back inside the source image
            assert -0.5 <= x0 <= x1 <= ds.Columns + 0.5 and -0.5 <= y0 <= y1 <= ds.Rows + 0.5
        w, h = float(ds.Columns), float(ds.Rows)
        truth = [(a * w, b * h, c * w, d * h) for a, b, c, d in truth_norm]
        best = max((_iou(box, t) for box in boxes for t in truth), default=0.0)
        tally = counts[body_part]
        tally[0] += 1
        tally[1] += bool(boxes)
        tally[2] += best > 0.0
        tally[3] += best >= 0.3
    print()
    for region, (n, with_boxes, overlapping, hits) in counts.items():
        print(
            f"{region}: {n} fractured valid images; SR/SC with boxes {with_boxes}, "
            f"a box overlapping a truth box {overlapping}, IoU >= 0.3 {hits}"
        )
    assert counts["HAND"][0] + counts["LEG"][0] == len(chosen)
