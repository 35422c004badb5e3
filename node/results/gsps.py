"""The optional Grayscale Softcopy Presentation State: the boxes as vector graphics (PS3.3 A.33.1).

One GSPS per analysed source frame (setting ``export.gsps``), so a viewer that applies
presentation states draws the boxes over the original pixels instead of a burned-in copy:

- layer ``AI_POSITIVE`` (red): boxes past the detector's high-specificity point;
- layer ``AI_POSSIBLE`` (amber): boxes past its high-sensitivity point only;
- layer ``AI_TEXT``: each box's probability next to it, and the overlay's header lines
  (:func:`node.results.overlay.header_lines`: outcome and operating point, image probability,
  how the region was decided, out-of-group warning, priority note), one text object per line
  from the image's top left corner down, in display units.

Boxes are closed POLYLINEs in source pixels, the same coordinates as the SR's image regions.
The source's VOI window is kept; a MONOCHROME1 source gets an INVERSE presentation LUT so it is
shown the way its modality meant. A colour source (three samples per pixel: RGB or YBR, which the
node reads as grey) cannot be referenced by a grayscale presentation state: it gets a Color
Softcopy Presentation State (PS3.3 A.34) with the same layers and the sRGB v4 ICC profile that
highdicom ships (the node reads colour pixels as sRGB; the checked source view carries no
profile of its own).

Laterality (0020,0060), Type 2C in General Series (PS3.3 C.7.3.1), is always written because
every analysed region is a paired limb: the source's side, else the routed one, else empty.

Errors: :class:`node.results.common.ResultBuildError` and its subclasses (see there).
"""

from __future__ import annotations

import functools
import pkgutil
from collections.abc import Mapping

import highdicom as hd
from highdicom.color import CIELabColor
from pydicom.dataset import Dataset

from inference.values import StudyResult
from node import received
from node.results.common import (
    CHARACTER_SET,
    GSPS_SERIES_NUMBER,
    MANUFACTURER,
    SERIES_DESCRIPTION,
    detector_of,
    frame_numbers,
    model_equipment,
    source_of,
)
from node.results.overlay import LineStyle, analysed_images, drawn_boxes, header_lines, laterality_of
from node.results.sr import box_polyline
from node.results.uids import Role, model_versions, result_uid
from node.results.wording import priority_lines

POSITIVE_LAYER = "AI_POSITIVE"
POSSIBLE_LAYER = "AI_POSSIBLE"
TEXT_LAYER = "AI_TEXT"
CONTENT_LABEL = "FRACTURE_AI"
LINE_HEIGHT = 0.045  # display units per header line: one text object per line, top down
CONTENT_DESCRIPTION = "AI fracture boxes; not for diagnostic use"


def _layers() -> dict[str, hd.pr.GraphicLayer]:
    return {
        POSITIVE_LAYER: hd.pr.GraphicLayer(
            POSITIVE_LAYER, 1, "Fracture boxes past the high-specificity point", CIELabColor(53.0, 78.0, 62.0)
        ),
        POSSIBLE_LAYER: hd.pr.GraphicLayer(
            POSSIBLE_LAYER,
            2,
            "Fracture boxes past the high-sensitivity point only",
            CIELabColor(84.0, 7.0, 85.0),
        ),
        TEXT_LAYER: hd.pr.GraphicLayer(
            TEXT_LAYER, 3, "AI outcome and probabilities", CIELabColor(100.0, 0.0, 0.0)
        ),
    }


