"""The evaluation's outputs: ``results.json`` (every number), ``report.md`` and PNG figures.

The Markdown report and the documentation section are rendered from the JSON data only, so
what a reader sees is what the JSON holds; :func:`update_generated_section` replaces a marked
section of a Markdown file (``docs/evaluation.md``) with a rendering, so published results are
generated, never typed. Figures (ROC, PR, reliability before/after calibration, FROC)
are drawn from the model runs with matplotlib's object API on an Agg canvas; no global backend
is set and pyplot is never imported.

NaN (a statistic the data leave undefined) is written as JSON ``null`` and shown as "n/a".

Errors::

    ReportError             a results file that cannot be read, or a documentation file
                            without the section markers
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from inference.evaluation.detection import froc
from inference.evaluation.metrics import precision_recall_curve, reliability, roc_curve
from inference.evaluation.runner import EvalImage, ModelRun, uncalibrated
from inference.evaluation.scoring import ModelEvaluation, Scope, detections_of, home_groups, subsets_of
from inference.modelcard import ModelCard
from inference.regions import DEFAULT_GROUP_TABLE, GroupTable

JSON_NAME = "results.json"
REPORT_NAME = "report.md"
FIGURES = "figures"
SCHEMA = "fracnode-evaluation/1"


class ReportError(Exception):
    """A results file or documentation file that cannot be used; names the path."""


# --------------------------------------------------------------------------------------------
# JSON


def to_jsonable(value: Any) -> Any:
    """Plain JSON data from dataclasses, enums, numpy values and paths; NaN and inf become None."""
    if isinstance(value, ModelCard):
        return card_summary(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return value


def card_summary(card: ModelCard) -> dict[str, Any]:
    """What a report needs to name a model: identity, scope, calibration and operating points."""
    return {
        "name": card.name,
        "version": card.version,
        "device_uid": card.device_uid,
        "kind": card.kind.value,
        "architecture": card.architecture,
        "group": card.group.value if card.group is not None else None,
        "regions": [r.value for r in card.regions],
        "input_size": card.input_size,
        "preprocessing": dict(card.preprocessing),
        "temperature": card.temperature,
        "logit_offset": card.logit_offset,
        "operating_points": [to_jsonable(p) for p in card.operating_points],
        "created": card.created,
    }


def write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return path


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read results: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ReportError(f"{path}: not a fracnode evaluation results file (schema {SCHEMA})")
    return data


# --------------------------------------------------------------------------------------------
# formatting


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: Mapping[str, Any] | None, digits: int = 3) -> str:
    if interval is None or interval.get("estimate") is None:
        return "n/a"
    text = f"{interval['estimate']:.{digits}f}"
    if interval.get("low") is not None and interval.get("high") is not None:
        text += f" ({interval['low']:.{digits}f}-{interval['high']:.{digits}f})"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _subset_name(subset: Mapping[str, Any]) -> str:
    name = "all images" if subset["scope"] == Scope.OVERALL.value else f"{subset['scope']}: {subset['name']}"
    return name + (" (out of group)" if subset.get("out_of_group") else "")


def _model_title(card: Mapping[str, Any]) -> str:
    scope = card["group"] or (", ".join(card["regions"]) if card["regions"] else "all regions")
    return f"{card['name']} {card['version']} ({card['kind']}, {card['architecture']}; {scope})"


LEVELS = (
    ("image", "per image"),
    ("study_mean", "per study, mean of views"),
    ("study_max", "per study, max of views"),
)


def _classifier_sections(model: Mapping[str, Any], figures: Sequence[str]) -> list[str]:
    lines: list[str] = []
    calibration = model.get("calibration")
    if calibration:
        fitted = calibration.get("fitted_temperature")
        lines += [
            f"Calibration on this data: ECE {_ci(calibration['ece_before'])} before calibration, "
            f"{_ci(calibration['ece_after'])} after (card temperature {_num(calibration['temperature'], 2)}, "
            f"logit offset {_num(calibration.get('logit_offset', 0.0), 2)}; "
            f"the temperature alone that fits this data: {_num(fitted, 2)}). Brier score "
            f"{_ci(calibration['brier_before'])} before, {_ci(calibration['brier_after'])} after.",
            "",
        ]
    for key, title in LEVELS:
        lines += [f"#### {title.capitalize()}", ""]
        ranking_rows = []
        for row in model["rows"]:
            metrics = row[key]
            ranking_rows.append(
                [
                    _subset_name(row["subset"]),
                    str(metrics["n"]),
                    str(metrics["positives"]),
                    _ci(metrics["auroc"]),
                    _ci(metrics["average_precision"]),
                    _ci(metrics["brier"]),
                    _ci(metrics["ece"]),
                ]
            )
        lines += _table(["subset", "n", "fractures", "AUROC", "AP", "Brier", "ECE"], ranking_rows)
        names = [p["name"] for p in model["rows"][0][key]["operating_points"]] if model["rows"] else []
        for index, name in enumerate(names):
            threshold = model["rows"][0][key]["operating_points"][index]["threshold"]
            rule = (
                "each group at its model's threshold"
                if threshold is None
                else f"probability >= {threshold:.3f}"
            )
            lines += [f"Operating point `{name}` ({rule}):", ""]
            point_rows = []
            for row in model["rows"]:
                point = row[key]["operating_points"][index]
                point_rows.append(
                    [
                        _subset_name(row["subset"]),
                        _ci(point["sensitivity"]),
                        _ci(point["specificity"]),
                        _ci(point["ppv"]),
                        _ci(point["npv"]),
                        _ci(point["accuracy"]),
                        _ci(point["f1"]),
                        _ci(point["kappa"]),
                    ]
                )
            lines += _table(
                ["subset", "sensitivity", "specificity", "PPV", "NPV", "accuracy", "F1", "kappa"], point_rows
            )
    lines += [f"![{name}]({FIGURES}/{name})" for name in figures] + [""]
    return lines


def _detector_sections(model: Mapping[str, Any], figures: Sequence[str]) -> list[str]:
    lines: list[str] = []
    rows = []
    for row in model["rows"]:
        found = row["detection"]
        recall = " / ".join(_num(r, 2) for _, r in found["froc"]["recall_at"])
        rows.append(
            [
                _subset_name(row["subset"]),
                str(found["images"]),
                str(found["lesions"]),
                _num(found["map50"]),
                _num(found["map50_95"]),
                recall,
                _ci(found["image_level"]["auroc"]),
                _ci(found["case_level"]["auroc"]),
            ]
        )
    rates = (
        " / ".join(_num(rate, 1) for rate, _ in model["rows"][0]["detection"]["froc"]["recall_at"])
        if rows
        else ""
    )
    lines += _table(
        [
            "subset",
            "images",
            "fracture boxes",
            "mAP@0.5",
            "mAP@0.5:0.95",
            f"recall at {rates} FP/image",
            "image AUROC",
            "case AUROC",
        ],
        rows,
    )
    names = [p["name"] for p in model["rows"][0]["detection"]["lesion_level"]] if model["rows"] else []
    for index, name in enumerate(names):
        threshold = model["rows"][0]["detection"]["lesion_level"][index]["threshold"]
        lines += [f"Operating point `{name}` (confidence >= {threshold:.3f}):", ""]
        point_rows = []
        for row in model["rows"]:
            found = row["detection"]
            lesion = found["lesion_level"][index]
            image = found["image_level"]["operating_points"][index]
            case = found["case_level"]["operating_points"][index]
            point_rows.append(
                [
                    _subset_name(row["subset"]),
                    _ci(lesion["recall"]),
                    _ci(lesion["precision"]),
                    _num(lesion["false_positives_per_image"], 2),
                    _ci(image["sensitivity"]),
                    _ci(image["specificity"]),
                    _ci(case["sensitivity"]),
                    _ci(case["specificity"]),
                ]
            )
        lines += _table(
            [
                "subset",
                "fracture recall",
                "box precision",
                "FP/image",
                "image sens.",
                "image spec.",
                "case sens.",
                "case spec.",
            ],
            point_rows,
        )
    lines += [f"![{name}]({FIGURES}/{name})" for name in figures] + [""]
    return lines


def _probability(value: float) -> str:
    """A threshold on a probability: 4 decimals, more where it sits next to 0 or 1."""
    return f"{value:.4f}" if 0.001 <= value <= 0.999 else f"{value:.6g}"


def _budget_text(target: Mapping[str, Any]) -> str:
    text = _ci(target["recall"], 3)
    if target.get("threshold") is not None:
        text += f" [box p >= {_probability(target['threshold'])}]"
    return text


def localisation_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Localisation rows as Markdown: the FP-budget recall at each IoU, the FROC tables and the
    box operating points."""
    if not rows:
        return []
    first = rows[0]["by_iou"]
    budget = first[0]["target"]["budget"]
    ious = [entry["iou"] for entry in first]
    lines = [
        "Boxes against the fracture boxes; every image of the row counts, negatives included (their "
        f"boxes are false positives). A hit is IoU >= the stated overlap with a fracture box, one hit "
        f"per fracture box. Target (issue 12): recall >= 0.70 at <= {budget:g} false-positive boxes per "
        "image, IoU 0.3.",
        "",
    ]
    header = ["subset", "images", "negatives", "fracture boxes"]
    header += [f"recall at <= {budget:g} FP/image, IoU {iou:g}" for iou in ious]
    table = []
    for row in rows:
        entry = row["by_iou"][0]
        table.append(
            [
                _subset_name(row["subset"]),
                str(entry["images"]),
                str(entry["negatives"]),
                str(entry["lesions"]),
            ]
            + [_budget_text(e["target"]) for e in row["by_iou"]]
        )
    lines += _table(header, table)
    rates = [rate for rate, _ in first[0]["recall_at"]]
    froc_header = ["subset"] + [
        f"IoU {iou:g}: recall at {' / '.join(f'{r:g}' for r in rates)} FP/image" for iou in ious
    ]
    froc_rows = [
        [_subset_name(row["subset"])]
        + [" / ".join(_num(value, 2) for _, value in e["recall_at"]) for e in row["by_iou"]]
        for row in rows
    ]
    lines += ["FROC (recall at each false-positive rate per image):", ""] + _table(froc_header, froc_rows)
    for index, point in enumerate(first[0]["points"]):
        threshold = point["threshold"]
        rule = (
            "each group at its localiser's threshold"
            if threshold is None
            else f"box p >= {_probability(threshold)}"
        )
        lines += [f"Box operating point `{point['name']}` ({rule}):", ""]
        point_header = ["subset"]
        for iou in ious:
            point_header += [f"recall, IoU {iou:g}", f"FP/image, IoU {iou:g}"]
        point_header.append(f"box precision, IoU {ious[0]:g}")
        point_rows = []
        for row in rows:
            cells = [_subset_name(row["subset"])]
            for e in row["by_iou"]:
                level = e["points"][index]
                cells += [_ci(level["recall"], 2), _num(level["false_positives_per_image"], 2)]
            cells.append(_ci(row["by_iou"][0]["points"][index]["precision"], 2))
            point_rows.append(cells)
        lines += _table(point_header, point_rows)
    return lines


