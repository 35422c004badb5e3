"""DICOM to frozen values (node/imaging.py): decoding, the grey-scale pipeline, bad pixel data.

Real files: pydicom-data's RG3 CR in three encodings. Generated files: tests/dicomgen.py through
real encoders (pydicom/pylibjpeg/pyjpegls, dcmtk dcmcjpeg), written to bytes and read back as
the worker reads them from the spool. Expected grey levels come from pydicom's own Modality LUT
and windowing where pydicom implements them correctly, else from the standard's formulas.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_windowing, convert_color_space
from pydicom.pixels.utils import pixel_array
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
)

from inference import pixels as px
from node.imaging import (
    ImageTooLargeError,
    ImagingError,
    PixelDataError,
    SourceFrame,
    UnsupportedImageError,
    VoiSource,
    header_facts,
    load_frames,
)
from tests.dicomgen import ALL_SYNTAXES, CR_STORAGE, SC_STORAGE, encode, make_dataset, phantom

LIMIT = 100_000_000
LOSSLESS = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
}
# Largest (max, mean) absolute difference in [0, 1] grey levels from the original after a lossy
# codec at dicomgen's settings (IJG quality 90, JPEG-LS error 2, JPEG 2000 ratio 20 on a tiny
# noisy image): a sanity bound on the codec, not on the decoder, which is checked exactly.
LOSSY_TOLERANCE = {
    JPEGBaseline8Bit: (0.2, 0.03),
    JPEGExtended12Bit: (0.2, 0.03),
    JPEGLSNearLossless: (0.02, 0.01),
    JPEG2000: (0.3, 0.06),
}


def _reread(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _one(ds: Dataset) -> SourceFrame:
    frames = load_frames(ds, max_pixels=LIMIT)
    assert len(frames) == 1
    return frames[0]


def _pydicom_grey(ds: Dataset) -> np.ndarray:
    """pydicom's Modality LUT and windowing of ``ds``, rescaled from its output range to [0, 1]."""
    values = apply_modality_lut(pixel_array(ds), ds)
    windowed = apply_windowing(values, ds)
    signed = int(ds.PixelRepresentation) == 1
    bits = int(ds.BitsStored)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    low, high = low * slope + intercept, high * slope + intercept
    return (np.asarray(windowed) - low) / (high - low)


# ---------------------------------------------------------------------------------------------
# Real files: RG3 (CR, MONOCHROME1, 10 of 16 bits, one window)
# ---------------------------------------------------------------------------------------------


def test_rg3_lossless_encodings_decode_to_identical_arrays(rg3_files: dict[str, Path]) -> None:
    plain = _one(pydicom.dcmread(rg3_files["RG3_UNCR"]))
    j2k = _one(pydicom.dcmread(rg3_files["RG3_J2KR"]))
    assert plain.pixels.shape == (1760, 1760) and plain.pixels.dtype == np.float32
    assert plain.voi is VoiSource.WINDOW and plain.photometric_interpretation_source == "MONOCHROME1"
    np.testing.assert_array_equal(plain.pixels, j2k.pixels)


def test_rg3_lossy_jpeg2000_is_close(rg3_files: dict[str, Path]) -> None:
    plain = _one(pydicom.dcmread(rg3_files["RG3_UNCR"]))
    lossy = _one(pydicom.dcmread(rg3_files["RG3_J2KI"]))
    error = np.abs(lossy.pixels.astype(np.float64) - plain.pixels)
    print(f"RG3_J2KI vs RG3_UNCR after windowing: max abs error {error.max():.5f}, mean {error.mean():.6f}")
    # Measured: max 0.0088, mean 0.00072 (9 and 0.7 grey levels of the 1024-wide window).
    assert 0.0 < error.max() < 0.02
    assert error.mean() < 0.002


