"""A small sample study for ``fracnode demo``: three synthetic DX views of a right wrist.

The pixels are drawn in code (radius and ulna shafts, carpal bones, a thin lucent line across
the distal radius), so fracnode ships no patient image. The study is new on every call (fresh
UIDs) and carries an obviously fake patient. It exercises the whole loop — receive, route
(BodyPartExamined WRIST -> upper-distal), analyse, SR/SC — not the model's accuracy: a
synthetic drawing is not a radiograph, and the model's answer on it means nothing clinically.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
VIEWS = (
    ("PA", "R-10214", "postero-anterior"),
    ("LL", "R-10236", "left lateral"),
    ("AP", "R-10206", "antero-posterior"),
)


def wrist_phantom(rows: int = 640, cols: int = 512, *, view: int = 0, seed: int = 0) -> NDArray[np.uint16]:
    """A 12-bit drawing of a wrist: soft tissue, two forearm bones, carpal blobs, a fracture line."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    tilt = (view - 1) * 0.08
    cx = cols / 2 + (y - rows / 2) * tilt
    soft = np.exp(-(((x - cx) / (cols * 0.30)) ** 6)) * 0.35
    radius = np.exp(-(((x - (cx - cols * 0.11)) / (cols * 0.065)) ** 4)) * (y > rows * 0.45) * 0.5
    ulna = np.exp(-(((x - (cx + cols * 0.12)) / (cols * 0.05)) ** 4)) * (y > rows * 0.50) * 0.45
    carpals = np.zeros_like(x)
    for i in range(6):
        bx = cx - cols * 0.12 + (i % 3) * cols * 0.11
        by = rows * (0.28 + 0.08 * (i // 3))
        carpals += np.exp(-(((x - bx) / (cols * 0.05)) ** 2 + ((y - by) / (rows * 0.035)) ** 2)) * 0.45
    image = soft + radius + ulna + np.clip(carpals, 0, 0.5)
    line = np.abs((y - rows * 0.55) - 0.25 * (x - (cx - cols * 0.11))) < 2.0
    image[line & (radius > 0.2)] *= 0.55
    image += rng.normal(0.0, 0.01, size=image.shape)
    scaled: NDArray[np.uint16] = np.round(np.clip(image, 0.0, 1.0) * 4095).astype(np.uint16)
    return scaled


def demo_study(directory: Path) -> tuple[str, list[Path]]:
    """Write the three views under ``directory``; return the Study Instance UID and the paths."""
    study_uid = generate_uid()
    series_uid = generate_uid()
    now = datetime.now(UTC)
    paths: list[Path] = []
    for index, (position, code, meaning) in enumerate(VIEWS):
        pixels = wrist_phantom(view=index, seed=index)
        ds = Dataset()
        ds.SOPClassUID = DX_FOR_PRESENTATION
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = "DEMO^FRACNODE"
        ds.PatientID = "FRACNODE-DEMO"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = f"DEMO{now.strftime('%H%M%S')}"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "DEMO"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.Manufacturer = "fracnode demo"
        ds.Modality = "DX"
        ds.StudyDescription = "XR WRIST 3V (fracnode demo, synthetic)"
        ds.SeriesDescription = f"R WRIST {position}"
        ds.BodyPartExamined = "WRIST"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.ImageLaterality = ds.Laterality = "R"
        ds.ViewPosition = position
        ds.PatientOrientation = ["L", "F"]
        ds.PresentationLUTShape = "IDENTITY"
        ds.DetectorType = "DIRECT"
        ds.BurnedInAnnotation = "NO"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-15460", "SRT", "Wrist joint"
        ds.AnatomicRegionSequence = Sequence([region])
        view_code = Dataset()
        view_code.CodeValue, view_code.CodingSchemeDesignator, view_code.CodeMeaning = code, "SRT", meaning
        ds.ViewCodeSequence = Sequence([view_code])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        path = directory / f"demo-{index + 1}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return str(study_uid), paths