def _share(interval: Mapping[str, Any]) -> str:
    return _ci(interval, 3)


def shift_markdown(shift: Mapping[str, Any], groups: bool = True) -> list[str]:
    """How far the negatives' probabilities move under each source change, per probability source."""
    described = "; ".join(f"`{s['name']}`: {s['description']}" for s in shift["shifts"])
    lines = [
        f"Each of the {shift['negatives']} negatives read again under each source change ({described}). "
        "|Δp| is the change of its calibrated probability; *up* is the share of negatives newly called "
        "positive at the point, *down* the share no longer called (Wilson 95 % intervals).",
        "",
    ]
    for report in shift["reports"]:
        title = "The node (each group's deciding probability)" if report["name"] == "node" else report["name"]
        lines += [f"**{title}**", ""]
        names = [c["name"] for c in report["rows"][0]["crossings"]] if report["rows"] else []
        header = ["subset", "change", "negatives", "median |Δp|", "90th pct |Δp|", "mean Δp"]
        for name in names:
            header += [f"{name}: called before -> after", f"{name}: up", f"{name}: down"]
        rows = []
        for row in report["rows"]:
            if not groups and row["subset"]["scope"] != Scope.OVERALL.value:
                continue
            cells = [
                _subset_name(row["subset"]),
                row["shift"],
                str(row["negatives"]),
                _num(row["median_abs_delta"]),
                _num(row["p90_abs_delta"]),
                _num(row["mean_delta"]),
            ]
            for crossing in row["crossings"]:
                cells += [
                    f"{_num(crossing['called_before'], 3)} -> {_num(crossing['called_after'], 3)}",
                    _share(crossing["up"]),
                    _share(crossing["down"]),
                ]
            rows.append(cells)
        lines += _table(header, rows)
    return lines


