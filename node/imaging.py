"""DICOM to frozen values: the header facts routing reads, and the frames models read.

DICOM stops here. :func:`header_facts` turns a dataset into an
:class:`inference.routing.HeaderFacts`; :func:`load_frames` decodes the pixel data (every
transfer syntax the node accepts, through pydicom with pylibjpeg / openjpeg / pyjpegls) and
applies the grey-scale pipeline of PS3.3 C.11 with the pure functions of
:mod:`inference.pixels`: BitsStored and sign, pixel padding, Modality LUT (rescale or LUT
sequence), VOI LUT (LUT sequence, else the first window, else a percentile window over the
non-padding pixels), MONOCHROME1 inversion, padding to 0. Colour secondary captures become grey
(BT.601 luma). Each frame of a multi-frame instance is one :class:`SourceFrame`.

Every value is read through :mod:`node.received`: an absent, empty or wrongly-typed optional
attribute is treated as absent, never as an exception. The pixel description (Rows, Columns,
Samples per Pixel, Bits Allocated / Stored, Pixel Representation, Photometric Interpretation) is
required: one missing or invalid is a :class:`PixelDescriptionError`. Decoding is bounded: the
size check against ``max_pixels`` comes before any allocation, and each compressed frame's own
header (:mod:`node.codecs`) must state the dataset's size before a decoder sees it. The decoder
gets a dataset made of the checked values only.

Errors (each has ``sop_instance_uid`` and a ``reason`` safe to store: fixed text, keywords and
numbers, never a value of the dataset)::

    ImagingError
        PixelDataError: pixel data missing, of the wrong length, or that cannot be decoded
            PixelDescriptionError: a required Image Pixel attribute missing or invalid
            CompressedFrameMismatchError: a compressed frame's own header is missing, garbled,
                or states another size, layout or coding than the dataset (checked before
                decoding: a decompression bomb)
        UnsupportedImageError: a photometric interpretation, layout or syntax the node does not read
        ImageTooLargeError: rows x columns x frames x samples above the limit, checked before decoding
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
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
    RLELossless,
)

from inference import pixels as px
from inference.routing import HeaderFacts
from node import codecs, received
from node.redact import describe

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour models pydicom turns into RGB: YBR_FULL(_422) by its colour conversion, YBR_ICT/RCT
# by the JPEG 2000 decoder's inverse component transform.
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_J2K = (JPEG2000Lossless, JPEG2000)
# PS3.3 C.7.6.3.1.2 defined terms, the only values an error message names.
_DEFINED_PHOTOMETRIC = frozenset(
    {
        *MONOCHROME,
        *COLOUR,
        "PALETTE COLOR",
        "HSV",
        "ARGB",
        "CMYK",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "XYB",
    }
)
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
_JPEG = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1)
_JPEG_LS = (JPEGLSLossless, JPEGLSNearLossless)
# The JPEG processes each syntax carries (PS3.5 A.4.1, A.4.2): baseline / extended sequential
# (SOF0, SOF1; an 8-bit extended stream may be written as baseline), lossless (SOF3).
# Progressive, arithmetic and hierarchical streams are refused: no DICOM syntax the node
# accepts carries them, and a progressive stream is a cheap way to make a decoder work.
_JPEG_PROCESSES = {
    JPEGBaseline8Bit: frozenset({0xFFC0, 0xFFC1}),
    JPEGExtended12Bit: frozenset({0xFFC0, 0xFFC1}),
    JPEGLossless: frozenset({0xFFC3}),
    JPEGLosslessSV1: frozenset({0xFFC3}),
}
_ENCAPSULATED = (*_JPEG, *_JPEG_LS, *_J2K, RLELossless)


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


class PixelDescriptionError(PixelDataError):
    """A required Image Pixel attribute (PS3.3 C.7.6.3) is missing or not a valid value."""


class CompressedFrameMismatchError(PixelDataError):
    """A compressed frame's own header is missing or garbled, or disagrees with the dataset."""


class ImageTooLargeError(ImagingError):
    """Rows x columns x frames x samples above the configured limit (checked before decoding)."""


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


_text = received.text