def test_rg3_monochrome1_is_inverted(rg3_files: dict[str, Path]) -> None:
    ds = pydicom.dcmread(rg3_files["RG3_UNCR"])
    frame = _one(ds)
    # Bone is bright and open-field air dark once MONOCHROME1 is turned into MONOCHROME2
    # (the raw values are the other way round: air is near the top of the 10 bits).
    air = frame.pixels[200:400, 480:560]
    tibia = frame.pixels[560:640, 800:900]
    assert air.mean() < 0.2 < 0.5 < tibia.mean()
    raw = pixel_array(ds)
    assert raw[200:400, 480:560].mean() > raw[560:640, 800:900].mean()
    # The same pixels declared MONOCHROME2 give exactly the complement.
    ds.PhotometricInterpretation = "MONOCHROME2"
    np.testing.assert_allclose(_one(ds).pixels, 1.0 - frame.pixels, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Generated files: every transfer syntax x signed/unsigned x 8/12/16 bits
# ---------------------------------------------------------------------------------------------


def _impossible(syntax: UID, bits: int, signed: bool) -> str | None:
    if syntax == JPEGBaseline8Bit and bits != 8:
        return "JPEG baseline (process 1) codes 8-bit samples only"
    if syntax == JPEGExtended12Bit and bits > 12:
        return "JPEG extended (process 2/4) codes 8- or 12-bit samples only"
    if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit) and signed:
        return "lossy JPEG codes unsigned samples: dcmcjpeg converts signed input and rewrites the window"
    return None


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("syntax", ALL_SYNTAXES, ids=[s.name for s in ALL_SYNTAXES])
def test_every_transfer_syntax_decodes_to_the_native_result(syntax: UID, signed: bool, bits: int) -> None:
    reason = _impossible(syntax, bits, signed)
    if reason:
        pytest.skip(reason)
    native = make_dataset(bits_stored=bits, signed=signed, rows=64, cols=48)
    expected = _one(_reread(native))
    np.testing.assert_allclose(expected.pixels, _pydicom_grey(native), atol=1e-6)

    encoded = _reread(encode(native, syntax))
    got = _one(encoded)
    assert got.voi is VoiSource.WINDOW
    # Decoding and LUTs agree with pydicom's on the same encoded file, lossy or not.
    np.testing.assert_allclose(got.pixels, _pydicom_grey(encoded), atol=1e-6)
    if syntax in LOSSLESS:
        np.testing.assert_array_equal(got.pixels, expected.pixels)
    else:
        largest, mean = LOSSY_TOLERANCE[syntax]
        error = np.abs(got.pixels.astype(np.float64) - expected.pixels)
        assert error.max() <= largest and error.mean() <= mean, (error.max(), error.mean())


# ---------------------------------------------------------------------------------------------
# Grey-scale variants
# ---------------------------------------------------------------------------------------------


def _dx(**kwargs: object) -> Dataset:
    kwargs.setdefault("rows", 64)
    kwargs.setdefault("cols", 48)
    return make_dataset(**kwargs)  # type: ignore[arg-type]


def test_rescale_slope_and_intercept_before_the_window() -> None:
    ds = _dx(bits_stored=12, rescale=(2.0, -1000.0), window=(3000.0, 6000.0))
    frame = _one(_reread(ds))
    stored = pixel_array(ds).astype(np.float64)
    np.testing.assert_allclose(frame.pixels, px.window(stored * 2.0 - 1000.0, 3000.0, 6000.0), atol=1e-6)
    np.testing.assert_allclose(frame.pixels, _pydicom_grey(ds), atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function(function: str) -> None:
    ds = _dx(bits_stored=12, window=(1500.0, 800.0))
    ds.VOILUTFunction = function
    frame = _one(_reread(ds))
    np.testing.assert_allclose(frame.pixels, _pydicom_grey(ds), atol=1e-6)
    assert frame.voi is VoiSource.WINDOW


def _lut_item(table: np.ndarray, first: int, bits: int, as_words: bool) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(table) % 65536, first, bits]
    if as_words:
        item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
    else:
        item.add_new("LUTData", "US", [int(v) for v in table])
    return item


@pytest.mark.parametrize(("bits", "as_words"), [(16, True), (16, False), (8, True)])
def test_voi_lut_sequence_wins_over_the_window(bits: int, as_words: bool) -> None:
    ds = _dx(bits_stored=12, window=(100.0, 10.0))
    entries = np.arange(4096)
    table = np.round(np.sqrt(entries / 4095.0) * (2**bits - 1)).astype(np.int64)  # a gamma curve
    ds.VOILUTSequence = Sequence([_lut_item(table, 0, bits, as_words)])
    frame = _one(_reread(ds))
    assert frame.voi is VoiSource.VOI_LUT
    # An 8-bit LUT of 4096 entries is the case pydicom's apply_voi indexes through a uint8
    # array and wraps, so the expectation is the standard's lookup, written out.
    expected = table[pixel_array(ds).astype(np.int64)] / (2**bits - 1)
    np.testing.assert_allclose(frame.pixels, expected, atol=1e-6)


