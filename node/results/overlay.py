"""Secondary Capture overlays: each analysed radiograph with the model's boxes burned in.

One RGB Secondary Capture (highdicom ``SCImage.from_ref_dataset``: same patient and study as the
source, a new series) per analysed source frame. The picture is the windowed source frame, grey,
between a header band and a footer band so no text covers anatomy:

- each box drawn solid when its probability passes the localiser's high-specificity point, dashed
  when it passes only the high-sensitivity point (boxes below both are not drawn), with its
  probability next to it; the localiser is the group's map model (its box operating points),
  else its detector;
- a header (:func:`header_lines`, worded by :mod:`node.results.wording`): the group outcome with
  the operating point behind it (threshold, model, validation sensitivity and specificity), the
  image's own probability, how the image's region was decided and with what confidence (in
  amber and in capitals when only the image classifier named it), the out-of-group warning and
  the study's priority note for the group when it applies;
- a footer "AI result - not for diagnostic use" (with an em dash) and a legend of the line styles.

BurnedInAnnotation is YES: the text is part of the pixels (PS3.3 C.7.6.1.1.11). The transfer
syntax is a setting: explicit VR little endian (RGB), JPEG-LS lossless (RGB) or JPEG baseline,
which PS3.5 8.2.1 wants as YBR_FULL_422. Small images are enlarged (nearest neighbour, by an
integer factor) so the text fits; box coordinates are scaled with them. Header lines are wrapped
to the canvas width, never cut.

Laterality (0020,0060) is Type 2C in the General Series module (PS3.3 C.7.3.1): required for a
paired body part when Image Laterality is absent (the SC carries none). Every analysed
region is a limb, so it is always written: the source's side, else the routed one, and empty
(known to be paired, side unknown) when neither names R or L.

Errors: :class:`node.results.common.ResultBuildError` and its subclasses (see there), plus
:class:`MissingFrameError` when the windowed pixels of an analysed frame are not passed in.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless

from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard
from inference.values import Box, GroupResult, ImageResult, StudyResult
from node.results.common import (
    CHARACTER_SET,
    MANUFACTURER,
    SC_FOOTER,
    SC_SERIES_NUMBER,
    SERIES_DESCRIPTION,
    ResultBuildError,
    detector_of,
    frame_numbers,
    is_analysed,
    model_equipment,
    source_of,
)
from node.results.uids import Role, model_versions, result_uid
from node.results.wording import guessed, outcome_explanation, priority_lines, region_line

ScSyntax = Literal["explicit", "jpeg-ls", "jpeg-baseline"]

# Transfer syntax and the photometric interpretation its encoder needs.
SC_SYNTAXES: Mapping[str, tuple[UID, str]] = {
    "explicit": (ExplicitVRLittleEndian, "RGB"),
    "jpeg-ls": (JPEGLSLossless, "RGB"),
    "jpeg-baseline": (JPEGBaseline8Bit, "YBR_FULL_422"),
}

POSITIVE_COLOUR = (255, 48, 48)
POSSIBLE_COLOUR = (255, 200, 0)
TEXT_COLOUR = (255, 255, 255)
WARNING_COLOUR = (255, 160, 0)
BAND_COLOUR = (0, 0, 0)
MIN_WIDTH = 640  # narrower frames are enlarged so one header line fits


class MissingFrameError(ResultBuildError):
    """An analysed image has no windowed frame in ``frames``."""

    def __init__(self, *, study_instance_uid: str, sop_instance_uid: str, frame: int) -> None:
        super().__init__(
            f"no windowed pixels for instance {sop_instance_uid} frame {frame}",
            study_instance_uid=study_instance_uid,
        )
        self.sop_instance_uid = sop_instance_uid
        self.frame = frame


class LineStyle(StrEnum):
    SOLID = "solid"  # past the high-specificity point
    DASHED = "dashed"  # past the high-sensitivity point only


@dataclass(frozen=True, slots=True)
class DrawnBox:
    """A box as it is drawn: source-pixel coordinates, probability and line style."""

    box: Box
    style: LineStyle


def build_overlays(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    frames: Mapping[tuple[str, int], NDArray[np.float32]],
    *,
    software_version: str,
    transfer_syntax: str = "explicit",
) -> list[Dataset]:
    """One Secondary Capture per analysed image frame of ``result``, in group then image order.

    ``frames`` maps (SOP Instance UID, 0-based frame) to the windowed frame: float32, rows x
    columns, values in [0, 1], MONOCHROME2 (0 is black). ``transfer_syntax`` is "explicit",
    "jpeg-ls" or "jpeg-baseline".
    """
    syntax, photometric = sc_syntax(transfer_syntax)
    versions = model_versions(result)
    series_uid = result_uid(result.study_instance_uid, versions, result.revision, Role.SC_SERIES)
    out: list[Dataset] = []
    for index, (group, image) in enumerate(analysed_images(result)):
        source = source_of(result, sources, image.sop_instance_uid)
        key = (image.sop_instance_uid, image.frame)
        if key not in frames:
            raise MissingFrameError(
                study_instance_uid=result.study_instance_uid,
                sop_instance_uid=image.sop_instance_uid,
                frame=image.frame,
            )
        rgb = render_overlay(
            frames[key],
            drawn_boxes(image.boxes, detector_of(group.models)),
            header=header_lines(group, image, priority_lines(result, group)),
            footer=[SC_FOOTER],
        ).pixels
        sc = derived_sc(
            source,
            image,
            group,
            rgb,
            series_uid=series_uid,
            series_number=SC_SERIES_NUMBER,
            sop_uid=result_uid(result.study_instance_uid, versions, result.revision, Role.SC_INSTANCE, index),
            instance_number=index + 1,
            series_description=SERIES_DESCRIPTION,
            derivation=(
                f"Windowed source image with fracture AI annotations ({group.group}); not for diagnostic use"
            ),
            burned_in_annotation=True,
            software_version=software_version,
            photometric=photometric,
            syntax=syntax,
        )
        out.append(sc)
    return out


def derived_sc(
    source: Dataset,
    image: ImageResult,
    group: GroupResult,
    rgb: NDArray[np.uint8],
    *,
    series_uid: str,
    series_number: int,
    sop_uid: str,
    instance_number: int,
    series_description: str,
    derivation: str,
    burned_in_annotation: bool,
    software_version: str,
    photometric: str = "RGB",
    syntax: UID = ExplicitVRLittleEndian,
) -> Dataset:
    """An RGB Secondary Capture derived from one source frame: same patient and study, a new
    series, the source referenced (with its frame), the group's models as contributing equipment."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=photometric,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # replaced by the source's value below
        laterality=laterality_of(source, image),  # Type 2C: emptied below when unknown
        transfer_syntax_uid=syntax,
        contributing_equipment=model_equipment(group.models),
        series_description=series_description,
        specific_character_set=CHARACTER_SET,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_version,
    )
    # Rows and columns keep the source's directions (bands are added above and below only).
    sc.PatientOrientation = source.get("PatientOrientation", "")
    if "Laterality" not in sc:
        sc.Laterality = ""  # a limb is paired: present, empty when the side is unknown
    sc.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
    sc.DerivationDescription = derivation
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    numbers = frame_numbers(source, image.frame)
    if numbers is not None:
        reference.ReferencedFrameNumber = numbers
    sc.SourceImageSequence = [reference]
    return sc


