"""``fracnode models list | show NAME | verify [PATH]``: the installed model packages.

``list`` shows the bundled packages and those of the configured ``[models] directory`` with
their validation metrics; ``show`` prints one card; ``verify`` checks the sha256 of every weight
file (all packages, or the one at PATH) and exits 1 when any fails. An unknown name or a path
that is not a package raises :class:`node.cli.CliError` (exit 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from inference.modelcard import HIGH_SENSITIVITY, ModelCard
from inference.packages import (
    ModelPackage,
    PackageError,
    bundled_directory,
    card_to_dict,
    discover,
    read_package,
    verify_package,
)
from node.cli import CliError
from node.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("models", help="list, show and verify model packages")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="bundled and configured packages with validation metrics")
    listing.set_defaults(handler=list_models)
    show = actions.add_parser("show", help="print the card of one package")
    show.add_argument("name", metavar="NAME", help="package name (or a package directory)")
    show.set_defaults(handler=show_model)
    verify = actions.add_parser("verify", help="check the weight checksums")
    verify.add_argument(
        "path", type=Path, nargs="?", default=None, metavar="PATH", help="one package directory"
    )
    verify.set_defaults(handler=verify_models)


def directories(settings: Settings) -> list[Path]:
    """The bundled packages (unless ``[models] include_bundled`` is false), then the site's."""
    out = [bundled_directory()] if settings.models.include_bundled else []
    if settings.models.directory is not None:
        out.append(settings.models.directory)
    return out


def all_packages(settings: Settings) -> list[ModelPackage]:
    packages: list[ModelPackage] = []
    for directory in directories(settings):
        try:
            packages.extend(discover(directory))
        except PackageError as exc:
            raise CliError(str(exc)) from exc
    return packages


def headline(card: ModelCard) -> str:
    """The one validation number that says most about the model, with its CI."""
    m: dict[str, Any] = card.validation_metrics
    if card.kind == "region":
        if "accuracy" in m:
            return f"accuracy {m['accuracy']:.3f} {m.get('accuracy_ci', '')} (n={m.get('n')})"
    elif card.kind == "detector":
        parts = []
        if "recall_at_0.5_fp_per_image" in m:
            parts.append(f"recall@0.5FP/img {m['recall_at_0.5_fp_per_image']:.3f}")
        image = m.get("image_level", {})
        if image.get("auroc") is not None:
            parts.append(f"image AUROC {image['auroc']:.3f} {image.get('auroc_ci', '')}")
        if parts:
            return ", ".join(parts)
    elif m.get("auroc") is not None:
        text = f"AUROC {m['auroc']:.3f} {m.get('auroc_ci', '')} (n={m.get('n')}, pos={m.get('positives')})"
        if card.segmenter is not None:
            box = card.segmenter.box_point(HIGH_SENSITIVITY)
            if box is not None:
                text += (
                    f", box recall {box.recall:.3f} at {box.false_positives_per_image:.2f} FP/img"
                    f" (IoU {box.iou})"
                )
        return text
    return "no validation metrics"


def operating_point_lines(card: ModelCard, intervals: bool = False) -> list[str]:
    """One indented line per operating point; ``intervals`` adds the Wilson 95 % CIs."""
    lines = []
    for point in card.operating_points:
        sensitivity = f"sensitivity {point.sensitivity:.3f}"
        specificity = f"specificity {point.specificity:.3f}"
        if intervals:
            sensitivity += f" {list(point.sensitivity_ci)}"
            specificity += f" {list(point.specificity_ci)}"
        lines.append(f"  {point.name}: threshold {point.threshold:.4f} {sensitivity} {specificity}")
    if card.segmenter is not None:
        for box in card.segmenter.box_operating_points:
            recall = f"recall {box.recall:.3f}"
            if intervals:
                recall += f" {list(box.recall_ci)}"
            lines.append(
                f"  box {box.name}: map probability {box.threshold:.4f} {recall} "
                f"FP/image {box.false_positives_per_image:.3f} (IoU {box.iou})"
            )
    return lines


def list_models(args: argparse.Namespace, settings: Settings) -> int:
    packages = all_packages(settings)
    if not packages:
        print("no model packages found in " + ", ".join(str(d) for d in directories(settings)))
        return 0
    for package in packages:
        card = package.card
        group = card.group or "-"
        regions = ",".join(card.regions)
        print(
            f"{card.name:<34} {card.version:<8} {card.kind:<10} {card.architecture:<19} {group:<15} "
            f"[{regions}] {headline(card)}"
        )
    return 0


def _find(name: str, settings: Settings) -> ModelPackage:
    path = Path(name)
    if (path / "model.json").is_file():
        try:
            return read_package(path)
        except PackageError as exc:
            raise CliError(str(exc)) from exc
    matches = [p for p in all_packages(settings) if p.card.name == name or p.path.name == name]
    if not matches:
        raise CliError(f"no model package named {name!r} (see `fracnode models list`)")
    return matches[-1]  # the configured directory wins over the bundled one


def show_model(args: argparse.Namespace, settings: Settings) -> int:
    package = _find(args.name, settings)
    data = card_to_dict(package.card)
    data["path"] = str(package.path)
    print(json.dumps(data, indent=2, default=str))
    return 0


def verify_models(args: argparse.Namespace, settings: Settings) -> int:
    if args.path is not None:
        if not (args.path / "model.json").is_file():
            raise CliError(f"{args.path} is not a model package (no model.json)")
        paths = [args.path]
    else:
        paths = [p.path for p in all_packages(settings)]
    failed = 0
    for path in paths:
        try:
            package = verify_package(path)
        except PackageError as exc:
            failed += 1
            print(f"FAILED {exc}")
        else:
            print(f"ok     {package.card.name} {package.card.version} ({path})")
    return 1 if failed else 0