def test_modality_lut_sequence() -> None:
    ds = _dx(bits_stored=12, window=(4000.0, 8000.0))
    del ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType
    table = np.arange(4096) * 2 + 100
    item = _lut_item(table, 0, 16, as_words=True)
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    frame = _one(_reread(ds))
    expected = px.window(table[pixel_array(ds).astype(np.int64)].astype(np.float64), 4000.0, 8000.0)
    np.testing.assert_allclose(frame.pixels, expected, atol=1e-6)


def test_no_window_falls_back_to_percentiles_of_the_non_padding_pixels() -> None:
    stored = phantom(64, 48, 12)
    stored[:, :8] = 0  # a padded border
    ds = make_dataset(sop_class=CR_STORAGE, bits_stored=12, pixels=stored, rows=64, cols=48)
    assert "WindowCenter" not in ds
    ds.PixelPaddingValue = 0
    frame = _one(_reread(ds))
    assert frame.voi is VoiSource.PERCENTILE
    assert not frame.pixels[:, :8].any()
    expected = px.percentile_window(stored.astype(np.float64), stored != 0)
    np.testing.assert_allclose(frame.pixels[:, 8:], expected[:, 8:], atol=1e-6)
    # Without PixelPaddingValue the border is data: it takes the bottom of the range.
    del ds.PixelPaddingValue
    assert _one(_reread(ds)).pixels[:, 8:].min() > frame.pixels[:, 8:].min()


def test_padding_of_a_monochrome1_image_is_black_after_inversion() -> None:
    """Padding at stored 0 is white in MONOCHROME1: without the padding rule it would be 1.0."""
    stored = phantom(64, 48, 10)
    assert stored.min() > 10  # no data pixel in the padding range
    stored[:4] = 0
    stored[4:6] = 7
    ds = make_dataset(
        sop_class=CR_STORAGE, bits_stored=10, pixels=stored, rows=64, cols=48, window=(512.0, 1024.0)
    )
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelPaddingValue = 0
    ds.PixelPaddingRangeLimit = 10
    frame = _one(_reread(ds))
    assert not frame.pixels[:6].any()
    np.testing.assert_allclose(
        frame.pixels[6:], 1.0 - px.window(stored[6:].astype(np.float64), 512.0, 1024.0)
    )
    del ds.PixelPaddingValue, ds.PixelPaddingRangeLimit
    assert _one(_reread(ds)).pixels[:4].min() == 1.0


def test_invalid_window_width_falls_back_to_percentiles() -> None:
    ds = _dx(bits_stored=12, window=(2048.0, 0.0))
    assert _one(_reread(ds)).voi is VoiSource.PERCENTILE


def test_bits_above_bits_stored_are_ignored() -> None:
    ds = _dx(bits_stored=12)
    clean = _one(_reread(ds)).pixels
    stored = np.frombuffer(ds.PixelData, dtype=np.uint16) | np.uint16(0xA000)
    ds.PixelData = stored.tobytes()
    np.testing.assert_array_equal(_one(_reread(ds)).pixels, clean)


def test_generated_monochrome1_matches_its_monochrome2_twin() -> None:
    """dicomgen inverts the stored values for MONOCHROME1 and the window is symmetric."""
    m2 = _one(_reread(_dx(bits_stored=12)))
    m1 = _one(_reread(_dx(bits_stored=12, photometric="MONOCHROME1")))
    assert m1.photometric_interpretation_source == "MONOCHROME1"
    np.testing.assert_allclose(m1.pixels, m2.pixels, atol=1e-6)


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless], ids=lambda s: s.name
)
def test_multiframe_each_frame_is_an_image(syntax: UID) -> None:
    frames = np.stack([phantom(64, 48, 12, seed=i) for i in range(3)])
    ds = make_dataset(
        sop_class=UID("1.2.840.10008.5.1.4.1.1.7.3"),
        bits_stored=12,
        rows=64,
        cols=48,
        frames=3,
        pixels=frames,
    )
    ds.WindowCenter, ds.WindowWidth = 2048.0, 4096.0
    loaded = load_frames(_reread(encode(ds, syntax)), max_pixels=LIMIT)
    assert [f.frame for f in loaded] == [0, 1, 2]
    assert {f.sop_instance_uid for f in loaded} == {str(ds.SOPInstanceUID)}
    for f, stored in zip(loaded, frames, strict=True):
        np.testing.assert_allclose(f.pixels, px.window(stored.astype(np.float64), 2048.0, 4096.0), atol=1e-6)
    assert not np.array_equal(loaded[0].pixels, loaded[1].pixels)