def analysed_images(result: StudyResult) -> Iterator[tuple[GroupResult, ImageResult]]:
    """(group, image) for every image a model read: it has a probability and no error."""
    for group in result.groups:
        for image in group.images:
            if is_analysed(image):
                yield group, image


def drawn_boxes(boxes: Sequence[Box], detector: ModelCard | None) -> list[DrawnBox]:
    """The boxes worth drawing and their style, from the localiser's box thresholds.

    A detector's boxes are held to its operating points, a map model's to its box operating
    points (:meth:`inference.modelcard.ModelCard.box_threshold`).

    Without a high-specificity point every box is drawn dashed (none is a firm call); without a
    high-sensitivity point, every box that does not pass high specificity is drawn dashed.
    """
    strict = detector.box_threshold(HIGH_SPECIFICITY) if detector is not None else None
    loose = detector.box_threshold(HIGH_SENSITIVITY) if detector is not None else None
    drawn: list[DrawnBox] = []
    for box in boxes:
        if strict is not None and box.probability >= strict:
            drawn.append(DrawnBox(box, LineStyle.SOLID))
        elif loose is None or box.probability >= loose:
            drawn.append(DrawnBox(box, LineStyle.DASHED))
    return drawn


def header_lines(
    group: GroupResult, image: ImageResult, notes: Sequence[str] = ()
) -> list[tuple[str, tuple[int, int, int]]]:
    """The header text, top to bottom (the renderer wraps each entry to the canvas width):

    1. ``<group>: <outcome explanation>`` (:func:`node.results.wording.outcome_explanation`);
    2. ``this image p 0.50`` and, for a group of several images, that the outcome uses p over all
       of them;
    3. how this image's region was decided (:func:`node.results.wording.region_line`), amber when
       it was guessed from the pixels;
    4. the out-of-group warning, amber, when it applies;
    5. ``notes``: the study's priority notes about this group
       (:func:`node.results.wording.priority_lines`).
    """
    lines: list[tuple[str, tuple[int, int, int]]] = [
        (f"{group.group}: {outcome_explanation(group)}", TEXT_COLOUR)
    ]
    if image.probability is not None:
        text = f"this image p {image.probability:.2f}"
        if len(group.images) > 1:
            text += f"; the outcome uses p over all {len(group.images)} images of the group"
        lines.append((text, TEXT_COLOUR))
    lines.append((region_line(image.routing), WARNING_COLOUR if guessed(image.routing) else TEXT_COLOUR))
    if group.out_of_group:
        lines.append(
            (
                f"WARNING: {image.routing.region} read by the {group.group} model (out of group, "
                "accuracy not validated)",
                WARNING_COLOUR,
            )
        )
    lines.extend((note, TEXT_COLOUR) for note in notes)
    return lines


