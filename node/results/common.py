"""What the SR, the Secondary Captures and the GSPS share: wording, series numbers, equipment, errors.

Error tree (all carry ``study_instance_uid``)::

    ResultBuildError(Exception)          a result cannot be turned into DICOM objects
    ├── MissingSourceError               an analysed image has no dataset in ``sources``
    └── NothingToReportError             the result references no image at all
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from highdicom import ContributingEquipment
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.modelcard import ModelCard, ModelKind
from inference.values import ImageResult, StudyResult
from node import received
from node.results.sources import has_pixel_description, source_view

MANUFACTURER = "fracnode"
SERIES_DESCRIPTION = "AI fracture analysis \u2014 not for diagnostic use"
SC_FOOTER = "AI result \u2014 not for diagnostic use"
# UTF-8: the em dash above is outside ISO-IR 6 (PS3.5 6.1.2.5.2; "ISO_IR 192" is UTF-8).
CHARACTER_SET = "ISO_IR 192"

# The multi-frame IODs among the storage classes the node accepts (node.scp): the Multi-frame
# Secondary Captures (PS3.3 A.8.2-A.8.5).
MULTI_FRAME_CLASSES = frozenset(f"1.2.840.10008.5.1.4.1.1.7.{n}" for n in (1, 2, 3, 4))

# Fixed series numbers, high so PACS viewers list the AI series after the acquired ones.
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
GSPS_SERIES_NUMBER = 9903
GRADCAM_SERIES_NUMBER = 9904


class ResultBuildError(Exception):
    """A study result cannot be turned into DICOM objects."""

    def __init__(self, message: str, *, study_instance_uid: str) -> None:
        super().__init__(message)
        self.study_instance_uid = study_instance_uid


class MissingSourceError(ResultBuildError):
    """An image result names a source instance that the caller did not pass in ``sources``."""

    def __init__(self, *, study_instance_uid: str, sop_instance_uid: str) -> None:
        super().__init__(
            f"no source dataset for instance {sop_instance_uid}", study_instance_uid=study_instance_uid
        )
        self.sop_instance_uid = sop_instance_uid


class NothingToReportError(ResultBuildError):
    """The result references no image: there is nothing to attach a report to."""


def all_images(result: StudyResult) -> tuple[ImageResult, ...]:
    """Every image result of the study: per group in group order, then the unrouted ones."""
    return tuple(image for group in result.groups for image in group.images) + result.not_analysed


def is_analysed(image: ImageResult) -> bool:
    """A model read the image: it has a probability and no error."""
    return image.probability is not None and image.error is None


def source_of(result: StudyResult, sources: Mapping[str, Dataset], sop_instance_uid: str) -> Dataset:
    """The checked view (:func:`node.results.sources.source_view`) of an analysed image's
    source dataset; its absence is a caller's bug."""
    try:
        return source_view(sources[sop_instance_uid])
    except KeyError as exc:
        raise MissingSourceError(
            study_instance_uid=result.study_instance_uid, sop_instance_uid=sop_instance_uid
        ) from exc


def referable(
    result: StudyResult, sources: Mapping[str, Dataset], images: Sequence[ImageResult]
) -> list[tuple[ImageResult, Dataset]]:
    """``images`` (once per frame) with the checked views of their sources, for references.

    An image that was not analysed may have no dataset (its file could not be read), no valid
    pixel description, or an error (it could not be decoded, it is too large, its model failed):
    it is left out of the references, and its reason still goes into the report. An image that
    was only routed elsewhere (no model for its region) is referenced. An analysed image without
    its dataset raises :class:`MissingSourceError`.
    """
    out: dict[tuple[str, int], tuple[ImageResult, Dataset]] = {}
    for image in images:
        key = (image.sop_instance_uid, image.frame)
        if key in out:
            continue
        source = sources.get(image.sop_instance_uid)
        if source is None:
            if is_analysed(image):
                raise MissingSourceError(
                    study_instance_uid=result.study_instance_uid, sop_instance_uid=image.sop_instance_uid
                )
            continue
        view = source_view(source)
        if not is_analysed(image) and (image.error is not None or not has_pixel_description(view)):
            continue
        out[key] = (image, view)
    return list(out.values())


def evidence_of(result: StudyResult, sources: Mapping[str, Dataset]) -> list[Dataset]:
    """Checked views of every source dataset the result names, each once, in first-mention order.

    Evidence (PS3.3 C.17.2.3) lists the study's instances, so an image that could not be decoded
    is in it, by its UIDs only, although no content item refers to it.
    """
    seen: dict[str, Dataset] = {}
    for image in all_images(result):
        source = sources.get(image.sop_instance_uid)
        if source is None or image.sop_instance_uid in seen:
            continue
        view = source_view(source)
        if "SOPInstanceUID" in view and "SOPClassUID" in view:
            seen[image.sop_instance_uid] = view
    if not seen:
        raise NothingToReportError(
            "the result references no source image", study_instance_uid=result.study_instance_uid
        )
    return list(seen.values())


def unique_cards(cards: Iterable[ModelCard]) -> list[ModelCard]:
    """Model cards once each (by device UID), in first-seen order."""
    seen: dict[str, ModelCard] = {}
    for card in cards:
        seen.setdefault(card.device_uid, card)
    return list(seen.values())


def model_equipment(cards: Sequence[ModelCard]) -> list[ContributingEquipment]:
    """One Contributing Equipment item per model, as IHE AI Results asks.

    Purpose of reference DCM 109102 "Processing Equipment"; the model's name as the model name,
    its version as the software version, and its Device UID (0018,1002), which changes with every
    version of the model.
    """
    items: list[ContributingEquipment] = []
    for card in unique_cards(cards):
        item = ContributingEquipment(
            manufacturer=card.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=card.name,
            software_versions=card.version,
            contribution_description=f"{card.kind} ({card.architecture})"[:1024],
        )
        item.DeviceUID = card.device_uid
        items.append(item)
    return items


def frame_numbers(source: Dataset, frame: int) -> list[int] | None:
    """1-based Referenced Frame Number for a multi-frame source; None for a single-frame one,
    and for an instance of a single-frame IOD whatever its Number of Frames claims (a reference
    to a frame of it is invalid, PS3.3 C.12.1.1.4)."""
    if received.text(source, "SOPClassUID") not in MULTI_FRAME_CLASSES:
        return None
    if (received.integer(source, "NumberOfFrames") or 1) > 1:
        return [frame + 1]
    return None


def classifier_of(cards: Sequence[ModelCard]) -> ModelCard | None:
    """The model whose probability decides a group's outcome: its classifier, else its first.

    A map model listed first decides (:class:`node.modelset.GroupModels` lists the deciding
    model first): its own probability, or its stack with the group's classifier.
    """
    if cards and cards[0].kind == ModelKind.SEGMENTER:
        return cards[0]
    return _first_of(cards, ModelKind.CLASSIFIER)


def detector_of(cards: Sequence[ModelCard]) -> ModelCard | None:
    """The model whose boxes a group reports: its map model (segmenter), else its detector, else its first."""
    for card in cards:
        if card.kind == ModelKind.SEGMENTER:
            return card
    return _first_of(cards, ModelKind.DETECTOR)


def _first_of(cards: Sequence[ModelCard], kind: ModelKind) -> ModelCard | None:
    for card in cards:
        if card.kind == kind:
            return card
    return cards[0] if cards else None
