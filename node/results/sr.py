"""The study's structured report: a Comprehensive 3D SR holding a TID 1500 Measurement Report.

Content tree (PS3.16 TID 1500, built with highdicom's template classes):

- Observation context: the fracnode node as the device observer (TID 1004); each model is named
  where it speaks, by TID 4019 Algorithm Identification, and listed in Contributing Equipment with
  its Device UID (IHE AI Results).
- Procedure reported: SNOMED CT "Plain radiography". Image library: every source image the result
  refers to.
- Per anatomical group, one TID 1501 measurement group at study level: finding "Fracture of bone",
  the qualitative evaluation "Fracture of bone" = Present / Equivocal / Absent / Undetermined, the
  calibrated probability (DCM "Probability", UCUM "1"), the finding site(s) with laterality, the
  source images, TID 4019 of the group's classifier whose parameters name the operating point used,
  and TEXT comments (below) for the outcome's operating point, the finding site determination,
  the out-of-group warning, the priority note and the reasons of images or groups not analysed.
- Per detected box, one TID 1410 planar ROI group: a closed POLYLINE ImageRegion on the source image
  (five (column, row) points in source pixels; DICOM puts 0.0 at the outer corner of the first pixel,
  PS3.3 C.18.6.1.1, the same convention as :class:`inference.values.Box`), finding "Fracture of
  bone", the finding site of the image's region with its laterality, the box probability and, when
  the localiser has its (box) operating points, Present (past high specificity) or Equivocal. The
  localiser is the group's map model (kind ``segmenter``), else its detector; it is named by TID
  4019 in each box group, with the finding site determination of its image.

The explanations are TEXT items with the standard concept name (121106, DCM, "Comment"), which
the qualitative evaluation row of TID 1501/1410 admits, worded by :mod:`node.results.wording`:

- the outcome with the operating point behind it: "<group>: fracture PRESENT — p 0.82 ≥ 0.70, the
  high-specificity threshold of <model> <version> (validation sensitivity 72 %, specificity 95 %)";
- "Finding site determination: wrist, from the header (Body Part Examined), confidence 95 %" or
  "... wrist, GUESSED FROM THE IMAGE by the region classifier, confidence 83 % — check the body
  part" (", below the confidence threshold" when analysed on a weak guess), one per distinct
  decision, naming its images ("image 2", "images 1, 3") when the group's images differ;
- "Worklist priority: positive capped at review (read out of group: REVIEW at most)" when the
  study's priority notes capped the group.

No coded concept fits the site determination: PS3.16 has none for how a finding site was
determined or how sure that was (DCM 111012 "Certainty of Finding" is about the finding, not
its site; TID 1501's Finding Site takes only laterality and topographical modifiers), so a
private code would be the alternative, and a Comment any SR reader shows is the better one.

VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY, UIDs from :mod:`node.results.uids`.

Errors: :class:`node.results.common.ResultBuildError` and its subclasses (see there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import highdicom as hd
import numpy as np
from highdicom.sr.templates import Template
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard
from inference.regions import Region
from inference.values import Box, GroupResult, ImageResult, StudyResult
from node.results import codes as fc
from node.results.common import (
    CHARACTER_SET,
    MANUFACTURER,
    SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    classifier_of,
    detector_of,
    evidence_of,
    frame_numbers,
    model_equipment,
    referable,
    source_of,
)
from node.results.uids import Role, model_versions, result_uid
from node.results.wording import outcome_explanation, priority_lines, site_determinations


def build_sr(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    *,
    software_version: str,
    institution: str | None = None,
) -> Dataset:
    """The TID 1500 report of ``result``; ``sources`` maps SOP Instance UID to the source dataset.

    The returned :class:`highdicom.sr.Comprehensive3DSR` has file meta (explicit VR little
    endian) and can be written with ``save_as(path, enforce_file_format=True)``.
    """
    versions = model_versions(result)

    def uid(role: Role, index: int = 0) -> str:
        return result_uid(result.study_instance_uid, versions, result.revision, role, index)

    evidence = evidence_of(result, sources)
    tracking = _Tracking(uid)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    for group in result.groups:
        groups.append(_group_evaluation(result, group, sources, tracking))
        groups.extend(_box_groups(result, group, sources, tracking))
    if not result.groups:
        groups.append(_study_not_analysed(result, sources, tracking))

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=result_uid("fracnode", (software_version,), 0, Role.OBSERVER),
                    name=MANUFACTURER,
                    manufacturer_name=MANUFACTURER,
                    model_name=MANUFACTURER,
                ),
            )
        ),
        procedure_reported=fc.PLAIN_RADIOGRAPHY,
        imaging_measurements=groups,
        referenced_images=[_library_view(ds) for ds in evidence if _is_image(ds)] or None,
    )
    cards = [card for group in result.groups for card in group.models]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uid(Role.SR_SERIES),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid(Role.SR_INSTANCE),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution,
        contributing_equipment=model_equipment(cards),
        series_description=SERIES_DESCRIPTION,
        specific_character_set=CHARACTER_SET,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_version,
    )
    return sr


class _Tracking:
    """Numbers the measurement groups of one report and gives each a derived tracking UID."""

    def __init__(self, uid: Callable[[Role, int], str]) -> None:
        self._uid = uid
        self._next = 0

    def __call__(self, label: str) -> hd.sr.TrackingIdentifier:
        index = self._next
        self._next += 1
        return hd.sr.TrackingIdentifier(
            uid=self._uid(Role.TRACKING, index), identifier=f"{index + 1}: {label}"
        )


def _group_evaluation(
    result: StudyResult, group: GroupResult, sources: Mapping[str, Dataset], tracking: _Tracking
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    card = classifier_of(group.models)
    measurements = []
    if group.probability is not None:
        measurements.append(
            hd.sr.Measurement(name=fc.PROBABILITY, value=float(group.probability), unit=fc.UNIT_RATIO)
        )
    evaluation = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking(f"{group.group} study level"),
        finding_type=fc.FRACTURE_OF_BONE,
        algorithm_id=_algorithm(card, group.operating_point) if card is not None else None,
        finding_sites=_sites(group.regions, group.images) or None,
        measurements=measurements or None,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=fc.FRACTURE_OF_BONE, value=fc.OUTCOME_CODES[group.outcome])
        ],
        source_images=_source_images(result, sources, group.images),
    )
    _comment(evaluation, _group_comments(result, group))
    return evaluation


def _box_groups(
    result: StudyResult, group: GroupResult, sources: Mapping[str, Dataset], tracking: _Tracking
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    card = detector_of(group.models)
    out: list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = []
    for image_number, image in enumerate(group.images, start=1):
        if not image.boxes:
            continue
        source = source_of(result, sources, image.sop_instance_uid)
        for number, box in enumerate(image.boxes, start=1):
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=box_polyline(box),
                source_image=hd.sr.SourceImageForRegion.from_source_image(
                    source, frame_numbers(source, image.frame)
                ),
            )
            evaluations = []
            call = _box_call(card, box) if card is not None else None
            if call is not None:
                evaluations.append(hd.sr.QualitativeEvaluation(name=fc.FRACTURE_OF_BONE, value=call))
            roi = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking(f"{group.group} image {image_number} box {number}"),
                referenced_region=region,
                finding_type=fc.FRACTURE_OF_BONE,
                algorithm_id=_algorithm(card, None) if card is not None else None,
                finding_sites=_sites((image.routing.region,), (image,)) or None,
                measurements=[
                    hd.sr.Measurement(name=fc.PROBABILITY, value=float(box.probability), unit=fc.UNIT_RATIO)
                ],
                qualitative_evaluations=evaluations or None,
            )
            _comment(roi, site_determinations([image.routing]))
            out.append(roi)
    return out


def _study_not_analysed(
    result: StudyResult, sources: Mapping[str, Dataset], tracking: _Tracking
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1500 needs one measurement group: with no group analysed, say so at study level."""
    evaluation = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking("study not analysed"),
        finding_type=fc.FRACTURE_OF_BONE,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=fc.FRACTURE_OF_BONE, value=fc.UNDETERMINED)
        ],
        source_images=_source_images(result, sources, result.not_analysed),
    )
    _comment(evaluation, ["no image of this study was analysed", *_image_reasons(result.not_analysed)])
    return evaluation


