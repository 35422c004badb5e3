"""What the SR and the SC say about how each finding was reached (issue 13), and dciodvfy on
every kind of object the node creates from sources without a side.

- Blank-header studies routed by the image classifier: the SR's content tree (read back with
  highdicom) and the SC's header text (the very lines its pixels were rendered from) name the
  region, that it was GUESSED FROM THE IMAGE, the confidence, and "below the confidence
  threshold" when it was analysed on a weak guess; the study's priority note is shown with them.
- The outcome is worded with the deciding card's operating point: threshold, model, validation
  sensitivity and specificity.
- The header stays inside the canvas at the sizes the SC is rendered (512 x 512 and 3000 x 2500
  sources; PNGs are written to the test's tmp folder for a look).
- CR, DX and SC sources with no side, every view (AP, PA, LAT, OBL, none) and every photometric
  (MONOCHROME1, MONOCHROME2, RGB): SR, overlay SCs, summary SC, presentation states and Grad-CAM
  SCs all pass dciodvfy without an error, Laterality (Type 2C) present on every image object.
- The whole chain on a real CR with its header blanked (pydicom-data RG3, an ankle): the bundled
  region classifier guesses, the node analyses the guess flagged, and every object it writes
  says so and validates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.templates import Template
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.modelcard import ModelKind
from inference.priority import decide_priority, priority_notes
from inference.regions import Region
from inference.values import Box, GroupResult, Outcome, RegionSource, Routing, StudyResult
from node.results.common import SC_FOOTER
from node.results.gradcam import build_gradcam_scs
from node.results.gsps import build_gsps
from node.results.overlay import (
    TEXT_COLOUR,
    WARNING_COLOUR,
    build_overlays,
    drawn_boxes,
    header_lines,
    layout,
    render_overlay,
)
from node.results.sr import build_sr
from node.results.summary import build_summary, summary_lines
from node.results.wording import outcome_explanation, priority_lines
from tests.dicomgen import CR_STORAGE, DX_PRESENTATION, SC_STORAGE, make_dataset
from tests.resultgen import card, flat_frame, study_result
from tests.validators import assert_valid, dsrdump

SOFTWARE = "0.1.0-test"
COMMENT = ("121106", "DCM")
MODEL = "upper-distal-classifier 1.0.0"  # tests.resultgen's deciding card
PRESENT = (
    "upper-distal: fracture PRESENT \u2014 p 0.82 \u2265 0.70, the high-specificity threshold of "
    f"{MODEL} (validation sensitivity 72 %, specificity 95 %)"
)
GUESSED_83 = (
    "wrist, GUESSED FROM THE IMAGE by the region classifier, confidence 83 % \u2014 check the body part"
)
GUESSED_41 = (
    "wrist, GUESSED FROM THE IMAGE by the region classifier, confidence 41 %, below the confidence "
    "threshold \u2014 check the body part"
)
CAPPED = "Worklist priority: positive capped at review (region guessed from the pixels: REVIEW at most)"
VIEWS: tuple[str | None, ...] = ("AP", "PA", "LAT", "OBL", None)
SIDELESS = ("Laterality", "ImageLaterality")
HEADER_REGION = ("BodyPartExamined", "AnatomicRegionSequence", "StudyDescription", "SeriesDescription")


def _code(item: object) -> tuple[str, str]:
    concept = hd.sr.CodedConcept.from_dataset(item) if isinstance(item, Dataset) else item
    assert isinstance(concept, hd.sr.CodedConcept)
    return concept.value, concept.scheme_designator


def _report(path: Path) -> hd.sr.MeasurementReport:
    """The TID 1500 content of the SR at ``path``, read back with highdicom."""
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def _comments(group: Template) -> list[str]:
    return [
        str(item.TextValue)
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT" and _code(item.ConceptNameCodeSequence[0]) == COMMENT
    ]


def _blank(ds: Dataset, keywords: Sequence[str] = (*SIDELESS, *HEADER_REGION)) -> Dataset:
    """``ds`` without the attributes named (no side, nothing naming a region)."""
    for keyword in keywords:
        if keyword in ds:
            del ds[keyword]
    return ds


def _blank_sources(n: int = 2, rows: int = 128, cols: int = 96) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [
        _blank(
            make_dataset(
                study_uid=study, series_uid=series, instance_number=i + 1, seed=i, rows=rows, cols=cols
            )
        )
        for i in range(n)
    ]


def _guessed(routing: Routing, confidence: float, *, low: bool = False, side: str | None = None) -> Routing:
    return replace(
        routing,
        source=RegionSource.IMAGE,
        confidence=confidence,
        laterality=side,
        guess=routing.region,
        guess_confidence=confidence,
        low_confidence=low,
    )


def _with_policy(result: StudyResult) -> StudyResult:
    """The study's priority and notes as the node decides them (inference.priority, defaults)."""
    priority, score = decide_priority(result.groups)
    notes = tuple(priority_notes(result.groups))
    return replace(result, priority=priority, score=score, priority_notes=notes)


