"""Run the node's own model objects over a labelled source and keep every output.

Each image is decoded once and prepared for each model that reads it with the model card's
preprocessing (:func:`inference.pixels.prepare`, the node's function); classifiers give their
uncalibrated ``logits`` and calibrated ``probabilities``, detectors their boxes mapped back to
the source through the letterbox transform, and fracture-map models (kind ``segmenter``) both
from one pass (:meth:`FractureSegmenter.segment`, flip TTA as the card says; a box left without
area in the source is dropped, as the node drops it). Which model reads which image follows the
node's routing (:meth:`GroupTable.route` over the groups the installed models serve), or "every
image" when one package is evaluated on everything.

A **stack** (:class:`inference.modelcard.Stack` on a map model's card) is not a model of its own:
:func:`stack_run` combines the classifier's and the map model's runs on the images both read,
with :func:`inference.maps.stacked_probabilities`, the node's function. Its card is the map
model's with the stack's operating points (what :attr:`node.modelset.GroupModels.deciding`
decides with) and its boxes are the map model's.

A plan may say which groups its model *decides* (gives the probability of) and which it
*localises* (gives the boxes of), as :class:`node.modelset.GroupModels` chose them; the node
view of :mod:`scoring` follows that.

Images reach this module as arrays only: the caller gives each a ``load`` function (a dataset
file read by :func:`inference.datasets.read_image`, or a DICOM frame decoded on the node side).

Errors::

    ImageUnavailable        raised by a ``load`` function: the image is skipped and reported
    RunnerError             a model returned outputs of the wrong shape or count
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from inference.datasets import DatasetError, LabelledImage, read_image
from inference.evaluation.detection import ScoredBox
from inference.maps import stacked_probabilities
from inference.modelcard import ModelCard, ModelKind, Stack
from inference.pixels import PreparedImage, PreprocessConfig, prepare
from inference.protocols import FractureClassifier, FractureDetector, FractureSegmenter
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, GroupTable, Region

log = logging.getLogger(__name__)

FloatImage = NDArray[np.float32]
NormalisedBox = tuple[float, float, float, float]
Model = FractureClassifier | FractureDetector | FractureSegmenter
Groups = frozenset[AnatomicalGroup]


class ImageUnavailable(Exception):
    """An image that cannot be read or decoded; ``reason`` is short and free of patient data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RunnerError(RuntimeError):
    """A model broke its protocol (outputs of the wrong shape or count)."""


@dataclass(frozen=True, slots=True)
class EvalImage:
    """One labelled image as the evaluation sees it; ``regions[0]`` is its primary region."""

    key: str  # file name or SOP Instance UID: unique within the source, never patient data
    label: int | None
    regions: tuple[Region, ...]
    study_id: str
    boxes: tuple[NormalisedBox, ...]
    load: Callable[[], FloatImage] = field(compare=False, repr=False)

    @property
    def region(self) -> Region:
        return self.regions[0]


def _reader(path_image: LabelledImage) -> Callable[[], FloatImage]:
    def load() -> FloatImage:
        try:
            return read_image(path_image.path)
        except DatasetError as exc:
            # The message starts with the full path, which may name a patient folder (MURA).
            detail = str(exc).removeprefix(f"{exc.path}: ") if exc.path is not None else str(exc)
            raise ImageUnavailable(f"cannot read {path_image.path.name}: {detail}") from exc

    return load


def from_labelled(images: Sequence[LabelledImage]) -> list[EvalImage]:
    """Dataset records (:func:`inference.datasets.load_source`) as evaluation images."""
    return [
        EvalImage(
            key=image.path.name if image.source != "mura" else str(image.path),
            label=image.label,
            regions=image.all_regions,
            study_id=image.study_id,
            boxes=image.boxes,
            load=_reader(image),
        )
        for image in images
    ]


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """A model and the groups it serves for the node; ``None``: every image, whatever its region.

    ``decides`` and ``localises``: the groups whose probability and whose boxes the node takes
    from this model (None: not said, the scoring's default order applies).
    """

    model: Model
    served: Groups | None
    decides: Groups | None = None
    localises: Groups | None = None


