"""The logistic stack of classifier and map logits: fitting, out-of-fold choice, calibration on
valid, and ``fracnode train segmenter --from-checkpoint ... --stack-with CLASSIFIER``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import optimize

from inference.calibration import CalibrationError, apply_calibration, calibrate_temperature
from inference.datasets import load_source
from inference.maps import stacked_probabilities
from inference.modelcard import HIGH_SENSITIVITY
from inference.packages import verify_package
from inference.training.segmenter_package import classifier_split
from inference.training.stack import (
    calibrate_stack,
    compare_out_of_fold,
    fit_logistic,
    fit_stack,
    stack_logits,
)
from node.cli import main
from tests.test_datasets import FRACATLAS_HEADER


def _logistic_data(
    n: int, weights: tuple[float, float], bias: float, seed: int = 0
) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    c, m = rng.normal(size=n), rng.normal(size=n)
    z = weights[0] * c + weights[1] * m + bias
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.int64)
    return c, m, y


def test_known_weights_are_recovered() -> None:
    c, m, y = _logistic_data(40_000, (1.5, 0.7), -0.5)
    (w_c, w_m), b = fit_logistic(np.column_stack([c, m]), y, l2=0.0)
    assert w_c == pytest.approx(1.5, abs=0.05) and w_m == pytest.approx(0.7, abs=0.05)
    assert b == pytest.approx(-0.5, abs=0.05)


def test_the_penalised_fit_is_the_minimum_scipy_finds() -> None:
    c, m, y = _logistic_data(300, (2.0, -1.0), 0.3, seed=1)
    x = np.column_stack([c, m])
    l2 = 5.0

    def loss(beta: np.ndarray) -> float:
        z = x @ beta[:2] + beta[2]
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * beta[:2] @ beta[:2])

    reference = optimize.minimize(loss, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    (w_c, w_m), b = fit_logistic(x, y, l2)
    assert np.allclose([w_c, w_m, b], reference, atol=1e-5)
    # The penalty shrinks the weights, never the bias.
    (free_c, free_m), _ = fit_logistic(x, y, 0.0)
    assert abs(w_c) < abs(free_c) and abs(w_m) < abs(free_m)


def test_separable_data_keep_finite_weights_and_bad_input_is_refused() -> None:
    (w_c, w_m), b = fit_logistic(
        np.array([[-2.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [2.0, 0.0]]), [0, 0, 1, 1], 1.0
    )
    assert np.isfinite([w_c, w_m, b]).all() and w_c > 0 and w_m == 0.0
    with pytest.raises(CalibrationError, match="positives and negatives"):
        fit_logistic(np.zeros((3, 2)), [1, 1, 1])
    with pytest.raises(CalibrationError, match="map logits"):
        fit_stack([0.0, 1.0], [0.0], [0, 1], "c")
    with pytest.raises(CalibrationError):
        fit_stack([0.0, np.nan], [0.0, 1.0], [0, 1], "c")


def _two_views(n: int, seed: int, map_noise: float = 1.0) -> tuple[np.ndarray, ...]:
    """Two noisy readings of one latent fracture score: each member sees half the truth."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=n)
    y = (latent > 0.9).astype(np.int64)
    return latent + rng.normal(size=n), 0.5 * (latent + map_noise * rng.normal(size=n)) - 3.0, y


def test_out_of_fold_the_stack_wins_where_it_should_help() -> None:
    classifier, map_logits, y = _two_views(400, seed=2)
    comparison = compare_out_of_fold(classifier, map_logits, y, folds=5, repeats=4, seed=0)
    table = comparison.as_dict()
    assert comparison.chosen == "stack" and table["images"] == 400 and len(comparison.auroc["stack"]) == 20
    means = table["mean_auroc"]
    assert means["stack"] > max(means["classifier"], means["map"])
    assert comparison.wins() >= 15  # of 20 folds
    # Each fold's stack was fitted without its test fold: the weights differ from fold to fold.
    assert len({w for w in comparison.weights}) == 20


def test_a_useless_member_leaves_the_better_one_chosen_or_matched() -> None:
    rng = np.random.default_rng(99)
    classifier, _, y = _two_views(300, seed=3)
    noise = rng.normal(size=300)
    comparison = compare_out_of_fold(classifier, noise, y, folds=5, repeats=4, seed=0)
    means = comparison.as_dict()["mean_auroc"]
    assert means["map"] == pytest.approx(0.5, abs=0.08)
    assert comparison.chosen in ("stack", "classifier")
    assert means["stack"] >= means["classifier"] - 0.02  # never much worse than the better member
    with pytest.raises(CalibrationError, match="two images of each class"):
        compare_out_of_fold([0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0, 1, 1])


