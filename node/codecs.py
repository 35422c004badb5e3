"""What a compressed frame says about itself, read from its own header before any decoding.

A decoder allocates what the codestream's header asks for, not what the dataset's Rows and
Columns say: a 5 KB JPEG 2000 whose SIZ marker claims 65000 x 65000 made openjpeg allocate
~10 GB. These parsers read only the few header bytes every decoder reads first, and
:mod:`node.imaging` compares them with the dataset's pixel description and the pixel limit
before it hands a frame to a decoder.

- JPEG (ISO 10918-1 B.2.2): the first frame header SOFn (baseline, extended, progressive,
  lossless; any coding), after SOI and the table/misc segments. Y = 0 (lines defined later by a
  DNL marker) is refused: the header must state its size.
- JPEG-LS (ISO 14495-1 C.2.2): SOF55 (``FFF7``), same layout as SOFn. An LSE oversize-dimension
  segment is not followed (DICOM's Rows and Columns are 16 bits).
- JPEG 2000 (ISO 15444-1 A.5.1): the SIZ marker that must follow SOC; image size is
  ``Xsiz - XOsiz`` by ``Ysiz - YOsiz``; the tile count must fit the 16-bit tile index. A JP2
  file wrapper (ISO 15444-1 Annex I) is read box by box: the ``ihdr`` of the ``jp2h`` header box
  and the SIZ of the ``jp2c`` codestream box must both be there and agree.
- RLE (PS3.5 Annex G): the 64-byte header (segment count, 15 offsets) checked against the
  fragment, and each segment's decoded length counted from its run headers (without producing
  output): PackBits expands a byte up to 128 times, so a small segment can claim far more than
  Rows x Columns.

Errors: :class:`CodestreamError` (also ValueError), whose ``reason`` is made of fixed text and
numbers from the header only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final


class CodestreamError(ValueError):
    """A compressed frame whose header is missing, garbled or not one the node decodes."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """Image size and layout as a codestream's own header states it."""

    codec: str  # "JPEG", "JPEG-LS", "JPEG 2000"
    rows: int
    columns: int
    components: int
    precision: int  # bits per sample (the largest over the components)
    marker: int = 0  # the SOFn marker (JPEG and JPEG-LS), 0 for JPEG 2000


# ---------------------------------------------------------------------------------------------
# JPEG and JPEG-LS
# ---------------------------------------------------------------------------------------------

SOI: Final = 0xFFD8
SOF55: Final = 0xFFF7  # JPEG-LS frame header
LSE: Final = 0xFFF8
# SOF0-3, 5-7, 9-11, 13-15 (C4 is DHT, C8 JPG, CC DAC).
JPEG_SOF: Final = frozenset(
    {0xFFC0, 0xFFC1, 0xFFC2, 0xFFC3, 0xFFC5, 0xFFC6, 0xFFC7}
    | {0xFFC9, 0xFFCA, 0xFFCB}
    | {0xFFCD, 0xFFCE, 0xFFCF}
)
_SOS: Final = 0xFFDA
_EOI: Final = 0xFFD9
_DHP: Final = 0xFFDE  # hierarchical progression: not a DICOM process
_STANDALONE: Final = frozenset({0xFF01, *range(0xFFD0, 0xFFD8)})  # TEM, RST0-7
_MAX_SEGMENTS: Final = 4096  # tables and APPn before the frame header; real files have < 20