@dataclass(frozen=True, slots=True)
class StackPlan:
    """A map model's stack with a classifier, evaluated on the images of ``served`` (None: every
    image both models read); ``classifier`` and ``segmenter`` are indices into the plans."""

    stack: Stack
    classifier: int
    segmenter: int
    served: Groups | None
    decides: Groups | None = None


def routed_groups(
    image: EvalImage, available: frozenset[AnatomicalGroup], table: GroupTable = DEFAULT_GROUP_TABLE
) -> frozenset[AnatomicalGroup]:
    """The groups the node would analyse ``image`` with (one per region it shows, adjacent when
    the region's own group has no model)."""
    groups = (table.route(region, available)[0] for region in image.regions)
    return frozenset(g for g in groups if g is not None)


def select_images(
    images: Sequence[EvalImage],
    plans: Sequence[ModelPlan],
    table: GroupTable = DEFAULT_GROUP_TABLE,
    extra: Sequence[Groups | None] = (),
) -> list[list[int]]:
    """For each plan (then for each of the ``extra`` group sets, e.g. a stack's), the indices of
    the labelled images it reads: those routed to one of its groups, or all for None."""
    available = frozenset(g for plan in plans if plan.served is not None for g in plan.served)
    routed = [routed_groups(image, available, table) for image in images]
    out: list[list[int]] = []
    for served in [plan.served for plan in plans] + list(extra):
        out.append(
            [
                index
                for index, image in enumerate(images)
                if image.label is not None and (served is None or routed[index] & served)
            ]
        )
    return out


@dataclass(frozen=True, slots=True)
class ModelRun:
    """Everything one model said about the images it read, aligned with ``indices``."""

    card: ModelCard
    served: frozenset[AnatomicalGroup] | None
    indices: NDArray[np.int64]
    probabilities: NDArray[np.float64]  # calibrated; a detector's: its top box confidence, 0 without
    logits: NDArray[np.float64] | None = None  # classifiers, map models and stacks
    boxes: tuple[tuple[ScoredBox, ...], ...] | None = None  # detectors, map models: normalised source coords
    decides: Groups | None = None
    localises: Groups | None = None
    members: tuple[str, ...] = ()  # a stack: the classifier's and the map model's names

    @property
    def kind(self) -> ModelKind:
        return self.card.kind

    @property
    def is_stack(self) -> bool:
        return bool(self.members)


@dataclass(slots=True)
class _Pending:
    indices: list[int] = field(default_factory=list)
    prepared: list[PreparedImage] = field(default_factory=list)


