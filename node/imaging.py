"""DICOM to frozen values: the header facts routing reads, and the frames models read.

DICOM stops here. :func:`header_facts` turns a dataset into an
:class:`inference.routing.HeaderFacts`; :func:`load_frames` decodes the pixel data (every
transfer syntax the node accepts, through pydicom with pylibjpeg / openjpeg / pyjpegls) and
applies the grey-scale pipeline of PS3.3 C.11 with the pure functions of
:mod:`inference.pixels`: BitsStored and sign, pixel padding, Modality LUT (rescale or LUT
sequence), VOI LUT (LUT sequence, else the first window, else a percentile window over the
non-padding pixels), MONOCHROME1 inversion, padding to 0. Colour secondary captures become grey
(BT.601 luma). Each frame of a multi-frame instance is one :class:`SourceFrame`.

Errors (each has ``sop_instance_uid`` and a ``reason`` safe to store: no patient data):
    ImagingError
        PixelDataError: pixel data missing, of the wrong length, or that cannot be decoded
        UnsupportedImageError: a photometric interpretation or layout the node does not read
        ImageTooLargeError: rows x columns x frames above the limit, checked before decoding
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from inference import pixels as px
from inference.routing import HeaderFacts

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour models pydicom turns into RGB: YBR_FULL(_422) by its colour conversion, YBR_ICT/RCT
# by the JPEG 2000 decoder's inverse component transform.
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_J2K = (JPEG2000Lossless, JPEG2000)
# Codestreams that end with an end-of-image marker FFD9 (JPEG EOI, JPEG-LS EOI, JPEG 2000 EOC).
_MARKER_ENDED = (
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    *_J2K,
)
# What a broken codestream makes the decoders raise (pydicom wraps plugin errors in RuntimeError).
_DECODE_ERRORS = (ValueError, RuntimeError, NotImplementedError, TypeError, IndexError, KeyError)


class ImagingError(Exception):
    """An image the node cannot turn into pixels; ``reason`` is safe to store and log."""

    def __init__(self, sop_instance_uid: str, reason: str) -> None:
        super().__init__(f"{sop_instance_uid}: {reason}")
        self.sop_instance_uid = sop_instance_uid
        self.reason = reason


class PixelDataError(ImagingError):
    """Pixel data missing, of the wrong length, or that cannot be decoded."""


class UnsupportedImageError(ImagingError):
    """A photometric interpretation or pixel layout the node does not read."""


class ImageTooLargeError(ImagingError):
    """Rows x columns x frames above the configured limit (checked before decoding)."""


class VoiSource(StrEnum):
    """Which VOI transform made the frame's grey levels."""

    VOI_LUT = "voi_lut"  # VOI LUT Sequence (0028,3010), first item
    WINDOW = "window"  # the first Window Center / Width (0028,1050/1051)
    PERCENTILE = "percentile"  # neither present (or invalid): percentiles of the non-padding pixels
    COLOUR = "colour"  # colour image: luma, no VOI (PS3.3 applies VOI to grey images only)


@dataclass(frozen=True, slots=True)
class SourceFrame:
    """One frame, model-independent: float32 (rows, columns) in [0, 1], MONOCHROME2.

    ``pixels`` is read-only. ``frame`` is 0-based.
    """

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    frame: int
    pixels: NDArray[np.float32]
    rows: int
    columns: int
    photometric_interpretation_source: str
    voi: VoiSource


# ---------------------------------------------------------------------------------------------
# Header facts
# ---------------------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        value = "\\".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def header_facts(ds: Dataset) -> HeaderFacts:
    """The header values routing reads (PS3.3 General Series, General Study, DX modules)."""
    codes: list[tuple[str, str, str]] = []
    for item in ds.get("AnatomicRegionSequence") or ():
        value = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
        if value is None:
            continue
        codes.append((value, _text(item, "CodingSchemeDesignator") or "", _text(item, "CodeMeaning") or ""))
    requested = _text(ds, "RequestedProcedureDescription")
    if requested is None:
        for item in ds.get("RequestAttributesSequence") or ():
            requested = _text(item, "RequestedProcedureDescription")
            if requested:
                break
    return HeaderFacts(
        body_part=_text(ds, "BodyPartExamined"),
        anatomic_codes=tuple(codes),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        requested_procedure_description=requested,
        image_laterality=_text(ds, "ImageLaterality"),
        laterality=_text(ds, "Laterality"),
        view_position=_text(ds, "ViewPosition"),
        modality=_text(ds, "Modality"),
    )


# ---------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------


