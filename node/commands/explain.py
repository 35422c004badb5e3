"""``fracnode explain``: Grad-CAM overlays of a classifier's decisions, written as PNG files.

PACKAGE_OR_GROUP is a model package folder, or an anatomical group (or a region, read as its
group) whose installed classifier is used, as the node would pick it. IMAGES are image files
(PNG, JPEG, ...) or DICOM files, decoded on the node side by :func:`node.imaging.load_frames`.
For each image (each frame) ``<name>_gradcam.png`` is written to ``--out``, the overlay over
the enhanced source image, and ``explain.csv`` lists the calibrated probability of each.

Exit codes: 0 written; 2 for an operator error (:class:`node.cli.CliError`: no such package or
group, a detector package, an unreadable image).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from node.cli import CliError
from node.settings import Settings

if TYPE_CHECKING:
    from inference.protocols import FractureClassifier

DICOM_SUFFIXES = (".dcm", ".dicom")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("explain", help="Grad-CAM overlays of a classifier's decisions as PNG files")
    parser.add_argument(
        "model", metavar="PACKAGE_OR_GROUP", help="a model package folder, or a group or region"
    )
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGES", help="image or DICOM files")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG overlays")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=explain)


def explain(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from inference.evaluation.gradcam import GradCamError, explain_image, write_png

    classifier = _classifier(args.model, settings)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise CliError(f"no such image file: {', '.join(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, float]] = []
    for path in tqdm(args.images, desc="explain", unit="img", disable=args.no_progress):
        frames = _frames(path, settings)
        for index, pixels in enumerate(frames):
            suffix = "" if len(frames) == 1 else f"_f{index}"
            try:
                result = explain_image(classifier, pixels)
            except GradCamError as exc:
                raise CliError(f"{path.name}: {exc}") from exc
            written = write_png(args.out / f"{path.stem}{suffix}_gradcam.png", result.overlay)
            rows.append((written.name, path.name, result.probability))
    table = args.out / "explain.csv"
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["overlay", "image", "model", "version", "probability"])
        for overlay, image, probability in rows:
            writer.writerow(
                [overlay, image, classifier.card.name, classifier.card.version, f"{probability:.6f}"]
            )
    for overlay, _, probability in rows:
        print(f"{args.out / overlay}  p(fracture) = {probability:.3f}")
    return 0


def _classifier(name: str, settings: Settings) -> FractureClassifier:
    from inference.modelcard import ModelKind
    from inference.models import load_model
    from inference.packages import PackageError, verify_package
    from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, Region
    from node.modelset import ModelSetError, load_model_set

    path = Path(name)
    if path.is_dir():
        try:
            package = verify_package(path)
            if package.card.kind != ModelKind.CLASSIFIER:
                raise CliError(f"{path}: a {package.card.kind} package; Grad-CAM needs a classifier")
            return load_model(package, settings.models.device)  # type: ignore[return-value]
        except PackageError as exc:
            raise CliError(f"model package {path}: {exc}") from exc
    group: AnatomicalGroup | None
    try:
        group = AnatomicalGroup(name.lower())
    except ValueError:
        try:
            group = DEFAULT_GROUP_TABLE.group_of(Region(name.lower()))
        except ValueError:
            group = None
    if group is None:
        groups = ", ".join(g.value for g in AnatomicalGroup)
        raise CliError(f"{name!r} is neither a package folder nor a group ({groups}) or limb region")
    try:
        installed = load_model_set(
            settings.models.directory,
            device=settings.models.device,
            include_bundled=settings.models.include_bundled,
            allow_unproven=settings.models.allow_unproven,
        )
    except ModelSetError as exc:
        raise CliError(str(exc)) from exc
    models = installed.groups.get(group)
    if models is None or models.classifier is None:
        raise CliError(f"no classifier installed for group {group}")
    return models.classifier


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _frames(path: Path, settings: Settings) -> list[NDArray[np.float32]]:
    if not _is_dicom(path):
        from inference.datasets import DatasetError, read_image

        try:
            return [read_image(path)]
        except DatasetError as exc:
            raise CliError(str(exc)) from exc
    import pydicom
    from pydicom.errors import InvalidDicomError

    from node.imaging import ImagingError, load_frames

    try:
        frames = load_frames(pydicom.dcmread(path), max_pixels=settings.pipeline.max_pixels)
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise CliError(f"{path.name}: not a readable DICOM file ({type(exc).__name__})") from exc
    except ImagingError as exc:
        raise CliError(f"{path.name}: {exc.reason}") from exc
    return [np.asarray(frame.pixels, dtype=np.float32) for frame in frames]