def jpeg_header(stream: bytes, *, ls: bool = False) -> FrameHeader:
    """The frame header of a JPEG (``ls=False``) or JPEG-LS (``ls=True``) stream."""
    codec = "JPEG-LS" if ls else "JPEG"
    data = memoryview(stream)
    if len(data) < 4 or (data[0] << 8 | data[1]) != SOI:
        raise CodestreamError(f"{codec} stream does not start with SOI")
    pos = 2
    for _ in range(_MAX_SEGMENTS):
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker (B.1.1.2)
        if pos + 2 > len(data):
            break
        marker = data[pos] << 8 | data[pos + 1]
        if data[pos] != 0xFF:
            raise CodestreamError(f"{codec} stream has no marker where a segment should start")
        pos += 2
        if marker in _STANDALONE:
            continue
        if marker in (_SOS, _EOI):
            raise CodestreamError(f"{codec} stream has no frame header before its scan")
        if marker == _DHP:
            raise CodestreamError("hierarchical JPEG is not decoded")
        if pos + 2 > len(data):
            break
        length = data[pos] << 8 | data[pos + 1]
        if length < 2 or pos + length > len(data):
            raise CodestreamError(f"{codec} segment 0x{marker:04X} runs past the end of the frame")
        if marker == SOF55 or marker in JPEG_SOF:
            if (marker == SOF55) != ls:
                expected = "SOF55" if ls else "a JPEG SOFn"
                raise CodestreamError(f"{codec} stream has frame marker 0x{marker:04X}, {expected} expected")
            return _frame(data[pos : pos + length], codec, marker)
        pos += length
    raise CodestreamError(f"{codec} stream has no frame header")


def _frame(segment: memoryview, codec: str, marker: int) -> FrameHeader:
    # Lf(2) P(1) Y(2) X(2) Nf(1), then Nf x (C, H/V, Tq)
    if len(segment) < 8:
        raise CodestreamError(f"{codec} frame header is too short")
    precision = segment[2]
    rows = segment[3] << 8 | segment[4]
    columns = segment[5] << 8 | segment[6]
    components = segment[7]
    if len(segment) < 8 + 3 * components:
        raise CodestreamError(f"{codec} frame header is shorter than its {components} components")
    if rows == 0 or columns == 0:
        raise CodestreamError(f"{codec} frame header states {rows} x {columns} pixels")
    if components == 0 or not 2 <= precision <= 16:
        raise CodestreamError(f"{codec} frame header states {components} components of {precision} bits")
    return FrameHeader(codec, rows, columns, components, precision, marker)


# ---------------------------------------------------------------------------------------------
# JPEG 2000
# ---------------------------------------------------------------------------------------------

_SOC: Final = b"\xff\x4f"
_SIZ: Final = 0xFF51
_JP2_SIGNATURE: Final = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_MAX_TILES: Final = 65535  # Isot is 16 bits (A.4.2)
_MAX_BOXES: Final = 256


def j2k_header(stream: bytes) -> FrameHeader:
    """The SIZ of a JPEG 2000 codestream, or of the codestream inside a JP2 file."""
    data = memoryview(stream)
    if bytes(data[:2]) == _SOC:
        return _siz(data)
    if bytes(data[:12]) == _JP2_SIGNATURE:
        return _jp2(data)
    raise CodestreamError("JPEG 2000 frame starts with neither SOC nor the JP2 signature")