def _pixel_routed(sources: Sequence[Dataset], boxes: Sequence[Sequence[Box]] | None = None) -> StudyResult:
    """An upper-distal positive whose images' regions only the image classifier named: image 1 at
    0.83, image 2 at 0.41 (below the minimum, analysed flagged as the setting allows)."""
    result = study_result(sources, boxes=boxes)
    group = result.groups[0]
    routings = [_guessed(group.images[0].routing, 0.83), _guessed(group.images[1].routing, 0.41, low=True)]
    images = tuple(replace(image, routing=r) for image, r in zip(group.images, routings, strict=True))
    return _with_policy(replace(result, groups=(replace(group, images=images),)))


def _by_uid(sources: Sequence[Dataset]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in sources}


def _frames(sources: Sequence[Dataset]) -> dict[tuple[str, int], NDArray[np.float32]]:
    return {(str(ds.SOPInstanceUID), 0): flat_frame(int(ds.Rows), int(ds.Columns)) for ds in sources}


# --- the SR ---------------------------------------------------------------------------------


def test_sr_says_the_region_was_guessed_from_the_pixels(tmp_path: Path) -> None:
    sources = _blank_sources(2)
    boxes = [(Box(10, 20, 40, 60, 0.81),), (Box(5, 6, 25, 30, 0.72),)]
    result = _pixel_routed(sources, boxes)
    assert result.priority_notes == (
        "upper-distal: positive capped at review (region guessed from the pixels: REVIEW at most)",
    )
    path = tmp_path / "sr.dcm"
    build_sr(result, _by_uid(sources), software_version=SOFTWARE).save_as(path, enforce_file_format=True)
    assert_valid(path, "Comprehensive3DSR")
    dsrdump(path)  # parses (it shortens long TEXT values, so the tree is read with highdicom)
    report = _report(path)

    (study_level,) = report.get_image_measurement_groups()
    (evaluation,) = study_level.get_qualitative_evaluations()
    assert _code(evaluation.value) == ("52101004", "SCT")  # Present
    (site,) = study_level.finding_sites
    assert _code(site.value) == ("74670003", "SCT") and site.laterality is None  # no side known
    assert _comments(study_level) == [
        PRESENT,
        f"Finding site determination, image 1: {GUESSED_83}",
        f"Finding site determination, image 2: {GUESSED_41}",
        CAPPED,
    ]
    # Each box group says how its own image's region was decided.
    rois = report.get_planar_roi_measurement_groups()
    assert [_comments(roi) for roi in rois] == [
        [f"Finding site determination: {GUESSED_83}"],
        [f"Finding site determination: {GUESSED_41}"],
    ]