def build_gsps(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    *,
    software_version: str,
) -> list[Dataset]:
    """One presentation state per analysed image frame of ``result`` (grayscale, or colour for a
    colour source): its boxes and the outcome as the overlay's header words it."""
    versions = model_versions(result)
    series_uid = result_uid(result.study_instance_uid, versions, result.revision, Role.GSPS_SERIES)
    layers = _layers()
    out: list[Dataset] = []
    for index, (group, image) in enumerate(analysed_images(result)):
        source = source_of(result, sources, image.sop_instance_uid)
        numbers = frame_numbers(source, image.frame)
        frame = numbers[0] if numbers else None
        annotations: list[hd.pr.GraphicAnnotation] = []
        drawn = drawn_boxes(image.boxes, detector_of(group.models))
        for style, layer in ((LineStyle.SOLID, POSITIVE_LAYER), (LineStyle.DASHED, POSSIBLE_LAYER)):
            objects = [
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=box_polyline(d.box),
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                )
                for d in drawn
                if d.style == style
            ]
            if objects:
                annotations.append(
                    hd.pr.GraphicAnnotation(
                        referenced_images=[source],
                        graphic_layer=layers[layer],
                        referenced_frame_number=frame,
                        graphic_objects=objects,
                    )
                )
        texts = [
            hd.pr.TextObject(
                text_value=f"{d.box.probability:.2f}",
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                anchor_point=(float(d.box.x0), float(d.box.y0)),
                anchor_point_visible=False,
            )
            for d in drawn
        ]
        header = header_lines(group, image, priority_lines(result, group))
        texts.extend(
            hd.pr.TextObject(
                text_value=text[:1024],
                units=hd.pr.AnnotationUnitsValues.DISPLAY,
                bounding_box=(0.01, 0.01 + row * LINE_HEIGHT, 0.99, 0.01 + (row + 1) * LINE_HEIGHT),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
            for row, (text, _) in enumerate(header)
        )
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[source],
                graphic_layer=layers[TEXT_LAYER],
                referenced_frame_number=frame,
                text_objects=texts,
            )
        )
        state = _presentation_state(
            source,
            annotations,
            [layers[name] for name in (POSITIVE_LAYER, POSSIBLE_LAYER, TEXT_LAYER)],
            series_uid=series_uid,
            sop_uid=result_uid(
                result.study_instance_uid, versions, result.revision, Role.GSPS_INSTANCE, index
            ),
            instance_number=index + 1,
            software_version=software_version,
            equipment=model_equipment(group.models),
        )
        state.Laterality = laterality_of(source, image) or ""
        out.append(state)
    return out


def _presentation_state(
    source: Dataset,
    annotations: list[hd.pr.GraphicAnnotation],
    layers: list[hd.pr.GraphicLayer],
    *,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    software_version: str,
    equipment: list[hd.ContributingEquipment],
) -> Dataset:
    """A Color Softcopy Presentation State for a colour source, else a Grayscale one whose
    presentation LUT shows a MONOCHROME1 source inverted, as its modality meant."""
    if received.integer(source, "SamplesPerPixel") == 3:
        return hd.pr.ColorSoftcopyPresentationState(
            referenced_images=[source],
            series_instance_uid=series_uid,
            series_number=GSPS_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=software_version,
            device_serial_number="",
            content_label=CONTENT_LABEL,
            content_description=CONTENT_DESCRIPTION,
            graphic_annotations=annotations,
            graphic_layers=layers,
            contributing_equipment=equipment,
            series_description=SERIES_DESCRIPTION,
            specific_character_set=CHARACTER_SET,
            icc_profile=_srgb_profile(),
        )
    inverse = source.get("PhotometricInterpretation") == "MONOCHROME1"
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=series_uid,
        series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_version,
        device_serial_number="",
        content_label=CONTENT_LABEL,
        content_description=CONTENT_DESCRIPTION,
        graphic_annotations=annotations,
        graphic_layers=layers,
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
            if inverse
            else hd.PresentationLUTShapeValues.IDENTITY
        ),
        contributing_equipment=equipment,
        series_description=SERIES_DESCRIPTION,
        specific_character_set=CHARACTER_SET,
    )


@functools.cache
def _srgb_profile() -> bytes:
    """The ICC's sRGB v4 colour-space ("spac") profile that highdicom ships and uses as its own
    default for pseudo-colour presentation states; PS3.3 C.11.15.1.1 wants an input or colour
    space profile, so a monitor profile such as Little CMS's built-in sRGB does not do."""
    data = pkgutil.get_data("highdicom", "_icc_profiles/sRGB_v4_ICC_preference.icc")
    if data is None:
        raise RuntimeError("highdicom's sRGB ICC profile is missing from its installation")
    return data