def second_source_markdown(second: Mapping[str, Any], regions: bool = True) -> list[str]:
    """Sensitivity at both operating points (and box recall) on a source with positives only."""
    source = second["source"]
    lines = [
        f"Second source `{source['name']}` ({source['layout']}): {source['positives']} images with a "
        f"fracture box; it has no confirmed negatives, so only sensitivity is measured (never "
        "specificity).",
        "",
    ]
    for report in second["reports"]:
        title = "The node (each group's deciding model)" if report["name"] == "node" else report["name"]
        lines += [f"**{title}**", ""]
        names = [p["name"] for p in report["rows"][0]["points"]] if report["rows"] else []
        boxes = [b["name"] for b in report["rows"][0]["boxes"]] if report["rows"] else []
        header = ["subset", "fractured images", "median p"] + [f"sensitivity at {n}" for n in names]
        header += [f"box recall at {n} (IoU 0.3)" for n in boxes]
        rows = []
        for row in report["rows"]:
            if not regions and row["subset"]["scope"] == Scope.REGION.value:
                continue
            cells = [_subset_name(row["subset"]), str(row["positives"]), _num(row["median_probability"])]
            cells += [_ci(point["sensitivity"]) for point in row["points"]]
            cells += [_ci(box["recall"], 2) for box in row["boxes"]]
            rows.append(cells)
        lines += _table(header, rows)
    return lines