def test_sr_names_a_header_decision_and_an_unused_classifier_answer(tmp_path: Path) -> None:
    """A generic header narrowed by its usual meaning while the classifier's weak answer was not used."""
    sources = _blank_sources(1)
    result = study_result(sources)
    group = result.groups[0]
    routing = replace(
        group.images[0].routing,
        source=RegionSource.DESCRIPTION,
        confidence=0.6,
        guess=Region.FOREARM,
        guess_confidence=0.41,
    )
    result = replace(result, groups=(replace(group, images=(replace(group.images[0], routing=routing),)),))
    path = tmp_path / "sr.dcm"
    build_sr(result, _by_uid(sources), software_version=SOFTWARE).save_as(path, enforce_file_format=True)
    assert_valid(path, "Comprehensive3DSR")
    (study_level,) = _report(path).get_image_measurement_groups()
    assert _comments(study_level) == [
        PRESENT,
        "Finding site determination: wrist, from the header (description keyword), confidence 60 %; "
        "the image classifier said forearm, 41 %, not used",
    ]


# --- the SC ---------------------------------------------------------------------------------


def test_sc_header_says_the_region_was_guessed(tmp_path: Path) -> None:
    sources = _blank_sources(2)
    result = _pixel_routed(sources, [(Box(10, 20, 40, 60, 0.81),), ()])
    frames = _frames(sources)
    overlays = build_overlays(result, _by_uid(sources), frames, software_version=SOFTWARE)
    group = result.groups[0]
    expected_lines = [
        [
            (PRESENT, TEXT_COLOUR),
            ("this image p 0.50; the outcome uses p over all 2 images of the group", TEXT_COLOUR),
            (
                "Region GUESSED FROM THE IMAGE: wrist, 83 % confidence \u2014 check the body part",
                WARNING_COLOUR,
            ),
            (CAPPED, TEXT_COLOUR),
        ],
        [
            (PRESENT, TEXT_COLOUR),
            ("this image p 0.60; the outcome uses p over all 2 images of the group", TEXT_COLOUR),
            (
                "Region GUESSED FROM THE IMAGE: wrist, 41 % confidence, below the confidence threshold "
                "\u2014 check the body part",
                WARNING_COLOUR,
            ),
            (CAPPED, TEXT_COLOUR),
        ],
    ]
    for number, (sc, image, lines) in enumerate(zip(overlays, group.images, expected_lines, strict=True)):
        header = header_lines(group, image, priority_lines(result, group))
        assert header == lines
        # The SC's pixels are exactly these lines rendered: this is the text the renderer got.
        rendered = render_overlay(
            frames[(image.sop_instance_uid, 0)],
            drawn_boxes(image.boxes, card(ModelKind.DETECTOR)),
            header=header,
            footer=[SC_FOOTER],
        )
        path = tmp_path / f"sc{number}.dcm"
        sc.save_as(path, enforce_file_format=True)
        assert_valid(path, "SCImage")
        back = pydicom.dcmread(path)
        np.testing.assert_array_equal(back.pixel_array, rendered.pixels)
        assert back.Laterality == ""  # a limb, side unknown: present and empty (Type 2C)
        band = rendered.pixels[: rendered.frame_top]
        assert np.all(band == np.array(WARNING_COLOUR, dtype=np.uint8), axis=-1).sum() > 200
        Image.fromarray(back.pixel_array).save(tmp_path / f"guessed-{number}.png")


def test_summary_sc_says_the_region_was_guessed() -> None:
    sources = _blank_sources(2)
    lines = summary_lines(_pixel_routed(sources))
    assert (f"    region {GUESSED_83}", WARNING_COLOUR) in lines
    assert (f"    region {GUESSED_41}", WARNING_COLOUR) in lines
    assert (f"    {CAPPED}", TEXT_COLOUR) in lines
    assert (PRESENT, TEXT_COLOUR) in lines


