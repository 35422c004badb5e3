"""``fracnode calibrate PACKAGE --data PATH``: refit calibration and operating points of a package.

The package is verified first; the data's labelled images of the card's regions (``--split``,
default ``valid``; sources without confirmed negatives left out) give the scores; the card gets
the temperature and logit offset (``--temperature-only``: temperature scaling alone, offset 0),
the three operating points with their nested out-of-fold sensitivity and
specificity, and the validation metrics, under a new version and device UID (IHE AIR), and the
checksums are rewritten. Bad input raises :class:`node.cli.CliError` (exit 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from inference.datasets import DatasetError, load_sources
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
    parser.add_argument("--split", default="valid", help="split to calibrate on ('all' for every image)")
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
    parser.set_defaults(handler=calibrate)


def calibrate(args: argparse.Namespace, settings: Settings) -> int:
    from inference.calibration import CalibrationError
    from inference.training.package import calibrate_package

    if not (args.package / "model.json").is_file():
        raise CliError(f"{args.package} is not a model package (no model.json)")
    for path in args.data:
        if not path.exists():
            raise CliError(f"--data {path} does not exist")
    split = None if args.split == "all" else args.split
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
        images = load_sources(list(args.data))
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
            {k: v for k, v in card.validation_metrics.items() if k != "per_group"}, indent=2, default=str
        )
    )
    return 0
