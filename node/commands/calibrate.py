"""``fracnode calibrate PACKAGE --data PATH``: refit calibration and operating points of a package.

The package is verified first; the data's labelled images of the card's regions (``--split``;
by default ``valid`` when the data name one, else every image, as a site CSV without a
``split`` column; sources without confirmed negatives left out) give the scores; the card gets
the temperature and logit offset (``--temperature-only``: temperature scaling alone, offset 0),
the three operating points with their nested out-of-fold sensitivity and
specificity, and the validation metrics, under a new version and device UID (IHE AIR), and the
checksums are rewritten.

A fracture-map package (kind ``segmenter``) is refitted by
:func:`inference.training.segmenter_package.calibrate_segmenter_package`: its image score's
calibration and points as above, its map calibration, and its two box operating points when the
data carry fracture boxes (kept at the same map cuts when they do not); a stack on its card is
recalibrated when ``--stack-classifier PKG`` gives the stack's classifier.

Bad input raises :class:`node.cli.CliError` (exit 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from inference.datasets import DatasetError, LabelledImage, load_sources
from inference.packages import PackageError
from inference.regions import AnatomicalGroup, Region
from node.cli import CliError
from node.commands.models import operating_point_lines
from node.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("calibrate", help="fit calibration and operating points of a model package")
    parser.add_argument("package", type=Path, metavar="PACKAGE", help="model package directory")
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        metavar="PATH",
        help="data folder or CSV (repeatable)",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split to calibrate on ('all' for every image; default: valid when the data have one, else all)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    parser.add_argument("--cache", type=Path, default=Path("var/cache"), metavar="DIR")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group", default=None, help="give the card this primary group first")
    parser.add_argument("--regions", default=None, help="comma-separated regions the card answers for")
    parser.add_argument("--name", default=None, help="rename the model in its card")
    parser.add_argument("--notes", default=None, help="replace the card's notes")
    parser.add_argument("--version", default=None, help="the new card's version (default: the next one)")
    parser.add_argument(
        "--temperature-only",
        action="store_true",
        help="fit the temperature alone (default: temperature and a logit offset)",
    )
    parser.add_argument(
        "--stack-classifier",
        type=Path,
        default=None,
        metavar="PKG",
        help="fracture-map package with a stack: recalibrate the stack too, with this classifier package",
    )
    parser.add_argument("--box-iou", type=float, default=0.3, help="fracture-map package: IoU of a box hit")
    parser.add_argument(
        "--box-fp-sensitive", type=float, default=0.5, help="FP boxes per image at the high-sensitivity point"
    )
    parser.add_argument(
        "--box-fp-specific", type=float, default=0.1, help="FP boxes per image at the high-specificity point"
    )
    parser.set_defaults(handler=calibrate)


def _split(requested: str | None, images: list[LabelledImage]) -> str | None:
    if requested == "all":
        return None
    if requested is not None:
        return requested
    return "valid" if any(i.split == "valid" for i in images) else None


def calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from inference.calibration import CalibrationError
    from inference.modelcard import ModelKind
    from inference.packages import read_package
    from inference.training.package import calibrate_package

    if not (args.package / "model.json").is_file():
        raise CliError(f"{args.package} is not a model package (no model.json)")
    for path in args.data:
        if not path.exists():
            raise CliError(f"--data {path} does not exist")
    if args.stack_classifier is not None and not (args.stack_classifier / "model.json").is_file():
        raise CliError(f"--stack-classifier {args.stack_classifier} is not a model package")
    if not 0.0 < args.box_iou <= 1.0 or args.box_fp_sensitive < 0 or args.box_fp_specific < 0:
        raise CliError("--box-iou must be in (0, 1], the FP-per-image budgets at least 0")
    scope: dict[str, object] = {}
    try:
        if args.group is not None:
            scope["group"] = AnatomicalGroup(args.group)
        if args.regions is not None:
            scope["regions"] = tuple(Region(r.strip()) for r in args.regions.split(",") if r.strip())
    except ValueError as exc:
        raise CliError(f"--group/--regions: {exc}") from exc
    if args.name is not None:
        scope["name"] = args.name
    if args.notes is not None:
        scope["notes"] = args.notes
    if args.version is not None:
        if not args.version.strip():
            raise CliError("--version must not be empty")
        scope["version"] = args.version.strip()
    try:
        kind = read_package(args.package).card.kind
        images = load_sources(list(args.data))
        split = _split(args.split, images)
        print(f"calibrating on {'split ' + split if split else 'every labelled image'} of the data")
        if kind is ModelKind.SEGMENTER:
            from inference.training.segmenter_package import BoxTargets, calibrate_segmenter_package

            package = calibrate_segmenter_package(
                args.package,
                images,
                split,
                args.cache,
                args.device,
                args.seed,
                scope,
                offset=not args.temperature_only,
                targets=BoxTargets(args.box_iou, args.box_fp_sensitive, args.box_fp_specific),
                stack_classifier=args.stack_classifier,
            )
        else:
            if args.stack_classifier is not None:
                raise CliError("--stack-classifier applies to a fracture-map package only")
            package = calibrate_package(
                args.package,
                images,
                split,
                args.cache,
                args.device,
                args.seed,
                scope,
                offset=not args.temperature_only,
            )
    except (DatasetError, PackageError, CalibrationError) as exc:
        raise CliError(str(exc)) from exc
    card = package.card
    print(
        f"calibrated {package.path}: {card.name} {card.version}, temperature {card.temperature:.4f}, "
        f"logit offset {card.logit_offset:+.4f}"
    )
    for line in operating_point_lines(card, intervals=True):
        print(line)
    print(
        json.dumps(
            {k: v for k, v in card.validation_metrics.items() if k not in ("per_group", "boxes")},
            indent=2,
            default=str,
        )
    )
    return 0
