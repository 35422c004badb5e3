"""``fracnode evaluate`` / ``calibrate`` for fracture-map models: localisation within a false-positive
budget, the stack as the node serves it, source changes, a second source, the site's two-command job.

Exact figures come from a map model whose map needs no weights (``BrightMapSegmenter``: bright
4 x 4 cells fire) on synthetic images laid out as FracAtlas, with a solid bright block on each
fracture (its YOLO box) and a half-bright checkerboard on some negatives (a false positive of
lower score). Real packages with seeded weights test the command-line plumbing.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from inference.calibration import sigmoid
from inference.datasets import DatasetError, load_csv, load_source
from inference.evaluation.detection import ImageDetections, ScoredBox, localisation, recall_at_budget
from inference.evaluation.runner import ModelPlan, StackPlan, from_labelled
from inference.evaluation.scoring import EvaluationConfig
from inference.evaluation.shift import (
    SHIFTS,
    ShiftError,
    collimation,
    contrast,
    gamma,
    jpeg,
    marker,
    resample,
    shifts_named,
)
from inference.evaluation.suite import SourceInfo, run_suite
from inference.maps import stacked_probabilities
from inference.modelcard import (
    HIGH_SENSITIVITY,
    HIGH_SPECIFICITY,
    BoxOperatingPoint,
    OperatingPoint,
    SegmenterSpec,
    Stack,
)
from inference.models import load_model
from inference.packages import read_package, verify_package
from inference.regions import AnatomicalGroup, Region
from node.cli import main
from tests.modelgen import classifier_package
from tests.test_datasets import FRACATLAS_HEADER
from tests.test_segmenter import BrightMapSegmenter, segmenter_card, segmenter_package

G = AnatomicalGroup
TP_SCORE = float(sigmoid(14.0))  # a solid bright block
FP_SCORE = float(sigmoid(10.0))  # a half-bright checkerboard
BOX_POINTS = (
    BoxOperatingPoint(HIGH_SENSITIVITY, 0.5, 0.0, 0.0),
    BoxOperatingPoint(HIGH_SPECIFICITY, 0.99999, 0.0, 0.0),  # between the two scores
)


def _image(fractured: bool, spotted: bool) -> np.ndarray:
    """128 x 128 (letterboxed to 64 at scale 0.5): body, two thin bright lines that fix the
    stretch range without firing, and a block on a fracture or a checkerboard spot."""
    image = np.full((128, 128), 20, np.uint8)
    image[16:112, 16:112] = 100
    image[16:112, 20] = 255
    image[16:112, 108] = 255
    if fractured:
        image[32:64, 40:72] = 255
    if spotted:
        rows, columns = np.indices((32, 32))
        image[80:112, 24:56] = np.where((rows + columns) % 2 == 0, 255, 20)
    return image


FRACTURE_BOX = (40 / 128, 32 / 128, 72 / 128, 64 / 128)


def fracatlas(
    root: Path, positives: int = 6, negatives: int = 6, spotted: int = 3, region: str = "hand"
) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "yolo").mkdir()
    rows = []
    for k in range(positives + negatives):
        fractured = k < positives
        stem = f"IMG{k:07d}"
        cv2.imwrite(
            str(root / "images" / f"{stem}.png"), _image(fractured, not fractured and k - positives < spotted)
        )
        x0, y0, x1, y1 = FRACTURE_BOX
        line = f"0 {(x0 + x1) / 2} {(y0 + y1) / 2} {x1 - x0} {y1 - y0}\n" if fractured else ""
        (root / "yolo" / f"{stem}.txt").write_text(line)
        label = int(fractured)
        rows.append([f"{stem}.png", region, 1, *[0] * 6, label, label, 1, 0, 0, "valid", 128, 128, 0])
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FRACATLAS_HEADER)
        writer.writerows(rows)
    return root


def bright_model(name: str = "test-map", stack: Stack | None = None) -> BrightMapSegmenter:
    card = segmenter_card(name, spec=SegmenterSpec(box_operating_points=BOX_POINTS, stack=stack))
    return BrightMapSegmenter(card)


CONFIG = EvaluationConfig(resamples=20)


# --------------------------------------------------------------------------------------------
# localisation maths


def _detections(truth: bool, *scores_and_hits: tuple[float, bool]) -> ImageDetections:
    boxes = []
    for score, hit in scores_and_hits:
        boxes.append(ScoredBox(0.1, 0.1, 0.3, 0.3, score) if hit else ScoredBox(0.6, 0.6, 0.9, 0.9, score))
    return ImageDetections("i", "c", int(truth), ((0.1, 0.1, 0.3, 0.3),) if truth else (), tuple(boxes))


def test_recall_within_the_false_positive_budget_counts_every_image() -> None:
    images = [
        _detections(True, (0.9, True)),
        _detections(True, (0.4, True), (0.8, False)),
        _detections(False, (0.7, False)),
        _detections(False),
    ]
    # Ranked: 0.9 hit, 0.8 FP, 0.7 FP, 0.4 hit. Four images: 0.5 FP/image allows both FPs.
    target = recall_at_budget(images, 0.3, 0.5)
    assert (target.hits, target.lesions, target.threshold) == (2, 2, 0.4)
    assert target.false_positives_per_image == 0.5 and target.recall.estimate == 1.0
    strict = recall_at_budget(images, 0.3, 0.25)  # one FP allowed: stops at 0.8
    assert (strict.hits, strict.threshold, strict.false_positives_per_image) == (1, 0.8, 0.25)
    assert recall_at_budget(images, 0.3, 0.0).threshold == 0.9
    assert math.isinf(recall_at_budget([_detections(False, (0.5, False))], 0.3, 0.0).threshold)
    # Per-image thresholds: the first image's box is held to 0.95 (dropped), the rest to 0.5.
    held = localisation(images, [("p", [0.95, 0.5, 0.5, 0.5])], 0.3)
    (point,) = held.points
    assert (point.true_positives, point.false_positives, point.lesions) == (0, 2, 2)
    assert math.isnan(point.threshold) and held.negatives == 2 and held.images == 4


# --------------------------------------------------------------------------------------------
# one map model: image rows, localisation, calibration


def test_a_map_model_is_scored_for_probability_and_boxes(tmp_path: Path) -> None:
    images = from_labelled(load_source(fracatlas(tmp_path / "fa")))
    written = run_suite(
        images, [ModelPlan(bright_model(), None)], SourceInfo("fa", "fracatlas", None), tmp_path / "out",
        config=CONFIG, progress=False,
    )  # fmt: skip
    (model,) = written.data["models"]
    overall = model["rows"][0]
    assert overall["subset"]["name"] == "all" and overall["image"]["auroc"]["estimate"] == 1.0
    assert model["calibration"]["ece_after"]["estimate"] is not None
    rows = {r["subset"]["name"]: r for r in model["localisation"]}
    assert set(rows) == {"all", "upper-distal", "hand"}
    at_03, at_05 = rows["all"]["by_iou"]
    assert (at_03["iou"], at_05["iou"]) == (0.3, 0.5)
    for entry in (at_03, at_05):  # the boxes are exact: IoU 1 with the truth
        assert (entry["images"], entry["negatives"], entry["lesions"]) == (12, 6, 6)
        target = entry["target"]
        assert target["hits"] == 6 and target["false_positives_per_image"] == 0.25
        assert target["threshold"] == pytest.approx(FP_SCORE)
        sensitive, specific = entry["points"]
        assert (sensitive["true_positives"], sensitive["false_positives"]) == (6, 3)
        assert (specific["true_positives"], specific["false_positives"]) == (6, 0)
        assert dict(entry["recall_at"])[0.1] == 1.0
    report = written.report.read_text()
    assert "#### Localisation" in report and "recall at <= 0.5 FP/image, IoU 0.3" in report
    assert "test-map-0.0.1_froc.png" in model["figures"]


# --------------------------------------------------------------------------------------------
# as the node serves: the stack decides, the map model localises


def test_the_node_view_follows_the_stack_and_the_localiser(tmp_path: Path) -> None:
    images = from_labelled(load_source(fracatlas(tmp_path / "fa")))
    classifier = load_model(classifier_package(tmp_path / "models", G.UPPER_DISTAL, size=64))
    stack = Stack(
        classifier.card.name,
        (0.5, 0.2),
        -1.0,
        (OperatingPoint(HIGH_SENSITIVITY, 0.4, 0.9, 0.5), OperatingPoint(HIGH_SPECIFICITY, 0.8, 0.5, 0.9)),
    )
    segmenter = bright_model(stack=stack)
    group = frozenset({G.UPPER_DISTAL})
    plans = [
        ModelPlan(classifier, group, decides=frozenset(), localises=frozenset()),  # type: ignore[arg-type]
        ModelPlan(segmenter, group, decides=frozenset(), localises=group),
    ]
    written = run_suite(
        images, plans, SourceInfo("fa", "fracatlas", None), tmp_path / "out", config=CONFIG, progress=False,
        stacks=[StackPlan(stack, 0, 1, group, group)],
    )  # fmt: skip
    data = written.data
    names = [m["card"]["name"] for m in data["models"]]
    assert names == [classifier.card.name, "test-map", f"test-map+{classifier.card.name}"]
    stacked = data["models"][2]
    assert stacked["members"] == [classifier.card.name, "test-map"] and not stacked["localisation"]
    assert [p["name"] for p in stacked["card"]["operating_points"]] == [HIGH_SENSITIVITY, HIGH_SPECIFICITY]
    node = data["node"]
    assert node["deciding"] == [["upper-distal", f"test-map+{classifier.card.name}"]]
    assert node["localisers"] == [["upper-distal", "test-map"]]
    # The node's probability is the stack of the two members' logits, as the node computes it.
    predictions = list(csv.DictReader((written.directory / "predictions.csv").open()))
    by_model: dict[str, dict[str, dict[str, str]]] = {}
    for row in predictions:
        by_model.setdefault(row["model"], {})[row["image"]] = row
    keys = sorted(by_model["test-map"])
    expected = stacked_probabilities(
        stack,
        np.array([float(by_model[classifier.card.name][k]["logit"]) for k in keys]),
        np.array([float(by_model["test-map"][k]["logit"]) for k in keys]),
    )
    got = np.array([float(by_model[f"test-map+{classifier.card.name}"][k]["probability"]) for k in keys])
    assert np.allclose(got, expected, atol=1e-6)
    node_boxes = node["localisation"][0]["by_iou"][0]
    own = data["models"][1]["localisation"][0]["by_iou"][0]
    assert node_boxes["target"] == own["target"] and node_boxes["points"] == own["points"]
    report = written.report.read_text()
    assert "### The node's boxes" in report and "A logistic stack of" in report


# --------------------------------------------------------------------------------------------
# source changes and a second source


def test_source_change_transforms_are_exact() -> None:
    rng = np.random.default_rng(0)
    image = (0.2 + 0.6 * rng.random((40, 60))).astype(np.float32)
    assert resample(image, 0.5).shape == (20, 30) and resample(image, 2.0).shape == (80, 120)
    assert np.allclose(resample(np.full((8, 8), 0.3, np.float32), 0.5), 0.3)
    squeezed = jpeg(image, 50)
    assert squeezed.shape == image.shape and squeezed.dtype == np.float32
    assert 0.0 < float(np.abs(squeezed - image).mean()) < 0.1
    assert np.allclose(gamma(image, 0.7), image**0.7)
    flat = contrast(image, 0.8)
    assert flat.mean() == pytest.approx(image.mean(), abs=1e-6) and flat.std() == pytest.approx(
        0.8 * image.std(), rel=1e-5
    )
    framed = collimation(image)
    assert (
        not framed[:4].any()
        and not framed[-4:].any()
        and not framed[:, :6].any()
        and not framed[:, -6:].any()
    )
    assert np.array_equal(framed[4:-4, 6:-6], image[4:-4, 6:-6])
    marked = marker(np.zeros((100, 100), np.float32))
    block = marked[3:15, 3:15]  # side 12 % of 100, 3 % from the corner
    assert block.mean() > 0.6 and block.min() < 0.1 and (block == 1).any()  # a dark letter on white
    assert not marked[15:].any() and not marked[:, 15:].any()
    assert [s.name for s in shifts_named(["marker", "half"])] == ["marker", "half"]
    assert len(SHIFTS) == 9
    with pytest.raises(ShiftError, match="unknown"):
        shifts_named(["sepia"])
    with pytest.raises(ShiftError):
        gamma(np.zeros((2, 2, 3)), 1.0)


def _web(root: Path) -> Path:
    """An upper-limb-web layout: boxed images are fractures, an unboxed one is unknown."""
    (root / "images").mkdir(parents=True)
    (root / "yolo").mkdir()
    rows = []
    for k, (region, boxed) in enumerate([("hand", True), ("hand", True), ("wrist", True), ("hand", False)]):
        stem = f"web{k}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), _image(boxed and k != 1, False))
        x0, y0, x1, y1 = FRACTURE_BOX
        (root / "yolo" / f"{stem}.txt").write_text(
            f"0 {(x0 + x1) / 2} {(y0 + y1) / 2} {x1 - x0} {y1 - y0}\n" if boxed else ""
        )
        rows.append([f"{stem}.png", region, int(boxed), "test"])
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "region", "n_boxes", "split"])
        writer.writerows(rows)
    return root


def test_source_shift_and_second_source_reports(tmp_path: Path) -> None:
    images = from_labelled(load_source(fracatlas(tmp_path / "fa")))
    web = from_labelled(load_source(_web(tmp_path / "web")))
    model = bright_model()
    group = frozenset({G.UPPER_DISTAL})
    written = run_suite(
        images, [ModelPlan(model, group, decides=group, localises=group)],
        SourceInfo("fa", "fracatlas", None), tmp_path / "out", config=CONFIG, progress=False,
        shifts=shifts_named(["gamma0.7", "marker"]),
        second=(SourceInfo("web", "upper-limb-web", None), web),
    )  # fmt: skip
    shift = written.data["source_shift"]
    assert shift["negatives"] == 6 and [s["name"] for s in shift["shifts"]] == ["gamma0.7", "marker"]
    node, own = shift["reports"]
    assert node["name"] == "node" and own["name"] == "test-map"
    rows = {(r["subset"]["name"], r["shift"]): r for r in own["rows"]}
    # gamma 0.7 moves nothing the stretch does not undo; the white marker block fires on every
    # clean negative (3 of 6) and leaves the spotted ones called as they were.
    steady = rows[("all", "gamma0.7")]
    assert steady["negatives"] == 6 and steady["p90_abs_delta"] == pytest.approx(0.0, abs=1e-6)
    flagged = rows[("all", "marker")]
    assert flagged["median_abs_delta"] == pytest.approx(0.5, abs=0.5) and flagged["mean_delta"] > 0.45
    for crossing in flagged["crossings"]:
        assert crossing["called_before"] == 0.5 and crossing["called_after"] == 1.0
        assert crossing["up"]["estimate"] == 0.5 and crossing["down"]["estimate"] == 0.0
    assert node["rows"][0]["crossings"] == own["rows"][0]["crossings"]
    second = written.data["second_source"]
    assert second["source"]["positives"] == 3 and second["source"]["negatives"] == 0
    report = {r["subset"]["name"]: r for r in second["reports"][1]["rows"]}
    assert report["all"]["positives"] == 3 and report["hand"]["positives"] == 2
    high_sensitivity = report["all"]["points"][0]
    assert high_sensitivity["name"] == HIGH_SENSITIVITY and high_sensitivity["sensitivity"][
        "estimate"
    ] == pytest.approx(2 / 3)
    assert report["all"]["boxes"][0]["recall"]["estimate"] == pytest.approx(2 / 3)
    text = written.report.read_text()
    assert "## A second source" in text and "never specificity" in text and "## Source changes" in text


# --------------------------------------------------------------------------------------------
# the command line: package mode, node mode, docs


@pytest.fixture()
def packages(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    classifier = classifier_package(models, G.UPPER_DISTAL, size=64)
    stack = Stack(classifier.card.name, (0.5, 0.5), 0.0, (OperatingPoint(HIGH_SENSITIVITY, 0.3, 0.9, 0.5),))
    segmenter_package(
        models, segmenter_card(spec=SegmenterSpec(box_operating_points=BOX_POINTS, stack=stack))
    )
    return models


def test_evaluate_cli_with_map_packages_in_both_modes(
    packages: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = fracatlas(tmp_path / "fa")
    docs = tmp_path / "evaluation.md"
    docs.write_text("# E\n\n<!-- BEGIN GENERATED: results -->\nold\n<!-- END GENERATED: results -->\n")
    out = tmp_path / "package-mode"
    code = main([
        "evaluate", str(data), "--model", str(packages / "test-map"),
        "--model", str(packages / "test-upper-distal"), "--out", str(out), "--bootstrap", "10",
        "--no-progress", "--docs", str(docs),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    names = [m["card"]["name"] for m in results["models"]]
    assert names == ["test-map", "test-upper-distal", "test-map+test-upper-distal"]
    assert results["models"][0]["localisation"] and results["models"][0]["served"] is None
    section = docs.read_text()
    assert "old" not in section and "box recall at <= 0.5 FP/image" in section
    assert section.count("<!-- BEGIN GENERATED: results -->") == 1

    config = tmp_path / "fracnode.toml"
    config.write_text(f'[models]\ndirectory = "{packages}"\ndevice = "cpu"\ninclude_bundled = false\n')
    node_out = tmp_path / "node-mode"
    code = main(["--config", str(config), "evaluate", str(data), "--out", str(node_out), "--bootstrap", "10",
                 "--no-progress", "--source-shift", "marker"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((node_out / "results.json").read_text())
    assert results["node"]["deciding"] == [["upper-distal", "test-map+test-upper-distal"]]
    assert results["node"]["localisers"] == [["upper-distal", "test-map"]]
    assert results["source_shift"]["reports"][0]["name"] == "node"
    assert (
        main(["evaluate", str(data), "--model", str(packages / "test-map"), "--source-shift", "sepia"]) == 2
    )
    assert "unknown source change" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# a site's two-command job: calibrate, then evaluate, on a labelled CSV


def _site_csv(root: Path, boxes: bool, split: bool = False) -> Path:
    root.mkdir(parents=True)
    rows = []
    for k in range(16):
        fractured = k % 2 == 0
        name = f"site{k}.png"
        cv2.imwrite(str(root / name), _image(fractured, k % 4 == 1))
        row = {
            "path": name,
            "label": int(fractured),
            "region": "wrist" if k % 3 else "hand",
            "study_id": f"s{k}",
        }
        if boxes:
            row["boxes"] = " ".join(f"{v:.6f}" for v in FRACTURE_BOX) if fractured else ""
        if split:
            row["split"] = "valid" if k < 12 else "train"
        rows.append(row)
    path = root / "site.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_the_csv_layout_carries_optional_boxes(tmp_path: Path) -> None:
    path = _site_csv(tmp_path / "site", boxes=True)
    images = load_csv(path)
    assert len(images[0].boxes) == 1 and images[0].boxes[0] == pytest.approx(FRACTURE_BOX)
    assert images[1].boxes == ()
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,region,boxes\nsite0.png,1,hand,0.5 0.5 0.2 0.9\n")
    with pytest.raises(DatasetError, match="row 2"):
        load_csv(bad)


def test_calibrate_then_evaluate_a_map_model_on_a_site_csv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = segmenter_package(
        tmp_path / "models", segmenter_card(spec=SegmenterSpec(box_operating_points=BOX_POINTS))
    )
    before = package.card
    site = _site_csv(tmp_path / "site", boxes=True)
    cache = ["--cache", str(tmp_path / "cache")]
    assert main(["calibrate", str(package.path), "--data", str(site), *cache]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "every labelled image" in printed and "box high_sensitivity" in printed
    after = verify_package(package.path).card
    assert after.version != before.version and after.device_uid != before.device_uid
    assert after.validation_metrics["n"] == 16 and after.validation_metrics["calibrated_on"] == ["csv"]
    assert after.validation_metrics["boxes"]["fracture_boxes"] == 8
    assert after.segmenter is not None and [p.name for p in after.segmenter.box_operating_points] == [
        HIGH_SENSITIVITY,
        HIGH_SPECIFICITY,
    ]
    assert {p.name for p in after.operating_points} >= {HIGH_SENSITIVITY, HIGH_SPECIFICITY}
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            str(site),
            "--model",
            str(package.path),
            "--out",
            str(out),
            "--bootstrap",
            "10",
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    (model,) = results["models"]
    assert model["card"]["version"] == after.version and model["rows"][0]["image"]["n"] == 16
    assert model["localisation"][0]["by_iou"][0]["lesions"] == 8

    # Without boxes the box points keep their map cuts; with a split column, valid is used.
    plain = segmenter_package(
        tmp_path / "plain", segmenter_card("plain-map", spec=SegmenterSpec(box_operating_points=BOX_POINTS))
    )
    unboxed = _site_csv(tmp_path / "unboxed", boxes=False, split=True)
    assert main(["calibrate", str(plain.path), "--data", str(unboxed), *cache]) == 0, capsys.readouterr().err
    assert "split valid" in capsys.readouterr().out
    card = read_package(plain.path).card
    assert card.validation_metrics["n"] == 12 and "not measured" in card.validation_metrics["boxes"]["note"]
    assert card.segmenter is not None
    from inference.maps import logit_threshold

    spec = card.segmenter
    kept = spec.box_operating_points
    # The loosest point (the cut the regions are drawn at) stays at the same map logit; the firmer
    # one stays above it (restated probabilities saturate near 1 on this random map).
    assert logit_threshold(kept[0].threshold, spec.map_temperature, spec.map_logit_offset) == pytest.approx(
        logit_threshold(BOX_POINTS[0].threshold, 1.0, 0.0), abs=1e-6
    )
    assert kept[1].threshold >= kept[0].threshold


def test_calibrate_a_classifier_on_a_site_csv_without_a_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = classifier_package(tmp_path / "models", G.UPPER_DISTAL, (Region.HAND, Region.WRIST), size=64)
    site = _site_csv(tmp_path / "site", boxes=False)
    code = main(["calibrate", str(package.path), "--data", str(site), "--cache", str(tmp_path / "cache")])
    assert code == 0, capsys.readouterr().err
    assert read_package(package.path).card.validation_metrics["n"] == 16
    code = main(
        ["calibrate", str(package.path), "--data", str(site), "--stack-classifier", str(package.path)]
    )
    assert code == 2 and "fracture-map package only" in capsys.readouterr().err


def test_the_node_counts_the_fractures_of_a_group_without_a_localiser_as_missed(tmp_path: Path) -> None:
    hands = from_labelled(load_source(fracatlas(tmp_path / "hands")))
    legs = from_labelled(load_source(fracatlas(tmp_path / "legs", region="leg")))
    leg_classifier = load_model(classifier_package(tmp_path / "models", G.LOWER_MIDDLE, size=64))
    upper, lower = frozenset({G.UPPER_DISTAL}), frozenset({G.LOWER_MIDDLE})
    plans = [
        ModelPlan(bright_model(), upper, decides=upper, localises=upper),
        ModelPlan(leg_classifier, lower, decides=lower, localises=frozenset()),  # type: ignore[arg-type]
    ]
    written = run_suite(
        hands + legs, plans, SourceInfo("fa", "fracatlas", None), tmp_path / "out", config=CONFIG,
        progress=False,
    )  # fmt: skip
    node = written.data["node"]
    assert node["localisers"] == [["upper-distal", "test-map"]]
    rows = {r["subset"]["name"]: r["by_iou"][0] for r in node["localisation"]}
    assert (rows["all"]["images"], rows["all"]["lesions"], rows["all"]["target"]["hits"]) == (24, 12, 6)
    assert rows["lower-middle"]["target"]["hits"] == 0 and rows["lower-middle"]["lesions"] == 6
    assert rows["lower-middle"]["points"][0]["threshold"] is None  # no localiser: no threshold
    assert rows["upper-distal"]["target"]["hits"] == 6