def render_overlay(
    frame: NDArray[np.float32],
    boxes: Sequence[DrawnBox],
    *,
    header: Sequence[tuple[str, tuple[int, int, int]]],
    footer: Sequence[str],
) -> Rendered:
    """The annotated picture (pure: no DICOM involved).

    The frame sits between a header band and a footer band, text wrapped to the frame's width;
    it is enlarged by an integer factor when narrower than ``MIN_WIDTH`` (see :func:`layout`).
    """
    if frame.ndim != 2:
        raise ValueError(f"expected a 2-D windowed frame, got shape {frame.shape}")
    grey = (np.clip(np.nan_to_num(frame, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    plan = layout(grey.shape[0], grey.shape[1])
    font = _font(plan.font_size)
    room = plan.width - 2 * plan.pad
    head = [(line, colour) for text, colour in header for line in _wrap(text, font, room)]
    foot_texts = [*footer, LEGEND] if boxes else list(footer)
    foot = [line for text in foot_texts for line in _wrap(text, font, room)]
    top = 2 * plan.pad + len(head) * plan.line_height
    height = top + plan.frame_height + 2 * plan.pad + len(foot) * plan.line_height

    picture = Image.fromarray(grey, mode="L")
    if plan.scale > 1:
        picture = picture.resize((plan.width, plan.frame_height), Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (plan.width, height), BAND_COLOUR)
    canvas.paste(picture.convert("RGB"), (0, top))
    draw = ImageDraw.Draw(canvas)

    for drawn in boxes:
        colour = POSITIVE_COLOUR if drawn.style == LineStyle.SOLID else POSSIBLE_COLOUR
        corners = (
            drawn.box.x0 * plan.scale,
            drawn.box.y0 * plan.scale + top,
            drawn.box.x1 * plan.scale,
            drawn.box.y1 * plan.scale + top,
        )
        outline = (corners[0], corners[1], corners[2] - 1, corners[3] - 1)
        if drawn.style == LineStyle.SOLID:
            draw.rectangle(outline, outline=colour, width=plan.line)
        else:
            _dashed_rectangle(draw, outline, colour, plan.line)
        _label(draw, f"{drawn.box.probability:.2f}", corners, colour, font, plan, top)

    y = plan.pad
    for text, colour in head:
        draw.text((plan.pad, y), text, fill=colour, font=font)
        y += plan.line_height
    y = top + plan.frame_height + plan.pad
    for text in foot:
        draw.text((plan.pad, y), text, fill=TEXT_COLOUR, font=font)
        y += plan.line_height
    return Rendered(np.asarray(canvas, dtype=np.uint8), frame_top=top, scale=plan.scale)


@dataclass(frozen=True, slots=True)
class Rendered:
    """The overlay's pixels and where the source frame sits in them."""

    pixels: NDArray[np.uint8]  # rows x columns x 3, RGB
    frame_top: int  # canvas row of the frame's first row
    scale: int  # canvas pixels per source pixel

    def canvas_point(self, x: float, y: float) -> tuple[int, int]:
        """Canvas (column, row) of source point (x, y)."""
        return int(x * self.scale), int(y * self.scale) + self.frame_top


def render_text_card(
    lines: Sequence[tuple[str, tuple[int, int, int]]], *, width: int = 1024
) -> NDArray[np.uint8]:
    """Lines of text on black, wrapped to ``width`` pixels (the study summary's picture)."""
    plan = layout(width, width)
    font = _font(plan.font_size)
    wrapped = [(line, colour) for text, colour in lines for line in _wrap(text, font, width - 2 * plan.pad)]
    height = 2 * plan.pad + max(1, len(wrapped)) * plan.line_height
    canvas = Image.new("RGB", (width, height), BAND_COLOUR)
    draw = ImageDraw.Draw(canvas)
    for number, (text, colour) in enumerate(wrapped):
        draw.text((plan.pad, plan.pad + number * plan.line_height), text, fill=colour, font=font)
    return np.asarray(canvas, dtype=np.uint8)


LEGEND = "solid: past the high-specificity point; dashed: past the high-sensitivity point only"


@dataclass(frozen=True, slots=True)
class Layout:
    scale: int  # integer enlargement of the frame
    font_size: int
    line: int  # box line width in canvas pixels
    pad: int
    line_height: int
    width: int  # canvas width = enlarged frame width
    frame_height: int  # enlarged frame height


def layout(rows: int, columns: int) -> Layout:
    """Sizes that scale with the image: text about 2 % of the longer side, lines about 0.3 %."""
    scale = max(1, math.ceil(MIN_WIDTH / max(columns, 1)))
    width, height = columns * scale, rows * scale
    longer = max(width, height)
    font_size = min(72, max(14, round(longer * 0.02)))
    return Layout(
        scale=scale,
        font_size=font_size,
        line=max(2, round(longer * 0.003)),
        pad=max(4, font_size // 3),
        line_height=round(font_size * 1.3),
        width=width,
        frame_height=height,
    )


def _dashed_rectangle(
    draw: ImageDraw.ImageDraw,
    corners: tuple[float, float, float, float],
    colour: tuple[int, int, int],
    width: int,
) -> None:
    x0, y0, x1, y1 = corners
    dash, gap = 4 * width, 3 * width
    for start, end in (
        ((x0, y0), (x1, y0)),
        ((x1, y0), (x1, y1)),
        ((x1, y1), (x0, y1)),
        ((x0, y1), (x0, y0)),
    ):
        length = math.hypot(end[0] - start[0], end[1] - start[1])
        if length == 0:
            continue
        ux, uy = (end[0] - start[0]) / length, (end[1] - start[1]) / length
        position = 0.0
        while position < length:
            stop = min(position + dash, length)
            draw.line(
                (
                    start[0] + ux * position,
                    start[1] + uy * position,
                    start[0] + ux * stop,
                    start[1] + uy * stop,
                ),
                fill=colour,
                width=width,
            )
            position = stop + gap


def _label(
    draw: ImageDraw.ImageDraw,
    text: str,
    box: tuple[float, float, float, float],
    colour: tuple[int, int, int],
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    plan: Layout,
    frame_top: int,
) -> None:
    """The probability just above the box, or just inside its top edge when there is no room."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    x = min(max(box[0], 0), plan.width - w - 2)
    y = box[1] - h - plan.line - 2
    if y < frame_top:
        y = box[1] + plan.line + 2
    draw.rectangle((x - 1, y - 1, x + w + 1, y + h + 1), fill=BAND_COLOUR)
    draw.text((x - left, y - top), text, fill=colour, font=font)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a long word is cut).

    Leading spaces indent every line of the paragraph; an empty text is one empty line.
    """
    indent = text[: len(text) - len(text.lstrip(" "))]
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else indent + word
        if font.getlength(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = indent + word
        while font.getlength(current) > width and len(current) > len(indent) + 1:
            cut = len(current) - 1
            while cut > len(indent) + 1 and font.getlength(current[:cut]) > width:
                cut -= 1
            lines.append(current[:cut])
            current = indent + current[cut:]
    return lines if current == "" and lines else [*lines, current]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans Bold from matplotlib (a dependency): it has the em dash that Pillow's font lacks."""
    path = _dejavu()
    if path is not None:
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size=size)


def _dejavu() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(list(spec.submodule_search_locations)[0])
    path = package / "mpl-data" / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
    return path if path.is_file() else None


def sc_syntax(transfer_syntax: str) -> tuple[UID, str]:
    """Transfer syntax UID and photometric interpretation for an SC syntax setting."""
    if transfer_syntax not in SC_SYNTAXES:
        raise ValueError(f"unknown SC transfer syntax {transfer_syntax!r}; use one of {sorted(SC_SYNTAXES)}")
    return SC_SYNTAXES[transfer_syntax]


def laterality_of(source: Dataset, image: ImageResult) -> str | None:
    """Series laterality for the SC: the source's, else the routed one; only R or L are valid."""
    for value in (source.get("Laterality"), source.get("ImageLaterality"), image.routing.laterality):
        if isinstance(value, str) and value.strip().upper() in ("R", "L"):
            return value.strip().upper()
    return None