@dataclass(slots=True)
class _Outputs:
    indices: list[int] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    logits: list[float] = field(default_factory=list)
    boxes: list[tuple[ScoredBox, ...]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RunResult:
    runs: tuple[ModelRun, ...]
    failures: tuple[tuple[str, str], ...]  # (image key, reason)


def _normalised(prepared: PreparedImage, raw: Sequence[float]) -> ScoredBox:
    x0, y0, x1, y1 = prepared.transform.to_source(*raw[:4])
    width, height = prepared.transform.source_width, prepared.transform.source_height
    return ScoredBox(x0 / width, y0 / height, x1 / width, y1 / height, float(raw[4]))


def _with_area(box: ScoredBox) -> bool:
    return box.x1 > box.x0 and box.y1 > box.y0


def _flush(model: Model, pending: _Pending, outputs: _Outputs) -> None:
    if not pending.indices:
        return
    batch = np.stack([p.pixels for p in pending.prepared]).astype(np.float32)
    count = len(pending.indices)
    if model.card.kind == ModelKind.CLASSIFIER:
        assert isinstance(model, FractureClassifier)
        logits = np.asarray(model.logits(batch), dtype=np.float64).reshape(-1)
        probabilities = np.asarray(model.probabilities(batch), dtype=np.float64).reshape(-1)
        if logits.size != count or probabilities.size != count:
            raise RunnerError(f"{model.card.name}: {logits.size} logits for {count} images")
        outputs.logits.extend(float(v) for v in logits)
        outputs.probabilities.extend(float(v) for v in probabilities)
    elif model.card.kind == ModelKind.SEGMENTER:
        assert isinstance(model, FractureSegmenter)
        out = model.segment(batch)
        logits = np.asarray(out.logits, dtype=np.float64).reshape(-1)
        probabilities = np.asarray(out.probabilities, dtype=np.float64).reshape(-1)
        if logits.size != count or probabilities.size != count or len(out.boxes) != count:
            raise RunnerError(f"{model.card.name}: outputs for {logits.size} of {count} images")
        outputs.logits.extend(float(v) for v in logits)
        outputs.probabilities.extend(float(v) for v in probabilities)
        for prepared, raw_boxes in zip(pending.prepared, out.boxes, strict=True):
            mapped = (_normalised(prepared, raw) for raw in raw_boxes)
            outputs.boxes.append(tuple(b for b in mapped if _with_area(b)))
    else:
        assert isinstance(model, FractureDetector)
        found = model.detect(batch)
        if len(found) != count:
            raise RunnerError(f"{model.card.name}: boxes for {len(found)} of {count} images")
        for prepared, raw_boxes in zip(pending.prepared, found, strict=True):
            boxes = tuple(_normalised(prepared, raw) for raw in raw_boxes)
            outputs.boxes.append(boxes)
            outputs.probabilities.append(max((b.score for b in boxes), default=0.0))
    outputs.indices.extend(pending.indices)
    pending.indices.clear()
    pending.prepared.clear()


def run_models(
    images: Sequence[EvalImage],
    plans: Sequence[ModelPlan],
    selections: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> RunResult:
    """Run each plan's model over its selected images (see :func:`select_images`).

    An image whose ``load`` raises :class:`ImageUnavailable` is left out of every run and
    listed in ``failures``.
    """
    if len(plans) != len(selections):
        raise ValueError(f"{len(plans)} plans but {len(selections)} selections")
    readers: dict[int, list[int]] = {}
    for plan_index, selection in enumerate(selections):
        for image_index in selection:
            readers.setdefault(image_index, []).append(plan_index)
    configs = [PreprocessConfig.from_dict(plan.model.card.preprocessing) for plan in plans]
    pending = [_Pending() for _ in plans]
    outputs = [_Outputs() for _ in plans]
    failures: list[tuple[str, str]] = []
    for image_index in tqdm(sorted(readers), desc="images", unit="img", disable=not progress):
        image = images[image_index]
        try:
            pixels = image.load()
        except ImageUnavailable as exc:
            failures.append((image.key, exc.reason))
            log.warning("an image is left out: %s", exc.reason)
            continue
        for plan_index in readers[image_index]:
            card = plans[plan_index].model.card
            pending[plan_index].indices.append(image_index)
            pending[plan_index].prepared.append(prepare(pixels, configs[plan_index], card.input_size))
            if len(pending[plan_index].indices) >= batch_size:
                _flush(plans[plan_index].model, pending[plan_index], outputs[plan_index])
    for plan, waiting, out in zip(plans, pending, outputs, strict=True):
        _flush(plan.model, waiting, out)
    runs = []
    for plan, out in zip(plans, outputs, strict=True):
        kind = plan.model.card.kind
        has_logits = kind in (ModelKind.CLASSIFIER, ModelKind.SEGMENTER)
        runs.append(
            ModelRun(
                card=plan.model.card,
                served=plan.served,
                indices=np.asarray(out.indices, dtype=np.int64),
                probabilities=np.clip(np.asarray(out.probabilities, dtype=np.float64), 0.0, 1.0),
                logits=np.asarray(out.logits, dtype=np.float64) if has_logits else None,
                boxes=tuple(out.boxes) if kind != ModelKind.CLASSIFIER else None,
                decides=plan.decides,
                localises=plan.localises,
            )
        )
    return RunResult(tuple(runs), tuple(failures))


def stack_card(segmenter: ModelCard, stack: Stack) -> ModelCard:
    """The card a stack decides with: the map model's, named for both members, with the stack's
    operating points and no calibration of its own (the stack's is folded into its weights)."""
    return replace(
        segmenter,
        name=f"{segmenter.name}+{stack.classifier}",
        architecture=f"logistic stack of {stack.classifier} and {segmenter.name}",
        temperature=1.0,
        logit_offset=0.0,
        operating_points=stack.operating_points,
        validation_metrics=dict(stack.validation_metrics),
        notes=stack.notes,
    )


def stack_run(
    classifier: ModelRun,
    segmenter: ModelRun,
    stack: Stack,
    keep: Sequence[int] | None = None,
    *,
    served: Groups | None = None,
    decides: Groups | None = None,
) -> ModelRun:
    """The stacked probability on the images both runs read (and ``keep`` holds, when given).

    ``logits`` are the stack's own (``w_c z_c + w_m z_m + b``); boxes are the map model's.
    """
    if classifier.logits is None or segmenter.logits is None:
        raise RunnerError("a stack needs the classifier's and the map model's logits")
    if stack.classifier != classifier.card.name:
        raise RunnerError(
            f"the stack of {segmenter.card.name} names {stack.classifier}, not {classifier.card.name}"
        )
    where = {int(i): p for p, i in enumerate(classifier.indices)}
    wanted = None if keep is None else {int(i) for i in keep}
    positions = [
        (where[int(i)], p)
        for p, i in enumerate(segmenter.indices)
        if int(i) in where and (wanted is None or int(i) in wanted)
    ]
    c = np.array([classifier.logits[a] for a, _ in positions], dtype=np.float64)
    m = np.array([segmenter.logits[b] for _, b in positions], dtype=np.float64)
    probabilities = stacked_probabilities(stack, c, m) if positions else np.zeros(0)
    logits = stack.weights[0] * c + stack.weights[1] * m + stack.bias
    boxes = None if segmenter.boxes is None else tuple(segmenter.boxes[b] for _, b in positions)
    return ModelRun(
        card=stack_card(segmenter.card, stack),
        served=served,
        indices=np.array([segmenter.indices[b] for _, b in positions], dtype=np.int64),
        probabilities=np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0),
        logits=np.asarray(logits, dtype=np.float64),
        boxes=boxes,
        decides=decides,
        localises=None,
        members=(classifier.card.name, segmenter.card.name),
    )


def uncalibrated(run: ModelRun) -> NDArray[np.float64] | None:
    """A classifier's probabilities before calibration: the sigmoid of its logits."""
    if run.logits is None:
        return None
    with np.errstate(over="ignore"):
        return np.asarray(1.0 / (1.0 + np.exp(-run.logits)), dtype=np.float64)


def thresholds_of(card: ModelCard, default: float) -> list[tuple[str, float]]:
    """The card's operating points as ``(name, threshold)``; one ``default`` point when it has none."""
    points = [(p.name, float(p.threshold)) for p in card.operating_points if math.isfinite(p.threshold)]
    return points or [(f"uncalibrated_{default:g}", default)]


def restrict(run: ModelRun, keep: Sequence[int]) -> ModelRun:
    """The part of ``run`` on the images ``keep`` (indices into the image list)."""
    wanted = np.isin(run.indices, np.asarray(list(keep), dtype=np.int64))
    positions = np.flatnonzero(wanted)
    return ModelRun(
        card=run.card,
        served=run.served,
        indices=run.indices[positions],
        probabilities=run.probabilities[positions],
        logits=None if run.logits is None else run.logits[positions],
        boxes=None if run.boxes is None else tuple(run.boxes[p] for p in positions),
        decides=run.decides,
        localises=run.localises,
        members=run.members,
    )


def set_torch_threads(threads: int) -> None:
    """Limit torch's CPU threads (a shared machine); models run in this process use them."""
    import torch

    torch.set_num_threads(max(1, threads))