def header_facts(ds: Dataset) -> HeaderFacts:
    """The header values routing reads (PS3.3 General Series, General Study, DX modules).

    Never raises: an attribute that is absent, empty or not what its VR promises is absent.
    """
    codes: list[tuple[str, str, str]] = []
    for item in received.items(ds, "AnatomicRegionSequence"):
        value = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue")
        if value is None:
            continue
        codes.append((value, _text(item, "CodingSchemeDesignator") or "", _text(item, "CodeMeaning") or ""))
    requested = _text(ds, "RequestedProcedureDescription")
    if requested is None:
        for item in received.items(ds, "RequestAttributesSequence"):
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
    """Number of Frames (0028,0008), 1 when absent or not a positive integer."""
    frames = received.integer(ds, "NumberOfFrames")
    return frames if frames is not None and frames > 1 else 1


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
    planar_configuration: int


_PIXEL_DESCRIPTION = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
)


def _layout(ds: Dataset, uid: str, max_pixels: int) -> _Layout:
    """The checked pixel description; raises before anything of the image is allocated."""
    values = {keyword: received.integer(ds, keyword) for keyword in _PIXEL_DESCRIPTION}
    photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
    missing = [keyword for keyword, value in values.items() if value is None]
    if not photometric:
        missing.append("PhotometricInterpretation")
    if missing:
        raise PixelDescriptionError(uid, f"missing or invalid {', '.join(missing)}")
    rows, columns = values["Rows"] or 0, values["Columns"] or 0
    samples, bits_allocated = values["SamplesPerPixel"] or 0, values["BitsAllocated"] or 0
    bits_stored, representation = values["BitsStored"] or 0, values["PixelRepresentation"]
    frames = frame_count(ds)
    if rows < 1 or columns < 1:
        raise PixelDescriptionError(uid, f"image of {rows} x {columns} pixels")
    if samples not in (1, 3):
        raise UnsupportedImageError(uid, f"{samples} samples per pixel")
    total = rows * columns * frames * samples
    if total > max_pixels:
        per = f" x {samples} samples" if samples > 1 else ""
        raise ImageTooLargeError(
            uid, f"{rows} x {columns} x {frames} frames{per} = {total} pixels, limit {max_pixels}"
        )
    if representation not in (0, 1):
        raise PixelDescriptionError(uid, f"pixel representation {representation}")
    meta = getattr(ds, "file_meta", None)
    syntax_text = _text(meta, "TransferSyntaxUID")
    if syntax_text is None:
        raise PixelDataError(uid, "no Transfer Syntax UID in the file meta")
    syntax = UID(syntax_text)
    if syntax.is_encapsulated and syntax not in _ENCAPSULATED:
        raise UnsupportedImageError(uid, f"transfer syntax {syntax.name or 'unknown'} is not decoded")
    if photometric not in MONOCHROME + COLOUR:
        # Only a defined term is named: anything else could be any text a sender put there.
        shown = photometric if photometric in _DEFINED_PHOTOMETRIC else "(not a defined term)"
        raise UnsupportedImageError(uid, f"photometric interpretation {shown} is not supported")
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
    planar = received.integer(ds, "PlanarConfiguration") if samples == 3 else 0
    return _Layout(
        rows,
        columns,
        frames,
        samples,
        bits_allocated,
        bits_stored,
        representation == 1,
        photometric,
        syntax,
        1 if planar == 1 else 0,
    )


def _pixel_data(ds: Dataset, uid: str) -> bytes:
    data = received.raw_value(ds, "PixelData")
    if not isinstance(data, bytes | bytearray):
        raise PixelDataError(uid, "pixel data is absent or not binary")
    return bytes(data)


def _check_encoding(ds: Dataset, uid: str, layout: _Layout) -> bytes:
    """Wrong-length native data, or a compressed frame whose own header disagrees with the
    dataset or that is cut short, before any decoding. Returns the pixel data."""
    data = _pixel_data(ds, uid)
    if not layout.syntax.is_encapsulated:
        expected = layout.rows * layout.columns * layout.frames * layout.samples * layout.bits_allocated // 8
        if len(data) not in (expected, expected + 1):  # one byte pads an odd length to even
            raise PixelDataError(
                uid,
                f"pixel data is {len(data)} bytes, {expected} expected for {layout.frames} frame(s) of "
                f"{layout.rows} x {layout.columns} x {layout.samples} at {layout.bits_allocated} bits",
            )
        return data
    for index in range(layout.frames):
        try:
            stream = bytes(get_frame(data, index, number_of_frames=layout.frames))
        except Exception as exc:  # noqa: BLE001  (pydicom's fragment parser on hostile bytes)
            raise PixelDataError(
                uid, f"frame {index} cannot be found in the encapsulated data: {describe(exc)}"
            ) from exc
        _check_frame_header(uid, index, stream, layout)
        # Encoders pad odd-length fragments with 00 or an FF fill byte (RG3_J2KI does).
        if layout.syntax in _MARKER_ENDED and not stream.rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
            raise PixelDataError(uid, f"frame {index} codestream has no end marker (truncated)")
    return data


