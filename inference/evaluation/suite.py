"""One evaluation from images and models to a folder of results: the body of ``fracnode evaluate``.

Steps: run the models (:mod:`runner`), score every model's rows (:mod:`scoring`), optionally
build the transfer matrix (:mod:`matrix`, every model on every image), then write
``results.json``, ``report.md`` rendered from it, ``predictions.csv`` (one line per model and
image: key, regions, label, probability, logit) and the figures.

With the matrix, each model runs once over every image and its routed rows are taken from that
run, so no image is predicted twice.

Errors: those of the modules it calls (:class:`runner.RunnerError`,
:class:`metrics.MetricsError`); an output folder that cannot be written raises ``OSError``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from inference.evaluation.matrix import draw_heatmap, transfer_matrix
from inference.evaluation.report import (
    FIGURES,
    JSON_NAME,
    REPORT_NAME,
    SCHEMA,
    draw_model_figures,
    report_markdown,
    to_jsonable,
    write_json,
)
from inference.evaluation.runner import (
    EvalImage,
    ModelPlan,
    ModelRun,
    restrict,
    run_models,
    select_images,
)
from inference.evaluation.scoring import EvaluationConfig, evaluate_node, evaluate_run


@dataclass(frozen=True, slots=True)
class SourceInfo:
    name: str  # shown in the report: a folder or file name, not a full path
    layout: str  # "fracatlas", "mura", "csv", "dicom", ...
    split: str | None


@dataclass(frozen=True, slots=True)
class SuiteOutput:
    directory: Path
    results: Path
    report: Path
    predictions: Path
    figures: tuple[Path, ...]
    data: dict[str, Any]


def _predictions_csv(path: Path, images: Sequence[EvalImage], runs: Sequence[ModelRun]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["model", "version", "image", "regions", "study", "label", "probability", "logit", "boxes"]
        )
        for run in runs:
            for position, index in enumerate(run.indices):
                image = images[index]
                writer.writerow(
                    [
                        run.card.name,
                        run.card.version,
                        image.key,
                        "+".join(r.value for r in image.regions),
                        image.study_id,
                        image.label,
                        f"{run.probabilities[position]:.6f}",
                        "" if run.logits is None else f"{run.logits[position]:.6f}",
                        "" if run.boxes is None else len(run.boxes[position]),
                    ]
                )
    return path


def run_suite(
    images: Sequence[EvalImage],
    plans: Sequence[ModelPlan],
    source: SourceInfo,
    out: Path,
    *,
    matrix: bool = False,
    config: EvaluationConfig | None = None,
    batch_size: int = 16,
    progress: bool = True,
    version: str = "",
) -> SuiteOutput:
    """Evaluate ``plans`` on ``images`` and write every output under ``out``."""
    config = config or EvaluationConfig()
    routed = select_images(images, plans, config.table)
    if matrix:
        everything = [i for i, image in enumerate(images) if image.label is not None]
        result = run_models(
            images, plans, [everything] * len(plans), batch_size=batch_size, progress=progress
        )
        full_runs = result.runs
        runs = tuple(restrict(run, keep) for run, keep in zip(full_runs, routed, strict=True))
    else:
        result = run_models(images, plans, routed, batch_size=batch_size, progress=progress)
        full_runs = result.runs
        runs = result.runs
    figures_dir = out / FIGURES
    figures: list[Path] = []
    models: list[dict[str, Any]] = []
    for run in tqdm(runs, desc="metrics", unit="model", disable=not progress):
        evaluation = evaluate_run(images, run, config)
        names = draw_model_figures(images, run, evaluation, figures_dir, config.table)
        figures += [figures_dir / name for name in names]
        entry = to_jsonable(evaluation)
        entry["figures"] = names
        models.append(entry)
    node = evaluate_node(images, runs, config)
    matrix_data: dict[str, Any] | None = None
    if matrix:
        table = transfer_matrix(
            images,
            full_runs,
            table=config.table,
            resamples=config.resamples,
            seed=config.seed,
            confidence=config.confidence,
        )
        matrix_data = to_jsonable(table)
        names = []
        for metric in ("auroc", "accuracy"):
            path = draw_heatmap(table, figures_dir / f"transfer_matrix_{metric}.png", metric, config.table)
            figures.append(path)
            names.append(path.name)
        matrix_data["figures"] = names
    labelled = [image for image in images if image.label is not None]
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "fracnode_version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {
            "name": source.name,
            "layout": source.layout,
            "split": source.split,
            "images": len(images),
            "labelled": len(labelled),
            "positives": sum(1 for image in labelled if image.label == 1),
            "failures": [{"image": key, "reason": reason} for key, reason in result.failures],
        },
        "config": {"resamples": config.resamples, "seed": config.seed, "confidence": config.confidence},
        "node": None if node is None else to_jsonable(node),
        "models": models,
        "matrix": matrix_data,
    }
    results = write_json(out / JSON_NAME, data)
    report = out / REPORT_NAME
    report.write_text(report_markdown(data), encoding="utf-8")
    predictions = _predictions_csv(out / "predictions.csv", images, full_runs)
    return SuiteOutput(out, results, report, predictions, tuple(figures), data)