def matrix_markdown(matrix: Mapping[str, Any]) -> list[str]:
    """The transfer matrix as Markdown tables: AUROC, accuracy, and the relation summary."""
    regions = matrix["regions"]
    cells = {(c["model"], c["region"]): c for c in matrix["cells"]}
    lines: list[str] = []
    for metric, title in (("auroc", "AUROC"), ("accuracy", "Accuracy at the Youden point")):
        rows = []
        for card in matrix["cards"]:
            row = [card["name"]]
            for region in regions:
                cell = cells.get((card["name"], region))
                text = "" if cell is None else _ci(cell[metric], 2)
                if cell is not None and cell["relation"] == "same region":
                    text = f"**{text}**"
                elif cell is not None and cell["relation"] == "same group":
                    text = f"*{text}*"
                row.append(text)
            rows.append(row)
        lines += [f"{title} (bold: same region, italic: same group):", ""]
        lines += _table(["model \\ test region", *regions], rows)
    summary_rows = [
        [
            s["relation"],
            str(s["cells"]),
            _num(s["mean_auroc"]),
            "n/a" if s["min_auroc"] is None else f"{_num(s['min_auroc'])}-{_num(s['max_auroc'])}",
            _num(s["mean_accuracy"]),
        ]
        for s in matrix["summary"]
    ]
    lines += ["Within versus between anatomical groups (cells with a defined AUROC):", ""]
    lines += _table(["relation", "cells", "mean AUROC", "AUROC range", "mean accuracy"], summary_rows)
    return lines


