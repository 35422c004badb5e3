"""``fracnode evaluate``: the models on labelled data, as a report, a JSON file and figures.

SOURCE is anything :func:`inference.datasets.load_source` reads (FracAtlas, upper-limb-web,
MURA, a ``path,label,region`` CSV), or a folder of DICOM files with a label CSV
(``sop_instance_uid`` or ``file``, ``label``, optional ``region``; ``--labels``, default
``SOURCE/labels.csv``). DICOM pixels are decoded here, on the node side, by
:func:`node.imaging.load_frames` (the node's own modality/VOI LUT path); a DICOM image without a
``region`` in the CSV gets the region its header names (:func:`inference.routing.resolve_region`).

Models: the installed ones (bundled plus ``models.directory``), each evaluated on the images the
node would route to it (:func:`node.modelset.load_model_set` picks the model of each group), or
``--model PKG`` (repeatable) to evaluate packages on every image. ``--matrix`` adds the
cross-region transfer matrix (every model on every image). Fracture-map models (kind
``segmenter``) are reported like classifiers for their image probability and with localisation
rows (recall within 0.5 false-positive boxes per image at IoU 0.3 and 0.5, FROC, box points);
as the node serves, a group's probability may be the stack of its classifier and map model.
``--source-shift`` reads the negatives again under source changes (resolution, JPEG, gamma,
contrast, collimation, a burnt-in marker) and reports how far their probabilities move;
``--second-source PATH`` adds the sensitivity at both operating points per region on a source
with positives only (upper-limb-web). ``--docs FILE`` writes the summary
into the generated section of FILE; ``--from-results JSON`` renders the report (and ``--docs``)
again from an earlier results file without running any model.

Exit codes: 0 written; 2 for an operator error (:class:`node.cli.CliError`: a missing source,
an unreadable label CSV, no fracture model, a package that fails verification).
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from node import __version__
from node.cli import CliError
from node.settings import Settings

if TYPE_CHECKING:
    from inference.evaluation.runner import EvalImage, Model, ModelPlan, StackPlan
    from inference.evaluation.shift import Shift
    from inference.evaluation.suite import SourceInfo
    from inference.modelcard import Stack

log = logging.getLogger(__name__)

DOCS_SECTION = "results"
DICOM_KEY_COLUMNS = ("sop_instance_uid", "file")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "evaluate",
        help="evaluate the models on labelled data: Markdown report, JSON, figures",
        description="Evaluate fracture models on labelled data; writes report.md, results.json and figures.",
    )
    parser.add_argument(
        "source",
        type=Path,
        nargs="?",
        help="FracAtlas / upper-limb-web / MURA folder, a path,label,region CSV, or a DICOM folder",
    )
    parser.add_argument("--split", default=None, help="only this split of the source (e.g. valid)")
    parser.add_argument("--matrix", action="store_true", help="add the cross-region transfer matrix")
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        metavar="PKG",
        help="evaluate this model package on every image (repeatable; default: the installed models)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default var/eval/<timestamp>)")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--labels", type=Path, default=None, help="label CSV of a DICOM folder")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for the models (default: torch's)"
    )
    parser.add_argument(
        "--docs", type=Path, default=None, help="Markdown file whose generated section to rewrite"
    )
    parser.add_argument(
        "--from-results", type=Path, default=None, metavar="JSON", help="render from an earlier results.json"
    )
    parser.add_argument(
        "--source-shift",
        nargs="?",
        const="all",
        default=None,
        metavar="CHANGES",
        help="read every negative again under source changes and report how far its probability moves "
        "(comma-separated: half,double,jpeg50,gamma0.7,gamma1.4,contrast0.8,contrast1.25,collimation,marker; "
        "default all)",
    )
    parser.add_argument(
        "--second-source",
        type=Path,
        default=None,
        metavar="PATH",
        help="a source with positives only (e.g. upper-limb-web): sensitivity per region at both points",
    )
    parser.add_argument("--second-split", default=None, help="only this split of --second-source")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=evaluate)


def evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from inference.evaluation.report import ReportError

    try:
        if args.from_results is not None:
            return _render_again(args)
        return _evaluate(args, settings)
    except ReportError as exc:
        raise CliError(str(exc)) from exc


def _render_again(args: argparse.Namespace) -> int:
    from inference.evaluation.report import REPORT_NAME, docs_section, read_json, report_markdown

    data = read_json(args.from_results)
    report = (args.out or args.from_results.parent) / REPORT_NAME
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(report_markdown(data), encoding="utf-8")
    print(f"report: {report}")
    if args.docs is not None:
        _write_docs(args.docs, docs_section(data))
    return 0


def _write_docs(path: Path, text: str) -> None:
    from inference.evaluation.report import update_generated_section

    update_generated_section(path, DOCS_SECTION, text)
    print(f"docs: {path} (section {DOCS_SECTION})")


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from inference.evaluation.metrics import MetricsError
    from inference.evaluation.report import docs_section
    from inference.evaluation.runner import RunnerError
    from inference.evaluation.scoring import EvaluationConfig
    from inference.evaluation.suite import SourceInfo, run_suite

    if args.source is None:
        raise CliError("evaluate needs a SOURCE (or --from-results JSON)")
    if args.bootstrap < 0:
        raise CliError("--bootstrap must be 0 or more")
    if args.batch_size < 1:
        raise CliError("--batch-size must be 1 or more")
    images, layout = _load_images(args, settings)
    if not any(image.label is not None for image in images):
        raise CliError(
            f"{args.source}: no labelled image" + (f" in split {args.split}" if args.split else "")
        )
    if args.threads is not None:
        from inference.evaluation.runner import set_torch_threads

        set_torch_threads(args.threads)
    shifts = _shifts(args.source_shift)
    second = _second_source(args.second_source, args.second_split)
    plans, stacks = _load_plans(args.model, settings)
    out = args.out or Path("var/eval") / datetime.now().strftime("%Y%m%d-%H%M%S")
    log.info("evaluating %d images with %d models into %s", len(images), len(plans), out)
    try:
        written = run_suite(
            images,
            plans,
            SourceInfo(args.source.name or str(args.source), layout, args.split),
            out,
            matrix=args.matrix,
            config=EvaluationConfig(resamples=args.bootstrap, seed=args.seed),
            batch_size=args.batch_size,
            progress=not args.no_progress,
            version=__version__,
            stacks=stacks,
            shifts=shifts,
            second=second,
        )
    except (RunnerError, MetricsError) as exc:
        raise CliError(f"evaluation failed: {exc}") from exc
    except OSError as exc:
        raise CliError(f"cannot write the results under {out}: {exc}") from exc
    failures = written.data["source"]["failures"]
    print(f"report: {written.report}")
    print(f"results: {written.results}")
    print(f"figures: {len(written.figures)} in {out / 'figures'}")
    if failures:
        print(f"images that could not be read: {len(failures)} (listed in {written.results.name})")
    if args.docs is not None:
        _write_docs(args.docs, docs_section(written.data))
    return 0


def _shifts(option: str | None) -> tuple[Shift, ...]:
    from inference.evaluation.shift import ShiftError, shifts_named

    if option is None:
        return ()
    names = None if option == "all" else [n.strip() for n in option.split(",") if n.strip()]
    try:
        return shifts_named(names)
    except ShiftError as exc:
        raise CliError(f"--source-shift: {exc}") from exc


def _second_source(path: Path | None, split: str | None) -> tuple[SourceInfo, list[EvalImage]] | None:
    from inference.datasets import DatasetError, detect_layout, load_source
    from inference.evaluation.runner import from_labelled
    from inference.evaluation.suite import SourceInfo

    if path is None:
        return None
    if not path.exists():
        raise CliError(f"--second-source {path}: no such file or folder")
    try:
        images = from_labelled(load_source(path, split))
        layout = detect_layout(path)
    except DatasetError as exc:
        raise CliError(str(exc)) from exc
    if not any(image.label == 1 for image in images):
        raise CliError(f"--second-source {path}: no image with a fracture")
    return SourceInfo(path.name or str(path), layout, split), images


# --------------------------------------------------------------------------------------------
# models


def _load_plans(packages: Sequence[Path], settings: Settings) -> tuple[list[ModelPlan], list[StackPlan]]:
    """The models to run and the stacks to compute from them.

    With ``--model``: each package on every image, and the stack of a map model whose card names
    one of the given classifiers. Without: what :func:`node.modelset.load_model_set` serves, each
    model on the groups it serves, marked with the groups it decides (gives the probability of)
    and localises (gives the boxes of), and each group's stack when the node stacks.
    """
    from inference.evaluation.runner import ModelPlan, StackPlan
    from inference.modelcard import ModelKind
    from inference.models import load_model
    from inference.packages import PackageError, verify_package
    from inference.regions import AnatomicalGroup
    from node.modelset import ModelSetError, ProbabilitySource, load_model_set

    if packages:
        plans = []
        for path in packages:
            try:
                package = verify_package(path)
                if package.card.kind == ModelKind.REGION:
                    raise CliError(f"{path}: a region classifier; evaluate takes fracture models")
                model = load_model(package, settings.models.device)
            except PackageError as exc:
                raise CliError(f"model package {path}: {exc}") from exc
            plans.append(ModelPlan(model, None))  # type: ignore[arg-type]
        names = {
            plan.model.card.name: k
            for k, plan in enumerate(plans)
            if plan.model.card.kind == ModelKind.CLASSIFIER
        }
        stacks = []
        for k, plan in enumerate(plans):
            spec = plan.model.card.segmenter
            if spec is not None and spec.stack is not None and spec.stack.classifier in names:
                stacks.append(StackPlan(spec.stack, names[spec.stack.classifier], k, None))
        return plans, stacks
    try:
        installed = load_model_set(
            settings.models.directory,
            device=settings.models.device,
            include_bundled=settings.models.include_bundled,
            allow_unproven=settings.models.allow_unproven,
        )
    except ModelSetError as exc:
        raise CliError(str(exc)) from exc
    # member model, groups it serves, decides (probability), localises (boxes)
    members: dict[int, tuple[Model, set[AnatomicalGroup], set[AnatomicalGroup], set[AnatomicalGroup]]] = {}
    stacked: dict[tuple[int, int], tuple[Stack, set[AnatomicalGroup]]] = {}
    for group, models in installed.groups.items():
        for member in (models.classifier, models.detector, models.segmenter):
            if member is not None:
                members.setdefault(id(member), (member, set(), set(), set()))[1].add(group)
        if models.localiser is not None:
            members[id(models.localiser)][3].add(group)
        source = models.probability_source
        if source is ProbabilitySource.STACK:
            assert models.classifier is not None and models.segmenter is not None and models.stack is not None
            key = (id(models.classifier), id(models.segmenter))
            stacked.setdefault(key, (models.stack, set()))[1].add(group)
            continue
        deciding = {
            ProbabilitySource.CLASSIFIER: models.classifier,
            ProbabilitySource.SEGMENTER: models.segmenter,
            ProbabilitySource.DETECTOR: models.detector,
        }[source]
        assert deciding is not None
        members[id(deciding)][2].add(group)
    if not members:
        where = settings.models.directory or "the bundled models"
        raise CliError(f"no fracture model installed ({where}); pass --model PKG")
    ordered = sorted(members.items(), key=lambda item: item[1][0].card.name)
    plans = [
        ModelPlan(member, frozenset(served), frozenset(decides), frozenset(localises))
        for _, (member, served, decides, localises) in ordered
    ]
    index = {key: k for k, (key, _) in enumerate(ordered)}
    stack_plans = [
        StackPlan(stack, index[classifier], index[segmenter], frozenset(groups), frozenset(groups))
        for (classifier, segmenter), (stack, groups) in sorted(
            stacked.items(), key=lambda item: sorted(item[1][1])
        )
    ]
    return plans, stack_plans


# --------------------------------------------------------------------------------------------
# images


def _label_header(path: Path) -> list[str]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return [c.strip() for c in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CliError(f"cannot read label CSV {path}: {exc}") from exc


def _is_dicom_source(source: Path, labels: Path | None) -> Path | None:
    """The label CSV when ``source`` is a DICOM folder, else None."""
    if labels is not None:
        return labels
    candidate = source / "labels.csv"
    if source.is_dir() and candidate.is_file():
        header = _label_header(candidate)
        if any(key in header for key in DICOM_KEY_COLUMNS):
            return candidate
    return None


def _load_images(args: argparse.Namespace, settings: Settings) -> tuple[list[EvalImage], str]:
    from inference.datasets import DatasetError, detect_layout, load_source
    from inference.evaluation.runner import from_labelled

    source: Path = args.source
    if not source.exists():
        raise CliError(f"{source}: no such file or folder")
    labels = _is_dicom_source(source, args.labels)
    if labels is not None:
        return _dicom_images(source, labels, settings), "dicom"
    try:
        return from_labelled(load_source(source, args.split)), detect_layout(source)
    except DatasetError as exc:
        raise CliError(str(exc)) from exc


def _dicom_images(folder: Path, labels: Path, settings: Settings) -> list[EvalImage]:
    """Evaluation images from DICOM files named by a label CSV (SOP Instance UID or file)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from inference.evaluation.runner import EvalImage
    from inference.regions import Region
    from inference.routing import load_keywords, resolve_region
    from node.imaging import header_facts

    if not folder.is_dir():
        raise CliError(f"{folder}: a DICOM source must be a folder")
    rows = _label_rows(labels)
    by_uid: dict[str, Path] = {}
    if any("sop_instance_uid" in row and row["sop_instance_uid"] for row in rows):
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p != labels):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except (InvalidDicomError, OSError, ValueError, EOFError):
                continue
            uid = str(header.get("SOPInstanceUID", "") or "")
            if uid:
                by_uid[uid] = path
    keywords = load_keywords(settings.routing.keywords_file)
    images: list[EvalImage] = []
    for number, row in enumerate(rows, start=2):
        uid = (row.get("sop_instance_uid") or "").strip()
        name = (row.get("file") or "").strip()
        found = by_uid.get(uid) if uid else (labels.parent / name if name else None)
        if found is None or not found.is_file():
            raise CliError(f"{labels} row {number}: no DICOM file for this row")
        path = found
        label = (row.get("label") or "").strip()
        if label not in ("0", "1", ""):
            raise CliError(f"{labels} row {number}: label must be 0, 1 or empty")
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise CliError(f"{labels} row {number}: {path.name} is not a readable DICOM file") from exc
        region_text = (row.get("region") or "").strip().lower()
        if region_text:
            try:
                region = Region(region_text)
            except ValueError as exc:
                raise CliError(f"{labels} row {number}: unknown region {region_text!r}") from exc
        else:
            region = resolve_region(header_facts(header), keywords).region
        frames = int(header.get("NumberOfFrames", 1) or 1)
        sop_uid = str(header.get("SOPInstanceUID", "") or path.name)
        study = str(header.get("StudyInstanceUID", "") or sop_uid)
        for frame in range(frames):
            images.append(
                EvalImage(
                    key=sop_uid if frames == 1 else f"{sop_uid}#{frame}",
                    label=int(label) if label else None,
                    regions=(region,),
                    study_id=study,
                    boxes=(),
                    load=_dicom_reader(path, frame, settings.pipeline.max_pixels),
                )
            )
    return images


def _label_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [{k.strip(): (v or "") for k, v in row.items() if k} for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CliError(f"cannot read label CSV {path}: {exc}") from exc
    if not rows:
        raise CliError(f"label CSV {path} has no rows")
    if not any(key in rows[0] for key in DICOM_KEY_COLUMNS) or "label" not in rows[0]:
        raise CliError(f"label CSV {path} needs the columns sop_instance_uid or file, and label")
    return rows


def _dicom_reader(path: Path, frame: int, max_pixels: int) -> Callable[[], NDArray[np.float32]]:
    def load() -> NDArray[np.float32]:
        import pydicom
        from pydicom.errors import InvalidDicomError

        from inference.evaluation.runner import ImageUnavailable
        from node.imaging import ImagingError, load_frames

        try:
            frames = load_frames(pydicom.dcmread(path), max_pixels=max_pixels)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise ImageUnavailable(f"cannot read {path.name}: {type(exc).__name__}") from exc
        except ImagingError as exc:
            raise ImageUnavailable(exc.reason) from exc
        if frame >= len(frames):
            raise ImageUnavailable(f"{path.name} has no frame {frame}")
        return np.asarray(frames[frame].pixels, dtype=np.float32)

    return load