def _check_frame_header(uid: str, index: int, stream: bytes, layout: _Layout) -> None:
    """The frame's own header against the dataset: a decoder allocates what the header says."""
    syntax = layout.syntax
    try:
        if syntax == RLELossless:
            _check_rle(uid, index, stream, layout)
            return
        if syntax in _J2K:
            header = codecs.j2k_header(stream)
        else:
            header = codecs.jpeg_header(stream, ls=syntax in _JPEG_LS)
    except codecs.CodestreamError as exc:
        raise CompressedFrameMismatchError(uid, f"frame {index} cannot be decoded: {exc.reason}") from exc
    stated = (header.rows, header.columns, header.components)
    expected = (layout.rows, layout.columns, layout.samples)
    if stated != expected:
        raise CompressedFrameMismatchError(
            uid,
            f"frame {index} {header.codec} header states {header.rows} x {header.columns} x "
            f"{header.components}, the dataset {layout.rows} x {layout.columns} x {layout.samples}",
        )
    if header.precision > layout.bits_allocated:
        raise CompressedFrameMismatchError(
            uid,
            f"frame {index} {header.codec} header states {header.precision} bits per sample, "
            f"more than the {layout.bits_allocated} allocated",
        )
    allowed = _JPEG_PROCESSES.get(syntax)
    if allowed is not None and header.marker not in allowed:
        raise CompressedFrameMismatchError(
            uid, f"frame {index} is JPEG process 0x{header.marker:04X}, not one of {syntax.name}"
        )


def _check_rle(uid: str, index: int, stream: bytes, layout: _Layout) -> None:
    segments = codecs.rle_segments(stream)
    expected = layout.samples * layout.bits_allocated // 8
    if len(segments) != expected:
        raise CompressedFrameMismatchError(
            uid, f"frame {index} RLE header states {len(segments)} segments, {expected} expected"
        )
    plane = layout.rows * layout.columns
    # pydicom accepts a segment longer than the plane (non-conformant padding); twice the
    # plane is room for any padding and still no bomb.
    limit = 2 * plane
    for number, (start, end) in enumerate(segments):
        decoded = codecs.rle_decoded_length(stream[start:end], limit)
        if decoded > limit:
            raise CompressedFrameMismatchError(
                uid, f"frame {index} RLE segment {number} decodes to more than {limit} bytes"
            )


def _decoder_view(layout: _Layout, data: bytes) -> Dataset:
    """A dataset of the checked pixel description and the pixel data only, for the decoder:
    it reads no attribute of the received dataset itself."""
    view = Dataset()
    view.file_meta = FileMetaDataset()
    view.file_meta.TransferSyntaxUID = layout.syntax
    view.Rows = layout.rows
    view.Columns = layout.columns
    view.SamplesPerPixel = layout.samples
    view.BitsAllocated = layout.bits_allocated
    view.BitsStored = layout.bits_stored
    view.HighBit = layout.bits_stored - 1
    view.PixelRepresentation = 1 if layout.signed else 0
    view.PhotometricInterpretation = layout.photometric
    if layout.samples == 3:
        view.PlanarConfiguration = layout.planar_configuration
    if layout.frames > 1:
        view.NumberOfFrames = layout.frames
    vr = "OB" if layout.syntax.is_encapsulated or layout.bits_allocated == 8 else "OW"
    view.add_new(0x7FE00010, vr, data)
    if layout.syntax.is_encapsulated:
        view["PixelData"].is_undefined_length = True
    return view


