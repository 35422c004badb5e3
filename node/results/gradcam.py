"""Grad-CAM heat maps as an extra Secondary Capture series (setting ``export.gradcam_sc``).

One RGB SC per analysed image whose group has a classifier: the enhanced source image with the
classifier's Grad-CAM map blended over it (``inference.evaluation.gradcam``), so a reviewer can
see where the model looked — the zero-shot study found failures driven by text labels and image
borders. Same patient and study, its own series, UIDs derived like every other result object.
The pixels carry no text, so BurnedInAnnotation is NO.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from inference.values import StudyResult
from node.results.common import GRADCAM_SERIES_NUMBER, source_of
from node.results.overlay import analysed_images, derived_sc
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
        sc = derived_sc(
            source,
            image,
            group,
            np.ascontiguousarray(overlays[key]),
            series_uid=series_uid,
            series_number=GRADCAM_SERIES_NUMBER,
            sop_uid=result_uid(
                result.study_instance_uid, versions, result.revision, Role.GRADCAM_INSTANCE, index
            ),
            instance_number=index + 1,
            series_description=GRADCAM_SERIES_DESCRIPTION,
            derivation=(
                f"Grad-CAM map of the {group.group} classifier over the source image; not for diagnostic use"
            ),
            burned_in_annotation=False,  # a heat map, no text
            software_version=software_version,
        )
        out.append(sc)
        index += 1
    return out
