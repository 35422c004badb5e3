"""``fracnode route FILES_OR_DIRS``: how each image would be routed, before going live.

Prints one line per image frame: file, SOP Instance UID, frame, region, the source of the
decision, confidence, laterality, view, group, out-of-group flag, and a note saying how the
region was found or why the image would not be analysed. Directories are searched recursively;
files that are not DICOM images are skipped with a message on stderr. ``--json`` prints the same
as a JSON array; ``--check-pixels`` also decodes every image as the worker would and reports
pixel errors. No patient names or IDs are printed.

Errors: no readable DICOM image, a missing path or an invalid keyword file raise
:class:`node.cli.CliError` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from inference.protocols import RegionClassifier
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup
from inference.routing import (
    BelowMinimum,
    KeywordFileError,
    load_keywords,
    needs_image,
    resolve_region,
    route_decision,
)
from inference.values import RegionSource
from node.cli import CliError
from node.imaging import ImagingError, frame_count, header_facts, load_frames
from node.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "route",
        help="show how DICOM files would be routed (region, source, confidence, group)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="FILES_OR_DIRS")
    parser.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    parser.add_argument(
        "--check-pixels", action="store_true", help="decode every image and report pixel data errors"
    )
    parser.set_defaults(handler=route_files)


def _installed(settings: Settings) -> tuple[frozenset[AnatomicalGroup], RegionClassifier | None]:
    """The groups with an installed fracture model and the region classifier, as the node
    loads them at start-up (verified packages, bundled and from ``models.directory``)."""
    from node.modelset import ModelSetError, load_model_set  # loads torch: only for this command

    try:
        m = settings.models
        models = load_model_set(
            m.directory, device=m.device, include_bundled=m.include_bundled, allow_unproven=m.allow_unproven
        )
    except ModelSetError as exc:
        raise CliError(str(exc)) from exc
    return models.available, models.region_model


@dataclass(frozen=True, slots=True)
class RouteLine:
    file: str
    sop_instance_uid: str
    frame: int
    region: str
    source: str
    confidence: float
    laterality: str | None
    view: str | None
    group: str | None
    out_of_group: bool
    note: str | None
    pixels: str | None = None  # with --check-pixels: "ok" or the pixel error
    guess: str | None = None  # the image classifier's answer, when it was asked
    guess_confidence: float | None = None


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def route_files(args: argparse.Namespace, settings: Settings) -> int:
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise CliError(f"no such file or directory: {', '.join(missing)}")
    try:
        keywords = load_keywords(settings.routing.keywords_file)
    except KeywordFileError as exc:
        raise CliError(f"routing.keywords_file: {exc}") from exc
    available, region_model = _installed(settings)
    table = DEFAULT_GROUP_TABLE

    lines: list[RouteLine] = []
    seen = 0
    for path in _files(args.paths):
        seen += 1
        try:
            # Large values (pixel data) are read from the file only if decoded.
            ds = pydicom.dcmread(path, defer_size="64 KB")
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            print(f"skipping {path}: not a readable DICOM file ({type(exc).__name__})", file=sys.stderr)
            continue
        if "Rows" not in ds or "PixelData" not in ds:
            print(f"skipping {path}: not an image ({ds.get('Modality', 'no modality')})", file=sys.stderr)
            continue
        decision = resolve_region(header_facts(ds), keywords, table=table)
        frames = None
        pixel_error = None
        if args.check_pixels or needs_image(decision, region_model):
            try:
                frames = load_frames(ds, max_pixels=settings.pipeline.max_pixels)
            except ImagingError as exc:
                pixel_error = f"{type(exc).__name__}: {exc.reason}"
        for index in range(frame_count(ds)):
            image = frames[index].pixels if frames is not None else None
            routing = route_decision(
                decision,
                table=table,
                available=available,
                region_model=region_model,
                image=image,
                min_image_confidence=settings.routing.min_image_confidence,
                below_minimum=BelowMinimum(settings.routing.below_minimum),
            )
            note = routing.reason if routing.group is None else decision.detail
            if routing.source is RegionSource.IMAGE and routing.group is not None:
                note = f"image classifier; header: {decision.detail}"
            lines.append(
                RouteLine(
                    file=str(path),
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                    frame=index,
                    region=routing.region.value,
                    source=routing.source.value,
                    confidence=round(routing.confidence, 3),
                    laterality=routing.laterality,
                    view=routing.view,
                    group=None if routing.group is None else routing.group.value,
                    out_of_group=routing.out_of_group,
                    note=note,
                    pixels=None if not args.check_pixels else (pixel_error or "ok"),
                    guess=None if routing.guess is None else routing.guess.value,
                    guess_confidence=None
                    if routing.guess_confidence is None
                    else round(routing.guess_confidence, 3),
                )
            )
    if not lines:
        raise CliError(f"no readable DICOM image among {seen} file(s)")
    if args.json:
        print(json.dumps([_as_dict(line) for line in lines], indent=2))
    else:
        _print_table(lines, check_pixels=args.check_pixels)
    return 0


def _as_dict(line: RouteLine) -> dict[str, object]:
    data = {name: getattr(line, name) for name in RouteLine.__dataclass_fields__}
    for optional in ("pixels", "guess", "guess_confidence"):
        if data[optional] is None:
            del data[optional]
    return data


def _print_table(lines: Sequence[RouteLine], *, check_pixels: bool) -> None:
    header = ["FILE", "SOP INSTANCE UID", "FRAME", "REGION", "SOURCE", "CONF", "LAT", "VIEW", "GROUP", "OOG"]
    if check_pixels:
        header.append("PIXELS")
    header.append("NOTE")
    rows = []
    for line in lines:
        row = [
            line.file,
            line.sop_instance_uid,
            str(line.frame),
            line.region,
            line.source,
            f"{line.confidence:.2f}",
            line.laterality or "-",
            line.view or "-",
            line.group or "-",
            "yes" if line.out_of_group else "no",
        ]
        if check_pixels:
            row.append(line.pixels or "-")
        row.append(line.note or "")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())
