"""Decoding is bounded: a compressed frame's own header is read and checked before a decoder runs.

Real encoded frames (pydicom-data files, and tests/dicomgen.py through pydicom's and dcmtk's
encoders) give the parsers of node/codecs.py their ground truth; the bombs are those frames with
their headers rewritten to claim sizes the dataset does not have (a 5 KB JPEG 2000 claiming
65000 x 65000 made openjpeg allocate ~10 GB before the fix). The memory bound is measured in a
child process (``ru_maxrss`` of a fresh interpreter, under an address-space limit so a regression
fails instead of swapping the machine); the error type says the decoder was never reached:
:class:`CompressedFrameMismatchError` is raised by the header check, before decoding.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
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

from node import codecs
from node.imaging import (
    CompressedFrameMismatchError,
    ImageTooLargeError,
    load_frames,
)
from tests.dicomgen import SC_STORAGE, encode, make_dataset

LIMIT = 100_000_000


def _reread(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _frame(ds: Dataset) -> bytes:
    return bytes(get_frame(ds.PixelData, 0, number_of_frames=1))


def _with_frame(ds: Dataset, stream: bytes) -> Dataset:
    ds.PixelData = encapsulate([stream + b"\0" * (len(stream) % 2)])
    return ds


def _encoded(syntax: UID, bits: int = 8) -> Dataset:
    return _reread(encode(make_dataset(rows=128, cols=96, bits_stored=bits), syntax))


def _testdata(name: str) -> Path:
    found = get_testdata_file(name, download=False)
    if found is None:
        pytest.skip(f"{name} is not in pydicom-data here")
    return Path(str(found))


# ---------------------------------------------------------------------------------------------
# The parsers against real codestreams
# ---------------------------------------------------------------------------------------------

REAL_FRAMES = [
    ("SC_rgb_jpeg_dcmtk.dcm", "jpeg"),  # baseline, YBR_FULL_422
    ("JPEG-lossy.dcm", "jpeg"),  # extended 12-bit
    ("JPEG-LL.dcm", "jpeg"),  # lossless SV1
    ("MR_small_jpeg_ls_lossless.dcm", "jpeg-ls"),
    ("JPEGLSNearLossless_16.dcm", "jpeg-ls"),
    ("RG3_J2KR.dcm", "j2k"),
    ("JPEG2000.dcm", "j2k"),
    ("GDCMJ2K_TextGBR.dcm", "j2k"),  # a JP2 file wrapper around the codestream
]


@pytest.mark.parametrize(("name", "kind"), REAL_FRAMES)
def test_headers_of_real_frames_state_the_datasets_size(name: str, kind: str) -> None:
    ds = pydicom.dcmread(_testdata(name))
    stream = _frame(ds)
    if kind == "j2k":
        header = codecs.j2k_header(stream)
    else:
        header = codecs.jpeg_header(stream, ls=kind == "jpeg-ls")
    assert (header.rows, header.columns, header.components) == (ds.Rows, ds.Columns, ds.SamplesPerPixel)
    assert header.precision <= ds.BitsAllocated


@pytest.mark.parametrize("name", ["emri_small_RLE.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_16bit.dcm"])
def test_rle_headers_of_real_frames(name: str) -> None:
    ds = pydicom.dcmread(_testdata(name))
    stream = _frame(ds)
    segments = codecs.rle_segments(stream)
    assert len(segments) == ds.SamplesPerPixel * ds.BitsAllocated // 8
    plane = ds.Rows * ds.Columns
    for start, end in segments:
        assert plane <= codecs.rle_decoded_length(stream[start:end], 2 * plane) <= plane + 1


@pytest.mark.parametrize(
    "syntax",
    [
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        RLELossless,
    ],
    ids=lambda s: UID(s).keyword,
)
def test_generated_frames_pass_the_check_and_decode(syntax: UID) -> None:
    (frame,) = load_frames(_encoded(syntax), max_pixels=LIMIT)
    assert frame.pixels.shape == (128, 96)


# ---------------------------------------------------------------------------------------------
# Bombs and garbled headers: refused before decoding
# ---------------------------------------------------------------------------------------------


def _sof_offset(stream: bytes, markers: tuple[int, ...]) -> int:
    """Offset of the first frame header marker (a real stream: tables come before it)."""
    for marker in markers:
        found = stream.find(struct.pack(">H", marker))
        if found > 0:
            return found
    raise AssertionError("no frame header in the test stream")


def _jpeg_claiming(stream: bytes, rows: int, columns: int, markers: tuple[int, ...]) -> bytes:
    at = _sof_offset(stream, markers)
    # marker(2) Lf(2) P(1) Y(2) X(2)
    return stream[: at + 5] + struct.pack(">HH", rows, columns) + stream[at + 9 :]


def _j2k_claiming(stream: bytes, rows: int, columns: int) -> bytes:
    assert stream[:4] == b"\xff\x4f\xff\x51"
    return stream[:8] + struct.pack(">II", columns, rows) + stream[16:]


def _jp2(codestream: bytes, rows: int, columns: int, components: int = 1, bits: int = 8) -> bytes:
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload

    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", rows, columns, components, bits - 1, 7, 0, 0))
    colr = box(b"colr", struct.pack(">BBBI", 1, 0, 0, 17))
    return (
        b"\x00\x00\x00\x0cjP  \r\n\x87\n"
        + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
        + box(b"jp2h", ihdr + colr)
        + box(b"jp2c", codestream)
    )


def _bomb_cases() -> list[tuple[str, Dataset]]:
    cases: list[tuple[str, Dataset]] = []
    j2k = _encoded(JPEG2000Lossless)
    cases.append(("j2k-65000", _with_frame(j2k, _j2k_claiming(_frame(j2k), 65000, 65000))))
    j2k = _encoded(JPEG2000Lossless)
    cases.append(
        ("jp2-65000", _with_frame(j2k, _jp2(_j2k_claiming(_frame(j2k), 65000, 65000), 65000, 65000)))
    )
    j2k = _encoded(JPEG2000Lossless)
    cases.append(("jp2-ihdr-65000", _with_frame(j2k, _jp2(_frame(j2k), 65000, 65000))))
    for syntax, markers in (
        (JPEGBaseline8Bit, (0xFFC0, 0xFFC1)),
        (JPEGLosslessSV1, (0xFFC3,)),
        (JPEGLSLossless, (0xFFF7,)),
    ):
        ds = _encoded(syntax)
        cases.append(
            (f"{syntax.keyword}-20000", _with_frame(ds, _jpeg_claiming(_frame(ds), 20000, 20000, markers)))
        )
    rle = _encoded(RLELossless)
    # One segment of replicate runs: each two bytes decode to 128, 6.4 MB for a 12 KB plane.
    bomb = struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x81\x00" * 50_000
    cases.append(("rle-packbits", _with_frame(rle, bomb)))
    return cases


@pytest.mark.parametrize("case", range(len(_bomb_cases())))
def test_bombs_are_refused_by_the_header_check(case: int) -> None:
    name, ds = _bomb_cases()[case]
    with pytest.raises(CompressedFrameMismatchError) as caught:
        load_frames(ds, max_pixels=LIMIT)
    assert caught.value.sop_instance_uid == str(ds.SOPInstanceUID)
    assert "frame 0" in caught.value.reason, name


def test_bombs_cost_no_memory(tmp_path: Path) -> None:
    """A fresh interpreter under a 4 GiB address-space limit loads every bomb; its peak RSS
    grows by well under 200 MB (the unchecked J2K bomb alone took 10.6 GB)."""
    paths = []
    for name, ds in _bomb_cases():
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    script = textwrap.dedent(
        """
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (4 * 1024**3, 4 * 1024**3))
        import pydicom
        from node.imaging import load_frames
        datasets = [pydicom.dcmread(p) for p in sys.argv[1:]]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        errors = []
        for ds in datasets:
            try:
                load_frames(ds, max_pixels=100_000_000)
                errors.append(None)
            except Exception as exc:
                errors.append(type(exc).__name__)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"errors": errors, "grown_kib": after - before}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["errors"] == ["CompressedFrameMismatchError"] * len(paths)
    assert report["grown_kib"] < 200 * 1024