def _rgb_sc() -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:64, 0:48]
    rgb = np.stack([x * 5, y * 3, (x + y) * 2], axis=-1) + rng.integers(0, 8, size=(64, 48, 3))
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    ds = make_dataset(sop_class=SC_STORAGE, bits_stored=8, rows=64, cols=48)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = rgb.tobytes()
    return ds, rgb


@pytest.mark.parametrize(
    ("syntax", "tolerance"),
    [(ExplicitVRLittleEndian, 1e-6), (RLELossless, 1e-6), (JPEG2000Lossless, 1e-6), (JPEGBaseline8Bit, 0.1)],
    ids=lambda v: v.name if isinstance(v, UID) else str(v),
)
def test_rgb_secondary_capture_becomes_grey(syntax: UID, tolerance: float) -> None:
    ds, rgb = _rgb_sc()
    encoded = _reread(encode(ds, syntax))
    frame = _one(encoded)
    assert frame.voi is VoiSource.COLOUR
    assert frame.photometric_interpretation_source == str(encoded.PhotometricInterpretation)
    np.testing.assert_allclose(frame.pixels, px.rgb_to_grey(rgb, 255.0), atol=tolerance)


def test_jpeg2000_ybr_rct_becomes_grey() -> None:
    """YBR_RCT is how DICOM labels a lossless JPEG 2000 with the reversible colour transform;
    the decoder undoes the transform, so the label must be accepted and read as RGB."""
    ds, rgb = _rgb_sc()
    encoded = _reread(encode(ds, JPEG2000Lossless))
    encoded.PhotometricInterpretation = "YBR_RCT"
    frame = _one(encoded)
    assert frame.photometric_interpretation_source == "YBR_RCT"
    np.testing.assert_allclose(frame.pixels, px.rgb_to_grey(rgb, 255.0), atol=1e-6)


def test_ybr_full_native_becomes_grey() -> None:
    ds, rgb = _rgb_sc()
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.PixelData = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.uint8).tobytes()
    np.testing.assert_allclose(_one(_reread(ds)).pixels, px.rgb_to_grey(rgb, 255.0), atol=2.5 / 255)


def test_source_frame_values() -> None:
    ds = _dx(bits_stored=12)
    frame = _one(_reread(ds))
    assert (frame.study_uid, frame.series_uid, frame.sop_instance_uid) == (
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
    )
    assert (frame.rows, frame.columns, frame.frame) == (64, 48, 0)
    assert frame.pixels.shape == (64, 48)
    with pytest.raises(ValueError):
        frame.pixels[0, 0] = 1.0  # read-only: a frozen value


# ---------------------------------------------------------------------------------------------
# Bad pixel data: a named error with a storable reason, no patient data
# ---------------------------------------------------------------------------------------------


def _assert_clean(error: ImagingError, ds: Dataset) -> None:
    assert error.sop_instance_uid == str(ds.SOPInstanceUID)
    for secret in (str(ds.PatientName), str(ds.PatientID)):
        assert secret not in error.reason and secret not in str(error)


@pytest.mark.parametrize("delta", [-100, -2, 2, 100])
def test_wrong_length_native_pixel_data(delta: int) -> None:
    ds = _dx(bits_stored=12)
    data = ds.PixelData
    ds.PixelData = data[:delta] if delta < 0 else data + b"\0" * delta
    with pytest.raises(PixelDataError) as caught:
        load_frames(_reread(ds), max_pixels=LIMIT)
    assert "bytes" in caught.value.reason
    _assert_clean(caught.value, ds)