def frame_count(ds: Dataset) -> int:
    """Number of Frames (0028,0008), 1 when absent."""
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True, slots=True)
class _Layout:
    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    syntax: UID


def _layout(ds: Dataset, uid: str, max_pixels: int) -> _Layout:
    missing = [
        k
        for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation", "PixelRepresentation")
        if ds.get(k) is None
    ]
    if missing:
        raise PixelDataError(uid, f"missing {', '.join(missing)}")
    rows, columns, frames = int(ds.Rows), int(ds.Columns), frame_count(ds)
    if rows < 1 or columns < 1:
        raise PixelDataError(uid, f"image of {rows} x {columns} pixels")
    if rows * columns * frames > max_pixels:
        raise ImageTooLargeError(
            uid,
            f"{rows} x {columns} x {frames} frames = {rows * columns * frames} pixels, limit {max_pixels}",
        )
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits_allocated = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored") or bits_allocated)
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.TransferSyntaxUID)) if meta is not None and "TransferSyntaxUID" in meta else None
    if syntax is None:
        raise PixelDataError(uid, "no Transfer Syntax UID in the file meta")
    if photometric not in MONOCHROME + COLOUR:
        raise UnsupportedImageError(uid, f"photometric interpretation {photometric} is not supported")
    if photometric in ("YBR_ICT", "YBR_RCT") and syntax not in _J2K:
        raise UnsupportedImageError(uid, f"{photometric} outside JPEG 2000")
    if samples != (1 if photometric in MONOCHROME else 3):
        raise UnsupportedImageError(uid, f"{photometric} with {samples} samples per pixel")
    if bits_allocated not in (8, 16, 32):
        raise UnsupportedImageError(uid, f"{bits_allocated} bits allocated")
    if not 1 <= bits_stored <= bits_allocated:
        raise PixelDataError(uid, f"{bits_stored} bits stored in {bits_allocated} allocated")
    if "PixelData" not in ds:
        kind = (
            "float pixel data" if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else "no pixel data"
        )
        raise (UnsupportedImageError if kind == "float pixel data" else PixelDataError)(uid, kind)
    return _Layout(
        rows,
        columns,
        frames,
        samples,
        bits_allocated,
        bits_stored,
        int(ds.PixelRepresentation) == 1,
        photometric,
        syntax,
    )


def _check_encoding(ds: Dataset, uid: str, layout: _Layout) -> None:
    """Wrong-length native data, or a compressed frame cut short, before any decoding."""
    data = ds.PixelData
    if not layout.syntax.is_encapsulated:
        expected = layout.rows * layout.columns * layout.frames * layout.samples * layout.bits_allocated // 8
        if len(data) not in (expected, expected + 1):  # one byte pads an odd length to even
            raise PixelDataError(
                uid,
                f"pixel data is {len(data)} bytes, {expected} expected for {layout.frames} frame(s) of "
                f"{layout.rows} x {layout.columns} x {layout.samples} at {layout.bits_allocated} bits",
            )
        return
    if layout.syntax not in _MARKER_ENDED:
        return
    for index in range(layout.frames):
        try:
            stream = get_frame(data, index, number_of_frames=layout.frames)
        except (ValueError, IndexError, KeyError) as exc:
            raise PixelDataError(
                uid, f"frame {index} cannot be found in the encapsulated data: {exc}"
            ) from exc
        # Encoders pad odd-length fragments with 00 or an FF fill byte (RG3_J2KI does).
        if not bytes(stream).rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
            raise PixelDataError(uid, f"frame {index} codestream has no end marker (truncated)")


def _decode(ds: Dataset, uid: str, index: int, layout: _Layout) -> NDArray[Any]:
    try:
        frame = pixel_array(ds, index=index if layout.frames > 1 else None)
    except _DECODE_ERRORS as exc:
        raise PixelDataError(uid, f"frame {index} cannot be decoded ({layout.syntax.name}): {exc}") from exc
    expected = (layout.rows, layout.columns) if layout.samples == 1 else (layout.rows, layout.columns, 3)
    if frame.shape != expected:
        raise PixelDataError(uid, f"frame {index} decoded to shape {frame.shape}, {expected} expected")
    return frame


