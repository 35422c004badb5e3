"""The optional Grayscale Softcopy Presentation State: the boxes as vector graphics (PS3.3 A.33.1).

One GSPS per analysed source frame (setting ``export.gsps``), so a viewer that applies
presentation states draws the boxes over the original pixels instead of a burned-in copy:

- layer ``AI_POSITIVE`` (red): boxes past the detector's high-specificity point;
- layer ``AI_POSSIBLE`` (amber): boxes past its high-sensitivity point only;
- layer ``AI_TEXT``: each box's probability next to it, and the outcome line (with the
  out-of-group warning) in the image's top left corner, in display units.

Boxes are closed POLYLINEs in source pixels, the same coordinates as the SR's image regions.
The source's VOI window is kept; a MONOCHROME1 source gets an INVERSE presentation LUT so it is
shown the way its modality meant. Series Laterality is set, which a paired body part needs.

Errors: :class:`node.results.common.ResultBuildError` and its subclasses (see there).
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
from highdicom.color import CIELabColor
from pydicom.dataset import Dataset

from inference.values import StudyResult
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

POSITIVE_LAYER = "AI_POSITIVE"
POSSIBLE_LAYER = "AI_POSSIBLE"
TEXT_LAYER = "AI_TEXT"


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
    """One GSPS per analysed image frame of ``result`` that has boxes to show or an outcome to state."""
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
        header = " | ".join(text for text, _ in header_lines(group, image))
        texts.append(
            hd.pr.TextObject(
                text_value=header[:1024],
                units=hd.pr.AnnotationUnitsValues.DISPLAY,
                bounding_box=(0.01, 0.01, 0.99, 0.08),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[source],
                graphic_layer=layers[TEXT_LAYER],
                referenced_frame_number=frame,
                text_objects=texts,
            )
        )
        inverse = source.get("PhotometricInterpretation") == "MONOCHROME1"
        gsps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[source],
            series_instance_uid=series_uid,
            series_number=GSPS_SERIES_NUMBER,
            sop_instance_uid=result_uid(
                result.study_instance_uid, versions, result.revision, Role.GSPS_INSTANCE, index
            ),
            instance_number=index + 1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=software_version,
            device_serial_number="",
            content_label="FRACTURE_AI",
            content_description="AI fracture boxes; not for diagnostic use",
            graphic_annotations=annotations,
            graphic_layers=[layers[name] for name in (POSITIVE_LAYER, POSSIBLE_LAYER, TEXT_LAYER)],
            presentation_lut_transformation=hd.PresentationLUTTransformation(
                presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
                if inverse
                else hd.PresentationLUTShapeValues.IDENTITY
            ),
            contributing_equipment=model_equipment(group.models),
            series_description=SERIES_DESCRIPTION,
            specific_character_set=CHARACTER_SET,
        )
        side = laterality_of(source, image)
        if side is not None:
            gsps.Laterality = side
        out.append(gsps)
    return out