def _replace_codestream(ds: Dataset, cut: bool) -> Dataset:
    from pydicom.encaps import encapsulate, get_frame

    stream = bytes(get_frame(ds.PixelData, 0, number_of_frames=1))
    if cut:
        bad = stream[: len(stream) // 2]
    else:  # the right length and end marker, nothing decodable inside
        bad = stream[:2] + bytes(len(stream) - 4) + b"\xff\xd9"
    ds.PixelData = encapsulate([bad + b"\0" * (len(bad) % 2)])
    return ds


@pytest.mark.parametrize(
    "syntax", [JPEGLossless, JPEGLSLossless, JPEG2000Lossless, JPEGBaseline8Bit], ids=str
)
@pytest.mark.parametrize("cut", [True, False], ids=["truncated", "corrupt"])
def test_broken_codestreams(syntax: UID, cut: bool) -> None:
    ds = _reread(encode(_dx(bits_stored=8), syntax))
    with pytest.raises(PixelDataError) as caught:
        load_frames(_replace_codestream(ds, cut), max_pixels=LIMIT)
    assert ("truncated" if cut else "cannot be decoded") in caught.value.reason
    _assert_clean(caught.value, ds)


def test_broken_rle() -> None:
    ds = _reread(encode(_dx(bits_stored=12), RLELossless))
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + bytes(60)])
    with pytest.raises(PixelDataError, match="cannot be decoded"):
        load_frames(ds, max_pixels=LIMIT)


@pytest.mark.parametrize("photometric", ["PALETTE COLOR", "YBR_PARTIAL_420", "HSV", "YBR_RCT"])
def test_unsupported_photometric_interpretation(photometric: str) -> None:
    ds = _dx(bits_stored=8)
    ds.PhotometricInterpretation = photometric
    with pytest.raises(UnsupportedImageError) as caught:
        load_frames(_reread(ds), max_pixels=LIMIT)
    assert photometric.split("_")[0] in caught.value.reason
    _assert_clean(caught.value, ds)


def test_too_large_is_refused_before_decoding() -> None:
    ds = _dx(bits_stored=12)
    with pytest.raises(ImageTooLargeError) as caught:
        load_frames(_reread(ds), max_pixels=64 * 48 - 1)
    _assert_clean(caught.value, ds)
    # Absurd dimensions over tiny pixel data: the size check comes first, so it is not a
    # length error (and nothing of 20000 x 20000 is ever allocated).
    ds.Rows, ds.Columns = 20000, 20000
    with pytest.raises(ImageTooLargeError, match="400000000 pixels"):
        load_frames(_reread(ds), max_pixels=LIMIT)


def test_other_bad_layouts() -> None:
    ds = _dx(bits_stored=12)
    del ds.PixelData
    with pytest.raises(PixelDataError, match="no pixel data"):
        load_frames(ds, max_pixels=LIMIT)
    ds = _dx(bits_stored=12)
    del ds.file_meta.TransferSyntaxUID
    with pytest.raises(PixelDataError, match="Transfer Syntax"):
        load_frames(ds, max_pixels=LIMIT)
    ds = _dx(bits_stored=12)
    ds.BitsStored = 17
    with pytest.raises(PixelDataError, match="bits stored"):
        load_frames(ds, max_pixels=LIMIT)
    ds = _dx(bits_stored=8)
    ds.BitsAllocated = 1
    with pytest.raises(UnsupportedImageError, match="1 bits allocated"):
        load_frames(ds, max_pixels=LIMIT)


# ---------------------------------------------------------------------------------------------
# Header facts
# ---------------------------------------------------------------------------------------------


def test_header_facts_of_a_generated_dx() -> None:
    ds = _dx(
        body_part="WRIST", study_description="XR WRIST 2V", series_description="R WRIST PA", protocol_name=""
    )
    facts = header_facts(_reread(ds))
    assert facts.body_part == "WRIST"
    assert facts.anatomic_codes == (("T-15460", "SRT", "Wrist joint"),)
    assert facts.study_description == "XR WRIST 2V" and facts.series_description == "R WRIST PA"
    assert facts.protocol_name is None  # empty is absent
    assert (facts.image_laterality, facts.laterality, facts.view_position, facts.modality) == (
        "R",
        "R",
        "PA",
        "DX",
    )


def test_header_facts_requested_procedure_from_request_attributes() -> None:
    ds = make_dataset(sop_class=CR_STORAGE, body_part=None)
    request = Dataset()
    request.RequestedProcedureID = "RP1"
    request.RequestedProcedureDescription = "  Röntgen Handgelenk li.  "
    ds.RequestAttributesSequence = Sequence([request])
    facts = header_facts(_reread(ds))
    assert facts.body_part is None
    assert facts.requested_procedure_description == "Röntgen Handgelenk li."
    assert facts.anatomic_codes == ()
    ds.RequestedProcedureDescription = "XR HAND"
    assert header_facts(ds).requested_procedure_description == "XR HAND"