_PROJECTION = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")


def _is_image(ds: Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds


def _library_view(ds: Dataset) -> Dataset:
    """What highdicom's image library entry (TID 1601) reads of ``ds``, and only what is there.

    highdicom adds the projection radiography descriptors of TID 1603 (patient orientation, imager
    pixel spacing) for a CR/DX source and fails when the source lacks them, which real CRs often
    do (the pydicom-data RG3 has no Imager Pixel Spacing). The view leaves Modality empty for such
    a source: the entry keeps its SOP reference, its coded modality (from the SOP class) and its
    size, without descriptors the source cannot back.
    """
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
        setattr(view, keyword, ds[keyword].value)
    orientation = ds.get("PatientOrientation")
    spacing = ds.get("ImagerPixelSpacing")
    complete = (
        ds.get("Modality") in _PROJECTION
        and orientation is not None
        and len(orientation) == 2
        and all(orientation)
        and spacing is not None
        and len(spacing) == 2
    )
    view.Modality = ds.Modality if complete else ""
    if complete:
        view.PatientOrientation = orientation
        view.ImagerPixelSpacing = spacing
    return view


def box_polyline(box: Box) -> np.ndarray:
    """The closed rectangle of ``box`` as five (column, row) points, first point repeated."""
    return np.array(
        [[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1], [box.x0, box.y0]],
        dtype=np.float64,
    )


def _algorithm(card: ModelCard, operating_point: str | None) -> hd.sr.AlgorithmIdentification:
    parameters: list[str] = []
    if operating_point is not None:
        point = card.operating_point(operating_point)
        threshold = f" (threshold {point.threshold:.4f})" if point is not None else ""
        parameters.append(f"operating point: {operating_point}{threshold}")
    return hd.sr.AlgorithmIdentification(
        name=card.name,
        version=card.version,
        parameters=parameters or None,
        manufacturer=card.manufacturer,
    )


def _box_call(card: ModelCard, box: Box) -> hd.sr.CodedConcept | None:
    strict = card.box_threshold(HIGH_SPECIFICITY)
    loose = card.box_threshold(HIGH_SENSITIVITY)
    if strict is not None and box.probability >= strict:
        return hd.sr.CodedConcept.from_code(fc.PRESENT)
    if loose is not None and box.probability >= loose:
        return hd.sr.CodedConcept.from_code(fc.EQUIVOCAL)
    return None


def _sites(regions: Sequence[Region], images: Sequence[ImageResult]) -> list[hd.sr.FindingSite]:
    sites: list[hd.sr.FindingSite] = []
    for region in dict.fromkeys(regions):
        code = fc.region_code(region)
        if code is None:
            continue
        sides = {image.routing.laterality for image in images if image.routing.region == region}
        sides.discard(None)
        side: str | None = None
        if len(sides) == 1:
            side = sides.pop()
        elif sides >= {"L", "R"}:
            side = "B"
        sites.append(hd.sr.FindingSite(anatomic_location=code, laterality=fc.laterality_code(side)))
    return sites


def _source_images(
    result: StudyResult, sources: Mapping[str, Dataset], images: Sequence[ImageResult]
) -> list[hd.sr.SourceImageForMeasurementGroup] | None:
    items = [
        hd.sr.SourceImageForMeasurementGroup.from_source_image(source, frame_numbers(source, image.frame))
        for image, source in referable(result, sources, images)
    ]
    return items or None


def _group_comments(result: StudyResult, group: GroupResult) -> list[str]:
    comments = [f"{group.group}: {outcome_explanation(group)}"]
    comments.extend(site_determinations([image.routing for image in group.images]))
    if group.out_of_group:
        regions = ", ".join(str(region) for region in group.regions)
        comments.append(
            f"Warning: out of group. {regions} read by the {group.group} model, which was not "
            "trained on this region; its accuracy there is not validated."
        )
    comments.extend(priority_lines(result, group))
    comments.extend(_image_reasons(group.images))
    return comments


def _image_reasons(images: Sequence[ImageResult]) -> list[str]:
    reasons: list[str] = []
    for number, image in enumerate(images, start=1):
        why = image.error or image.routing.reason
        if why is not None and (image.error is not None or image.probability is None):
            reasons.append(f"image {number} not analysed: {why}")
    return reasons


def _comment(group: Template, texts: Sequence[str]) -> None:
    """Append TEXT "Comment" items to a TID 1501 group (its qualitative evaluations row takes TEXT)."""
    container = group[0]
    for text in texts:
        container.ContentSequence.append(
            hd.sr.TextContentItem(
                name=fc.COMMENT,
                value=text[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
