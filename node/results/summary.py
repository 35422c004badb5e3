"""The optional study summary: one Secondary Capture that a PACS user reads at a glance.

A text card in the overlay series (setting ``export.summary_sc``): each anatomical group's
outcome with the operating point behind it (:func:`node.results.wording.outcome_explanation`),
its regions, image and box counts, how its images' regions were decided (amber when guessed
from the pixels), the out-of-group warning, the study's priority notes, the images not analysed
and why, the models and their versions, and the footer "AI result - not for diagnostic use".
Same patient and study as the sources; BurnedInAnnotation YES; Laterality (Type 2C, PS3.3
C.7.3.1) the one side every image shows, else present and empty.

Errors: :class:`node.results.common.ResultBuildError` and its subclasses (see there).
"""

from __future__ import annotations

from collections.abc import Mapping

import highdicom as hd
from pydicom.dataset import Dataset

from inference.values import StudyResult
from node.results.common import (
    CHARACTER_SET,
    MANUFACTURER,
    SC_FOOTER,
    SC_SERIES_NUMBER,
    SERIES_DESCRIPTION,
    evidence_of,
    model_equipment,
    unique_cards,
)
from node.results.overlay import (
    TEXT_COLOUR,
    WARNING_COLOUR,
    analysed_images,
    render_text_card,
    sc_syntax,
)
from node.results.uids import Role, model_versions, result_uid
from node.results.wording import guessed, outcome_explanation, priority_lines, site_determination

Line = tuple[str, tuple[int, int, int]]


def summary_lines(result: StudyResult) -> list[Line]:
    """The card's text, top to bottom (no patient data: the PACS shows that around it)."""
    lines: list[Line] = [
        ("fracnode \u2014 AI fracture analysis of this study", TEXT_COLOUR),
        ("", TEXT_COLOUR),
    ]
    for group in result.groups:
        lines.append((f"{group.group}: {outcome_explanation(group)}", TEXT_COLOUR))
        details = ["regions " + ", ".join(str(region) for region in group.regions)]
        boxes = sum(len(image.boxes) for image in group.images)
        details.append(f"{len(group.images)} image(s), {boxes} box(es)")
        lines.append(("    " + "; ".join(details), TEXT_COLOUR))
        decided: dict[str, bool] = {}
        for image in group.images:
            decided.setdefault(site_determination(image.routing), guessed(image.routing))
        lines.extend(
            (f"    region {text}", WARNING_COLOUR if pixels else TEXT_COLOUR)
            for text, pixels in decided.items()
        )
        if group.out_of_group:
            lines.append(
                (
                    f"    WARNING: out of group - read by the {group.group} model, not validated there",
                    WARNING_COLOUR,
                )
            )
        lines.extend((f"    {note}", TEXT_COLOUR) for note in priority_lines(result, group))
    if result.not_analysed:
        lines.append((f"Not analysed: {len(result.not_analysed)} image(s)", TEXT_COLOUR))
        reasons = sorted(
            {image.error or image.routing.reason or "no reason recorded" for image in result.not_analysed}
        )
        lines.extend((f"    {reason}", TEXT_COLOUR) for reason in reasons)
    cards = unique_cards(card for group in result.groups for card in group.models)
    if cards:
        lines.append(("", TEXT_COLOUR))
        lines.append(("Models: " + ", ".join(f"{c.name} {c.version}" for c in cards), TEXT_COLOUR))
    lines.extend([("", TEXT_COLOUR), (SC_FOOTER, TEXT_COLOUR)])
    return lines


def build_summary(
    result: StudyResult,
    sources: Mapping[str, Dataset],
    *,
    software_version: str,
    transfer_syntax: str = "explicit",
) -> Dataset:
    """The summary Secondary Capture of ``result``, last instance of the overlay series."""
    syntax, photometric = sc_syntax(transfer_syntax)
    versions = model_versions(result)
    reference = evidence_of(result, sources)[0]
    cards = unique_cards(card for group in result.groups for card in group.models)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=render_text_card(summary_lines(result)),
        photometric_interpretation=photometric,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_uid(result.study_instance_uid, versions, result.revision, Role.SC_SERIES),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(
            result.study_instance_uid, versions, result.revision, Role.SUMMARY_INSTANCE
        ),
        instance_number=len(list(analysed_images(result))) + 1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # replaced below: a text card has no patient orientation
        transfer_syntax_uid=syntax,
        contributing_equipment=model_equipment(cards),
        series_description=SERIES_DESCRIPTION,
        specific_character_set=CHARACTER_SET,
        manufacturer_model_name=MANUFACTURER,
        software_versions=software_version,
    )
    sc.PatientOrientation = []  # type 2: present and empty
    # Type 2C for a paired body part (PS3.3 C.7.3.1): the one side every image shows, else empty.
    sides = {image.routing.laterality for group in result.groups for image in group.images}
    side = next(iter(sides)) if len(sides) == 1 else None
    sc.Laterality = side if side in ("L", "R") and side is not None else ""
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = "Summary of the fracture AI result of this study; not for diagnostic use"
    return sc
