"""The cross-region transfer matrix of the zero-shot anatomical-similarity study.

Every model reads every labelled test image; each cell is one model on the images of one test
region: image-level accuracy (Wilson interval) at the card's Youden point (0.5 for a card without
operating points) and AUROC (stratified bootstrap interval). Each cell is classed by the group
table: **same region** (the region is on the model's card), **same group** (another region of a
group the model was trained for) or **other group**; the summary compares the classes, which is
the study's finding that transfer holds within an anatomical group and fails between groups.
Trained one model per region on MURA, the matrix is the study's 7 x 7 table.

The heat-map is drawn with matplotlib's object API on an Agg canvas: no global backend is set.

Errors: none of its own; :class:`inference.evaluation.metrics.MetricsError` passes through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from inference.decision import UNCALIBRATED_THRESHOLD
from inference.evaluation.metrics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Interval,
    auroc_rows,
    bootstrap_intervals,
    confusion,
    wilson_interval,
)
from inference.evaluation.runner import EvalImage, ModelRun
from inference.evaluation.scoring import home_groups
from inference.modelcard import YOUDEN, ModelCard
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, GroupTable, Region


class Relation(StrEnum):
    SAME_REGION = "same region"
    SAME_GROUP = "same group"
    OTHER_GROUP = "other group"


@dataclass(frozen=True, slots=True)
class MatrixCell:
    model: str
    region: Region
    relation: Relation
    images: int
    positives: int
    threshold: float
    accuracy: Interval
    auroc: Interval


@dataclass(frozen=True, slots=True)
class RelationSummary:
    """The cells of one relation: how many, and their mean / min / max AUROC and accuracy."""

    relation: Relation
    cells: int  # cells with a defined AUROC
    mean_auroc: float
    min_auroc: float
    max_auroc: float
    mean_accuracy: float


@dataclass(frozen=True, slots=True)
class TransferMatrix:
    cards: tuple[ModelCard, ...]  # rows
    regions: tuple[Region, ...]  # columns, in group-table order
    cells: tuple[MatrixCell, ...]
    summary: tuple[RelationSummary, ...]

    def cell(self, model: str, region: Region) -> MatrixCell | None:
        for cell in self.cells:
            if cell.model == model and cell.region == region:
                return cell
        return None


def relation(card: ModelCard, region: Region, table: GroupTable = DEFAULT_GROUP_TABLE) -> Relation:
    """How a test region relates to what the model was trained on, by the group table (a card
    naming no region and no group was trained on every region)."""
    if region in card.regions or (not card.regions and card.group is None):
        return Relation.SAME_REGION
    if table.group_of(region) in home_groups(card, table):
        return Relation.SAME_GROUP
    return Relation.OTHER_GROUP


def matrix_threshold(card: ModelCard) -> float:
    point = card.operating_point(YOUDEN)
    return float(point.threshold) if point is not None else UNCALIBRATED_THRESHOLD


def column_order(regions: set[Region], table: GroupTable = DEFAULT_GROUP_TABLE) -> tuple[Region, ...]:
    """Regions grouped as the table groups them (group order, then region order in the group)."""
    ordered = [r for g in AnatomicalGroup for r in table.regions_of(g) if r in regions]
    return tuple(ordered)


def transfer_matrix(
    images: Sequence[EvalImage],
    runs: Sequence[ModelRun],
    *,
    table: GroupTable = DEFAULT_GROUP_TABLE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> TransferMatrix:
    """Every run against every test region present in its images (regions outside any group skipped)."""
    present = {r for run in runs for i in run.indices for r in images[i].regions}
    regions = column_order(present, table)
    cells: list[MatrixCell] = []
    for run in runs:
        threshold = matrix_threshold(run.card)
        for region in regions:
            positions = [p for p, i in enumerate(run.indices) if region in images[i].regions]
            if not positions:
                continue
            labels = np.array([images[run.indices[p]].label for p in positions], dtype=np.int64)
            scores = run.probabilities[positions]
            table_counts = confusion(labels, scores, threshold)
            area = bootstrap_intervals(
                labels, scores, {"auroc": auroc_rows}, resamples=resamples, seed=seed, confidence=confidence
            )["auroc"]
            cells.append(
                MatrixCell(
                    model=run.card.name,
                    region=region,
                    relation=relation(run.card, region, table),
                    images=len(positions),
                    positives=int(labels.sum()),
                    threshold=threshold,
                    accuracy=wilson_interval(
                        table_counts.tp + table_counts.tn, table_counts.total, confidence
                    ),
                    auroc=area,
                )
            )
    return TransferMatrix(
        cards=tuple(run.card for run in runs),
        regions=regions,
        cells=tuple(cells),
        summary=tuple(_summarise(cells, kind) for kind in Relation),
    )


def _summarise(cells: Sequence[MatrixCell], kind: Relation) -> RelationSummary:
    chosen = [c for c in cells if c.relation == kind and c.auroc.defined]
    if not chosen:
        return RelationSummary(kind, 0, math.nan, math.nan, math.nan, math.nan)
    areas = np.array([c.auroc.estimate for c in chosen])
    accuracy = np.array([c.accuracy.estimate for c in chosen])
    return RelationSummary(
        relation=kind,
        cells=len(chosen),
        mean_auroc=float(areas.mean()),
        min_auroc=float(areas.min()),
        max_auroc=float(areas.max()),
        mean_accuracy=float(accuracy.mean()),
    )


def draw_heatmap(
    matrix: TransferMatrix, path: Path, metric: str = "auroc", table: GroupTable = DEFAULT_GROUP_TABLE
) -> Path:
    """A PNG heat-map of AUROC (or ``metric="accuracy"``), models by test region.

    Each cell shows the value and its 95% interval; same-region cells have a solid frame,
    same-group cells a dashed one; white lines separate the anatomical groups of the columns.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = [card.name for card in matrix.cards]
    columns = list(matrix.regions)
    values = np.full((len(rows), len(columns)), math.nan)
    for r, name in enumerate(rows):
        for c, region in enumerate(columns):
            cell = matrix.cell(name, region)
            if cell is not None:
                values[r, c] = getattr(cell, metric).estimate
    width = max(5.0, 1.25 * len(columns) + 3.0)
    height = max(3.0, 0.8 * len(rows) + 2.0)
    figure = Figure(figsize=(width, height), dpi=110)
    axes = figure.add_subplot()
    image = axes.imshow(
        np.ma.masked_invalid(values),
        cmap="RdYlGn",
        vmin=0.5 if metric == "auroc" else 0.0,
        vmax=1.0,
        aspect="auto",
    )
    figure.colorbar(image, ax=axes, label="AUROC" if metric == "auroc" else metric)
    for r, name in enumerate(rows):
        for c, region in enumerate(columns):
            cell = matrix.cell(name, region)
            if cell is None:
                continue
            interval = getattr(cell, metric)
            text = "n/a" if not interval.defined else f"{interval.estimate:.2f}"
            if interval.defined and not math.isnan(interval.low):
                text += f"\n[{interval.low:.2f}, {interval.high:.2f}]"
            axes.text(c, r, text, ha="center", va="center", fontsize=7)
            if cell.relation != Relation.OTHER_GROUP:
                same_region = cell.relation == Relation.SAME_REGION
                axes.add_patch(
                    Rectangle(
                        (c - 0.44, r - 0.44),
                        0.88,
                        0.88,
                        fill=False,
                        linewidth=2.5 if same_region else 1.5,
                        linestyle="-" if same_region else "--",
                        edgecolor="black",
                    )
                )
    groups = [table.group_of(region) for region in columns]
    for c in range(1, len(columns)):
        if groups[c] != groups[c - 1]:
            axes.axvline(c - 0.5, color="white", linewidth=3)
    axes.set_xticks(
        range(len(columns)), [f"{r.value}\n({g})" for r, g in zip(columns, groups, strict=True)], fontsize=7
    )
    axes.set_yticks(range(len(rows)), rows, fontsize=8)
    axes.set_xlabel("test region (anatomical group)")
    axes.set_ylabel("model")
    title = "AUROC" if metric == "auroc" else metric
    axes.set_title(
        f"Cross-region transfer, {title}\n(solid frame: same region, dashed: same group)", fontsize=9
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