def test_calibration_on_valid_is_folded_into_the_weights() -> None:
    classifier, map_logits, y = _two_views(300, seed=4)
    stack = fit_stack(classifier[:150], map_logits[:150], y[:150], "clf")
    calibrated = calibrate_stack(stack, classifier[150:], map_logits[150:], y[150:])
    report = calibrate_temperature(stack_logits(stack, classifier[150:], map_logits[150:]), y[150:])
    expected = apply_calibration(
        stack_logits(stack, classifier[150:], map_logits[150:]), report.temperature, report.logit_offset
    )
    served = stacked_probabilities(calibrated, classifier[150:], map_logits[150:])
    assert np.allclose(served, expected, atol=1e-9)
    assert calibrated.classifier == "clf"
    names = [p.name for p in calibrated.operating_points]
    assert HIGH_SENSITIVITY in names and calibrated.validation_metrics["n"] == 150
    # Recalibration keeps the ranking: the weights keep their ratio.
    assert calibrated.weights[0] / calibrated.weights[1] == pytest.approx(stack.weights[0] / stack.weights[1])


# --------------------------------------------------------------------------------------------
# packaging with --stack-with


def _fracatlas(root: Path, count: int = 60) -> Path:
    """``count`` FracAtlas-layout hand images (3/4 train), half with a bright fracture bar."""
    rng = np.random.default_rng(7)
    rows, polygons = [], {}
    (root / "images").mkdir(parents=True)
    (root / "yolo").mkdir()
    for k in range(count):
        fractured = k % 2 == 0
        image = (rng.random((96, 96)) * 40).astype(np.uint8)
        image[20:76, 30:66] = 120
        stem = f"IMG{k:07d}"
        lines = ""
        if fractured:
            x = int(rng.integers(32, 56))
            image[30:60, x : x + 8] = 255
            x0, y0, x1, y1 = x / 96, 30 / 96, (x + 8) / 96, 60 / 96
            polygons[f"{stem}.jpg"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            lines = f"0 {(x0 + x1) / 2:.5f} {(y0 + y1) / 2:.5f} {x1 - x0:.5f} {y1 - y0:.5f}\n"
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), image)
        (root / "yolo" / f"{stem}.txt").write_text(lines)
        split = "valid" if k >= count * 3 // 4 else "train"
        label = int(fractured)
        rows.append([f"{stem}.jpg", "hand", 1, *[0] * 6, label, label, 1, 0, 0, split, 96, 96, 0])
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FRACATLAS_HEADER)
        writer.writerows(rows)
    (root / "fracture_polygons.json").write_text(json.dumps({"format": "test", "images": polygons}))
    return root


def test_package_a_checkpoint_with_a_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _fracatlas(tmp_path / "fa")
    common = [
        "--data", str(data), "--size", "64", "--epochs", "1", "--batch", "8", "--threads", "1",
        "--device", "cpu", "--no-progress", "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    classifier = tmp_path / "out" / "hand-clf"
    assert main(["train", "classifier", *common, "--group", "upper-distal", "--out", str(classifier),
                 "--work", str(tmp_path / "clf-work")]) == 0  # fmt: skip
    work = tmp_path / "seg-work"
    first = tmp_path / "out" / "map"
    assert main(["train", "segmenter", *common, "--out", str(first), "--work", str(work),
                 "--stop-fraction", "0.4"]) == 0  # fmt: skip
    capsys.readouterr()
    clf_card = verify_package(classifier).card
    split = classifier_split(clf_card, load_source(data))
    assert split is not None  # rebuilt from the card, counts checked
    fitted, held = split
    assert (len(fitted), len(held)) == (39, 6) and not fitted & held

    stacked = tmp_path / "out" / "map-stacked"
    args = ["--out", str(stacked), "--from-checkpoint", str(work / "checkpoint.pt"), "--stop-fraction", "0.4",
            "--stack-with", str(classifier), "--stack-force"]  # fmt: skip
    assert main(["train", "segmenter", *common, *args]) == 0, capsys.readouterr().err
    card = verify_package(stacked).card
    assert card.segmenter is not None and card.segmenter.stack is not None
    stack = card.segmenter.stack
    assert stack.classifier == clf_card.name and np.isfinite([*stack.weights, stack.bias]).all()
    assert stack.operating_points and stack.validation_metrics["split"] == "valid"
    summary = card.training_data["stack"]
    assert "early-stopping hold-out carved out of FracAtlas train" in summary["chosen_on"]
    assert "of them were in the classifier's own fit set" in summary["classifier_fit_overlap"]
    assert summary["out_of_fold"]["folds"] >= 2 and set(summary["out_of_fold"]["mean_auroc"]) == {
        "stack",
        "classifier",
        "map",
    }
    assert "Stack with" in card.notes and "out-of-fold AUROC" in card.notes and "valid" in card.notes

    # Only the hold-out images the classifier never saw, and without forcing: attached or not,
    # the card says which images chose.
    unseen = tmp_path / "out" / "map-unseen"
    args = ["--out", str(unseen), "--from-checkpoint", str(work / "checkpoint.pt"), "--stop-fraction", "0.4",
            "--stack-with", str(classifier), "--stack-images", "unseen"]  # fmt: skip
    assert main(["train", "segmenter", *common, *args]) == 0, capsys.readouterr().err
    card = verify_package(unseen).card
    assert "only those the classifier was not fitted on either" in card.training_data["stack"]["chosen_on"]
    assert "Stack with" in card.notes
    assert (
        main(["train", "segmenter", *common, "--out", str(tmp_path / "x"), "--stack-with", str(tmp_path)])
        == 2
    )
    assert "not a model package" in capsys.readouterr().err
