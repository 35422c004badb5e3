"""``fracnode train classifier|detector|region|segmenter``: train a model and write its package.

Data: ``--data PATH`` (repeatable) is a FracAtlas or upper-limb-web folder, a MURA v1.1 folder
or a CSV file (``path,label,region[,study_id][,split]``); the layout is detected. The ``train``
split trains, ``valid`` calibrates and scores (see :mod:`inference.training.classifier`).
Prepared pixels are cached under ``--cache`` and checkpoints written every epoch under
``--work``, so ``--resume`` continues a stopped run. The package goes to ``--out``.

``train segmenter`` trains a fracture-map model on the FracAtlas polygons (default: the
``fracture_polygons.json`` beside the data), chooses its image score on the early-stopping
hold-out, calibrates it on ``valid`` once and sets its image and box operating points
(:mod:`inference.training.segmenter_package`). With ``--from-checkpoint`` it trains nothing: it
packages the best weights of an existing checkpoint (``--size`` must be the run's).

Operator errors (a missing path, data that cannot train this model, a checkpoint of other
settings) raise :class:`node.cli.CliError` (exit 2).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from inference.datasets import DatasetError
from inference.modelcard import SEGMENTER_SCORES
from inference.models.catalog import BACKBONES, SEGMENTER_BACKBONES, YOLO_VARIANTS
from inference.packages import ModelPackage, PackageError
from inference.pixels import PreprocessConfig
from inference.regions import AnatomicalGroup, Region
from node.cli import CliError
from node.settings import Settings

log = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser, size: int, epochs: int, batch: int) -> None:
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        metavar="PATH",
        help="FracAtlas / upper-limb-web / MURA folder or CSV file (repeatable)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="package directory to write")
    parser.add_argument(
        "--name", default=None, help="model name in the card (default: the --out folder name)"
    )
    parser.add_argument("--version", default="1.0.0", help="model version in the card")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--size", type=int, default=size, help="input size in pixels (square)")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        metavar="DIR",
        help="checkpoints and logs (default: var/train/<name>)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("var/cache"),
        metavar="DIR",
        help="prepared-pixel cache (default: var/cache)",
    )
    parser.add_argument("--clahe", action="store_true", help="add CLAHE to the preprocessing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--notes", default="", help="free text for the card")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "train", help="train a classifier, detector, region or fracture-map model into a package"
    )
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True)

    classifier = kinds.add_parser("classifier", help="fracture classifier (torchvision, from scratch)")
    _common(classifier, size=224, epochs=14, batch=32)
    scope = classifier.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--group", choices=[str(g) for g in AnatomicalGroup], help="train on this group's images"
    )
    scope.add_argument("--all-regions", action="store_true", help="train on every region of the data")
    classifier.add_argument(
        "--regions",
        default=None,
        help="comma-separated regions to train on instead of the group's (e.g. leg,hip)",
    )
    classifier.add_argument("--backbone", choices=BACKBONES, default="mobilenet_v3_small")
    classifier.add_argument("--lr", type=float, default=2e-3)
    classifier.add_argument(
        "--balance", choices=("undersample", "weight", "sample", "none"), default="undersample"
    )
    classifier.add_argument("--negatives-per-positive", type=float, default=2.0)
    classifier.add_argument("--patience", type=int, default=6)
    classifier.add_argument(
        "--kfold", type=int, default=0, metavar="K", help="repeated stratified K-fold first"
    )
    classifier.add_argument("--repeats", type=int, default=1, metavar="R")
    classifier.set_defaults(handler=train_classifier)

    detector = kinds.add_parser("detector", help="YOLOv8 fracture detector (built from the yaml)")
    _common(detector, size=320, epochs=10, batch=16)
    detector.add_argument("--variant", choices=YOLO_VARIANTS, default="n")
    detector.add_argument(
        "--hours", type=float, default=None, help="stop after this many hours (overrides epochs)"
    )
    detector.add_argument("--famo", action="store_true", help="square training boxes (FAMO)")
    detector.add_argument(
        "--negatives-per-positive",
        type=float,
        default=0.5,
        help="confirmed-negative background images per boxed image",
    )
    detector.add_argument("--workers", type=int, default=2)
    detector.add_argument(
        "--group", choices=[str(g) for g in AnatomicalGroup], default=None, help="primary group for the card"
    )
    detector.set_defaults(handler=train_detector)

    region = kinds.add_parser("region", help="body-region classifier for the router")
    _common(region, size=128, epochs=8, batch=32)
    region.add_argument("--backbone", choices=BACKBONES, default="mobilenet_v3_small")
    region.add_argument("--lr", type=float, default=2e-3)
    region.add_argument("--class-cap", type=int, default=200, help="images per region per epoch at most")
    region.add_argument("--patience", type=int, default=6)
    region.add_argument(
        "--min-images", type=int, default=20, help="fewest training images that make a region a class"
    )
    region.set_defaults(handler=train_region)

    segmenter = kinds.add_parser(
        "segmenter", help="fracture-map model on the fracture polygons (image probability and boxes)"
    )
    _common(segmenter, size=256, epochs=30, batch=16)
    segmenter.add_argument("--backbone", choices=SEGMENTER_BACKBONES, default="mobilenet_v3_small")
    segmenter.add_argument("--lr", type=float, default=2e-3)
    segmenter.add_argument("--patience", type=int, default=8)
    segmenter.add_argument("--negatives-per-positive", type=float, default=2.0)
    segmenter.add_argument(
        "--stop-fraction", type=float, default=0.15, help="early-stopping hold-out carved out of train"
    )
    segmenter.add_argument(
        "--polygons",
        type=Path,
        default=None,
        metavar="FILE",
        help="fracture_polygons.json (default: the one beside --data)",
    )
    segmenter.add_argument(
        "--regions", default=None, help="comma-separated regions to train on (default: every region)"
    )
    segmenter.add_argument(
        "--group", choices=[str(g) for g in AnatomicalGroup], default=None, help="the group the card names"
    )
    segmenter.add_argument(
        "--score",
        choices=("auto", *SEGMENTER_SCORES),
        default="auto",
        help="image score (auto: the best on the early-stopping hold-out)",
    )
    segmenter.add_argument(
        "--flip", choices=("auto", "on", "off"), default="auto", help="horizontal-flip TTA (auto: as --score)"
    )
    segmenter.add_argument("--box-iou", type=float, default=0.3, help="IoU of a box hit")
    segmenter.add_argument(
        "--box-fp-sensitive", type=float, default=0.5, help="FP boxes per image at the high-sensitivity point"
    )
    segmenter.add_argument(
        "--box-fp-specific", type=float, default=0.1, help="FP boxes per image at the high-specificity point"
    )
    segmenter.add_argument(
        "--from-checkpoint",
        type=Path,
        default=None,
        metavar="FILE",
        help="package this checkpoint's best weights (checkpoint.pt, or a state_dict) without training",
    )
    segmenter.add_argument(
        "--stack-with",
        type=Path,
        default=None,
        metavar="PKG",
        help="classifier package: fit the stack with it on the train hold-out, kept if it wins out of fold",
    )
    segmenter.add_argument(
        "--stack-images",
        choices=("holdout", "unseen"),
        default="holdout",
        help="hold-out images that fit and choose the stack (unseen: those the classifier did not train on)",
    )
    segmenter.add_argument("--stack-l2", type=float, default=1.0, help="L2 penalty of the stack weights")
    segmenter.add_argument(
        "--stack-force", action="store_true", help="attach the stack even if a member wins"
    )
    segmenter.set_defaults(handler=train_segmenter)


def _check(args: argparse.Namespace) -> tuple[str, Path]:
    for path in args.data:
        if not path.exists():
            raise CliError(f"--data {path} does not exist")
    for option in ("epochs", "size", "batch", "threads"):
        if getattr(args, option) < 1:
            raise CliError(f"--{option} must be at least 1")
    if args.size < 32:
        raise CliError("--size must be at least 32")
    name = args.name or args.out.name
    work = args.work or Path("var/train") / name
    return name, work


def _report(package: ModelPackage) -> int:
    from node.commands.models import headline, operating_point_lines

    card = package.card
    print(f"wrote {package.path} ({card.name} {card.version}, {card.kind}, {card.architecture})")
    print(f"validation: {headline(card)}")
    for line in operating_point_lines(card):
        print(line)
    return 0


def _loop(args: argparse.Namespace, **extra: object):  # type: ignore[no-untyped-def]
    from inference.training.loop import LoopConfig

    return LoopConfig(
        backbone=args.backbone,
        epochs=args.epochs,
        batch=args.batch,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
        **extra,  # type: ignore[arg-type]
    )


def train_classifier(args: argparse.Namespace, settings: Settings) -> int:
    from inference.calibration import CalibrationError
    from inference.training.classifier import ClassifierJob, fit_classifier
    from inference.training.loop import TrainingError
    from inference.training.package import package_classifier

    name, work = _check(args)
    regions = None
    if args.regions:
        try:
            regions = tuple(Region(r.strip()) for r in args.regions.split(",") if r.strip())
        except ValueError as exc:
            raise CliError(f"--regions: {exc}") from exc
    if args.kfold == 1 or args.kfold < 0:
        raise CliError("--kfold must be 0 (off) or at least 2")
    job = ClassifierJob(
        data=tuple(p.resolve() for p in args.data),
        group=None if args.all_regions else AnatomicalGroup(args.group),
        regions=regions,
        size=args.size,
        loop=_loop(args, balance=args.balance, negatives_per_positive=args.negatives_per_positive),
        preprocess=PreprocessConfig(clahe=args.clahe),
        kfold=args.kfold,
        repeats=args.repeats,
    )
    try:
        fitted = fit_classifier(job, args.cache, work, resume=args.resume, progress=not args.no_progress)
        package = package_classifier(fitted, args.out, name, args.version, args.notes)
    except (DatasetError, TrainingError, PackageError, CalibrationError) as exc:
        raise CliError(str(exc)) from exc
    return _report(package)


def train_region(args: argparse.Namespace, settings: Settings) -> int:
    from inference.calibration import CalibrationError
    from inference.training.loop import TrainingError
    from inference.training.package import package_region
    from inference.training.region import RegionJob, fit_region

    name, work = _check(args)
    job = RegionJob(
        data=tuple(p.resolve() for p in args.data),
        size=args.size,
        loop=_loop(args, class_cap=args.class_cap),
        preprocess=PreprocessConfig(clahe=args.clahe),
        min_images=args.min_images,
    )
    try:
        fitted = fit_region(job, args.cache, work, resume=args.resume, progress=not args.no_progress)
        package = package_region(fitted, args.out, name, args.version, args.notes)
    except (DatasetError, TrainingError, PackageError, CalibrationError) as exc:
        raise CliError(str(exc)) from exc
    return _report(package)


def train_detector(args: argparse.Namespace, settings: Settings) -> int:
    from inference.calibration import CalibrationError
    from inference.training.detector import DetectorJob, fit_detector
    from inference.training.loop import TrainingError
    from inference.training.package import package_detector

    name, work = _check(args)
    job = DetectorJob(
        data=tuple(p.resolve() for p in args.data),
        variant=args.variant,
        size=args.size,
        epochs=args.epochs,
        hours=args.hours,
        batch=args.batch,
        seed=args.seed,
        famo=args.famo,
        negatives_per_positive=args.negatives_per_positive,
        device=args.device,
        workers=args.workers,
        preprocess=PreprocessConfig(clahe=args.clahe),
    )
    try:
        fitted = fit_detector(job, args.cache, work, resume=args.resume, progress=not args.no_progress)
        package = package_detector(
            fitted,
            args.out,
            name,
            args.cache,
            args.version,
            None if args.group is None else AnatomicalGroup(args.group),
            args.notes,
        )
    except (DatasetError, TrainingError, PackageError, CalibrationError) as exc:
        raise CliError(str(exc)) from exc
    return _report(package)


def train_segmenter(args: argparse.Namespace, settings: Settings) -> int:
    from inference.calibration import CalibrationError
    from inference.training.loop import TrainingError
    from inference.training.segmenter import SegmenterJob, SegmenterLoop, run_segmenter
    from inference.training.segmenter_package import (
        BoxTargets,
        StackOptions,
        package_segmenter,
        package_segmenter_from_checkpoint,
    )

    name, work = _check(args)
    if args.clahe:
        raise CliError("--clahe: the segmenter trains and serves on the default preprocessing")
    if not 0.0 < args.stop_fraction < 1.0:
        raise CliError("--stop-fraction must be between 0 and 1")
    if not 0.0 < args.box_iou <= 1.0 or args.box_fp_sensitive < 0 or args.box_fp_specific < 0:
        raise CliError("--box-iou must be in (0, 1], the FP-per-image budgets at least 0")
    if args.polygons is not None and not args.polygons.is_file():
        raise CliError(f"--polygons {args.polygons} does not exist")
    if args.from_checkpoint is not None and not args.from_checkpoint.is_file():
        raise CliError(f"--from-checkpoint {args.from_checkpoint} does not exist")
    regions = None
    if args.regions:
        try:
            regions = tuple(str(Region(r.strip())) for r in args.regions.split(",") if r.strip())
        except ValueError as exc:
            raise CliError(f"--regions: {exc}") from exc
    job = SegmenterJob(
        data=tuple(p.resolve() for p in args.data),
        polygons=None if args.polygons is None else args.polygons.resolve(),
        regions=regions,
        size=args.size,
        loop=SegmenterLoop(
            backbone=args.backbone,
            epochs=args.epochs,
            batch=args.batch,
            lr=args.lr,
            patience=args.patience,
            negatives_per_positive=args.negatives_per_positive,
            seed=args.seed,
            device=args.device,
            threads=args.threads,
        ),
        stop_fraction=args.stop_fraction,
    )
    if args.stack_with is not None and not (args.stack_with / "model.json").is_file():
        raise CliError(f"--stack-with {args.stack_with} is not a model package")
    if args.stack_l2 < 0:
        raise CliError("--stack-l2 must be at least 0")
    stack_with = None if args.stack_with is None else args.stack_with.resolve()
    stack_options = StackOptions(l2=args.stack_l2, images=args.stack_images, force=args.stack_force)
    targets = BoxTargets(args.box_iou, args.box_fp_sensitive, args.box_fp_specific)
    score = None if args.score == "auto" else str(args.score)
    flip = None if args.flip == "auto" else args.flip == "on"
    group = None if args.group is None else AnatomicalGroup(args.group)
    try:
        if args.from_checkpoint is not None:
            package = package_segmenter_from_checkpoint(
                args.from_checkpoint.resolve(),
                job,
                args.out,
                name,
                args.cache,
                args.version,
                group,
                args.notes,
                score=score,
                flip=flip,
                targets=targets,
                device=args.device,
                stack_with=stack_with,
                stack_options=stack_options,
            )
        else:
            run = run_segmenter(job, args.cache, work, resume=args.resume, progress=not args.no_progress)
            package = package_segmenter(
                run,
                args.out,
                name,
                args.cache,
                args.version,
                group,
                args.notes,
                score=score,
                flip=flip,
                targets=targets,
                device=args.device,
                stack_with=stack_with,
                stack_options=stack_options,
            )
    except (DatasetError, TrainingError, PackageError, CalibrationError) as exc:
        raise CliError(str(exc)) from exc
    return _report(package)
