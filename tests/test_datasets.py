"""Loaders on generated FracAtlas-, web-, MURA- and CSV-shaped trees, and on the real sets when present."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.datasets import (
    SOURCE_CSV,
    SOURCE_FRACATLAS,
    SOURCE_MURA,
    SOURCE_WEB,
    DatasetError,
    detect_layout,
    load_csv,
    load_fracatlas,
    load_mura,
    load_source,
    load_upper_limb_web,
    read_image,
    select,
    summarise,
)
from inference.regions import AnatomicalGroup, Region


def _image(path: Path, width: int = 40, height: int = 30, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((height, width), value, dtype=np.uint8)
    array[:, : width // 2] = 20
    assert cv2.imwrite(str(path), array)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


FRACATLAS_HEADER = [
    "image_id",
    "region",
    "hand",
    "leg",
    "hip",
    "shoulder",
    "mixed",
    "hardware",
    "multiscan",
    "fractured",
    "fracture_count",
    "frontal",
    "lateral",
    "oblique",
    "split",
    "width",
    "height",
    "source_truncated",
]


def make_fracatlas(root: Path) -> Path:
    rows = [
        ["IMG0000001.jpg", "hand", 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, "train", 40, 30, 0],
        ["IMG0000002.jpg", "leg", 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, "train", 40, 30, 0],
        ["IMG0000003.jpg", "hand+shoulder", 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0, "valid", 40, 30, 0],
        ["IMG0000004.jpg", "leg+hip", 0, 1, 1, 0, 1, 0, 0, 1, 2, 1, 0, 0, "valid", 40, 30, 1],
    ]
    _write_csv(root / "labels.csv", FRACATLAS_HEADER, rows)
    for row in rows:
        _image(root / "images" / str(row[0]))
    (root / "yolo").mkdir()
    (root / "yolo" / "IMG0000001.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    (root / "yolo" / "IMG0000002.txt").write_text("")
    (root / "yolo" / "IMG0000004.txt").write_text("0 0.1 0.1 0.4 0.4\n0 0.9 0.5 0.1 0.1\n")
    return root


def make_web(root: Path) -> Path:
    rows = [
        ["elbow-1.jpg", "elbow", 1, "train"],
        ["img-2.jpg", "unknown", 0, "train"],
        ["wrist-3.jpg", "wrist", 1, "valid"],
    ]
    _write_csv(root / "labels.csv", ["image_id", "region", "n_boxes", "split"], rows)
    for row in rows:
        _image(root / "images" / str(row[0]))
    (root / "yolo").mkdir()
    (root / "yolo" / "elbow-1.txt").write_text("0 0.4 0.4 0.2 0.2\n")
    (root / "yolo" / "wrist-3.txt").write_text("0 0.6 0.6 0.2 0.2\n")
    return root


def make_mura(parent: Path) -> Path:
    """A tiny MURA v1.1 tree: two studies in train (one positive), one in valid."""
    root = parent / "MURA-v1.1"
    studies = {
        "train": [
            ("XR_WRIST/patient00001/study1_positive", 1, 2),
            ("XR_HUMERUS/patient00002/study1_negative", 0, 1),
        ],
        "valid": [("XR_ELBOW/patient11185/study1_negative", 0, 3)],
    }
    for split, entries in studies.items():
        paths, labelled = [], []
        for study, label, images in entries:
            labelled.append(f"MURA-v1.1/{split}/{study}/,{label}")
            for k in range(1, images + 1):
                relative = f"MURA-v1.1/{split}/{study}/image{k}.png"
                _image(parent / relative)
                paths.append(relative)
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{split}_image_paths.csv").write_text("\n".join(paths) + "\n")
        (root / f"{split}_labeled_studies.csv").write_text("\n".join(labelled) + "\n")
    return root


def test_fracatlas_layout(tmp_path: Path) -> None:
    root = make_fracatlas(tmp_path / "fracatlas")
    images = load_fracatlas(root)
    assert [i.label for i in images] == [1, 0, 0, 1]
    first, _, mixed, truncated = images
    assert first.region is Region.HAND and first.source == SOURCE_FRACATLAS and first.split == "train"
    assert len(first.boxes) == 1 and first.boxes[0] == pytest.approx((0.4, 0.3, 0.6, 0.7))
    assert mixed.regions == (Region.HAND, Region.SHOULDER) and mixed.region is Region.HAND
    assert len(truncated.boxes) == 2 and truncated.boxes[0] == pytest.approx((0.0, 0.0, 0.3, 0.3))  # clipped
    assert [i.study_id for i in load_fracatlas(root, "valid")] == ["IMG0000003", "IMG0000004"]
    assert detect_layout(root) == SOURCE_FRACATLAS
    # group membership counts every region an image shows
    proximal = select(images, groups=[AnatomicalGroup.UPPER_PROXIMAL])
    assert [i.study_id for i in proximal] == ["IMG0000003"]
    lower = select(images, regions=[Region.HIP])
    assert [i.study_id for i in lower] == ["IMG0000004"]


def test_web_layout_has_no_confirmed_negatives(tmp_path: Path) -> None:
    root = make_web(tmp_path / "web")
    images = load_upper_limb_web(root)
    assert [i.label for i in images] == [1, None, 1]
    assert images[1].region is Region.UNKNOWN and images[1].boxes == ()
    assert detect_layout(root) == SOURCE_WEB
    assert summarise(images)["sources"] == {
        SOURCE_WEB: {"images": 3, "positive": 2, "negative": 0, "unknown": 1}
    }
    assert len(select(images, labelled_only=True)) == 2


def test_mura_layout_study_level_labels(tmp_path: Path) -> None:
    root = make_mura(tmp_path)
    for given in (root, tmp_path):  # the MURA-v1.1 folder or its parent
        images = load_mura(given)
        assert len(images) == 6
        assert detect_layout(given) == SOURCE_MURA
    wrist = [i for i in images if i.region is Region.WRIST]
    assert len(wrist) == 2 and {i.label for i in wrist} == {1} and len({i.study_id for i in wrist}) == 1
    assert all(i.path.is_file() for i in images)
    valid = load_mura(root, "valid")
    assert {(i.region, i.label, i.split) for i in valid} == {(Region.ELBOW, 0, "valid")}
    assert {i.source for i in images} == {SOURCE_MURA}


def test_mura_image_of_an_unlabelled_study_is_an_error(tmp_path: Path) -> None:
    root = make_mura(tmp_path)
    (root / "valid_labeled_studies.csv").write_text("")
    with pytest.raises(DatasetError, match="valid_image_paths.csv row 1: image of unlabelled study"):
        load_mura(root, "valid")


def test_csv_layout(tmp_path: Path) -> None:
    _image(tmp_path / "a" / "one.png")
    _image(tmp_path / "a" / "two.png")
    _image(tmp_path / "a" / "three.png")
    listing = tmp_path / "site.csv"
    _write_csv(
        listing,
        ["path", "label", "region", "study_id", "split"],
        [
            ["a/one.png", 1, "wrist", "S1", "train"],
            ["a/two.png", 0, "Wrist", "S1", "train"],
            ["a/three.png", "", "knee", "", "valid"],
        ],
    )
    images = load_csv(listing)
    assert [i.label for i in images] == [1, 0, None]
    assert images[0].path == tmp_path / "a" / "one.png" and images[0].source == SOURCE_CSV
    assert images[1].region is Region.WRIST and images[0].study_id == images[1].study_id == "S1"
    assert images[2].study_id == "a/three.png"
    assert load_source(listing, "valid")[0].region is Region.KNEE
    # the minimal form: no study, no split
    minimal = tmp_path / "minimal.csv"
    _write_csv(minimal, ["path", "label", "region"], [["a/one.png", 1, "hand"]])
    assert load_csv(minimal)[0].split is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["a.png", 1, "tail"], "row 2: unknown region 'tail'"),
        (["a.png", "yes", "hand"], "row 2: label must be 0, 1 or empty"),
    ],
)
def test_csv_errors_name_the_row(tmp_path: Path, row: list[object], message: str) -> None:
    listing = tmp_path / "bad.csv"
    _write_csv(listing, ["path", "label", "region"], [row])
    with pytest.raises(DatasetError, match=message):
        load_csv(listing)


def test_csv_without_required_columns(tmp_path: Path) -> None:
    listing = tmp_path / "bad.csv"
    _write_csv(listing, ["file", "label"], [["a.png", 1]])
    with pytest.raises(DatasetError, match="missing column"):
        load_csv(listing)


def test_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown layout"):
        load_source(tmp_path)
    with pytest.raises(DatasetError, match="no such data folder"):
        load_source(tmp_path / "absent")


def test_read_image_grey_float_and_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = (rng.random((120, 90)) * 255).astype(np.uint8)
    path = tmp_path / "full.jpg"
    cv2.imwrite(str(path), array, [cv2.IMWRITE_JPEG_QUALITY, 95])
    image = read_image(path)
    assert image.shape == (120, 90) and image.dtype == np.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    truncated = tmp_path / "truncated.jpg"
    data = path.read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    partial = read_image(truncated)
    assert partial.shape == (120, 90)
    # the rows the scan holds decode to the same pixels
    assert np.abs(partial[:40] - image[:40]).max() < 1e-6
    colour = tmp_path / "colour.png"
    cv2.imwrite(str(colour), np.dstack([array, array, array]))
    assert read_image(colour).shape == (120, 90)
    sixteen = tmp_path / "sixteen.png"
    cv2.imwrite(str(sixteen), (array.astype(np.uint16) * 257))
    assert float(read_image(sixteen).max()) == pytest.approx(float(array.max()) / 255.0, abs=1e-6)
    with pytest.raises(DatasetError, match="cannot decode"):
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"not an image")
        read_image(bad)


# --------------------------------------------------------------------------------------------
# the real sets


def test_real_fracatlas(fracatlas: Path) -> None:
    images = load_source(fracatlas)
    assert len(images) == 3724  # datasets README: development part
    assert all(i.label in (0, 1) for i in images)
    by = {region: sum(1 for i in images if i.regions == (region,)) for region in Region}
    assert (
        by[Region.HAND] == 1170
        and by[Region.LEG] == 1929
        and by[Region.HIP] == 162
        and by[Region.SHOULDER] == 93
    )
    positives_with_boxes = sum(1 for i in images if i.label == 1 and i.boxes)
    assert positives_with_boxes > 0.9 * sum(1 for i in images if i.label == 1)
    assert all(i.label == 1 for i in images if i.boxes)
    assert {i.split for i in images} == {"train", "valid"}
    truncated = [i for i in images if i.study_id == "IMG0000003"] or images[:1]
    assert read_image(truncated[0].path).ndim == 2


def test_real_upper_limb_web(upper_limb_web: Path) -> None:
    images = load_source(upper_limb_web)
    assert len(images) == 1342
    assert not any(i.label == 0 for i in images)  # no confirmed negatives
    assert all((i.label == 1) == bool(i.boxes) for i in images)
    regions = {i.region for i in images}
    assert {
        Region.ELBOW,
        Region.FINGER,
        Region.FOREARM,
        Region.HUMERUS,
        Region.SHOULDER,
        Region.WRIST,
    } <= regions