@pytest.mark.parametrize(("rows", "columns"), [(512, 512), (3000, 2500)])
def test_header_stays_legible_at_rendered_sizes(tmp_path: Path, rows: int, columns: int) -> None:
    """The longest header the node writes (pixel guess below threshold, out of group, capped) is
    wrapped inside the canvas: nothing reaches the right-hand padding, the text scales with the
    image, and the band grows instead of covering the picture."""
    sources = _blank_sources(1, rows=rows, cols=columns)
    result = study_result(sources, out_of_group=True, region=Region.ELBOW)
    group = result.groups[0]
    image = replace(group.images[0], routing=_guessed(group.images[0].routing, 0.41, low=True))
    group = replace(group, images=(image,))
    result = _with_policy(replace(result, groups=(group,)))
    header = header_lines(group, image, priority_lines(result, group))
    assert [text for text, _ in header][-1] == (
        "Worklist priority: positive capped at review (read out of group: REVIEW at most)"
    )
    rendered = render_overlay(flat_frame(rows, columns), [], header=header, footer=[SC_FOOTER])
    plan = layout(rows, columns)
    assert rendered.pixels.shape[1] == plan.width  # no wider than the picture
    band = rendered.pixels[: rendered.frame_top]
    text = np.any(band != 0, axis=-1)
    columns_with_text = np.flatnonzero(text.any(axis=0))
    assert columns_with_text.max() < plan.width - plan.pad // 2  # wrapped, not cut at the edge
    assert rendered.frame_top > len(header) * plan.line_height  # more lines than entries: wrapped
    assert plan.font_size >= 20  # readable on a reading-room monitor at fit-to-screen
    picture = rendered.pixels[rendered.frame_top : rendered.frame_top + plan.frame_height]
    assert np.all(picture == 128)  # no text over the image
    Image.fromarray(rendered.pixels).save(tmp_path / f"header-{rows}x{columns}.png")


# --- outcome wording ------------------------------------------------------------------------


def _group(outcome: Outcome, probability: float, **card_changes: object) -> GroupResult:
    group = study_result(_blank_sources(1), outcome=outcome, probability=probability).groups[0]
    deciding = replace(group.models[0], **card_changes)  # type: ignore[arg-type]
    return replace(group, models=(deciding, *group.models[1:]))


@pytest.mark.parametrize(
    ("outcome", "probability", "changes", "words"),
    [
        (Outcome.POSITIVE, 0.82, {}, PRESENT.removeprefix("upper-distal: ")),
        (
            Outcome.POSSIBLE,
            0.45,
            {},
            "fracture POSSIBLE \u2014 p 0.45 \u2265 0.30, the high-sensitivity threshold of "
            f"{MODEL} (validation sensitivity 95 %, specificity 55 %); below 0.70, its high-specificity "
            "threshold",
        ),
        (
            Outcome.NEGATIVE,
            0.12,
            {},
            "no fracture found \u2014 p 0.12 below 0.30, the high-sensitivity threshold of "
            f"{MODEL} (validation sensitivity 95 %, specificity 55 %)",
        ),
        (  # printed to the decimals that keep the comparison true
            Outcome.POSSIBLE,
            0.6996,
            {},
            "fracture POSSIBLE \u2014 p 0.6996 \u2265 0.3000, the high-sensitivity threshold of "
            f"{MODEL} (validation sensitivity 95 %, specificity 55 %); below 0.7000, its "
            "high-specificity threshold",
        ),
        (  # an uncalibrated card decides at the even-chance default and has no figures to quote
            Outcome.POSITIVE,
            0.62,
            {"operating_points": ()},
            "fracture PRESENT \u2014 p 0.62 \u2265 0.50, the default threshold of "
            f"{MODEL}, which has no high-specificity operating point (no validation figures)",
        ),
    ],
)
def test_outcome_names_the_threshold_and_validation_figures(
    outcome: Outcome, probability: float, changes: dict[str, object], words: str
) -> None:
    group = _group(outcome, probability, **changes)
    assert outcome_explanation(group) == words
    assert header_lines(group, group.images[0])[0] == (f"upper-distal: {words}", TEXT_COLOUR)