def report_markdown(data: Mapping[str, Any]) -> str:
    """The whole report, from the results data alone."""
    source = data["source"]
    config = data["config"]
    lines = [
        "# fracnode evaluation report",
        "",
        "Not for diagnostic use. Generated by `fracnode evaluate`; every number is in "
        f"`{JSON_NAME}`. Intervals are 95%: Wilson for proportions, stratified bootstrap "
        f"({config['resamples']} resamples, seed {config['seed']}) for AUROC, AP, Brier, ECE, F1 and kappa.",
        "",
        f"- source: `{source['name']}` ({source['layout']}), split {source['split'] or 'all'}",
        f"- images: {source['images']} ({source['labelled']} labelled, "
        f"{source['positives']} with a fracture); failed to read: {len(source['failures'])}",
        f"- generated: {data['created']} by fracnode {data['fracnode_version']}",
        "",
    ]
    node = data.get("node")
    if node:
        deciding = ", ".join(f"{group}: {name}" for group, name in node["deciding"])
        lines += [
            "## The node: all models as routed",
            "",
            "Each image is scored by the model that decides its group, and called at that model's "
            f"operating points ({deciding}); studies are aggregated per group, as the node reports them.",
            "",
        ]
        lines += _classifier_sections(node, [])
        if node.get("localisation"):
            localisers = ", ".join(f"{group}: {name}" for group, name in node["localisers"])
            lines += [
                "### The node's boxes",
                "",
                f"Each image's boxes come from its group's localiser ({localisers}) and are held to that "
                "localiser's box operating points, as the SC and SR show them.",
                "",
            ]
            lines += localisation_markdown(node["localisation"])
    for model in data["models"]:
        card = model["card"]
        served = model["served"]
        lines += [f"## {_model_title(card)}", ""]
        lines += [
            "Images: "
            + (
                "every labelled image"
                if served is None
                else f"routed as the node routes them, groups {', '.join(served)}"
            )
            + ".",
            "",
        ]
        figures = model.get("figures", [])
        if model.get("members"):
            lines += [
                f"A logistic stack of {' and '.join(model['members'])} (the map model card's `stack`); "
                "its boxes are the map model's.",
                "",
            ]
        if card["kind"] == "detector":
            lines += _detector_sections(model, figures)
        else:
            lines += _classifier_sections(model, figures)
        if model.get("localisation"):
            lines += ["#### Localisation", ""] + localisation_markdown(model["localisation"])
    if data.get("second_source"):
        lines += ["## A second source: sensitivity per region", ""] + second_source_markdown(
            data["second_source"]
        )
    if data.get("source_shift"):
        lines += ["## Source changes: how far the negatives move", ""] + shift_markdown(data["source_shift"])
    if data.get("matrix"):
        lines += ["## Cross-region transfer matrix", ""] + matrix_markdown(data["matrix"])
        lines += [f"![transfer matrix]({FIGURES}/{name})" for name in data["matrix"].get("figures", [])] + [
            ""
        ]
    return "\n".join(lines).rstrip() + "\n"


_DOCS_HEADER = ["subset", "images", "fractures", "AUROC (image)", "calibration / boxes", "operating points"]


def _docs_row(subset: Mapping[str, Any], metrics: Mapping[str, Any], extra: str) -> list[str]:
    points = "; ".join(
        f"{p['name']}: sens {_ci(p['sensitivity'], 2)}, spec {_ci(p['specificity'], 2)}"
        for p in metrics["operating_points"]
    )
    return [
        _subset_name(subset),
        str(metrics["n"]),
        str(metrics["positives"]),
        _ci(metrics["auroc"]),
        extra,
        points,
    ]


def _docs_box_cell(row: Mapping[str, Any]) -> str:
    budget = row["by_iou"][0]["target"]["budget"]
    parts = [f"IoU {e['iou']:g} {_ci(e['target']['recall'], 2)}" for e in row["by_iou"]]
    return f"box recall at <= {budget:g} FP/image: " + ", ".join(parts)


