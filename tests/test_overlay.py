"""Secondary Capture overlays: dciodvfy-valid in each transfer syntax, boxes drawn as specified.

Sources are generated DX radiographs (tests.dicomgen) and the pydicom-data RG3 CR; the windowed
frames are what the imaging stage hands over (float32 in [0, 1], MONOCHROME2).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from numpy.typing import NDArray
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless

from inference.modelcard import ModelKind
from inference.regions import Region
from inference.values import Box, Outcome
from node.results.common import SC_FOOTER, SERIES_DESCRIPTION
from node.results.gsps import build_gsps
from node.results.overlay import (
    POSITIVE_COLOUR,
    POSSIBLE_COLOUR,
    WARNING_COLOUR,
    LineStyle,
    MissingFrameError,
    build_overlays,
    drawn_boxes,
    header_lines,
    render_overlay,
)
from node.results.sr import build_sr
from node.results.summary import build_summary, summary_lines
from tests.resultgen import card, flat_frame, frames_of, study_result, wrist_sources
from tests.validators import assert_valid

SOFTWARE = "0.1.0-test"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
GREY = (128, 128, 128)  # flat_frame(0.5) after windowing to 8 bits


@pytest.mark.parametrize(
    ("syntax", "uid", "photometric"),
    [
        ("explicit", ExplicitVRLittleEndian, "RGB"),
        ("jpeg-ls", JPEGLSLossless, "RGB"),
        ("jpeg-baseline", JPEGBaseline8Bit, "YBR_FULL_422"),
    ],
)
def test_overlays_validate_in_each_syntax(tmp_path: Path, syntax: str, uid: str, photometric: str) -> None:
    sources = wrist_sources(2)
    boxes = [(Box(10, 20, 40, 60, 0.81), Box(50, 70, 80, 100, 0.40)), ()]
    result = study_result(sources, boxes=boxes)
    frames = frames_of(sources)
    overlays = build_overlays(
        result,
        {str(ds.SOPInstanceUID): ds for ds in sources},
        frames,
        software_version=SOFTWARE,
        transfer_syntax=syntax,
    )
    assert len(overlays) == 2
    for number, (sc, source) in enumerate(zip(overlays, sources, strict=True), start=1):
        path = tmp_path / f"sc{number}.dcm"
        sc.save_as(path, enforce_file_format=True)
        assert_valid(path, "SCImage")
        back = pydicom.dcmread(path)
        assert back.SOPClassUID == SC_STORAGE
        assert back.file_meta.TransferSyntaxUID == uid
        assert back.PhotometricInterpretation == photometric
        assert back.SamplesPerPixel == 3
        assert back.BurnedInAnnotation == "YES"
        assert back.SeriesDescription == SERIES_DESCRIPTION
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert (back.PatientID, back.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
        assert back.SeriesInstanceUID != source.SeriesInstanceUID
        assert back.SeriesInstanceUID == overlays[0].SeriesInstanceUID
        assert back.InstanceNumber == number
        assert back.Laterality == "R"
        (reference,) = back.SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        device_uids = {item.get("DeviceUID") for item in back.ContributingEquipmentSequence}
        assert {model.device_uid for model in result.groups[0].models} <= device_uids
        image = result.groups[0].images[number - 1]
        expected = render_overlay(
            frames[(image.sop_instance_uid, 0)],
            drawn_boxes(image.boxes, card(ModelKind.DETECTOR)),
            header=header_lines(result.groups[0], image),
            footer=[SC_FOOTER],
        ).pixels
        decoded = back.pixel_array
        assert decoded.shape == expected.shape
        if syntax == "jpeg-baseline":  # lossy, chroma subsampled
            assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 8
        else:
            np.testing.assert_array_equal(decoded, expected)


def _edge(pixels: NDArray[np.uint8], row: int, first: int, last: int) -> NDArray[np.uint8]:
    return pixels[row, first:last]


def _share(pixels: NDArray[np.uint8], colour: tuple[int, int, int]) -> float:
    return float(np.all(pixels == np.array(colour, dtype=np.uint8), axis=-1).mean())


def test_solid_dashed_and_hidden_boxes() -> None:
    detector = card(ModelKind.DETECTOR)  # high sensitivity 0.30, high specificity 0.70
    solid = Box(100, 200, 300, 300, 0.90)
    dashed = Box(100, 450, 300, 550, 0.50)
    hidden = Box(400, 450, 600, 550, 0.10)
    drawn = drawn_boxes([solid, dashed, hidden], detector)
    assert [d.style for d in drawn] == [LineStyle.SOLID, LineStyle.DASHED]
    rendered = render_overlay(flat_frame(700, 700), drawn, header=[("header", (255, 255, 255))], footer=["f"])
    pixels = rendered.pixels
    assert rendered.scale == 1

    def top_edge(box: Box) -> NDArray[np.uint8]:
        x0, y0 = rendered.canvas_point(box.x0, box.y0)
        x1, _ = rendered.canvas_point(box.x1, box.y0)
        return _edge(pixels, y0, x0, x1)

    assert _share(top_edge(solid), POSITIVE_COLOUR) == 1.0
    dashes = _share(top_edge(dashed), POSSIBLE_COLOUR)
    assert 0.45 < dashes < 0.75  # 4 on, 3 off
    assert _share(top_edge(dashed), GREY) == pytest.approx(1.0 - dashes)
    assert _share(top_edge(hidden), GREY) == 1.0
    # Nothing but grey inside the frame away from the boxes and their labels.
    x, y = rendered.canvas_point(500, 100)
    assert tuple(pixels[y, x]) == GREY


def test_probability_label_is_drawn_next_to_the_box() -> None:
    box = Box(200, 300, 400, 400, 0.90)
    drawn = drawn_boxes([box], card(ModelKind.DETECTOR))
    rendered = render_overlay(flat_frame(700, 700), drawn, header=[], footer=[])
    x0, y0 = rendered.canvas_point(box.x0, box.y0)
    above = rendered.pixels[max(rendered.frame_top, y0 - 40) : y0 - 3, x0 : x0 + 80]
    red = np.all(above == np.array(POSITIVE_COLOUR, dtype=np.uint8), axis=-1).sum()
    black = np.all(above == 0, axis=-1).sum()
    assert red > 20 and black > 100  # the red digits of "0.90" on their dark plate
    below = rendered.pixels[y0 + 3 : y0 + 40, x0 + 5 : x0 + 80]
    assert _share(below, GREY) == 1.0  # there was room above: nothing inside the box


def test_header_carries_the_out_of_group_warning() -> None:
    sources = wrist_sources(1)
    inside = study_result(sources).groups[0]
    outside = study_result(sources, out_of_group=True, region=Region.ELBOW).groups[0]
    lines = header_lines(outside, outside.images[0])
    assert lines[0][0].startswith("upper-distal: fracture PRESENT \u2014 p 0.82 \u2265 0.70")
    assert lines[1][0] == "this image p 0.50"
    assert lines[2][0] == "Region: elbow (from the header: Body Part Examined; routing confidence 100 %)"
    assert lines[-1][1] == WARNING_COLOUR and "elbow" in lines[-1][0] and "out of group" in lines[-1][0]
    assert all(colour != WARNING_COLOUR for _, colour in header_lines(inside, inside.images[0]))
    for group, expected in ((outside, True), (inside, False)):
        rendered = render_overlay(
            flat_frame(300, 700), [], header=header_lines(group, group.images[0]), footer=[SC_FOOTER]
        )
        band = rendered.pixels[: rendered.frame_top]
        assert (_share(band, WARNING_COLOUR) > 0) == expected


_MODEL = "upper-distal-classifier 1.0.0"


@pytest.mark.parametrize(
    ("outcome", "probability", "words"),
    [
        (
            Outcome.POSITIVE,
            0.82,
            "fracture PRESENT \u2014 p 0.82 \u2265 0.70, the high-specificity threshold of "
            f"{_MODEL} (validation sensitivity 72 %, specificity 95 %)",
        ),
        (
            Outcome.POSSIBLE,
            0.45,
            "fracture POSSIBLE \u2014 p 0.45 \u2265 0.30, the high-sensitivity threshold of "
            f"{_MODEL} (validation sensitivity 95 %, specificity 55 %); below 0.70, its "
            "high-specificity threshold",
        ),
        (
            Outcome.NEGATIVE,
            0.12,
            "no fracture found \u2014 p 0.12 below 0.30, the high-sensitivity threshold of "
            f"{_MODEL} (validation sensitivity 95 %, specificity 55 %)",
        ),
    ],
)
def test_header_outcome_words(outcome: Outcome, probability: float, words: str) -> None:
    group = study_result(wrist_sources(1), outcome=outcome, probability=probability).groups[0]
    assert header_lines(group, group.images[0])[0][0] == f"upper-distal: {words}"


def test_small_frames_are_enlarged_with_their_boxes() -> None:
    box = Box(10, 20, 40, 60, 0.90)
    rendered = render_overlay(
        flat_frame(128, 96), drawn_boxes([box], card(ModelKind.DETECTOR)), header=[], footer=[SC_FOOTER]
    )
    assert rendered.scale == 7  # ceil(640 / 96)
    assert rendered.pixels.shape[1] == 96 * 7
    x0, y0 = rendered.canvas_point(box.x0, box.y0)
    x1, _ = rendered.canvas_point(box.x1, box.y0)
    assert _share(rendered.pixels[y0, x0:x1], POSITIVE_COLOUR) == 1.0


def test_uids_are_derived_and_distinct_from_the_sr() -> None:
    sources = wrist_sources(2)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    frames = frames_of(sources)
    first = build_overlays(study_result(sources), by_uid, frames, software_version=SOFTWARE)
    again = build_overlays(study_result(sources), by_uid, frames, software_version=SOFTWARE)
    assert [sc.SOPInstanceUID for sc in first] == [sc.SOPInstanceUID for sc in again]
    assert len({sc.SOPInstanceUID for sc in first}) == 2
    sr = build_sr(study_result(sources), by_uid, software_version=SOFTWARE)
    assert sr.SeriesInstanceUID != first[0].SeriesInstanceUID
    assert sr.SOPInstanceUID not in {sc.SOPInstanceUID for sc in first}
    revised = build_overlays(study_result(sources, revision=2), by_uid, frames, software_version=SOFTWARE)
    assert revised[0].SOPInstanceUID != first[0].SOPInstanceUID


def test_images_that_were_not_read_get_no_overlay() -> None:
    sources = wrist_sources(2)
    result = study_result(sources)
    group = result.groups[0]
    failed = replace(group.images[1], probability=None, error="JPEG 2000 decode failed")
    result = replace(result, groups=(replace(group, images=(group.images[0], failed)),))
    frames = frames_of(sources[:1])  # the worker has no pixels for the failed image
    overlays = build_overlays(
        result, {str(ds.SOPInstanceUID): ds for ds in sources}, frames, software_version=SOFTWARE
    )
    assert [sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in overlays] == [
        sources[0].SOPInstanceUID
    ]


def test_missing_frame_is_named() -> None:
    sources = wrist_sources(1)
    with pytest.raises(MissingFrameError) as caught:
        build_overlays(
            study_result(sources), {str(sources[0].SOPInstanceUID): sources[0]}, {}, software_version=SOFTWARE
        )
    assert caught.value.sop_instance_uid == str(sources[0].SOPInstanceUID)
    assert caught.value.frame == 0


def test_unknown_syntax_is_refused() -> None:
    sources = wrist_sources(1)
    with pytest.raises(ValueError, match="jpeg-2000"):
        build_overlays(study_result(sources), {}, {}, software_version=SOFTWARE, transfer_syntax="jpeg-2000")


def test_cr_source_rg3(tmp_path: Path, rg3_files: dict[str, Path]) -> None:
    source = pydicom.dcmread(rg3_files["RG3_UNCR"])
    result = study_result([source], boxes=[(Box(700, 800, 1000, 1150, 0.91),)], region=Region.ANKLE)
    (sc,) = build_overlays(
        result, {str(source.SOPInstanceUID): source}, frames_of([source]), software_version=SOFTWARE
    )
    path = tmp_path / "rg3-sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert_valid(path, "SCImage")
    back = pydicom.dcmread(path)
    assert list(back.PatientOrientation) == ["R", "F"]  # the source's: rows and columns keep direction
    assert back.Laterality == "R"
    assert back.Columns == source.Columns  # 1760 px: no enlargement
    assert back.Rows > source.Rows  # header and footer bands


def test_summary_sc(tmp_path: Path) -> None:
    sources = wrist_sources(2)
    result = study_result(sources, out_of_group=True, region=Region.ELBOW)
    skipped = replace(result.groups[0].images[0], sop_instance_uid="1.2.3.4", error="decode failed")
    result = replace(result, not_analysed=(skipped,))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    summary = build_summary(result, by_uid, software_version=SOFTWARE)
    path = tmp_path / "summary.dcm"
    summary.save_as(path, enforce_file_format=True)
    assert_valid(path, "SCImage")
    back = pydicom.dcmread(path)
    overlays = build_overlays(result, by_uid, frames_of(sources), software_version=SOFTWARE)
    assert back.SeriesInstanceUID == overlays[0].SeriesInstanceUID
    assert back.InstanceNumber == len(overlays) + 1
    assert back.SOPInstanceUID not in {sc.SOPInstanceUID for sc in overlays}
    assert back.BurnedInAnnotation == "YES" and back.Laterality == "R"
    lines = summary_lines(result)
    texts = [text for text, _ in lines]
    assert texts[2] == (
        "upper-distal: fracture PRESENT \u2014 p 0.82 \u2265 0.70, the high-specificity threshold of "
        "upper-distal-classifier 1.0.0 (validation sensitivity 72 %, specificity 95 %)"
    )
    assert texts[3] == "    regions elbow; 2 image(s), 0 box(es)"
    assert texts[4] == "    region elbow, from the header (Body Part Examined), confidence 100 %"
    assert [text for text, colour in lines if colour == WARNING_COLOUR] == [
        "    WARNING: out of group - read by the upper-distal model, not validated there"
    ]
    assert "Not analysed: 1 image(s)" in texts and "    decode failed" in texts
    assert texts[-1] == SC_FOOTER
    assert back.pixel_array.shape[1] == 1024


def _annotations(gsps: pydicom.Dataset) -> dict[str, pydicom.Dataset]:
    return {item.GraphicLayer: item for item in gsps.GraphicAnnotationSequence}


def test_gsps_carries_the_boxes(tmp_path: Path) -> None:
    sources = wrist_sources(1)
    solid, dashed, hidden = Box(10, 20, 40, 60, 0.81), Box(50, 70, 80, 100, 0.40), Box(5, 5, 9, 9, 0.1)
    result = study_result(sources, boxes=[(solid, dashed, hidden)], out_of_group=True, region=Region.ELBOW)
    (gsps,) = build_gsps(result, {str(sources[0].SOPInstanceUID): sources[0]}, software_version=SOFTWARE)
    path = tmp_path / "gsps.dcm"
    gsps.save_as(path, enforce_file_format=True)
    assert_valid(path, "GrayscaleSoftcopyPresentationState")
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    assert back.Laterality == "R" and back.PresentationLUTShape == "IDENTITY"
    assert back.SeriesDescription == SERIES_DESCRIPTION
    referenced = back.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert referenced.ReferencedSOPInstanceUID == sources[0].SOPInstanceUID
    layers = _annotations(back)
    assert set(layers) == {"AI_POSITIVE", "AI_POSSIBLE", "AI_TEXT"}
    for layer, box in (("AI_POSITIVE", solid), ("AI_POSSIBLE", dashed)):
        (graphic,) = layers[layer].GraphicObjectSequence
        assert graphic.GraphicType == "POLYLINE" and graphic.GraphicAnnotationUnits == "PIXEL"
        np.testing.assert_allclose(
            np.reshape(graphic.GraphicData, (-1, 2)),
            [[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1], [box.x0, box.y0]],
        )
    texts = [item.UnformattedTextValue for item in layers["AI_TEXT"].TextObjectSequence]
    assert texts[:2] == ["0.81", "0.40"]  # the hidden box has no label either
    assert texts[2].startswith("upper-distal: fracture PRESENT \u2014 p 0.82")
    assert any("out of group" in text for text in texts[3:])
    boxes = [item.BoundingBoxTopLeftHandCorner[1] for item in layers["AI_TEXT"].TextObjectSequence[2:]]
    assert boxes == sorted(boxes) and len(set(boxes)) == len(boxes)  # one line each, top down


def test_gsps_on_a_monochrome1_cr(tmp_path: Path, rg3_files: dict[str, Path]) -> None:
    source = pydicom.dcmread(rg3_files["RG3_UNCR"])
    result = study_result([source], boxes=[(Box(700, 800, 1000, 1150, 0.91),)], region=Region.ANKLE)
    (gsps,) = build_gsps(result, {str(source.SOPInstanceUID): source}, software_version=SOFTWARE)
    path = tmp_path / "gsps-cr.dcm"
    gsps.save_as(path, enforce_file_format=True)
    assert_valid(path, "GrayscaleSoftcopyPresentationState")
    assert gsps.PresentationLUTShape == "INVERSE"  # MONOCHROME1 shown as its modality meant
