"""The pure pixel maths of inference/pixels.py: DICOM grey-scale transforms and the letterbox.

Windowing is checked against pydicom's own implementation of PS3.3 C.11.2 as an independent
reference; the letterbox against where OpenCV actually puts the pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_windowing

from inference import pixels as px

# ---------------------------------------------------------------------------------------------
# Grey-scale transforms
# ---------------------------------------------------------------------------------------------


def _pydicom_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """pydicom's windowing of 16-bit unsigned data, rescaled from its [0, 65535] output to [0, 1]."""
    ds = Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored = 16
    ds.PixelRepresentation = 0
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.VOILUTFunction = function
    with np.errstate(over="ignore"):  # pydicom's sigmoid overflows to the right limit
        return np.asarray(apply_windowing(values.astype(np.float64), ds)) / 65535.0


@pytest.mark.parametrize("function", list(px.WindowFunction))
@pytest.mark.parametrize(
    ("center", "width"), [(2048.0, 4096.0), (550.0, 1024.0), (100.5, 7.0), (3000.0, 1.0)]
)
def test_window_matches_pydicom(function: px.WindowFunction, center: float, width: float) -> None:
    values = np.arange(0, 4096, dtype=np.float64).reshape(64, 64)
    if function is px.WindowFunction.LINEAR and width == 1.0:
        pytest.skip("pydicom divides by zero for a LINEAR width of 1; covered by test_window_width_one")
    ours = px.window(values, center, width, function)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _pydicom_window(values, center, width, function), atol=1e-6)


