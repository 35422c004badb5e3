"""Small DICOM radiographs generated in code, in any transfer syntax the node accepts.

Pixel content is a smooth synthetic "bone" pattern so compression has something to do and
windowing tests have a known range. Encoded syntaxes come from pydicom's encoders (RLE,
JPEG-LS, JPEG 2000) or from dcmtk's ``dcmcjpeg`` (JPEG baseline/extended/lossless) and
``dcmconv`` (deflated), all real encoders.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
DX_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.1.1")
SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
SC_MULTIFRAME_GRAY_WORD = UID("1.2.840.10008.5.1.4.1.1.7.3")
CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")

ALL_SYNTAXES: tuple[UID, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

_DCMCJPEG_FLAGS = {
    JPEGBaseline8Bit: ["+eb"],
    JPEGExtended12Bit: ["+ee"],
    JPEGLossless: ["+el"],
    JPEGLosslessSV1: ["+e1"],
}


@dataclass(frozen=True, slots=True)
class Study:
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]


def phantom(rows: int, cols: int, bits: int, signed: bool = False, seed: int = 0) -> np.ndarray:
    """A deterministic radiograph-like pattern using the full range of ``bits`` bits."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    bone = np.exp(-(((x - cols / 2) / (cols / 6)) ** 2)) * (0.6 + 0.4 * np.sin(y / max(rows, 1) * 6.0))
    image = 0.15 + 0.75 * bone + rng.normal(0.0, 0.01, size=(rows, cols))
    image = np.clip(image, 0.0, 1.0)
    top = (1 << bits) - 1
    values = np.round(image * top)
    if signed:
        values = values - (1 << (bits - 1))
        return values.astype(np.int16 if bits > 8 else np.int8)
    return values.astype(np.uint16 if bits > 8 else np.uint8)


def make_dataset(
    *,
    sop_class: UID = DX_PRESENTATION,
    rows: int = 128,
    cols: int = 96,
    bits_stored: int = 12,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    frames: int = 1,
    body_part: str | None = "WRIST",
    study_description: str = "XR WRIST 2V",
    series_description: str = "R WRIST PA",
    protocol_name: str | None = None,
    laterality: str = "R",
    view: str = "PA",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    pixels: np.ndarray | None = None,
    seed: int = 0,
) -> Dataset:
    """A valid-enough CR/DX/SC instance with file meta (explicit VR little endian)."""
    bits_allocated = 8 if bits_stored <= 8 else 16
    if pixels is None:
        single = phantom(rows, cols, bits_stored, signed, seed)
        pixels = np.stack([single] * frames) if frames > 1 else single
    if photometric == "MONOCHROME1" and pixels is not None and not signed:
        pixels = ((1 << bits_stored) - 1 - pixels.astype(np.int64)).astype(pixels.dtype)

    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "TESTID001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Manufacturer = "fracnode-tests"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    if protocol_name is not None:
        ds.ProtocolName = protocol_name
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.PatientOrientation = ""

    if sop_class in (DX_PRESENTATION, DX_PROCESSING):
        ds.Modality = "DX"
        ds.PresentationIntentType = (
            "FOR PRESENTATION" if sop_class == DX_PRESENTATION else "FOR PROCESSING"
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImageLaterality = laterality
        ds.Laterality = laterality
        ds.ViewPosition = view
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
        ds.DetectorType = "DIRECT"
        ds.BurnedInAnnotation = "NO"
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.ImagerPixelSpacing = [0.1, 0.1]
        ds.PatientOrientation = ["L", "F"]
        region = Dataset()
        region.CodeValue = "T-15460"
        region.CodingSchemeDesignator = "SRT"
        region.CodeMeaning = "Wrist joint"
        ds.AnatomicRegionSequence = Sequence([region])
        view_code = Dataset()
        view_code.CodeValue = "R-10214"
        view_code.CodingSchemeDesignator = "SRT"
        view_code.CodeMeaning = "postero-anterior"
        ds.ViewCodeSequence = Sequence([view_code])
        ds.RescaleIntercept = 0 if rescale is None else rescale[1]
        ds.RescaleSlope = 1 if rescale is None else rescale[0]
        ds.RescaleType = "US"
        if window is None:
            window = ((1 << bits_stored) / 2, float(1 << bits_stored))
    elif sop_class == CR_STORAGE:
        ds.Modality = "CR"
        ds.ViewPosition = view
        ds.Laterality = laterality
        ds.ImageLaterality = laterality
    else:
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.Laterality = laterality
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def encode(ds: Dataset, syntax: UID) -> Dataset:
    """A copy of ``ds`` in transfer syntax ``syntax`` (real encoders; see module docstring)."""
    out = pydicom.dcmread(_to_bytes(ds), force=True)
    if syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        out.file_meta.TransferSyntaxUID = syntax
        return out
    if syntax in _DCMCJPEG_FLAGS:
        return _dcmtk(out, ["dcmcjpeg", *_DCMCJPEG_FLAGS[syntax]])
    kwargs: dict[str, object] = {}
    if syntax == JPEGLSNearLossless:
        kwargs["jls_error"] = 2
    if syntax == JPEG2000:
        kwargs["j2k_cr"] = [20]
    out.compress(syntax, generate_instance_uid=False, **kwargs)  # type: ignore[arg-type]
    return out


def _to_bytes(ds: Dataset) -> object:
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def _dcmtk(ds: Dataset, command: list[str]) -> Dataset:
    if shutil.which(command[0]) is None:
        raise RuntimeError(f"{command[0]} (dcmtk) is not installed; `make test` installs it")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.dcm"
        dst = Path(tmp) / "out.dcm"
        ds.save_as(src, enforce_file_format=True)
        subprocess.run([*command, str(src), str(dst)], check=True, capture_output=True)
        return pydicom.dcmread(dst)


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(
    directory: Path,
    n: int = 3,
    *,
    syntax: UID = ExplicitVRLittleEndian,
    **kwargs: object,
) -> tuple[Study, list[Path]]:
    """``n`` instances of one study and series written under ``directory``."""
    study_uid = str(kwargs.pop("study_uid", None) or generate_uid())
    series_uid = str(kwargs.pop("series_uid", None) or generate_uid())
    paths: list[Path] = []
    sops: list[str] = []
    for i in range(n):
        ds = make_dataset(
            study_uid=study_uid, series_uid=series_uid, instance_number=i + 1, seed=i, **kwargs  # type: ignore[arg-type]
        )
        if syntax != ExplicitVRLittleEndian:
            ds = encode(ds, syntax)
        sops.append(str(ds.SOPInstanceUID))
        paths.append(write(ds, directory / f"img{i + 1}.dcm"))
    return Study(study_uid, series_uid, tuple(sops)), paths