@pytest.mark.parametrize(
    ("syntax", "garble", "words"),
    [
        (JPEGBaseline8Bit, lambda s: b"\x00" * 16, "SOI"),
        (JPEGBaseline8Bit, lambda s: b"\xff\xd8\xff\xda\x00\x02" + s[2:], "no frame header before its scan"),
        (JPEGBaseline8Bit, lambda s: s[:40], "runs past the end"),
        (JPEGLSLossless, lambda s: b"\xff\xd8\xff\xc3" + s[4:], "SOF55 expected"),
        (JPEG2000Lossless, lambda s: s[:2] + b"\xff\x52" + s[4:], "no SIZ"),
        (JPEG2000Lossless, lambda s: s[:20], "cut short"),
        (JPEG2000Lossless, lambda s: b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 20, "JP2"),
        (RLELossless, lambda s: struct.pack("<16I", 16, *([64] * 15)) + s[64:], "16 segments"),
        (RLELossless, lambda s: struct.pack("<16I", 1, 10**6, *([0] * 14)) + s[64:], "offsets"),
        (RLELossless, lambda s: struct.pack("<16I", 2, 64, 80, *([0] * 13)) + s[64:], "2 segments"),
    ],
    ids=[
        "jpeg-no-soi",
        "jpeg-no-sof",
        "jpeg-cut",
        "jpeg-ls-wrong-sof",
        "j2k-no-siz",
        "j2k-cut",
        "jp2-no-boxes",
        "rle-count",
        "rle-offset",
        "rle-segments",
    ],
)
def test_garbled_headers_are_refused(syntax: UID, garble: object, words: str) -> None:
    ds = _encoded(syntax)
    assert callable(garble)
    with pytest.raises(CompressedFrameMismatchError, match=words):
        load_frames(_with_frame(ds, garble(_frame(ds))), max_pixels=LIMIT)


