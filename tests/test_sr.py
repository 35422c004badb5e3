"""The TID 1500 SR: validated by dciodvfy and dsrdump, read back with highdicom, content asserted.

Sources are generated DX radiographs (tests.dicomgen) and the pydicom-data RG3 CR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from inference.modelcard import ModelKind
from inference.regions import Region
from inference.values import Box, ImageResult, Outcome, Priority, StudyResult
from node.results import codes as fc
from node.results.common import (
    SERIES_DESCRIPTION,
    MissingSourceError,
    NothingToReportError,
)
from node.results.sr import build_sr
from node.results.uids import Role, model_versions, result_uid
from tests.resultgen import LOOSE, STRICT, card, routing, study_result, wrist_sources
from tests.validators import assert_valid, dsrdump

SOFTWARE = "0.1.0-test"


def _write(ds: Dataset, tmp_path: Path, name: str = "sr.dcm") -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _build_and_read(
    result: StudyResult, sources: Sequence[Dataset], tmp_path: Path
) -> tuple[Path, hd.sr.Comprehensive3DSR]:
    sr = build_sr(result, {str(ds.SOPInstanceUID): ds for ds in sources}, software_version=SOFTWARE)
    path = _write(sr, tmp_path)
    assert_valid(path, "Comprehensive3DSR")
    dsrdump(path)
    return path, hd.sr.srread(path)


def _code(item: object) -> tuple[str, str]:
    concept = hd.sr.CodedConcept.from_dataset(item) if isinstance(item, Dataset) else item
    assert isinstance(concept, hd.sr.CodedConcept)
    return concept.value, concept.scheme_designator


def _texts(group: hd.sr.Template, name: tuple[str, str]) -> list[str]:
    return [
        str(item.TextValue)
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT" and _code(item.ConceptNameCodeSequence[0]) == name
    ]


ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_VERSION = ("111003", "DCM")
ALGORITHM_PARAMETERS = ("111002", "DCM")
COMMENT = ("121106", "DCM")

BOXES = (
    (Box(10.5, 20.0, 40.0, 60.0, 0.81), Box(50.0, 70.0, 80.0, 100.0, 0.40)),
    (Box(5.0, 6.0, 25.0, 30.25, 0.72),),
)


def test_sr_validates_and_dsrdump_parses_it(tmp_path: Path) -> None:
    sources = wrist_sources(2)
    result = study_result(sources, boxes=BOXES)
    path, _ = _build_and_read(result, sources, tmp_path)
    tree = dsrdump(path)
    assert "Imaging Measurement Report" in tree
    assert '(125605004,SCT,"Fracture of bone")' in tree
    assert "POLYLINE" in tree


def test_content_tree_is_tid_1500_with_the_findings(tmp_path: Path) -> None:
    sources = wrist_sources(2)
    result = study_result(sources, boxes=BOXES)
    _, sr = _build_and_read(result, sources, tmp_path)

    root = sr
    assert root.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert root.ContentTemplateSequence[0].MappingResource == "DCMR"
    assert _code(root.ConceptNameCodeSequence[0]) == ("126000", "DCM")  # Imaging Measurement Report
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)

    # Image library: both sources.
    (library_container,) = hd.sr.utils.find_content_items(
        sr, name=codes.DCM.ImageLibrary, value_type=hd.sr.ValueTypeValues.CONTAINER, recursive=True
    )
    library = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in hd.sr.utils.find_content_items(
            library_container, value_type=hd.sr.ValueTypeValues.IMAGE, recursive=True
        )
    ]
    assert set(library) == {str(ds.SOPInstanceUID) for ds in sources}

    # Study level: one group per anatomical group, Present with the group probability.
    (study_level,) = report.get_image_measurement_groups()
    assert _code(study_level.finding_type) == ("125605004", "SCT")
    (evaluation,) = study_level.get_qualitative_evaluations()
    assert _code(evaluation.name) == ("125605004", "SCT")
    assert _code(evaluation.value) == ("52101004", "SCT")  # Present
    (probability,) = study_level.get_measurements(name=fc.PROBABILITY)
    assert probability.value == pytest.approx(0.82)
    assert _code(probability.unit) == ("1", "UCUM")
    (site,) = study_level.finding_sites
    assert _code(site.value) == ("74670003", "SCT")  # Wrist joint
    assert _code(site.laterality) == ("24028007", "SCT")  # Right
    assert _texts(study_level, ALGORITHM_NAME) == [result.groups[0].models[0].name]
    assert _texts(study_level, ALGORITHM_VERSION) == ["1.0.0"]
    assert _texts(study_level, ALGORITHM_PARAMETERS) == [
        f"operating point: high_specificity (threshold {STRICT:.4f})"
    ]
    referenced = {item.referenced_sop_instance_uid for item in study_level.source_images}
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}
    # In group: the outcome with its operating point and how the site was decided, no warning.
    assert _texts(study_level, COMMENT) == [
        "upper-distal: fracture PRESENT \u2014 p 0.82 \u2265 0.70, the high-specificity threshold of "
        "upper-distal-classifier 1.0.0 (validation sensitivity 72 %, specificity 95 %)",
        "Finding site determination: wrist, from the header (Body Part Examined), confidence 100 %",
    ]

    # Per box: a planar ROI with the box as a closed POLYLINE on its source image.
    rois = report.get_planar_roi_measurement_groups()
    expected = [(image, box) for image in result.groups[0].images for box in image.boxes]
    assert len(rois) == len(expected) == 3
    detector = card(ModelKind.DETECTOR)
    for roi, (image, box) in zip(rois, expected, strict=True):
        region = roi.roi
        assert isinstance(region, hd.sr.ImageRegion)
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_allclose(
            region.value,
            [[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1], [box.x0, box.y0]],
            rtol=0,
            atol=1e-5,  # GraphicData is FL (float32)
        )
        (selected_from,) = region.ContentSequence  # SELECTED FROM the source image
        assert selected_from.RelationshipType == "SELECTED FROM"
        assert selected_from.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image.sop_instance_uid
        assert selected_from.ReferencedSOPSequence[0].ReferencedSOPClassUID == sources[0].SOPClassUID
        assert _code(roi.finding_type) == ("125605004", "SCT")
        (roi_site,) = roi.finding_sites
        assert _code(roi_site.value) == ("74670003", "SCT")
        assert _code(roi_site.laterality) == ("24028007", "SCT")
        (roi_probability,) = roi.get_measurements(name=fc.PROBABILITY)
        assert roi_probability.value == pytest.approx(box.probability)
        (call,) = roi.get_qualitative_evaluations()
        expected_call = "52101004" if box.probability >= STRICT else "42425007"  # Present / Equivocal
        assert box.probability >= LOOSE
        assert _code(call.value) == (expected_call, "SCT")
        assert _texts(roi, ALGORITHM_NAME) == [detector.name]  # TID 4019 of the detector
        assert _texts(roi, COMMENT) == [
            "Finding site determination: wrist, from the header (Body Part Examined), confidence 100 %"
        ]


def test_identification_per_ihe_ai_results(tmp_path: Path) -> None:
    sources = wrist_sources(1)
    result = study_result(sources, boxes=[(Box(1, 2, 30, 40, 0.9),)])
    _, sr = _build_and_read(result, sources, tmp_path)
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.SeriesDescription == SERIES_DESCRIPTION == "AI fracture analysis \u2014 not for diagnostic use"
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert sr.SoftwareVersions == SOFTWARE
    models = {item.DeviceUID: item for item in sr.ContributingEquipmentSequence if "DeviceUID" in item}
    for model in result.groups[0].models:
        item = models[model.device_uid]
        assert item.ManufacturerModelName == model.name
        assert item.SoftwareVersions == model.version
        assert item.Manufacturer == model.manufacturer
        assert _code(item.PurposeOfReferenceCodeSequence[0]) == ("109102", "DCM")  # Processing Equipment
    assert len(models) == 2
    # Same patient and study as the source; evidence lists the source.
    assert sr.PatientID == sources[0].PatientID
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sources[0].SOPInstanceUID


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (Outcome.POSITIVE, "52101004"),  # Present
        (Outcome.POSSIBLE, "42425007"),  # Equivocal
        (Outcome.NEGATIVE, "272519000"),  # Absent
        (Outcome.NOT_ANALYSED, "373068000"),  # Undetermined
    ],
)
def test_outcome_codes(tmp_path: Path, outcome: Outcome, code: str) -> None:
    sources = wrist_sources(1)
    probability = None if outcome == Outcome.NOT_ANALYSED else 0.5
    result = study_result(sources, outcome=outcome, probability=probability)
    _, sr = _build_and_read(result, sources, tmp_path)
    (group,) = sr.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert _code(evaluation.value) == (code, "SCT")
    assert len(group.get_measurements(name=fc.PROBABILITY)) == (0 if probability is None else 1)
    comments = _texts(group, ("121106", "DCM"))
    assert any("not analysed" in text for text in comments) == (outcome == Outcome.NOT_ANALYSED)


def test_out_of_group_warning_is_a_comment(tmp_path: Path) -> None:
    sources = wrist_sources(1)
    result = study_result(sources, out_of_group=True, region=Region.ELBOW)
    _, sr = _build_and_read(result, sources, tmp_path)
    (group,) = sr.content.get_image_measurement_groups()
    (warning,) = [text for text in _texts(group, COMMENT) if text.startswith("Warning")]
    assert warning.startswith("Warning: out of group.")
    assert "elbow" in warning and "upper-distal" in warning
    (site,) = group.finding_sites
    assert _code(site.value) == ("16953009", "SCT")  # Elbow joint


def test_cr_source_rg3(tmp_path: Path, rg3_files: dict[str, Path]) -> None:
    source = pydicom.dcmread(rg3_files["RG3_UNCR"])
    box = Box(700.0, 800.0, 1000.0, 1150.0, 0.91)
    result = study_result([source], boxes=[(box,)], region=Region.ANKLE)
    _, sr = _build_and_read(result, [source], tmp_path)
    (roi,) = sr.content.get_planar_roi_measurement_groups()
    assert roi.roi is not None
    reference = roi.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert reference.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    np.testing.assert_allclose(roi.roi.value[2], [1000.0, 1150.0])
    (site,) = roi.finding_sites
    assert _code(site.value) == ("70258002", "SCT")  # Ankle joint
    assert _code(site.laterality) == ("24028007", "SCT")  # RG3: Laterality R


def test_study_with_nothing_analysed_still_reports(tmp_path: Path) -> None:
    sources = wrist_sources(1)
    skipped = ImageResult(
        str(sources[0].SOPInstanceUID),
        0,
        routing(Region.OTHER, None),
        None,
        error=None,
    )
    result = StudyResult(str(sources[0].StudyInstanceUID), 1, (), (skipped,), Priority.NOT_ANALYSED, None)
    _, sr = _build_and_read(result, sources, tmp_path)
    (group,) = sr.content.get_image_measurement_groups()
    (evaluation,) = group.get_qualitative_evaluations()
    assert _code(evaluation.value) == ("373068000", "SCT")
    assert "no image of this study was analysed" in _texts(group, ("121106", "DCM"))
    assert sr.content.get_planar_roi_measurement_groups() == []


def test_uids_are_derived_and_idempotent(tmp_path: Path) -> None:
    sources = wrist_sources(1)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    first = build_sr(study_result(sources), by_uid, software_version=SOFTWARE)
    again = build_sr(study_result(sources), by_uid, software_version=SOFTWARE)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    result = study_result(sources)
    assert first.SOPInstanceUID == result_uid(
        result.study_instance_uid, model_versions(result), result.revision, Role.SR_INSTANCE
    )
    revised = build_sr(study_result(sources, revision=2), by_uid, software_version=SOFTWARE)
    retrained = build_sr(study_result(sources, version="1.1.0"), by_uid, software_version=SOFTWARE)
    uids = {first.SOPInstanceUID, revised.SOPInstanceUID, retrained.SOPInstanceUID}
    assert len(uids) == 3
    assert first.SeriesInstanceUID != revised.SeriesInstanceUID


def test_result_uid_form() -> None:
    uid = result_uid("1.2.3", ["b@2", "a@1"], 3, Role.SC_INSTANCE, 7)
    assert uid == result_uid("1.2.3", ["a@1", "b@2"], 3, Role.SC_INSTANCE, 7)  # order-insensitive
    assert uid.startswith("2.25.") and len(uid) <= 64
    value = int(uid.removeprefix("2.25."))
    assert (value >> 76) & 0xF == 8  # RFC 9562 version 8
    assert (value >> 62) & 0x3 == 0b10  # RFC 9562 variant
    assert pydicom.uid.UID(uid).is_valid
    others = {
        result_uid("1.2.3", ["a@1", "b@2"], 3, Role.SC_INSTANCE, 8),
        result_uid("1.2.3", ["a@1", "b@2"], 4, Role.SC_INSTANCE, 7),
        result_uid("1.2.3", ["a@1", "b@3"], 3, Role.SC_INSTANCE, 7),
        result_uid("1.2.3", ["a@1", "b@2"], 3, Role.SR_INSTANCE, 7),
        result_uid("1.2.4", ["a@1", "b@2"], 3, Role.SC_INSTANCE, 7),
    }
    assert uid not in others and len(others) == 5
    with pytest.raises(ValueError):
        result_uid("", [], 0, Role.SR_INSTANCE)
    with pytest.raises(ValueError):
        result_uid("1.2.3", [], -1, Role.SR_INSTANCE)


def test_missing_source_is_named() -> None:
    sources = wrist_sources(2)
    result = study_result(sources)
    with pytest.raises(MissingSourceError) as caught:
        build_sr(result, {str(sources[0].SOPInstanceUID): sources[0]}, software_version=SOFTWARE)
    assert caught.value.sop_instance_uid == str(sources[1].SOPInstanceUID)
    assert caught.value.study_instance_uid == result.study_instance_uid


def test_empty_result_has_nothing_to_report() -> None:
    result = StudyResult("1.2.3", 1, (), (), Priority.NOT_ANALYSED, None)
    with pytest.raises(NothingToReportError):
        build_sr(result, {}, software_version=SOFTWARE)


def test_unreadable_image_is_reported_without_a_reference(tmp_path: Path) -> None:
    sources = wrist_sources(2)
    result = study_result(sources)
    group = result.groups[0]
    unreadable = replace(group.images[1], probability=None, error="file could not be parsed")
    result = replace(result, groups=(replace(group, images=(group.images[0], unreadable)),))
    _, sr = _build_and_read(result, sources[:1], tmp_path)  # the worker has no dataset for it
    (study_level,) = sr.content.get_image_measurement_groups()
    assert {item.referenced_sop_instance_uid for item in study_level.source_images} == {
        str(sources[0].SOPInstanceUID)
    }
    assert "image 2 not analysed: file could not be parsed" in _texts(study_level, ("121106", "DCM"))