def _first(value: Any) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _lut(item: Dataset, uid: str, what: str, signed_input: bool) -> tuple[int, NDArray[np.float64], int]:
    """(first mapped value, table, bits per entry) of a Modality or VOI LUT item (PS3.3 C.11.1.1)."""
    try:
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
    except (AttributeError, TypeError, ValueError) as exc:
        raise PixelDataError(uid, f"{what} has no valid LUT Descriptor / LUT Data") from exc
    entries = entries or 65536
    if signed_input and first >= 32768:  # US/SS ambiguity of the descriptor's second value
        first -= 65536
    if isinstance(data, bytes | bytearray):
        raw = bytes(data)
        if len(raw) >= 2 * entries:
            table = np.frombuffer(raw[: 2 * entries], dtype="<u2").astype(np.float64)
        elif bits == 8 and len(raw) >= entries:
            table = np.frombuffer(raw[:entries], dtype=np.uint8).astype(np.float64)
        else:
            raise PixelDataError(uid, f"{what} LUT Data holds {len(raw)} bytes for {entries} entries")
    else:
        values = [data] if isinstance(data, int) else list(data)
        if len(values) < entries:
            raise PixelDataError(uid, f"{what} LUT Data holds {len(values)} of {entries} entries")
        table = np.asarray(values[:entries], dtype=np.float64)
    return first, table, bits


def _grey(
    ds: Dataset, uid: str, stored: NDArray[Any], layout: _Layout
) -> tuple[NDArray[np.float32], VoiSource]:
    values = px.restrict_bits(stored, layout.bits_stored, layout.signed)
    padding: NDArray[np.bool_] | None = None
    if ds.get("PixelPaddingValue") is not None:
        limit = ds.get("PixelPaddingRangeLimit")
        padding = px.padding_mask(values, int(ds.PixelPaddingValue), None if limit is None else int(limit))

    modality_lut = ds.get("ModalityLUTSequence")
    if modality_lut:
        first, table, _bits = _lut(modality_lut[0], uid, "Modality LUT", layout.signed)
        modality = px.lookup(values, first, table)
    else:
        slope = ds.get("RescaleSlope")
        intercept = ds.get("RescaleIntercept")
        modality = px.rescale(
            values, 1.0 if slope is None else _first(slope), 0.0 if intercept is None else _first(intercept)
        )

    keep = None if padding is None else ~padding
    voi_lut = ds.get("VOILUTSequence")
    if voi_lut:
        first, table, bits = _lut(voi_lut[0], uid, "VOI LUT", bool(modality.min() < 0))
        top = max(float(2**bits - 1), float(table.max()))  # a descriptor may understate its bits
        grey = (px.lookup(modality, first, table) / top).astype(np.float32)
        source = VoiSource.VOI_LUT
    else:
        window = _window(ds)
        if window is not None:
            grey = px.window(modality, *window)
            source = VoiSource.WINDOW
        else:
            grey = px.percentile_window(modality, keep)
            source = VoiSource.PERCENTILE
    if layout.photometric == "MONOCHROME1":
        grey = px.invert(grey)
    if padding is not None:
        grey[padding] = 0.0
    return grey, source


def _window(ds: Dataset) -> tuple[float, float, px.WindowFunction] | None:
    """The first Window Center / Width and the VOI LUT Function, when present and valid."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c, w = _first(center), _first(width)
    except (TypeError, ValueError, IndexError):
        return None
    name = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    function = px.WindowFunction(name) if name in px.WindowFunction.__members__ else px.WindowFunction.LINEAR
    if not px.window_is_valid(w, function) or not np.isfinite(c):
        return None
    return c, w, function


def load_frames(ds: Dataset, *, max_pixels: int) -> list[SourceFrame]:
    """Every frame of ``ds`` as a :class:`SourceFrame` (float32 [0, 1], MONOCHROME2).

    Raises :class:`ImageTooLargeError` before decoding anything, :class:`UnsupportedImageError`
    or :class:`PixelDataError`; the caller records the reason for this image and goes on.
    """
    uid = str(ds.get("SOPInstanceUID") or "")
    layout = _layout(ds, uid, max_pixels)
    _check_encoding(ds, uid, layout)
    frames: list[SourceFrame] = []
    for index in range(layout.frames):
        decoded = _decode(ds, uid, index, layout)
        if layout.samples == 3:
            grey = px.rgb_to_grey(decoded, float(2**layout.bits_stored - 1))
            voi = VoiSource.COLOUR
        else:
            grey, voi = _grey(ds, uid, decoded, layout)
        grey = np.ascontiguousarray(grey, dtype=np.float32)
        grey.flags.writeable = False
        frames.append(
            SourceFrame(
                study_uid=str(ds.get("StudyInstanceUID") or ""),
                series_uid=str(ds.get("SeriesInstanceUID") or ""),
                sop_instance_uid=uid,
                frame=index,
                pixels=grey,
                rows=layout.rows,
                columns=layout.columns,
                photometric_interpretation_source=layout.photometric,
                voi=voi,
            )
        )
    return frames
