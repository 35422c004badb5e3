"""The cross-region transfer matrix on a small generated multi-region set with real torch models.

Each generated radiograph is noise plus, when fractured, a bright bar: in the upper-limb regions
(hand, wrist, shoulder) the bar is in the top-left quarter, in the lower-limb ones (leg, knee) in
the bottom-right quarter. Each model is a real torch module (a fixed convolution that averages
one quarter, then a scale and bias) behind the FractureClassifier protocol; it "was trained" on
the regions of its card. So a model sees fractures of its own anatomical group and is blind to
the other group's, the structure the zero-shot study found, and the matrix must show it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from inference.evaluation.matrix import Relation, draw_heatmap, relation, transfer_matrix
from inference.evaluation.runner import EvalImage, ModelPlan, run_models, select_images
from inference.evaluation.suite import SourceInfo, run_suite
from inference.modelcard import YOUDEN, ModelCard, ModelKind, OperatingPoint
from inference.protocols import FractureClassifier
from inference.regions import AnatomicalGroup, Region

SIZE = 32
UPPER = (Region.HAND, Region.WRIST, Region.SHOULDER)
LOWER = (Region.LEG, Region.KNEE)


class QuarterNet(nn.Module):
    """Mean brightness of one quarter of the image minus the mean of the whole image, scaled."""

    def __init__(self, quarter: str) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, SIZE, SIZE)
        half = SIZE // 2
        rows = slice(0, half) if quarter == "top-left" else slice(half, SIZE)
        mask[..., rows, rows] = 1.0 / (half * half)
        mask -= 1.0 / (SIZE * SIZE)
        self.conv = nn.Conv2d(1, 1, SIZE, bias=True)
        with torch.no_grad():
            self.conv.weight.copy_(mask * 40.0)
            self.conv.bias.fill_(-2.0)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels.unsqueeze(1)).flatten(1)


class TorchQuarterClassifier:
    def __init__(self, card: ModelCard, quarter: str) -> None:
        self.card = card
        self.module = QuarterNet(quarter).eval()
        self.device = torch.device("cpu")

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(batch)))[:, 0].numpy()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-self.logits(batch) / self.card.temperature))).astype(np.float32)


def card(name: str, regions: tuple[Region, ...], group: AnatomicalGroup | None) -> ModelCard:
    return ModelCard(
        name=name,
        version="1",
        device_uid="1.2.3",
        kind=ModelKind.CLASSIFIER,
        architecture="quarter",
        group=group,
        regions=regions,
        input_size=SIZE,
        preprocessing={"stretch": False},
        temperature=1.5,
        operating_points=(OperatingPoint(YOUDEN, 0.5, 0.0, 0.0),),
    )


def hand_model() -> TorchQuarterClassifier:
    return TorchQuarterClassifier(card("hand-only", (Region.HAND,), None), "top-left")


def leg_model() -> TorchQuarterClassifier:
    return TorchQuarterClassifier(card("leg-only", (Region.LEG,), None), "bottom-right")


def generated_images(per_region: int = 24, seed: int = 0) -> list[EvalImage]:
    rng = np.random.default_rng(seed)
    images: list[EvalImage] = []
    for region in UPPER + LOWER:
        for k in range(per_region):
            label = k % 2
            pixels = (0.3 + 0.1 * rng.random((48, 40))).astype(np.float32)
            if label:
                if region in UPPER:
                    pixels[4:20, 6:9] = 0.9
                else:
                    pixels[30:44, 30:33] = 0.9

            def load(pixels: np.ndarray = pixels) -> np.ndarray:
                return pixels

            images.append(EvalImage(f"{region}-{k}", label, (region,), f"{region}-{k // 2}", (), load))
    return images


def test_protocol_and_relations() -> None:
    model = hand_model()
    assert isinstance(model, FractureClassifier)
    assert relation(model.card, Region.HAND) == Relation.SAME_REGION
    assert relation(model.card, Region.WRIST) == Relation.SAME_GROUP
    assert relation(model.card, Region.SHOULDER) == Relation.OTHER_GROUP
    assert relation(model.card, Region.LEG) == Relation.OTHER_GROUP


def test_a_card_without_regions_or_group_covers_every_group() -> None:
    from inference.evaluation.scoring import home_groups

    everywhere = card("all", (), None)
    assert home_groups(everywhere) == frozenset(AnatomicalGroup)
    assert relation(everywhere, Region.FOOT) == Relation.SAME_REGION
    assert home_groups(card("g", (), AnatomicalGroup.LOWER_DISTAL)) == {AnatomicalGroup.LOWER_DISTAL}


def test_matrix_shape_values_and_summary(tmp_path: Path) -> None:
    images = generated_images()
    plans = [ModelPlan(hand_model(), None), ModelPlan(leg_model(), None)]
    selections = select_images(images, plans)
    assert all(len(s) == len(images) for s in selections)
    runs = run_models(images, plans, selections, batch_size=16, progress=False).runs
    matrix = transfer_matrix(images, runs, resamples=200, seed=0)

    # Columns in group-table order: shoulder (upper-proximal), wrist, hand (upper-distal), knee, leg.
    assert matrix.regions == (Region.SHOULDER, Region.WRIST, Region.HAND, Region.KNEE, Region.LEG)
    assert [c.name for c in matrix.cards] == ["hand-only", "leg-only"]
    assert len(matrix.cells) == 2 * 5
    for cell in matrix.cells:
        assert cell.images == 24 and cell.positives == 12
        assert cell.auroc.low <= cell.auroc.estimate <= cell.auroc.high
        assert cell.accuracy.low <= cell.accuracy.estimate <= cell.accuracy.high

    hand = matrix.cell("hand-only", Region.HAND)
    wrist = matrix.cell("hand-only", Region.WRIST)
    leg_on_hand = matrix.cell("leg-only", Region.HAND)
    assert hand is not None and wrist is not None and leg_on_hand is not None
    assert hand.relation == Relation.SAME_REGION and hand.auroc.estimate == pytest.approx(1.0)
    assert wrist.relation == Relation.SAME_GROUP and wrist.auroc.estimate == pytest.approx(1.0)
    assert leg_on_hand.relation == Relation.OTHER_GROUP and leg_on_hand.auroc.estimate < 0.8

    summary = {s.relation: s for s in matrix.summary}
    assert summary[Relation.SAME_REGION].cells == 2
    assert summary[Relation.SAME_GROUP].cells == 2  # hand-only on wrist, leg-only on knee
    assert summary[Relation.OTHER_GROUP].cells == 6
    assert summary[Relation.SAME_GROUP].mean_auroc > summary[Relation.OTHER_GROUP].mean_auroc + 0.2

    png = draw_heatmap(matrix, tmp_path / "matrix.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_suite_with_matrix_writes_report_json_and_figures(tmp_path: Path) -> None:
    import json

    images = generated_images(per_region=12, seed=1)
    plans = [
        ModelPlan(hand_model(), frozenset({AnatomicalGroup.UPPER_DISTAL})),
        ModelPlan(leg_model(), frozenset({AnatomicalGroup.LOWER_MIDDLE})),
    ]
    out = run_suite(
        images,
        plans,
        SourceInfo("generated", "test", None),
        tmp_path / "eval",
        matrix=True,
        progress=False,
        version="test",
    )
    data = json.loads(out.results.read_text())
    assert data["matrix"]["regions"] == ["shoulder", "wrist", "hand", "knee", "leg"]
    assert len(data["matrix"]["cells"]) == 10
    # Routed as the node routes: the hand model reads the upper-distal images, and the
    # shoulder images through the adjacency of upper-proximal (out of group).
    hand_rows = {(r["subset"]["scope"], r["subset"]["name"]): r for r in data["models"][0]["rows"]}
    assert hand_rows[("overall", "all")]["image"]["n"] == 36
    assert hand_rows[("region", "shoulder")]["subset"]["out_of_group"] is True
    assert hand_rows[("region", "wrist")]["subset"]["out_of_group"] is False
    assert ("region", "leg") not in hand_rows
    calibration = data["models"][0]["calibration"]
    assert calibration["temperature"] == 1.5
    for when in ("reliability_before", "reliability_after"):
        assert sum(calibration[when]["counts"]) == 36
    for name in data["models"][0]["figures"] + data["matrix"]["figures"]:
        assert (tmp_path / "eval" / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    assert {"transfer_matrix_auroc.png", "transfer_matrix_accuracy.png"} == set(data["matrix"]["figures"])
    # The node view: every image scored by the model deciding its (routed) group.
    node = data["node"]
    assert node["deciding"] == [["upper-distal", "hand-only"], ["lower-middle", "leg-only"]]
    node_rows = {(r["subset"]["scope"], r["subset"]["name"]): r for r in node["rows"]}
    assert node_rows[("overall", "all")]["image"]["n"] == len(images)
    assert node_rows[("region", "shoulder")]["subset"]["out_of_group"] is True
    assert node_rows[("overall", "all")]["image"]["auroc"]["estimate"] > 0.95
    report = out.report.read_text()
    assert "## The node: all models as routed" in report
    assert "## Cross-region transfer matrix" in report and "same group" in report
    lines = out.predictions.read_text().splitlines()
    assert len(lines) == 1 + 2 * len(images)  # every model on every image for the matrix
    assert not math.isnan(data["models"][0]["rows"][0]["image"]["auroc"]["estimate"])


def test_each_unit_is_called_at_its_own_models_threshold() -> None:
    from inference.evaluation.scoring import EvaluationConfig, _at_unit_thresholds

    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.6, 0.6, 0.3, 0.3])
    # Units 1-2 read by a model with threshold 0.5 / 0.7, units 3-4 by one with 0.2 / 0.4.
    result = _at_unit_thresholds(
        labels, scores, {"youden": np.array([0.5, 0.7, 0.2, 0.4])}, EvaluationConfig(resamples=20)
    )
    point = result.operating_points[0]
    assert (point.confusion.tp, point.confusion.fp, point.confusion.tn, point.confusion.fn) == (2, 0, 2, 0)
    assert math.isnan(point.threshold)
    assert result.auroc.estimate == pytest.approx(0.5)  # ranking uses the probabilities themselves


def test_unreadable_image_is_left_out_and_listed() -> None:
    from inference.evaluation.runner import ImageUnavailable

    images = generated_images(per_region=4)

    def broken() -> np.ndarray:
        raise ImageUnavailable("cannot decode hand_x.png")

    images.append(EvalImage("hand-x", 1, (Region.HAND,), "hx", (), broken))
    plans = [ModelPlan(hand_model(), None)]
    result = run_models(images, plans, select_images(images, plans), progress=False)
    assert result.failures == (("hand-x", "cannot decode hand_x.png"),)
    assert result.runs[0].indices.tolist() == list(range(len(images) - 1))


class BrightBoxDetector:
    """A real (if simple) FractureDetector: one box around the bright pixels of each prepared image."""

    def __init__(self) -> None:
        self.card = ModelCard("bright-box", "1", "1.2.3", ModelKind.DETECTOR, "threshold", None, (), 64)

    def detect(self, batch: np.ndarray) -> list[list[tuple[float, float, float, float, float]]]:
        out = []
        for image in batch:
            rows, cols = np.nonzero(image > 0.5)
            if rows.size == 0:
                out.append([])
                continue
            out.append(
                [(float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1), 0.9)]
            )
        return out


def test_detector_boxes_map_back_to_normalised_source_coordinates() -> None:
    from inference.evaluation.scoring import EvaluationConfig, evaluate_run
    from inference.protocols import FractureDetector

    # 100 rows x 50 columns: letterboxed into 64 x 64 with 16 columns of padding on the left.
    source = np.zeros((100, 50), dtype=np.float32)
    source[10:30, 5:20] = 1.0
    truth = (5 / 50, 10 / 100, 20 / 50, 30 / 100)
    image = EvalImage("a", 1, (Region.HAND,), "a", (truth,), lambda: source)
    empty = EvalImage("b", 0, (Region.HAND,), "b", (), lambda: np.zeros((100, 50), dtype=np.float32))
    detector = BrightBoxDetector()
    assert isinstance(detector, FractureDetector)
    plans = [ModelPlan(detector, None)]
    run = run_models([image, empty], plans, [[0, 1]], progress=False).runs[0]
    assert run.boxes is not None and run.boxes[1] == ()
    (box,) = run.boxes[0]
    # One prepared pixel is 100 / 64 source rows: the box comes back within that.
    for got, want in zip((box.x0, box.y0, box.x1, box.y1), truth, strict=True):
        assert got == pytest.approx(want, abs=1.6 / 64)
    assert run.probabilities.tolist() == [0.9, 0.0]
    found = evaluate_run([image, empty], run, EvaluationConfig(resamples=10)).rows[0].detection  # type: ignore[union-attr]
    assert found.map50 == pytest.approx(1.0) and found.froc.recall_at[0] == (0.1, 1.0)
