"""Grad-CAM heat maps as an extra Secondary Capture series (setting ``export.gradcam_sc``).

One RGB SC per analysed image whose group has a classifier: the enhanced source image with the
classifier's Grad-CAM map blended over it (``inference.evaluation.gradcam``), so a reviewer can
see where the model looked — the zero-shot study found failures driven by text labels and image
borders. Same patient and study, its own series, UIDs derived like every other result object.
The pixels carry no text, so BurnedInAnnotation is NO.
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from inference.values import StudyResult
from node.results.common import (
    CHARACTER_SET,
    GRADCAM_SERIES_NUMBER,
    MANUFACTURER,
    frame_numbers,
    model_equipment,
    source_of,
)
from node.results.overlay import analysed_images, laterality_of
from node.results.uids import Role, model_versions, result_uid

GRADCAM_SERIES_DESCRIPTION = "AI fracture analysis \u2014 Grad-CAM \u2014 not for diagnostic use"


def build_gradcam_scs(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    overlays: Mapping[tuple[str, int], NDArray[np.uint8]],
    *,
    software_version: str,
) -> list[Dataset]:
    """One SC per (SOP Instance UID, frame) in ``overlays`` (rows x columns x 3, uint8 RGB)."""
    versions = model_versions(result)
    series_uid = result_uid(result.study_instance_uid, versions, result.revision, Role.GRADCAM_SERIES)
    out: list[Dataset] = []
    index = 0
    for group, image in analysed_images(result):
        key = (image.sop_instance_uid, image.frame)
        if key not in overlays:
            continue
        source = source_of(result, sources, image.sop_instance_uid)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=np.ascontiguousarray(overlays[key]),
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=GRADCAM_SERIES_NUMBER,
            sop_instance_uid=result_uid(
                result.study_instance_uid, versions, result.revision, Role.GRADCAM_INSTANCE, index
            ),
            instance_number=index + 1,
            manufacturer=MANUFACTURER,
            patient_orientation=("L", "F"),  # replaced by the source's value below
            laterality=laterality_of(source, image),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=model_equipment(group.models),
            series_description=GRADCAM_SERIES_DESCRIPTION,
            specific_character_set=CHARACTER_SET,
            manufacturer_model_name=MANUFACTURER,
            software_versions=software_version,
        )
        sc.PatientOrientation = source.get("PatientOrientation", "")
        sc.BurnedInAnnotation = "NO"
        sc.DerivationDescription = (
            f"Grad-CAM map of the {group.group} classifier over the source image; not for diagnostic use"
        )
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        numbers = frame_numbers(source, image.frame)
        if numbers is not None:
            reference.ReferencedFrameNumber = numbers
        sc.SourceImageSequence = [reference]
        out.append(sc)
        index += 1
    return out