def _decode(view: Dataset, uid: str, index: int, layout: _Layout) -> NDArray[Any]:
    try:
        frame = pixel_array(view, index=index if layout.frames > 1 else None)
    # A decoder is foreign code fed hostile bytes: whatever it raises, this image cannot be read.
    except Exception as exc:  # noqa: BLE001
        raise PixelDataError(
            uid, f"frame {index} cannot be decoded ({layout.syntax.name}): {describe(exc)}"
        ) from exc
    expected = (layout.rows, layout.columns) if layout.samples == 1 else (layout.rows, layout.columns, 3)
    if frame.shape != expected:
        raise PixelDataError(uid, f"frame {index} decoded to shape {frame.shape}, {expected} expected")
    return frame


def _lut(item: Dataset, uid: str, what: str, signed_input: bool) -> tuple[int, NDArray[np.float64], int]:
    """(first mapped value, table, bits per entry) of a Modality or VOI LUT item (PS3.3 C.11.1.1)."""
    descriptor = received.numbers(item, "LUTDescriptor")
    data = received.raw_value(item, "LUTData")
    if len(descriptor) != 3 or not all(v.is_integer() for v in descriptor) or data is None:
        raise PixelDataError(uid, f"{what} has no valid LUT Descriptor / LUT Data")
    entries, first, bits = (int(v) for v in descriptor)
    if not (0 <= entries <= 65535 and 1 <= bits <= 16):
        raise PixelDataError(uid, f"{what} has no valid LUT Descriptor / LUT Data")
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
        values = received.numbers(item, "LUTData")
        if len(values) < entries:
            raise PixelDataError(uid, f"{what} LUT Data holds {len(values)} of {entries} entries")
        table = np.asarray(values[:entries], dtype=np.float64)
    return first, table, bits


def _grey(
    ds: Dataset, uid: str, stored: NDArray[Any], layout: _Layout
) -> tuple[NDArray[np.float32], VoiSource]:
    values = px.restrict_bits(stored, layout.bits_stored, layout.signed)
    padding: NDArray[np.bool_] | None = None
    padding_value = received.integer(ds, "PixelPaddingValue")
    if padding_value is not None:
        limit = received.integer(ds, "PixelPaddingRangeLimit")
        padding = px.padding_mask(values, padding_value, limit)

    modality_lut = received.items(ds, "ModalityLUTSequence")
    if modality_lut:
        first, table, _bits = _lut(modality_lut[0], uid, "Modality LUT", layout.signed)
        modality = px.lookup(values, first, table)
    else:
        slope = received.first_number(ds, "RescaleSlope")
        intercept = received.first_number(ds, "RescaleIntercept")
        modality = px.rescale(
            values, 1.0 if slope is None or slope == 0 else slope, 0.0 if intercept is None else intercept
        )

    keep = None if padding is None else ~padding
    voi_lut = received.items(ds, "VOILUTSequence")
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
    c, w = received.first_number(ds, "WindowCenter"), received.first_number(ds, "WindowWidth")
    if c is None or w is None:
        return None
    name = (_text(ds, "VOILUTFunction") or "LINEAR").upper()
    function = px.WindowFunction(name) if name in px.WindowFunction.__members__ else px.WindowFunction.LINEAR
    if not px.window_is_valid(w, function) or not np.isfinite(c):
        return None
    return c, w, function


def load_frames(ds: Dataset, *, max_pixels: int) -> list[SourceFrame]:
    """Every frame of ``ds`` as a :class:`SourceFrame` (float32 [0, 1], MONOCHROME2).

    Raises :class:`ImageTooLargeError` before decoding anything, :class:`UnsupportedImageError`
    or :class:`PixelDataError` (and its subclasses); the caller records the reason for this image
    and goes on. Nothing else escapes: the grey-scale pipeline reads optional attributes through
    :mod:`node.received`.
    """
    uid = _text(ds, "SOPInstanceUID") or ""
    layout = _layout(ds, uid, max_pixels)
    view = _decoder_view(layout, _check_encoding(ds, uid, layout))
    frames: list[SourceFrame] = []
    for index in range(layout.frames):
        decoded = _decode(view, uid, index, layout)
        if layout.samples == 3:
            grey = px.rgb_to_grey(decoded, float(2**layout.bits_stored - 1))
            voi = VoiSource.COLOUR
        else:
            grey, voi = _grey(ds, uid, decoded, layout)
        grey = np.ascontiguousarray(grey, dtype=np.float32)
        grey.flags.writeable = False
        frames.append(
            SourceFrame(
                study_uid=_text(ds, "StudyInstanceUID") or "",
                series_uid=_text(ds, "SeriesInstanceUID") or "",
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