def test_jpeg_with_lines_defined_later_is_refused() -> None:
    ds = _encoded(JPEGBaseline8Bit)
    stream = _jpeg_claiming(_frame(ds), 0, 96, (0xFFC0, 0xFFC1))
    with pytest.raises(CompressedFrameMismatchError, match="0 x 96"):
        load_frames(_with_frame(ds, stream), max_pixels=LIMIT)


def test_jpeg_header_of_another_size_within_the_limit() -> None:
    ds = _encoded(JPEGBaseline8Bit)
    stream = _jpeg_claiming(_frame(ds), 256, 192, (0xFFC0, 0xFFC1))
    with pytest.raises(CompressedFrameMismatchError, match="256 x 192 x 1, the dataset 128 x 96 x 1"):
        load_frames(_with_frame(ds, stream), max_pixels=LIMIT)


def test_progressive_jpeg_in_the_baseline_syntax_is_refused() -> None:
    ds = _encoded(JPEGBaseline8Bit)
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(ds.pixel_array, dtype=np.uint8)).save(buffer, "JPEG", progressive=True)
    with pytest.raises(CompressedFrameMismatchError, match="process 0xFFC2"):
        load_frames(_with_frame(ds, buffer.getvalue()), max_pixels=LIMIT)


def test_j2k_tile_count_beyond_the_standard_is_refused() -> None:
    ds = _encoded(JPEG2000Lossless)
    stream = bytearray(_j2k_claiming(_frame(ds), 300, 300))
    stream[24:32] = struct.pack(">II", 1, 1)  # XTsiz, YTsiz: 90000 tiles of one pixel
    with pytest.raises(CompressedFrameMismatchError, match="90000 tiles"):
        load_frames(_with_frame(ds, bytes(stream)), max_pixels=LIMIT)


def test_j2k_precision_beyond_bits_allocated_is_refused() -> None:
    ds = _encoded(JPEG2000Lossless)
    stream = bytearray(_frame(ds))
    stream[42] = 15  # Ssiz: 16-bit samples in an 8-bit allocated image
    with pytest.raises(CompressedFrameMismatchError, match="16 bits per sample"):
        load_frames(_with_frame(ds, bytes(stream)), max_pixels=LIMIT)


def test_samples_count_towards_the_pixel_limit() -> None:
    rgb = np.zeros((100, 100, 3), dtype=np.uint8)
    ds = make_dataset(sop_class=SC_STORAGE, rows=100, cols=100, bits_stored=8, pixels=rgb)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds = _reread(ds)
    assert len(load_frames(ds, max_pixels=30_000)) == 1
    with pytest.raises(ImageTooLargeError, match="x 3 samples = 30000 pixels, limit 29999"):
        load_frames(ds, max_pixels=29_999)