def test_window_width_one_is_a_threshold() -> None:
    values = np.array([[99.0, 99.5, 100.0, 101.0]])
    np.testing.assert_array_equal(px.window(values, 100.0, 1.0), [[0.0, 0.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    ("width", "function", "valid"),
    [
        (1.0, px.WindowFunction.LINEAR, True),
        (0.5, px.WindowFunction.LINEAR, False),
        (0.5, px.WindowFunction.LINEAR_EXACT, True),
        (0.0, px.WindowFunction.SIGMOID, False),
        (float("nan"), px.WindowFunction.LINEAR, False),
    ],
)
def test_window_validity(width: float, function: px.WindowFunction, valid: bool) -> None:
    assert px.window_is_valid(width, function) is valid
    if not valid:
        with pytest.raises(ValueError):
            px.window(np.zeros((2, 2)), 0.0, width, function)


def test_restrict_bits_drops_high_bits_and_extends_the_sign() -> None:
    stored = np.array([0xF123, 0x0FFF, 0x0800, 0x07FF], dtype=np.uint16)
    np.testing.assert_array_equal(px.restrict_bits(stored, 12, signed=False), [0x123, 4095, 2048, 2047])
    np.testing.assert_array_equal(px.restrict_bits(stored, 12, signed=True), [0x123, -1, -2048, 2047])
    # Already sign-extended data (what pydicom returns) stays as it is.
    np.testing.assert_array_equal(
        px.restrict_bits(np.array([-2048, -1, 2047], dtype=np.int16), 12, signed=True), [-2048, -1, 2047]
    )


def test_padding_mask_value_and_range() -> None:
    stored = np.array([0, 1, 5, 10, 11])
    np.testing.assert_array_equal(px.padding_mask(stored, 5), [False, False, True, False, False])
    np.testing.assert_array_equal(px.padding_mask(stored, 10, 1), [False, True, True, True, False])


def test_lookup_clamps_outside_the_table() -> None:
    table = np.array([10, 20, 30], dtype=np.uint16)
    values = np.array([-5, -1, 0, 1, 2, 9])
    np.testing.assert_array_equal(px.lookup(values, -1, table), [10, 10, 20, 30, 30, 30])
    with pytest.raises(ValueError):
        px.lookup(values, 0, np.array([]))


def test_rescale() -> None:
    np.testing.assert_array_equal(px.rescale(np.array([0, 1, 2]), 2.0, -1024.0), [-1024.0, -1022.0, -1020.0])


def test_percentile_window_ignores_padding() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(100.0, 200.0, size=(64, 64))
    image[:, :16] = -30000.0  # padding far outside the data
    keep = np.ones(image.shape, dtype=bool)
    keep[:, :16] = False
    out = px.percentile_window(image, keep, 0.0, 100.0)
    assert out[:, 16:].min() == pytest.approx(0.0) and out[:, 16:].max() == pytest.approx(1.0)
    # Without the mask the padding takes the bottom of the range and squeezes the data.
    squeezed = px.percentile_window(image, None, 0.0, 100.0)
    assert squeezed[:, 16:].min() > 0.9
    assert not px.percentile_window(np.full((4, 4), 7.0)).any()


def test_invert_and_grey() -> None:
    image = np.array([[0.0, 0.25, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(px.invert(image), [[1.0, 0.75, 0.0]])
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(px.rgb_to_grey(rgb, 255.0), [[0.299, 0.587, 0.114, 1.0]], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Letterbox
# ---------------------------------------------------------------------------------------------


def _box_from_moments(image: np.ndarray) -> tuple[float, float, float, float]:
    """Edges of a uniform box from the mean and variance of its profiles (pixel i covers [i, i+1])."""
    edges = []
    for axis in (0, 1):  # summing over rows gives the x profile
        profile = image.sum(axis=axis).astype(np.float64)
        centres = np.arange(profile.size) + 0.5
        mass = profile.sum()
        mean = (profile * centres).sum() / mass
        half = np.sqrt(3.0 * ((profile * (centres - mean) ** 2).sum() / mass))
        edges.append((mean - half, mean + half))
    (x0, x1), (y0, y1) = edges
    return x0, y0, x1, y1


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [
        (1760, 1760, 640),
        (2991, 1213, 640),
        (997, 2345, 224),
        (333, 1000, 640),
        (150, 97, 512),
        (100, 300, 1024),
    ],
)
def test_letterbox_maps_a_box_back_within_half_a_pixel(height: int, width: int, size: int) -> None:
    """A box drawn in the source, found in the model image and mapped back, lands on itself.

    The round trip goes through real pixels, so it checks the transform against the resize.
    (Resizing to a rounded size, as the first version did, misses by up to ~5 source pixels.)
    """
    rng = np.random.default_rng(height * width + size)
    for _ in range(5):
        x0 = int(rng.integers(width // 20 + 2, width // 4))
        x1 = int(rng.integers(width // 2, width - width // 20 - 2))
        y0 = int(rng.integers(height // 20 + 2, height // 4))
        y1 = int(rng.integers(height // 2, height - height // 20 - 2))
        image = np.zeros((height, width), dtype=np.float32)
        image[y0:y1, x0:x1] = 1.0
        prepared = px.letterbox(image, size)
        assert prepared.pixels.shape == (size, size) and prepared.pixels.dtype == np.float32
        found = prepared.transform.to_source(*_box_from_moments(prepared.pixels))
        np.testing.assert_allclose(found, (x0, y0, x1, y1), atol=0.5)


def test_letterbox_transform_round_trip_and_padding() -> None:
    prepared = px.letterbox(np.ones((300, 1200), dtype=np.float32), 640)
    t = prepared.transform
    assert t.scale == pytest.approx(640 / 1200)
    assert t.pad_x == 0.0 and t.pad_y == (640 - 160) // 2
    box = (10.25, 20.5, 1100.0, 299.0)
    np.testing.assert_allclose(t.to_source(*t.to_model(*box)), box, atol=1e-9)
    # The padding is 0 and the content starts exactly at the pad.
    assert not prepared.pixels[: int(t.pad_y)].any()
    assert prepared.pixels[int(t.pad_y) : int(t.pad_y) + 160].min() > 0.99


def test_letterbox_of_a_sliver_does_not_fail() -> None:
    prepared = px.letterbox(np.ones((1, 5000), dtype=np.float32), 224)
    assert prepared.pixels.shape == (224, 224)
    assert prepared.pixels.any()


def test_prepare_is_deterministic_float32() -> None:
    rng = np.random.default_rng(3)
    image = rng.uniform(0.2, 0.7, size=(300, 200)).astype(np.float32)
    config = px.PreprocessConfig(stretch=True, clahe=True)
    first = px.prepare(image, config, 128)
    second = px.prepare(image.copy(), config, 128)
    assert first.pixels.dtype == np.float32 and first.pixels.shape == (128, 128)
    np.testing.assert_array_equal(first.pixels, second.pixels)
    assert 0.0 <= first.pixels.min() and first.pixels.max() <= 1.0
    with pytest.raises(ValueError):
        px.prepare(np.zeros((4, 4, 3), dtype=np.float32), config, 64)