def test_not_analysed_group_gives_its_reason() -> None:
    group = study_result(_blank_sources(1), outcome=Outcome.NOT_ANALYSED, probability=None).groups[0]
    assert outcome_explanation(group) == "not analysed: no model for this group"


# --- dciodvfy on every object, sources without a side ---------------------------------------


def _rgb(ds: Dataset) -> Dataset:
    """``ds`` as 8-bit RGB (a scanned film or a screen capture sent as a radiograph)."""
    grey = (ds.pixel_array >> 4).astype(np.uint8)
    ds.PixelData = np.ascontiguousarray(np.stack([grey] * 3, axis=-1)).tobytes()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    return _blank(
        ds, ("WindowCenter", "WindowWidth", "PresentationLUTShape", "RescaleSlope", "RescaleIntercept")
    )


def _sideless_study(sop_class: str, photometric: str) -> list[Dataset]:
    """One source per view (the last without ViewPosition), none naming a side or a region."""
    study, series = generate_uid(), generate_uid()
    out: list[Dataset] = []
    for number, view in enumerate(VIEWS):
        ds = make_dataset(
            sop_class=pydicom.uid.UID(sop_class),
            photometric="MONOCHROME2" if photometric == "RGB" else photometric,
            rows=64,
            cols=48,
            view=view or "",
            study_uid=study,
            series_uid=series,
            instance_number=number + 1,
            seed=number,
        )
        _blank(ds, (*SIDELESS, *HEADER_REGION, "ViewCodeSequence", *(() if view else ("ViewPosition",))))
        out.append(_rgb(ds) if photometric == "RGB" else ds)
    return out


def _objects(sources: Sequence[Dataset]) -> tuple[StudyResult, list[Dataset]]:
    """Every kind of object the node creates, for a pixel-routed result over ``sources``: the
    routed side is unknown for all images but one "L" and one "B" (not a series value)."""
    result = study_result(sources, boxes=[(Box(5, 5, 20, 30, 0.81),)] * len(sources))
    group = result.groups[0]
    sides = ["L", "B", None, None, None]
    images = tuple(
        replace(image, routing=replace(_guessed(image.routing, 0.83, side=side), view=view))
        for image, side, view in zip(group.images, sides, VIEWS, strict=True)
    )
    result = _with_policy(replace(result, groups=(replace(group, images=images),)))
    by_uid = _by_uid(sources)
    frames = _frames(sources)
    heat = {key: np.zeros((*frame.shape, 3), dtype=np.uint8) for key, frame in frames.items()}
    objects: list[Dataset] = [
        build_sr(result, by_uid, software_version=SOFTWARE),
        *build_overlays(result, by_uid, frames, software_version=SOFTWARE),
        *build_overlays(result, by_uid, frames, software_version=SOFTWARE, transfer_syntax="jpeg-baseline"),
        build_summary(result, by_uid, software_version=SOFTWARE),
        *build_gsps(result, by_uid, software_version=SOFTWARE),
        *build_gradcam_scs(result, by_uid, heat, software_version=SOFTWARE),
    ]
    return result, objects


SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
CSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.2"


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2", "RGB"])
@pytest.mark.parametrize("sop_class", [CR_STORAGE, DX_PRESENTATION, SC_STORAGE], ids=["CR", "DX", "SC"])
def test_every_object_validates_for_sources_without_a_side(
    tmp_path: Path, sop_class: str, photometric: str
) -> None:
    sources = _sideless_study(sop_class, photometric)
    _, objects = _objects(sources)
    n = len(sources)
    kinds = [str(ds.SOPClassUID) for ds in objects]
    state = CSPS_CLASS if photometric == "RGB" else GSPS_CLASS
    assert kinds == [SR_CLASS, *[SC_CLASS] * (2 * n + 1), *[state] * n, *[SC_CLASS] * n]
    for number, ds in enumerate(objects):
        path = tmp_path / f"{number:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert_valid(path)  # no "Error" line from dciodvfy
        if str(ds.SOPClassUID) != SR_CLASS:
            assert "Laterality" in ds, f"object {number} ({ds.SOPClassUID.name}) has no Laterality"
    # Per image: the routed side where it is a series value (L), else present and empty.
    per_image = [objects[1 : 1 + n], objects[1 + 2 * n + 1 :][:n], objects[-n:]]
    for series in per_image:
        assert [ds.Laterality for ds in series] == ["L", "", "", "", ""]
    assert objects[1 + 2 * n].Laterality == ""  # the summary: the images disagree