def _docs_localisation(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    table = []
    for row in rows:
        if row["subset"]["scope"] == Scope.REGION.value:
            continue
        entry = row["by_iou"][0]
        points = "; ".join(
            f"{p['name']}: recall {_ci(p['recall'], 2)}, FP/image {_num(p['false_positives_per_image'], 2)}"
            for p in entry["points"]
        )
        table.append(
            [
                _subset_name(row["subset"]),
                str(entry["images"]),
                str(entry["lesions"]),
                _docs_box_cell(row),
                points,
            ]
        )
    return _table(
        [
            "subset",
            "images",
            "fracture boxes",
            "target measure",
            f"box points (IoU {rows[0]['by_iou'][0]['iou']:g})",
        ],
        table,
    )


def docs_section(data: Mapping[str, Any]) -> str:
    """A short summary for ``docs/evaluation.md``: overall and per-group rows of each model."""
    source = data["source"]
    lines = [
        f"Source `{source['name']}` ({source['layout']}), split {source['split'] or 'all'}: "
        f"{source['labelled']} labelled images, {source['positives']} with a fracture. "
        f"Generated {data['created']} by fracnode {data['fracnode_version']} "
        f"(bootstrap {data['config']['resamples']} resamples, seed {data['config']['seed']}).",
        "",
    ]
    node = data.get("node")
    if node:
        deciding = ", ".join(f"{group}: {name}" for group, name in node["deciding"])
        lines += [f"**The node, all models as routed** ({deciding})", ""]
        node_rows = [
            _docs_row(row["subset"], row["image"], f"ECE {_ci(row['image']['ece'])}")
            for row in node["rows"]
            if row["subset"]["scope"] != Scope.REGION.value
        ]
        lines += _table(_DOCS_HEADER, node_rows)
        if node.get("localisation"):
            localisers = ", ".join(f"{group}: {name}" for group, name in node["localisers"])
            lines += [f"**The node's boxes** ({localisers})", ""]
            lines += _docs_localisation(node["localisation"])
    for model in data["models"]:
        card = model["card"]
        lines += [f"**{_model_title(card)}**", ""]
        rows = []
        boxes = {_subset_name(r["subset"]): r for r in model.get("localisation") or []}
        for row in model["rows"]:
            if row["subset"]["scope"] == Scope.REGION.value:
                continue
            if card["kind"] == "detector":
                found = row["detection"]
                metrics = found["image_level"]
                extra = f"mAP@0.5 {_num(found['map50'])}"
            else:
                metrics = row["image"]
                extra = f"ECE {_ci(metrics['ece'])}, Brier {_ci(metrics['brier'])}"
            located = boxes.get(_subset_name(row["subset"]))
            if located is not None:
                extra += "; " + _docs_box_cell(located)
            rows.append(_docs_row(row["subset"], metrics, extra))
        lines += _table(_DOCS_HEADER, rows)
    if data.get("second_source"):
        lines += ["A second source:", ""] + second_source_markdown(data["second_source"])
    if data.get("source_shift"):
        lines += ["Source changes (overall rows; per group in the report):", ""]
        lines += shift_markdown(data["source_shift"], groups=False)
    if data.get("matrix"):
        lines += ["Cross-region transfer matrix:", ""] + matrix_markdown(data["matrix"])
    return "\n".join(lines).rstrip() + "\n"


def update_generated_section(path: Path, name: str, text: str) -> Path:
    """Replace the text between the lines ``<!-- BEGIN GENERATED: name -->`` and
    ``<!-- END GENERATED: name -->``."""
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    try:
        document = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from exc
    # The markers count only on lines of their own, so prose may quote them.
    pattern = re.compile(
        r"^" + re.escape(begin) + r"[ \t]*$.*?^" + re.escape(end) + r"[ \t]*$", re.DOTALL | re.MULTILINE
    )
    if not pattern.search(document):
        raise ReportError(f"{path}: no section markers {begin!r} ... {end!r}")
    path.write_text(pattern.sub(lambda _: f"{begin}\n{text}{end}", document, count=1), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# figures


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def _figure(width: float = 5.5, height: float = 5.0) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def _save(figure: Any, path: Path) -> Path:
    for axes in figure.axes:
        axes.title.set_fontsize(10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _curve_sets(
    images: Sequence[EvalImage], run: ModelRun, table: GroupTable
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, labels, scores) for the overall images and each group with both classes."""
    out = []
    for subset, positions in subsets_of(images, run.indices, home_groups(run.card, table), table):
        if subset.scope == Scope.REGION:
            continue
        labels = np.array([images[run.indices[p]].label for p in positions], dtype=np.int64)
        if 0 < labels.sum() < labels.size:
            name = "all" if subset.scope == Scope.OVERALL else subset.name
            out.append((name, labels, run.probabilities[positions]))
    return out


def draw_model_figures(
    images: Sequence[EvalImage],
    run: ModelRun,
    evaluation: ModelEvaluation,
    directory: Path,
    table: GroupTable = DEFAULT_GROUP_TABLE,
) -> list[str]:
    """ROC, PR and (classifiers) reliability or (detectors) FROC PNGs; returns their file names."""
    from inference.evaluation.metrics import auroc, average_precision

    stem = _slug(f"{run.card.name}-{run.card.version}")
    written: list[str] = []
    sets = _curve_sets(images, run, table)
    what = "top box confidence" if run.card.kind.value == "detector" else "probability"
    if sets:
        figure = _figure()
        axes = figure.add_subplot()
        for name, labels, scores in sets:
            curve = roc_curve(labels, scores)
            axes.plot(curve.x, curve.y, label=f"{name} (AUROC {auroc(labels, scores):.3f}, n={labels.size})")
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
        axes.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, per image: {run.card.name}")
        axes.legend(fontsize=7, loc="lower right")
        written.append(_save(figure, directory / f"{stem}_roc.png").name)

        figure = _figure()
        axes = figure.add_subplot()
        for name, labels, scores in sets:
            curve = precision_recall_curve(labels, scores)
            axes.step(
                np.r_[0.0, curve.x],
                np.r_[1.0, curve.y],
                where="pre",
                label=f"{name} (AP {average_precision(labels, scores):.3f}, prevalence {labels.mean():.2f})",
            )
        axes.set(
            xlabel="recall (sensitivity)",
            ylabel="precision (PPV)",
            xlim=(0, 1),
            ylim=(0, 1.02),
            title=f"Precision-recall, per image ({what}): {run.card.name}",
        )
        axes.legend(fontsize=7, loc="lower left")
        written.append(_save(figure, directory / f"{stem}_pr.png").name)

    before = uncalibrated(run)
    if before is not None and run.indices.size:
        labels = np.array([images[i].label for i in run.indices], dtype=np.int64)
        figure = _figure(5.5, 6.0)
        axes, counts = figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
        for name, scores, style in (
            ("before (sigmoid of logits)", before, "o--"),
            (
                f"after (T = {run.card.temperature:.2f}, b = {run.card.logit_offset:+.2f})",
                run.probabilities,
                "s-",
            ),
        ):
            table_bins = reliability(labels, scores)
            centres = (table_bins.edges[:-1] + table_bins.edges[1:]) / 2
            filled = table_bins.counts > 0
            axes.plot(table_bins.mean_score[filled], table_bins.observed[filled], style, label=name)
            counts.bar(centres, table_bins.counts, width=0.09, alpha=0.5, label=name)
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
        axes.set(
            ylabel="observed fracture frequency",
            xlim=(0, 1),
            ylim=(0, 1),
            title=f"Reliability before / after calibration:\n{run.card.name}",
        )
        axes.legend(fontsize=7, loc="upper left")
        counts.set(xlabel="predicted probability (10 bins)", ylabel="images")
        written.append(_save(figure, directory / f"{stem}_reliability.png").name)

    if run.boxes is not None and run.indices.size and not run.is_stack:
        overlap = 0.3 if run.card.kind.value == "segmenter" else 0.5
        figure = _figure()
        axes = figure.add_subplot()
        for subset, positions in subsets_of(images, run.indices, home_groups(run.card, table), table):
            if subset.scope == Scope.REGION:
                continue
            found = detections_of(images, run, positions)
            if not any(d.truth for d in found):
                continue
            lesions = froc(found, overlap)
            name = "all" if subset.scope == Scope.OVERALL else subset.name
            axes.step(
                lesions.fp_per_image, lesions.sensitivity, where="post", label=f"{name} (n={len(found)})"
            )
        for rate in (0.1, 0.2, 0.3, 0.4, 0.5):
            axes.axvline(rate, color="grey", linewidth=0.5, linestyle=":")
        axes.set(
            xlabel="false positives per image",
            ylabel=f"fraction of fractures found (IoU >= {overlap:g})",
            xlim=(0, 2),
            ylim=(0, 1),
            title=f"FROC: {run.card.name}",
        )
        axes.legend(fontsize=7, loc="lower right")
        written.append(_save(figure, directory / f"{stem}_froc.png").name)
    return written
