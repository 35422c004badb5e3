"""One evaluation from images and models to a folder of results: the body of ``fracnode evaluate``.

Steps: run the models (:mod:`runner`), score every model's rows (:mod:`scoring`), optionally
build the transfer matrix (:mod:`matrix`, every model on every image), then write
``results.json``, ``report.md`` rendered from it, ``predictions.csv`` (one line per model and
image: key, regions, label, probability, logit) and the figures.

With the matrix, each model runs once over every image and its routed rows are taken from that
run, so no image is predicted twice. Stacks (:class:`runner.StackPlan`) are computed from their
members' runs on the images routed to the stack's groups, and reported like a model (the matrix
holds the members only).

Two optional parts measure a new source (:mod:`shift`): ``shifts`` reads every negative again
under each source change (decoded once per image) and reports how far its probabilities move;
``second`` runs the same plans on a second source with positives only (upper-limb-web) and
reports sensitivity at both operating points per region.

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
    StackPlan,
    restrict,
    run_models,
    select_images,
    stack_run,
)
from inference.evaluation.scoring import EvaluationConfig, evaluate_node, evaluate_run
from inference.evaluation.shift import Shift, second_source_rows, shift_rows, shifted_images


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


def _with_stacks(
    images: Sequence[EvalImage],
    plans: Sequence[ModelPlan],
    stacks: Sequence[StackPlan],
    selections: Sequence[Sequence[int]],
    stack_selections: Sequence[Sequence[int]],
    batch_size: int,
    progress: bool,
) -> tuple[tuple[ModelRun, ...], tuple[tuple[str, str], ...]]:
    result = run_models(images, plans, selections, batch_size=batch_size, progress=progress)
    stacked = tuple(
        stack_run(
            result.runs[plan.classifier],
            result.runs[plan.segmenter],
            plan.stack,
            keep,
            served=plan.served,
            decides=plan.decides,
        )
        for plan, keep in zip(stacks, stack_selections, strict=True)
    )
    return tuple(result.runs) + stacked, result.failures


def _source_shift(
    images: Sequence[EvalImage],
    plans: Sequence[ModelPlan],
    stacks: Sequence[StackPlan],
    routed: Sequence[Sequence[int]],
    stack_images: Sequence[Sequence[int]],
    runs: Sequence[ModelRun],
    shifts: Sequence[Shift],
    config: EvaluationConfig,
    node: bool,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    negatives = sorted({i for selection in routed for i in selection if images[i].label == 0})
    copies, origin = shifted_images(images, negatives, shifts)
    by_source: dict[int, list[int]] = {}
    for copy, (source, _) in enumerate(origin):
        by_source.setdefault(source, []).append(copy)

    def copies_of(selection: Sequence[int]) -> list[int]:
        return [c for i in selection for c in by_source.get(i, [])]

    shifted, failures = _with_stacks(
        copies,
        plans,
        stacks,
        [copies_of(s) for s in routed],
        [copies_of(s) for s in stack_images],
        batch_size,
        progress,
    )
    reports = shift_rows(images, runs, shifted, origin, shifts, config, node=node)
    return {
        "shifts": [{"name": s.name, "description": s.description} for s in shifts],
        "negatives": len(negatives),
        "failures": [{"image": key, "reason": reason} for key, reason in failures],
        "reports": to_jsonable(reports),
    }


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
    stacks: Sequence[StackPlan] = (),
    shifts: Sequence[Shift] = (),
    second: tuple[SourceInfo, Sequence[EvalImage]] | None = None,
) -> SuiteOutput:
    """Evaluate ``plans`` (and ``stacks`` of them) on ``images`` and write every output under ``out``;
    ``shifts`` and ``second`` add the two new-source measures of :mod:`shift`."""
    config = config or EvaluationConfig()
    selections = select_images(images, plans, config.table, [stack.served for stack in stacks])
    routed, stack_images = selections[: len(plans)], selections[len(plans) :]
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
    stacked = tuple(
        stack_run(
            full_runs[plan.classifier],
            full_runs[plan.segmenter],
            plan.stack,
            keep,
            served=plan.served,
            decides=plan.decides,
        )
        for plan, keep in zip(stacks, stack_images, strict=True)
    )
    runs = tuple(runs) + stacked
    full_runs = tuple(full_runs) + stacked
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
            [run for run in full_runs if not run.is_stack],
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
    shift_data: dict[str, Any] | None = None
    if shifts:
        shift_data = _source_shift(
            images,
            plans,
            stacks,
            routed,
            stack_images,
            runs,
            shifts,
            config,
            node is not None,
            batch_size,
            progress,
        )
    second_data: dict[str, Any] | None = None
    if second is not None:
        info, second_images = second
        chosen = select_images(second_images, plans, config.table, [stack.served for stack in stacks])
        second_runs, second_failures = _with_stacks(
            second_images,
            plans,
            stacks,
            chosen[: len(plans)],
            chosen[len(plans) :],
            batch_size,
            progress,
        )
        positives = [image for image in second_images if image.label == 1]
        second_data = {
            "source": {
                "name": info.name,
                "layout": info.layout,
                "split": info.split,
                "images": len(second_images),
                "positives": len(positives),
                "negatives": sum(1 for image in second_images if image.label == 0),
                "failures": [{"image": key, "reason": reason} for key, reason in second_failures],
            },
            "reports": to_jsonable(
                second_source_rows(second_images, second_runs, config, node=node is not None)
            ),
        }
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
        "source_shift": shift_data,
        "second_source": second_data,
    }
    results = write_json(out / JSON_NAME, data)
    report = out / REPORT_NAME
    report.write_text(report_markdown(data), encoding="utf-8")
    predictions = _predictions_csv(out / "predictions.csv", images, full_runs)
    return SuiteOutput(out, results, report, predictions, tuple(figures), data)