# --- the whole chain on a real CR with its header blanked ------------------------------------


@pytest.fixture(scope="module")
def bundled_models() -> Iterator[object]:
    from node.modelset import load_model_set

    models = load_model_set(None)
    if models.region_model is None:
        pytest.skip("no bundled region classifier")
    yield models


def test_real_cr_with_a_blank_header_says_how_its_region_was_guessed(
    tmp_path: Path, rg3_files: dict[str, Path], bundled_models: object
) -> None:
    from prometheus_client import CollectorRegistry

    from inference.routing import BelowMinimum, load_keywords
    from node.analysis import AnalysisConfig, analyse_study
    from node.metrics import Metrics
    from node.modelset import ModelSet
    from node.outputs import OutputConfig, build_objects

    assert isinstance(bundled_models, ModelSet)
    source = _blank(
        pydicom.dcmread(rg3_files["RG3_UNCR"]),
        (*SIDELESS, *HEADER_REGION, "ViewPosition", "ProtocolName", "RequestedProcedureDescription"),
    )
    path = tmp_path / "blank.dcm"
    source.save_as(path, enforce_file_format=True)
    analysis = analyse_study(
        str(source.StudyInstanceUID),
        1,
        [path],
        models=bundled_models,
        keywords=load_keywords(None),
        config=AnalysisConfig(below_minimum=BelowMinimum.ANALYSE_FLAGGED, gradcam=True),
        metrics=Metrics(CollectorRegistry()),
    )
    result = analysis.result
    assert len(result.groups) == 1, f"the region classifier's guess was not analysed: {result}"
    (group,) = result.groups
    (image,) = group.images
    routing = image.routing
    assert routing.source is RegionSource.IMAGE and routing.guess == routing.region
    pct = f"{round(100 * routing.confidence)} %"
    below = ", below the confidence threshold" if routing.low_confidence else ""

    objects = build_objects(
        analysis,
        OutputConfig(
            directory=tmp_path, software_version=SOFTWARE, destinations=(), summary_sc=True, gsps=True
        ),
    )
    for number, ds in enumerate(objects):
        written = tmp_path / f"out{number}.dcm"
        ds.save_as(written, enforce_file_format=True)
        assert_valid(written)
    sr, overlay = objects[0], objects[1]
    (study_level,) = _report(tmp_path / "out0.dcm").get_image_measurement_groups()
    comments = _comments(study_level)
    assert comments[0] == f"{group.group}: {outcome_explanation(group)}"
    assert (
        f"Finding site determination: {routing.region}, GUESSED FROM THE IMAGE by the region classifier, "
        f"confidence {pct}{below} \u2014 check the body part"
    ) in comments
    header = header_lines(group, image, priority_lines(result, group))
    guessed = f"Region GUESSED FROM THE IMAGE: {routing.region}, {pct} confidence{below}"
    assert (f"{guessed} \u2014 check the body part", WARNING_COLOUR) in header
    assert all(f"Worklist priority: {note.split(': ', 1)[1]}" in comments for note in result.priority_notes)
    assert str(sr.SOPClassUID) == SR_CLASS and overlay.Laterality == ""
    Image.fromarray(pydicom.dcmread(tmp_path / "out1.dcm").pixel_array).save(tmp_path / "rg3-blank.png")
