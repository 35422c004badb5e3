"""Training smoke tests on generated images (CPU, tiny sizes): every backbone, the region model,
the detector, k-fold, resume and calibrate, each ending in a loadable, verifiable package."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from inference.datasets import load_fracatlas
from inference.modelcard import ModelKind
from inference.models import load_model
from inference.packages import read_package, verify_package
from inference.protocols import FractureClassifier, FractureDetector, RegionClassifier
from inference.regions import Region
from inference.training.augment import AugmentConfig, augment
from inference.training.detector import famo_square, froc, recall_at_fppi, write_yolo_folder
from inference.training.splits import holdout_split, repeated_kfold
from node.cli import main
from tests.test_datasets import FRACATLAS_HEADER


def _bone(rng: np.random.Generator, fracture: bool, width: int = 64, height: int = 48) -> np.ndarray:
    """A grey 'bone' band on a dark background; a fracture is a dark gap across it."""
    image = (rng.random((height, width)) * 30).astype(np.uint8)
    image[height // 3 : 2 * height // 3, :] = 180
    if fracture:
        x = int(rng.integers(10, width - 10))
        image[height // 3 : 2 * height // 3, x : x + 3] = 20
    return image


@pytest.fixture
def csv_data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for k in range(36):
        label = k % 3 == 0
        name = f"img/{k:03d}.png"
        (tmp_path / "img").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / name), _bone(rng, label))
        region = "hand" if k % 2 else "leg"
        rows.append([name, int(label), region, f"S{k // 2}", "valid" if k >= 24 else "train"])
    listing = tmp_path / "site.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "region", "study_id", "split"])
        writer.writerows(rows)
    return listing


def _common(tmp_path: Path, name: str, epochs: int = 1) -> list[str]:
    return [
        "--size",
        "32",
        "--epochs",
        str(epochs),
        "--batch",
        "8",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "out" / name),
        "--work",
        str(tmp_path / "work" / name),
        "--cache",
        str(tmp_path / "cache"),
    ]


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "resnet18", "efficientnet_b0"])
def test_classifier_smoke_per_backbone(tmp_path: Path, csv_data: Path, backbone: str) -> None:
    args = ["train", "classifier", "--data", str(csv_data), "--all-regions", "--backbone", backbone]
    assert main(args + _common(tmp_path, backbone)) == 0
    package = verify_package(tmp_path / "out" / backbone)
    card = package.card
    assert card.kind is ModelKind.CLASSIFIER and card.architecture == backbone and card.input_size == 32
    assert card.group is None and set(card.regions) == {Region.HAND, Region.LEG}
    assert len(card.operating_points) == 3 and card.validation_metrics["n"] == 12
    assert card.training_data["epochs_run"] == 1
    assert card.training_data["valid"]["images"] == 12
    model = load_model(package)
    assert isinstance(model, FractureClassifier)
    assert isinstance(model.module, torch.nn.Module) and not model.module.training  # type: ignore[attr-defined]
    assert str(model.device) == "cpu"  # type: ignore[attr-defined]
    batch = np.random.default_rng(1).random((3, 32, 32)).astype(np.float32)
    p = model.probabilities(batch)
    assert p.shape == (3,) and np.all((p >= 0) & (p <= 1))
    z = model.logits(batch)
    assert card.validation_metrics["calibration"]["method"] == "temperature+offset"
    assert np.allclose(p, 1 / (1 + np.exp(-(z / card.temperature + card.logit_offset))), atol=1e-6)


def test_training_is_reproducible_and_resumes(tmp_path: Path, csv_data: Path) -> None:
    base = ["train", "classifier", "--data", str(csv_data), "--group", "upper-distal"]
    assert main(base + _common(tmp_path, "a", epochs=2)) == 0
    assert main(base + _common(tmp_path, "b", epochs=2)) == 0
    a, b = (load_model(read_package(tmp_path / "out" / n)) for n in "ab")
    batch = np.random.default_rng(2).random((4, 32, 32)).astype(np.float32)
    assert np.allclose(a.logits(batch), b.logits(batch), atol=1e-5)  # type: ignore[union-attr]
    card = read_package(tmp_path / "out" / "a").card
    assert card.regions == (Region.HAND,)  # the group's regions only
    # resuming a finished run trains nothing more and gives the same weights
    assert main(base + _common(tmp_path, "a", epochs=2) + ["--resume"]) == 0
    again = load_model(read_package(tmp_path / "out" / "a"))
    assert np.allclose(a.logits(batch), again.logits(batch), atol=1e-6)  # type: ignore[union-attr]
    assert len(read_package(tmp_path / "out" / "a").card.training_data["history"]) == 2
    # a checkpoint of other settings is refused
    assert main(base + _common(tmp_path, "a", epochs=2) + ["--resume", "--lr", "0.1"]) == 2


def test_kfold_reports_every_fold(tmp_path: Path, csv_data: Path) -> None:
    args = ["train", "classifier", "--data", str(csv_data), "--all-regions", "--kfold", "2", "--repeats", "1"]
    assert main(args + _common(tmp_path, "kfold")) == 0
    cv = read_package(tmp_path / "out" / "kfold").card.training_data["cross_validation"]
    assert cv["folds"] == 2 and len(cv["auroc_per_fold"]) == 2


def test_region_model_smoke(tmp_path: Path, csv_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "region", "--data", str(csv_data), "--min-images", "5"]
    assert main(args + _common(tmp_path, "region")) == 0
    package = verify_package(tmp_path / "out" / "region")
    assert package.card.kind is ModelKind.REGION and package.card.regions == (Region.HAND, Region.LEG)
    metrics = package.card.validation_metrics
    assert set(metrics["per_region"]) == {"hand", "leg"} and 0 <= metrics["accuracy"] <= 1
    model = load_model(package)
    assert isinstance(model, RegionClassifier)
    answers = model.predict(np.zeros((2, 32, 32), dtype=np.float32))
    assert all(region in (Region.HAND, Region.LEG) and 0.5 <= p <= 1 for region, p in answers)
    capsys.readouterr()


def test_calibrate_writes_a_new_version(
    tmp_path: Path, csv_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["train", "classifier", "--data", str(csv_data), "--all-regions"] + _common(tmp_path, "c")) == 0
    )
    before = read_package(tmp_path / "out" / "c").card
    assert (
        main(
            [
                "calibrate",
                str(tmp_path / "out" / "c"),
                "--data",
                str(csv_data),
                "--cache",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    after = verify_package(tmp_path / "out" / "c").card
    assert after.version == "1.0.1" and after.device_uid != before.device_uid
    assert {p.name for p in after.operating_points} == {"high_sensitivity", "high_specificity", "youden"}
    assert after.validation_metrics["n"] == 12 and "calibration" in after.validation_metrics
    assert "temperature" in capsys.readouterr().out
    # an all-region model scoped to one group is calibrated on that group's images only
    scoped = ["--group", "upper-distal", "--regions", "hand", "--name", "c-hand", "--version", "2.0.0"]
    assert main(["calibrate", str(tmp_path / "out" / "c"), "--data", str(csv_data)] + scoped) == 0
    card = verify_package(tmp_path / "out" / "c").card
    assert (card.name, card.group, card.version) == ("c-hand", "upper-distal", "2.0.0")
    assert card.regions == (Region.HAND,)
    assert card.validation_metrics["n"] == 6
    assert main(["calibrate", str(tmp_path), "--data", str(csv_data)]) == 2
    # temperature scaling alone, on request
    only = ["calibrate", str(tmp_path / "out" / "c"), "--data", str(csv_data), "--temperature-only"]
    assert main(only) == 0
    card = verify_package(tmp_path / "out" / "c").card
    assert card.logit_offset == 0.0 and card.validation_metrics["calibration"]["method"] == "temperature"


def test_bad_input_exits_2(tmp_path: Path, csv_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "train",
                "classifier",
                "--data",
                str(tmp_path / "absent"),
                "--all-regions",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    # a group the data do not hold
    args = ["train", "classifier", "--data", str(csv_data), "--group", "lower-distal"]
    assert main(args + _common(tmp_path, "none")) == 2
    assert "no labelled training images" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# detector


def _fracatlas_with_boxes(root: Path) -> Path:
    rng = np.random.default_rng(3)
    rows = []
    (root / "images").mkdir(parents=True)
    (root / "yolo").mkdir()
    for k in range(18):
        boxed = k % 2 == 0
        image = _bone(rng, False, 96, 96)
        stem = f"IMG{k:07d}"
        lines = ""
        if boxed:
            x = int(rng.integers(20, 70))
            image[30:60, x : x + 6] = 255
            lines = f"0 {(x + 3) / 96:.4f} {45 / 96:.4f} {6 / 96:.4f} {30 / 96:.4f}\n"
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), image)
        (root / "yolo" / f"{stem}.txt").write_text(lines)
        split = "valid" if k >= 12 else "train"
        rows.append(
            [f"{stem}.jpg", "hand", 1, 0, 0, 0, 0, 0, 0, int(boxed), int(boxed), 1, 0, 0, split, 96, 96, 0]
        )
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FRACATLAS_HEADER)
        writer.writerows(rows)
    return root


def test_detector_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _fracatlas_with_boxes(tmp_path / "fa")
    args = [
        "train",
        "detector",
        "--data",
        str(data),
        "--workers",
        "0",
        "--negatives-per-positive",
        "1",
        "--group",
        "upper-middle",
        "--famo",
    ]
    common = _common(tmp_path, "det")
    common[common.index("--size") + 1] = "64"
    common[common.index("--batch") + 1] = "4"
    assert main(args + common) == 0
    package = verify_package(tmp_path / "out" / "det")
    card = package.card
    assert card.kind is ModelKind.DETECTOR and card.architecture == "yolov8n" and card.input_size == 64
    assert "recall_at_0.5_fp_per_image" in card.validation_metrics
    assert card.training_data["famo_square_boxes"] is True
    model = load_model(package)
    assert isinstance(model, FractureDetector)
    found = model.detect(np.zeros((2, 64, 64), dtype=np.float32))
    assert len(found) == 2 and all(isinstance(boxes, list) for boxes in found)
    assert (package.path / "model.pt").stat().st_size < 8 * 1024 * 1024
    capsys.readouterr()


def test_famo_squares_boxes_in_the_yolo_folder(tmp_path: Path) -> None:
    assert famo_square((10, 20, 14, 40), 100, 100) == (2.0, 20.0, 22.0, 40.0)
    assert famo_square((0, 0, 4, 20), 100, 100) == (0.0, 0.0, 12.0, 20.0)  # clipped at the edge
    from inference.pixels import PreprocessConfig
    from inference.training.cache import prepare_set

    images = load_fracatlas(_fracatlas_with_boxes(tmp_path / "fa"), "train")
    prepared = prepare_set(images, 64, PreprocessConfig(), None, progress=False)
    write_yolo_folder(prepared, tmp_path / "yolo", "train", famo=True)
    labels = sorted((tmp_path / "yolo" / "labels" / "train").glob("*.txt"))
    boxes = [line.split() for f in labels for line in f.read_text().splitlines()]
    assert boxes and all(float(b[3]) == pytest.approx(float(b[4]), abs=1e-5) for b in boxes)
    assert len(list((tmp_path / "yolo" / "images" / "train").glob("*.png"))) == len(images)


def test_froc_counts_hits_and_false_positives() -> None:
    truths = [[(0, 0, 10, 10)], [], [(50, 50, 60, 60)]]
    detections = [
        [(0, 0, 10, 10, 0.9), (0, 0, 10, 10, 0.8)],  # a hit, then a duplicate (false positive)
        [(5, 5, 9, 9, 0.7)],  # false positive on a normal image
        [(80, 80, 90, 90, 0.6)],  # a miss
    ]
    thresholds, recall, fppi = froc(truths, detections)
    assert list(thresholds) == [0.9, 0.8, 0.7, 0.6]
    assert list(recall) == [0.5, 0.5, 0.5, 0.5]
    assert list(fppi) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert recall_at_fppi(recall, fppi, 0.5) == 0.5 and recall_at_fppi(recall, fppi, -1) == 0.0


# --------------------------------------------------------------------------------------------
# splits and augmentation


def test_holdout_and_kfold_keep_studies_together() -> None:
    studies = [f"S{k // 3}" for k in range(60)]
    targets = np.array([int(k // 3 % 4 == 0) for k in range(60)], dtype=np.int64)
    train, held = holdout_split(studies, targets, 0.25, seed=0)
    assert set(train) | set(held) == set(range(60)) and not set(train) & set(held)
    assert not {studies[k] for k in train} & {studies[k] for k in held}
    assert 0 < targets[held].sum() < len(held)  # both classes held out
    pairs = repeated_kfold(studies, targets, folds=3, repeats=2, seed=0)
    assert len(pairs) == 6
    for repeat in range(2):
        tests = np.concatenate([pairs[repeat * 3 + f][1] for f in range(3)])
        assert sorted(tests) == list(range(60))
    for train, test in pairs:
        assert not {studies[k] for k in train} & {studies[k] for k in test}


def test_augmentation_is_seeded_and_stays_in_range() -> None:
    batch = torch.rand(4, 1, 32, 32)
    one = augment(batch, AugmentConfig(), torch.Generator().manual_seed(5))
    two = augment(batch, AugmentConfig(), torch.Generator().manual_seed(5))
    other = augment(batch, AugmentConfig(), torch.Generator().manual_seed(6))
    assert torch.equal(one, two) and not torch.equal(one, other)
    assert one.shape == batch.shape and float(one.min()) >= 0.0 and float(one.max()) <= 1.0


def test_card_json_is_plain_data(tmp_path: Path, csv_data: Path) -> None:
    assert (
        main(["train", "classifier", "--data", str(csv_data), "--all-regions"] + _common(tmp_path, "j")) == 0
    )
    data = json.loads((tmp_path / "out" / "j" / "model.json").read_text())
    assert data["preprocessing"]["stretch"] is True and data["input_size"] == 32
    assert data["training_data"]["machine"] and data["training_data"]["wall_seconds"] >= 0


def test_concurrent_trainings_share_one_cache(tmp_path: Path, csv_data: Path) -> None:
    """Two trainings filling one cache at once each write under their own temporary name."""
    from concurrent.futures import ThreadPoolExecutor

    from inference.datasets import load_csv
    from inference.pixels import PreprocessConfig
    from inference.training.cache import prepare_set

    images = load_csv(csv_data)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=6) as pool:
        sets = list(
            pool.map(lambda _: prepare_set(images, 32, PreprocessConfig(), cache, progress=False), range(6))
        )
    stored = list(cache.rglob("*.npz"))
    assert len(stored) == len(images)
    assert not [path for path in stored if ".tmp" in path.name]
    again = prepare_set(images, 32, PreprocessConfig(), cache, progress=False)
    for prepared in sets:
        assert np.array_equal(prepared.pixels, again.pixels)
