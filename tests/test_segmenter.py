"""The fracture-map model kind (``segmenter``): masks, map -> boxes -> source pixels, flip TTA,
the stack, the card, training and packaging, serving through the node, the chance-level guard."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from prometheus_client import CollectorRegistry

from inference.calibration import apply_calibration, sigmoid
from inference.datasets import LabelledImage
from inference.maps import logit_threshold, map_boxes, mirror_average, stacked_probabilities
from inference.modelcard import (
    HIGH_SENSITIVITY,
    HIGH_SPECIFICITY,
    SEGMENTER_SCORES,
    BoxOperatingPoint,
    ModelCard,
    ModelKind,
    OperatingPoint,
    SegmenterSpec,
    Stack,
)
from inference.models import load_model
from inference.models.catalog import SEGMENTER_BACKBONES
from inference.models.segmenter import TorchSegmenter, upsample_maps
from inference.models.segnet import SEGMENTER_BACKBONES as SEGNET_BACKBONES
from inference.models.segnet import SegNet
from inference.models.torchio import WEIGHTS_FILE, save_weights
from inference.packages import (
    ModelPackage,
    PackageError,
    bundled_directory,
    card_from_dict,
    card_to_dict,
    discover,
    new_device_uid,
    read_package,
    rewrite_card,
    verify_package,
    write_package,
)
from inference.pixels import LetterboxTransform, PreprocessConfig, letterbox
from inference.priority import unproven
from inference.protocols import FractureClassifier, FractureDetector, FractureSegmenter
from inference.regions import AnatomicalGroup, Region
from inference.routing import load_keywords
from inference.training.segmenter import SCORE_METHODS, masks_for, rasterise_polygons
from inference.values import Outcome
from node.analysis import AnalysisConfig, analyse_study
from node.cli import main
from node.metrics import Metrics
from node.modelset import GroupModels, ModelSet, ProbabilitySource, load_model_set
from node.results.common import classifier_of, detector_of
from node.results.overlay import LineStyle, build_overlays, drawn_boxes
from node.results.sr import build_sr
from node.settings import load_settings
from tests.dicomgen import make_dataset
from tests.modelgen import classifier_package
from tests.test_datasets import FRACATLAS_HEADER
from tests.validators import assert_valid, dsrdump

SIZE = 64
G = AnatomicalGroup


# --------------------------------------------------------------------------------------------
# helpers: real packages with seeded SegNet weights, and a map model that needs no training


def segmenter_card(
    name: str = "test-map",
    *,
    group: AnatomicalGroup | None = G.UPPER_DISTAL,
    size: int = SIZE,
    spec: SegmenterSpec | None = None,
    temperature: float = 1.0,
    metrics: dict[str, object] | None = None,
) -> ModelCard:
    return ModelCard(
        name=name,
        version="0.0.1",
        device_uid=new_device_uid(),
        kind=ModelKind.SEGMENTER,
        architecture="mobilenet_v3_small",
        group=group,
        regions=(Region.WRIST, Region.HAND, Region.FINGER),
        input_size=size,
        preprocessing=PreprocessConfig().as_dict(),
        temperature=temperature,
        operating_points=(
            OperatingPoint(HIGH_SENSITIVITY, 0.3, 0.9, 0.5),
            OperatingPoint(HIGH_SPECIFICITY, 0.7, 0.5, 0.9),
        ),
        validation_metrics=dict(metrics or {}),
        segmenter=spec if spec is not None else SegmenterSpec(),
    )


def segmenter_package(directory: Path, card: ModelCard, seed: int = 0) -> ModelPackage:
    torch.manual_seed(seed)
    out = directory / card.name
    out.mkdir(parents=True, exist_ok=True)
    weights = save_weights(SegNet(card.architecture).eval(), out / WEIGHTS_FILE)
    return write_package(out, card, {WEIGHTS_FILE: weights})


class BrightMapSegmenter(TorchSegmenter):
    """The real runtime with a map that needs no weights: each stride-4 cell's logit is set by the
    mean brightness of its 4 x 4 pixels (-10 dark, +10 bright, +14 brightest)."""

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card, SegNet(card.architecture).eval(), torch.device("cpu"))

    def maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, s, _ = batch.shape
        cells = batch.reshape(n, s // 4, 4, s // 4, 4).mean(axis=(2, 4))
        coarse = np.where(cells >= 0.9, 14.0, np.where(cells >= 0.5, 10.0, -10.0)).astype(np.float32)
        return coarse, coarse.reshape(n, -1).max(axis=1)


BOX_POINTS = (
    BoxOperatingPoint(HIGH_SENSITIVITY, 0.5, 0.8, 0.4),
    BoxOperatingPoint(HIGH_SPECIFICITY, 0.995, 0.5, 0.1),
)


# --------------------------------------------------------------------------------------------
# masks


def test_a_square_polygon_covers_exactly_its_pixels() -> None:
    transform = LetterboxTransform(1.0, 0.0, 0.0, 100, 100, 100)
    mask = rasterise_polygons([[0.2, 0.2, 0.5, 0.2, 0.5, 0.6, 0.2, 0.6]], transform)
    assert mask.dtype == np.uint8 and mask.sum() == 30 * 40
    assert mask[20:60, 20:50].all()
    # A right triangle: the pixels whose centres lie strictly inside, none on the diagonal.
    triangle = rasterise_polygons([[0.2, 0.2, 0.5, 0.2, 0.2, 0.5]], transform)
    assert triangle.sum() == sum(range(30)) and triangle[20, 20:49].all() and not triangle[20, 49]


def test_polygons_honour_the_letterbox_offsets() -> None:
    wide = letterbox(np.zeros((100, 200), dtype=np.float32), 100).transform  # scale 0.5, pad_y 25
    assert (wide.scale, wide.pad_x, wide.pad_y) == (0.5, 0.0, 25.0)
    mask = rasterise_polygons([[0.25, 0.2, 0.75, 0.2, 0.75, 0.8, 0.25, 0.8]], wide)
    # source columns [50, 150), rows [20, 80) -> model columns [25, 75), rows [35, 65)
    assert mask.sum() == 50 * 30 and mask[35:65, 25:75].all()
    tall = letterbox(np.zeros((200, 100), dtype=np.float32), 100).transform  # pad_x 25
    mask = rasterise_polygons([[0.2, 0.25, 0.6, 0.25, 0.6, 0.75, 0.2, 0.75]], tall)
    assert mask.sum() == 20 * 50 and mask[25:75, 35:55].all()
    # Two polygons are a union; a sliver thinner than a pixel still marks one pixel.
    both = rasterise_polygons(
        [[0.1, 0.1, 0.2, 0.1, 0.2, 0.2, 0.1, 0.2], [0.15, 0.15, 0.3, 0.15, 0.3, 0.3, 0.15, 0.3]],
        LetterboxTransform(1.0, 0.0, 0.0, 100, 100, 100),
    )
    assert both.sum() == 100 + 225 - 25
    sliver = rasterise_polygons([[0.5, 0.5, 0.5001, 0.5, 0.5001, 0.5001]], wide)
    assert sliver.sum() == 1


def test_masks_for_negatives_are_empty_and_boxes_stand_in_for_missing_polygons(tmp_path: Path) -> None:
    transform = LetterboxTransform(1.0, 0.0, 0.0, 64, 64, 64)

    def image(
        name: str, label: int, boxes: tuple[tuple[float, float, float, float], ...] = ()
    ) -> LabelledImage:
        return LabelledImage(tmp_path / name, label, Region.HAND, name, "train", boxes, "fracatlas")

    images = [
        image("a.jpg", 1),
        image("b.jpg", 1, ((0.25, 0.25, 0.5, 0.5),)),
        image("c.jpg", 0, ((0.25, 0.25, 0.5, 0.5),)),
    ]
    polygons = {"a.jpg": [[0.0, 0.0, 0.125, 0.0, 0.125, 0.125, 0.0, 0.125]]}
    masks = masks_for(images, [transform] * 3, polygons)
    assert masks.shape == (3, 64, 64)
    assert masks[0].sum() == 8 * 8 and masks[0][:8, :8].all()
    assert masks[1].sum() == 16 * 16 and masks[1][16:32, 16:32].all()
    assert masks[2].sum() == 0


# --------------------------------------------------------------------------------------------
# map -> boxes -> source pixels


def test_two_blobs_give_two_boxes_at_the_right_source_pixels() -> None:
    # 128 rows x 64 columns letterboxed to 64: scale 0.5, 16 columns of padding on the left.
    transform = letterbox(np.zeros((128, 64), dtype=np.float32), SIZE).transform
    assert (transform.scale, transform.pad_x, transform.pad_y) == (0.5, 16.0, 0.0)
    full = np.full((SIZE, SIZE), -5.0, dtype=np.float32)
    full[8:16, 20:28] = 2.0
    full[10, 22] = 4.0  # the peak of the first blob
    full[16, 28] = 2.0  # touches it at a corner: 8-connected, one region
    full[40:56, 36:44] = 1.0
    temperature, offset = 2.0, -0.5
    boxes = map_boxes(full, 0.3, temperature, offset)
    assert [b[:4] for b in boxes] == [(20.0, 8.0, 29.0, 17.0), (36.0, 40.0, 44.0, 56.0)]
    assert boxes[0][4] == pytest.approx(float(sigmoid(4.0 / 2.0 - 0.5)))
    assert boxes[1][4] == pytest.approx(0.5)
    in_source = [transform.to_source(*b[:4]) for b in boxes]
    assert in_source == [(8.0, 16.0, 26.0, 34.0), (40.0, 80.0, 56.0, 112.0)]
    # A stricter cut leaves the first blob only; nothing is found on a flat map.
    assert [b[:4] for b in map_boxes(full, 0.6, temperature, offset)] == [(20.0, 8.0, 29.0, 17.0)]
    assert map_boxes(np.full((8, 8), -5.0, dtype=np.float32), 0.5) == []
    for p in (0.1, 0.5, 0.93):
        assert float(apply_calibration(logit_threshold(p, temperature, offset), temperature, offset)) == (
            pytest.approx(p)
        )
    with pytest.raises(ValueError):
        map_boxes(full[None], 0.5)


def test_the_upsampled_map_cuts_on_stride_4_cell_edges() -> None:
    coarse = np.full((1, 16, 16), -10.0, dtype=np.float32)
    coarse[0, 2:4, 5:7] = 10.0
    full = upsample_maps(coarse, SIZE)
    (box,) = map_boxes(full[0], 0.5)
    assert box[:4] == (20.0, 8.0, 28.0, 16.0)


# --------------------------------------------------------------------------------------------
# flip TTA and the stack


def test_flip_tta_averages_a_pass_and_its_mirror_and_is_mirror_symmetric(tmp_path: Path) -> None:
    package = segmenter_package(tmp_path, segmenter_card(spec=SegmenterSpec(flip=True)), seed=3)
    tta = load_model(package)
    assert isinstance(tta, TorchSegmenter) and isinstance(tta, FractureSegmenter)
    plain = TorchSegmenter(replace(package.card, segmenter=SegmenterSpec(flip=False)), tta.module, tta.device)
    x = np.random.default_rng(0).random((2, SIZE, SIZE)).astype(np.float32)
    mirrored = np.ascontiguousarray(x[:, :, ::-1])

    coarse, heads = tta.maps(x)
    a, ha = plain.maps(x)
    b, hb = plain.maps(mirrored)
    assert np.allclose(coarse, mirror_average(a, b), atol=1e-5)
    assert np.allclose(coarse, (a + b[:, :, ::-1]) / 2, atol=1e-5)
    assert np.allclose(heads, (ha + hb) / 2, atol=1e-5)
    assert not np.allclose(a[:, :, ::-1], b, atol=1e-3)  # the network alone is not symmetric

    coarse_m, heads_m = tta.maps(mirrored)
    assert np.allclose(coarse_m, coarse[:, :, ::-1], atol=1e-5) and np.allclose(heads_m, heads, atol=1e-5)
    # Boxes mirror too: cut the map near its median so there are regions to compare.
    median = float(np.median(upsample_maps(coarse, SIZE)))
    cut = float(sigmoid(median))
    spec = SegmenterSpec(flip=True, box_operating_points=(BoxOperatingPoint(HIGH_SENSITIVITY, cut, 0, 0),))
    cutting = TorchSegmenter(replace(package.card, segmenter=spec), tta.module, tta.device)
    out, out_m = cutting.segment(x), cutting.segment(mirrored)
    assert np.allclose(out.probabilities, out_m.probabilities, atol=1e-5)
    for boxes, boxes_m in zip(out.boxes, out_m.boxes, strict=True):
        assert boxes
        expected = sorted((SIZE - x1, y0, SIZE - x0, y1) for x0, y0, x1, y1, _ in boxes)
        assert sorted(b[:4] for b in boxes_m) == expected


def test_stacked_probability_is_the_logistic_of_the_weighted_logits() -> None:
    stack = Stack("test-upper-distal", (0.7, 1.3), -0.2)
    got = stacked_probabilities(stack, np.array([1.0, -2.0]), np.array([0.5, 3.0]))
    assert got.tolist() == pytest.approx(
        [float(sigmoid(0.7 * 1.0 + 1.3 * 0.5 - 0.2)), float(sigmoid(0.7 * -2.0 + 1.3 * 3.0 - 0.2))]
    )
    with pytest.raises(ValueError):
        stacked_probabilities(stack, np.zeros(2), np.zeros(3))


# --------------------------------------------------------------------------------------------
# the card


def test_segmenter_cards_round_trip_and_old_cards_still_load() -> None:
    stack = Stack(
        "test-upper-distal",
        (0.8, 1.1),
        -0.3,
        (OperatingPoint(HIGH_SENSITIVITY, 0.2, 0.9, 0.6), OperatingPoint(HIGH_SPECIFICITY, 0.6, 0.6, 0.9)),
        {"auroc": 0.9},
        "out of fold",
    )
    spec = SegmenterSpec("top16", True, 1.7, -0.4, BOX_POINTS, False, stack)
    card = segmenter_card(spec=spec)
    data = card_to_dict(card)
    assert data["kind"] == "segmenter" and data["segmenter"]["score"] == "top16"
    assert card_from_dict(json.loads(json.dumps(data))) == card
    assert card.box_threshold(HIGH_SPECIFICITY) == 0.995 and card.box_threshold(HIGH_SENSITIVITY) == 0.5
    # A detector's boxes are held to its image operating points.
    detector = replace(card, kind=ModelKind.DETECTOR, segmenter=None)
    assert "segmenter" not in card_to_dict(detector)
    assert detector.box_threshold(HIGH_SPECIFICITY) == 0.7
    # Cards written before the kind existed load unchanged; a segmenter card without the block
    # gets the defaults; a bad block is a PackageError.
    for package in discover(bundled_directory()):
        raw = json.loads((package.path / "model.json").read_text())
        loaded = card_from_dict(raw)
        assert (loaded.segmenter is not None) == (raw["kind"] == "segmenter"), package.path.name
    bare = {k: v for k, v in data.items() if k != "segmenter"}
    assert card_from_dict(bare).segmenter == SegmenterSpec()
    with pytest.raises(PackageError, match="score"):
        card_from_dict({**data, "segmenter": {**data["segmenter"], "score": "median"}})
    with pytest.raises(PackageError):
        card_from_dict({**data, "segmenter": {**data["segmenter"], "stack": {"weights": [1.0]}}})
    assert SCORE_METHODS == SEGMENTER_SCORES and SEGMENTER_BACKBONES == SEGNET_BACKBONES


# --------------------------------------------------------------------------------------------
# serving: which model gives what, through the node, into the SR and SC


def test_group_models_choose_probability_and_boxes(tmp_path: Path) -> None:
    classifier = classifier_package(tmp_path / "models", G.UPPER_DISTAL, size=SIZE)
    stack = Stack(
        classifier.card.name,
        (0.5, 2.0),
        0.1,
        (OperatingPoint(HIGH_SENSITIVITY, 0.11, 0.9, 0.5), OperatingPoint(HIGH_SPECIFICITY, 0.88, 0.5, 0.9)),
    )
    segmenter_package(tmp_path / "models", segmenter_card(spec=SegmenterSpec(stack=stack)))
    models = load_model_set(tmp_path / "models", include_bundled=False).groups[G.UPPER_DISTAL]
    assert models.probability_source is ProbabilitySource.STACK
    assert models.localiser is models.segmenter and models.stack == stack
    deciding = models.deciding
    assert deciding.kind is ModelKind.SEGMENTER and deciding.operating_points == stack.operating_points
    assert [c.kind for c in models.cards] == [ModelKind.SEGMENTER, ModelKind.CLASSIFIER]
    assert classifier_of(models.cards) == deciding and detector_of(models.cards) == deciding

    # A stack fitted with another classifier does not apply: the classifier decides.
    other = GroupModels(
        models.classifier,
        None,
        BrightMapSegmenter(segmenter_card(spec=SegmenterSpec(stack=replace(stack, classifier="x")))),
    )
    assert other.probability_source is ProbabilitySource.CLASSIFIER and other.stack is None
    assert [c.kind for c in other.cards] == [ModelKind.CLASSIFIER, ModelKind.SEGMENTER]
    assert classifier_of(other.cards).kind is ModelKind.CLASSIFIER  # type: ignore[union-attr]
    assert detector_of(other.cards).kind is ModelKind.SEGMENTER  # type: ignore[union-attr]
    alone = GroupModels(None, None, other.segmenter)
    assert alone.probability_source is ProbabilitySource.SEGMENTER and alone.cards == (other.segmenter.card,)  # type: ignore[union-attr]


def _blob_study(tmp_path: Path) -> tuple[Path, pydicom.Dataset]:
    """A right-wrist DX of 128 rows x 64 columns, dark but for two bright blobs."""
    pixels = np.zeros((128, 64), dtype=np.uint16)
    pixels[16:32, 8:24] = 3071  # blob A: 0.75 of the range
    pixels[80:112, 40:56] = 3071  # blob B ...
    pixels[88:104, 40:48] = 4095  # ... with a brightest core
    ds = make_dataset(rows=128, cols=64, pixels=pixels)
    path = tmp_path / "blobs.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_a_map_model_serves_probability_and_boxes_into_a_valid_sr_and_sc(tmp_path: Path) -> None:
    path, ds = _blob_study(tmp_path)
    card = segmenter_card(
        temperature=2.0,
        spec=SegmenterSpec(score="max", map_temperature=2.0, box_operating_points=BOX_POINTS),
    )
    segmenter = BrightMapSegmenter(card)
    models = ModelSet(groups={G.UPPER_DISTAL: GroupModels(None, None, segmenter)})
    analysis = analyse_study(
        str(ds.StudyInstanceUID),
        1,
        [path],
        models=models,
        keywords=load_keywords(),
        config=AnalysisConfig(),
        metrics=Metrics(CollectorRegistry()),
    )
    (group,) = analysis.result.groups
    assert group.group is G.UPPER_DISTAL and group.models == (card,)
    assert group.probability == pytest.approx(float(sigmoid(14.0 / 2.0)))
    assert group.outcome is Outcome.POSITIVE
    (image,) = group.images
    # Source pixels of the blobs exactly, highest probability first: B's brightest core (one cell
    # wide, so the upsampled peak stays under its 14) beats A's plain 10.
    assert [(b.x0, b.y0, b.x1, b.y1) for b in image.boxes] == [
        (40.0, 80.0, 56.0, 112.0),
        (8.0, 16.0, 24.0, 32.0),
    ]
    assert image.boxes[1].probability == pytest.approx(float(sigmoid(10.0 / 2.0)))
    assert float(sigmoid(10.0 / 2.0)) < image.boxes[0].probability < float(sigmoid(14.0 / 2.0))
    styles = [d.style for d in drawn_boxes(image.boxes, detector_of(group.models))]
    assert styles == [LineStyle.SOLID, LineStyle.DASHED]  # past 0.995 / past 0.5 only

    sr = build_sr(analysis.result, analysis.sources, software_version="test")
    sr_path = tmp_path / "sr.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    assert_valid(sr_path, "Comprehensive3DSR")
    dsrdump(sr_path)
    report = hd.sr.srread(sr_path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    rois = report.get_planar_roi_measurement_groups()
    assert len(rois) == 2
    for roi, box, call in zip(rois, image.boxes, ("52101004", "42425007"), strict=True):  # Present, Equivocal
        region = roi.roi
        assert isinstance(region, hd.sr.ImageRegion)
        np.testing.assert_allclose(
            region.value,
            [[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1], [box.x0, box.y0]],
            rtol=0,
            atol=1e-5,
        )
        (evaluation,) = roi.get_qualitative_evaluations()
        assert evaluation.value.value == call
        names = [
            str(item.TextValue)
            for item in roi[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111001"
        ]
        assert names == [card.name]  # TID 4019 names the map model

    (sc,) = build_overlays(analysis.result, analysis.sources, analysis.frames, software_version="test")
    sc_path = tmp_path / "sc.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    assert_valid(sc_path, "SCImage")
    back = pydicom.dcmread(sc_path)
    assert card.device_uid in {item.get("DeviceUID") for item in back.ContributingEquipmentSequence}
    assert back.BurnedInAnnotation == "YES"


def test_the_stacked_probability_serves_through_the_node(tmp_path: Path) -> None:
    classifier = classifier_package(tmp_path / "models", G.UPPER_DISTAL, size=SIZE)
    stack = Stack(
        classifier.card.name,
        (0.6, 0.9),
        -0.25,
        (OperatingPoint(HIGH_SENSITIVITY, 0.2, 0.9, 0.5), OperatingPoint(HIGH_SPECIFICITY, 0.8, 0.5, 0.9)),
    )
    segmenter_package(tmp_path / "models", segmenter_card(spec=SegmenterSpec(stack=stack)))
    models = load_model_set(tmp_path / "models", include_bundled=False)
    path, ds = _blob_study(tmp_path)
    analysis = analyse_study(
        str(ds.StudyInstanceUID),
        1,
        [path],
        models=models,
        keywords=load_keywords(),
        config=AnalysisConfig(),
        metrics=Metrics(CollectorRegistry()),
    )
    (group,) = analysis.result.groups
    served = models.groups[G.UPPER_DISTAL]
    assert served.classifier is not None and served.segmenter is not None
    frame = analysis.frames[(str(ds.SOPInstanceUID), 0)]
    from inference.pixels import prepare

    pixels = prepare(frame, PreprocessConfig(), SIZE).pixels[None]
    expected = sigmoid(
        0.6 * float(served.classifier.logits(pixels)[0])
        + 0.9 * float(served.segmenter.logits(pixels)[0])
        - 0.25
    )
    assert group.probability == pytest.approx(float(expected), abs=1e-6)
    assert group.models[0].operating_points == stack.operating_points


# --------------------------------------------------------------------------------------------
# the guard


def test_a_chance_level_package_is_refused_unless_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    hand = classifier_package(models, G.UPPER_DISTAL, size=SIZE)
    rewrite_card(hand, validation_metrics={"auroc": 0.51, "auroc_ci": [0.44, 0.58]})
    leg = classifier_package(models, G.LOWER_MIDDLE, size=SIZE)
    rewrite_card(leg, validation_metrics={"auroc": 0.8, "auroc_ci": [0.7, 0.9]})
    segmenter_package(
        models,
        segmenter_card("chance-map", group=G.UPPER_PROXIMAL, metrics={"auroc": 0.5, "auroc_ci": [0.4, 0.6]}),
    )
    # Proven overall, at chance on shoulders: it serves wrists and hands only.
    per_group = {
        "upper-distal": {"n": 100, "positives": 30, "auroc": 0.8, "auroc_ci": [0.7, 0.9]},
        "upper-proximal": {"n": 20, "positives": 4, "auroc": 0.55, "auroc_ci": [0.3, 0.8]},
    }
    wide = segmenter_card(
        "wide-map", group=None, metrics={"auroc": 0.75, "auroc_ci": [0.65, 0.85], "per_group": per_group}
    )
    segmenter_package(models, replace(wide, regions=(Region.WRIST, Region.SHOULDER)))
    assert unproven(read_package(models / hand.path.name).card) is not None
    assert unproven(read_package(models / leg.path.name).card) is None

    with caplog.at_level(logging.WARNING, logger="node.modelset"):
        refused = load_model_set(models, include_bundled=False)
    assert refused.available == {G.LOWER_MIDDLE, G.UPPER_DISTAL}
    assert refused.groups[G.UPPER_DISTAL].classifier is None  # the chance-level hand model is out
    assert refused.groups[G.UPPER_DISTAL].segmenter.card.name == "wide-map"  # type: ignore[union-attr]
    assert {p.card.name for p in refused.packages} == {leg.card.name, "wide-map"}
    warned = [r.getMessage() for r in caplog.records if "does not serve" in r.getMessage()]
    assert any(hand.path.name in m and "allow_unproven" in m for m in warned)
    assert any("chance-map" in m for m in warned)
    assert any("wide-map" in m and "group upper-proximal" in m for m in warned)

    allowed = load_model_set(models, include_bundled=False, allow_unproven=True)
    assert allowed.available == {G.UPPER_DISTAL, G.LOWER_MIDDLE, G.UPPER_PROXIMAL}
    assert allowed.groups[G.UPPER_PROXIMAL].segmenter.card.name == "chance-map"  # type: ignore[union-attr]

    config = tmp_path / "fracnode.toml"
    config.write_text("[models]\nallow_unproven = true\n")
    assert load_settings(config, environ={}).models.allow_unproven is True
    assert load_settings(None, environ={}).models.allow_unproven is False


def test_the_bundled_chance_level_detector_does_not_serve_by_default() -> None:
    chance = [p.card.name for p in discover(bundled_directory()) if unproven(p.card) is not None]
    if not chance:
        pytest.skip("no bundled package is at chance level")
    served = load_model_set(None)
    names = {c.name for models in served.groups.values() for c in models.cards}
    assert not names & set(chance)
    assert not {p.card.name for p in served.packages} & set(chance)


# --------------------------------------------------------------------------------------------
# training and packaging


def _fracatlas_with_polygons(root: Path) -> Path:
    """24 FracAtlas-layout hand images (16 train, 8 valid), half with a bright fracture bar."""
    rng = np.random.default_rng(5)
    rows, polygons = [], {}
    (root / "images").mkdir(parents=True)
    (root / "yolo").mkdir()
    for k in range(24):
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
        split = "valid" if k >= 16 else "train"
        label = int(fractured)
        rows.append([f"{stem}.jpg", "hand", 1, *[0] * 6, label, label, 1, 0, 0, split, 96, 96, 0])
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FRACATLAS_HEADER)
        writer.writerows(rows)
    (root / "fracture_polygons.json").write_text(json.dumps({"format": "test", "images": polygons}))
    return root


def test_train_segmenter_smoke_then_package_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _fracatlas_with_polygons(tmp_path / "fa")
    common = [
        "--data", str(data), "--size", str(SIZE), "--epochs", "1", "--batch", "4", "--threads", "1",
        "--device", "cpu", "--no-progress", "--cache", str(tmp_path / "cache"),
    ]  # fmt: skip
    trained = tmp_path / "out" / "map-test"
    work = tmp_path / "work"
    assert main(["train", "segmenter", *common, "--out", str(trained), "--work", str(work)]) == 0
    printed = capsys.readouterr().out
    assert "segmenter" in printed and "box high_sensitivity" in printed

    package = verify_package(trained)
    card = package.card
    assert card.kind is ModelKind.SEGMENTER and card.input_size == SIZE
    assert card.architecture == "mobilenet_v3_small" and card.regions == (Region.HAND,)
    spec = card.segmenter
    assert spec is not None and spec.score in SEGMENTER_SCORES
    assert [p.name for p in spec.box_operating_points] == [HIGH_SENSITIVITY, HIGH_SPECIFICITY]
    low, high = (p.threshold for p in spec.box_operating_points)
    assert 0.0 < low <= high < 1.0
    assert card.operating_point(HIGH_SENSITIVITY) is not None and card.auroc_interval() is not None
    assert card.validation_metrics["boxes"]["fracture_boxes"] == 4  # the 4 fractured valid images
    choice = card.training_data["score_choice"]
    assert "never valid" in choice["chosen_on"] and len(choice["stop_auroc"]) == 2 * len(SEGMENTER_SCORES)
    assert (work / "checkpoint.pt").is_file()

    model = load_model(package)
    for protocol in (FractureSegmenter, FractureClassifier, FractureDetector):
        assert isinstance(model, protocol)
    assert isinstance(model, TorchSegmenter) and model.module.training is False
    batch = np.random.default_rng(1).random((3, SIZE, SIZE)).astype(np.float32)
    out = model.segment(batch)
    assert out.logits.shape == out.probabilities.shape == (3,) and len(out.boxes) == 3
    assert np.all((out.probabilities >= 0) & (out.probabilities <= 1))
    assert all(
        0 <= b[0] < b[2] <= SIZE and 0 <= b[1] < b[3] <= SIZE and b[4] >= low for i in out.boxes for b in i
    )
    assert np.allclose(model.probabilities(batch), out.probabilities)

    monkeypatch.setenv("FRACNODE_MODELS__DIRECTORY", str(trained.parent))
    assert main(["models", "list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("map-test")]
    assert listed and "segmenter" in listed[0] and "box recall" in listed[0]

    # Package the run's checkpoint again without training: the same best weights, score forced.
    again = tmp_path / "out" / "map-again"
    args = ["--out", str(again), "--from-checkpoint", str(work / "checkpoint.pt"), "--score", "max"]
    assert main(["train", "segmenter", *common, *args, "--flip", "off"]) == 0
    capsys.readouterr()
    second = verify_package(again).card
    assert second.segmenter is not None and (second.segmenter.score, second.segmenter.flip) == ("max", False)
    assert second.device_uid != card.device_uid and second.training_data["from_checkpoint"].endswith(
        "checkpoint.pt"
    )
    first_state = torch.load(trained / WEIGHTS_FILE, weights_only=True)
    second_state = torch.load(again / WEIGHTS_FILE, weights_only=True)
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)

    assert (
        main(["train", "segmenter", *common, "--out", str(again), "--from-checkpoint", str(tmp_path / "no")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