def _siz(data: memoryview) -> FrameHeader:
    if len(data) < 4 or (data[2] << 8 | data[3]) != _SIZ:
        raise CodestreamError("JPEG 2000 codestream has no SIZ marker after SOC")
    if len(data) < 4 + 38:
        raise CodestreamError("JPEG 2000 SIZ marker is cut short")
    (lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, csiz) = struct.unpack_from(
        ">HHIIIIIIIIH", data, 4
    )
    if csiz < 1 or lsiz != 38 + 3 * csiz or len(data) < 4 + lsiz:
        raise CodestreamError("JPEG 2000 SIZ marker length does not match its component count")
    if not (xosiz < xsiz and yosiz < ysiz):
        raise CodestreamError("JPEG 2000 SIZ image offset lies outside the image")
    if xtsiz == 0 or ytsiz == 0 or xtosiz > xosiz or ytosiz > yosiz:
        raise CodestreamError("JPEG 2000 SIZ tile grid is invalid")
    if xtosiz + xtsiz <= xosiz or ytosiz + ytsiz <= yosiz:
        raise CodestreamError("JPEG 2000 SIZ first tile lies outside the image")
    tiles = -(-(xsiz - xtosiz) // xtsiz) * -(-(ysiz - ytosiz) // ytsiz)
    if tiles > _MAX_TILES:
        raise CodestreamError(f"JPEG 2000 SIZ states {tiles} tiles, at most {_MAX_TILES} exist")
    precision = 0
    for index in range(csiz):
        ssiz, xrsiz, yrsiz = struct.unpack_from(">BBB", data, 4 + 38 + 3 * index)
        if xrsiz != 1 or yrsiz != 1:
            raise CodestreamError("JPEG 2000 component subsampling is not decoded")
        precision = max(precision, (ssiz & 0x7F) + 1)
    return FrameHeader("JPEG 2000", ysiz - yosiz, xsiz - xosiz, csiz, precision)


def _boxes(data: memoryview, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """Box type -> (content start, content end) of the boxes between ``start`` and ``end``."""
    found: dict[bytes, tuple[int, int]] = {}
    pos = start
    for _ in range(_MAX_BOXES):
        if pos >= end:
            return found
        if pos + 8 > end:
            return found  # fewer bytes than a box header: the fragment's even-length padding
        length, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:
            if pos + 16 > end:
                raise CodestreamError("JP2 box header is cut short")
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif length == 0:
            length = end - pos  # the last box runs to the end
        if length < header or pos + length > end:
            raise CodestreamError("JP2 box length runs past its container")
        found.setdefault(bytes(kind), (pos + header, pos + length))
        pos += length
    raise CodestreamError("JP2 file has too many boxes")


def _jp2(data: memoryview) -> FrameHeader:
    top = _boxes(data, 0, len(data))
    if b"jp2h" not in top or b"jp2c" not in top:
        raise CodestreamError("JP2 file lacks its header box or its codestream box")
    header = _boxes(data, *top[b"jp2h"])
    if b"ihdr" not in header:
        raise CodestreamError("JP2 header box has no image header (ihdr)")
    start, end = header[b"ihdr"]
    if end - start < 14:
        raise CodestreamError("JP2 image header (ihdr) is cut short")
    height, width, nc, bpc = struct.unpack_from(">IIHB", data, start)
    start, end = top[b"jp2c"]
    siz = _siz(data[start:end])
    bits = (bpc & 0x7F) + 1 if bpc != 0xFF else siz.precision  # 0xFF: per-component (bpcc box)
    if (height, width, nc) != (siz.rows, siz.columns, siz.components) or bits != siz.precision:
        raise CodestreamError(
            f"JP2 image header states {height} x {width} x {nc} at {bits} bits, its codestream "
            f"{siz.rows} x {siz.columns} x {siz.components} at {siz.precision} bits"
        )
    return siz


# ---------------------------------------------------------------------------------------------
# RLE
# ---------------------------------------------------------------------------------------------

_RLE_HEADER: Final = 64


def rle_segments(stream: bytes) -> list[tuple[int, int]]:
    """(start, end) of each segment of an RLE frame, checked against the fragment's length."""
    if len(stream) < _RLE_HEADER:
        raise CodestreamError("RLE frame is shorter than its 64-byte header")
    count, *offsets = struct.unpack_from("<16I", stream, 0)
    if not 1 <= count <= 15:
        raise CodestreamError(f"RLE header states {count} segments, 1 to 15 exist")
    starts = offsets[:count]
    if starts[0] != _RLE_HEADER or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise CodestreamError("RLE segment offsets do not start at 64 and increase")
    if starts[-1] >= len(stream):
        raise CodestreamError("RLE segment offset lies past the end of the frame")
    if any(offset != 0 for offset in offsets[count:]):
        raise CodestreamError("RLE header has offsets beyond its segment count")
    ends = [*starts[1:], len(stream)]
    return list(zip(starts, ends, strict=True))


def rle_decoded_length(segment: bytes, limit: int) -> int:
    """How many bytes a PackBits segment decodes to, counted from its run headers, stopping
    as soon as the count passes ``limit`` (so a bomb costs no more than a valid segment)."""
    decoded = 0
    pos = 0
    end = len(segment)
    while pos < end and decoded <= limit:
        header = segment[pos]
        if header < 128:  # literal run of header + 1 bytes
            decoded += header + 1
            pos += header + 2
        elif header > 128:  # replicate the next byte 257 - header times
            decoded += 257 - header
            pos += 2
        else:  # 128: no operation
            pos += 1
    return decoded
