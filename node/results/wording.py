"""How the result objects word a group's outcome and an image's routing, in one place.

The SR (TEXT comments), the overlay Secondary Capture (its header band), the GSPS (its text
layer) and the study summary all say the same thing in the same words:

- the outcome with the operating point behind it, read from the deciding model card
  (``GroupResult.models[0]``, whose ``operating_points`` decided it, see
  :mod:`inference.decision`): "fracture PRESENT — p 0.82 ≥ 0.70, the high-specificity
  threshold of wrist-net 1.0.0 (validation sensitivity 72 %, specificity 95 %)";
- how each image's region was decided (:class:`inference.values.RegionSource`) and with what
  confidence, in capitals when it was only guessed from the pixels: "Region GUESSED FROM THE
  IMAGE: wrist, 83 % confidence — check the body part";
- the study's priority notes (:mod:`inference.priority`) that concern a group: "Worklist
  priority: positive capped at review (read out of group: REVIEW at most)".

Pure functions over the frozen result values; no DICOM, no errors of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

from inference.decision import UNCALIBRATED_THRESHOLD
from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard
from inference.values import GroupResult, Outcome, RegionSource, Routing, StudyResult

OUTCOME_WORDS = {
    Outcome.POSITIVE: "fracture PRESENT",
    Outcome.POSSIBLE: "fracture POSSIBLE",
    Outcome.NEGATIVE: "no fracture found",
    Outcome.NOT_ANALYSED: "not analysed",
}

# The operating point each outcome is decided at when the group does not name one.
_POINT_OF_OUTCOME = {
    Outcome.POSITIVE: HIGH_SPECIFICITY,
    Outcome.POSSIBLE: HIGH_SENSITIVITY,
    Outcome.NEGATIVE: HIGH_SENSITIVITY,
}

# Where a header-based decision was read, as a radiologist would name it.
HEADER_WORDS = {
    RegionSource.BODY_PART: "Body Part Examined",
    RegionSource.ANATOMIC_CODE: "anatomic region code",
    RegionSource.DESCRIPTION: "description keyword",
}

CHECK_BODY_PART = "check the body part"
BELOW_THRESHOLD = "below the confidence threshold"
GUESSED = "GUESSED FROM THE IMAGE"


def point_words(name: str) -> str:
    """``high_specificity`` -> ``high-specificity``; ``youden`` -> ``Youden``."""
    return "Youden" if name == "youden" else name.replace("_", "-")


def percent(value: float) -> str:
    """A fraction as a whole percentage: 0.834 -> ``83 %``."""
    return f"{round(100.0 * value)} %"


def decimals(value: float, *thresholds: float) -> int:
    """2, or as many more decimals (up to 6) as it takes for ``value`` and every threshold, so
    printed, to compare as the real numbers do (p 0.6996 is not "0.70 below 0.70")."""
    for places in (2, 3, 4, 5, 6):
        if all((round(value, places) >= round(t, places)) == (value >= t) for t in thresholds):
            return places
    return 6


def _model(card: ModelCard) -> str:
    return f"{card.name} {card.version}"


def _threshold_clause(card: ModelCard, name: str) -> tuple[float, str]:
    """(threshold, "the <point> threshold of <model> (validation ...)") for point ``name``."""
    point = card.operating_point(name)
    if point is None:
        return UNCALIBRATED_THRESHOLD, (
            f"the default threshold of {_model(card)}, which has no {point_words(name)} "
            "operating point (no validation figures)"
        )
    return point.threshold, (
        f"the {point_words(point.name)} threshold of {_model(card)} (validation sensitivity "
        f"{percent(point.sensitivity)}, specificity {percent(point.specificity)})"
    )


def outcome_explanation(group: GroupResult) -> str:
    """The group's outcome and the operating point behind it, for the SC header and the SR.

    - POSITIVE: "fracture PRESENT — p 0.82 ≥ 0.70, the high-specificity threshold of M 1.0.0
      (validation sensitivity 72 %, specificity 95 %)"
    - POSSIBLE: "fracture POSSIBLE — p 0.45 ≥ 0.30, the high-sensitivity threshold of M 1.0.0
      (validation sensitivity 95 %, specificity 55 %); below 0.70, its high-specificity threshold"
    - NEGATIVE: "no fracture found — p 0.12 below 0.30, the high-sensitivity threshold of M 1.0.0
      (validation sensitivity 95 %, specificity 55 %)"
    - NOT_ANALYSED: "not analysed: <reason>"

    ``p`` is the group's probability (aggregated over its images); the card is the deciding
    one, ``group.models[0]``.
    """
    words = OUTCOME_WORDS[group.outcome]
    if group.outcome is Outcome.NOT_ANALYSED:
        return f"{words}: {group.reason or 'no reason recorded'}"
    if group.probability is None or not group.models:
        return words
    card = group.models[0]
    name = group.operating_point or _POINT_OF_OUTCOME[group.outcome]
    threshold, clause = _threshold_clause(card, name)
    strict = card.operating_point(HIGH_SPECIFICITY) if group.outcome is Outcome.POSSIBLE else None
    places = decimals(group.probability, threshold, *([strict.threshold] if strict is not None else []))
    relation = "below" if group.outcome is Outcome.NEGATIVE else "\u2265"
    text = f"{words} \u2014 p {group.probability:.{places}f} {relation} {threshold:.{places}f}, {clause}"
    if strict is not None:
        text += f"; below {strict.threshold:.{places}f}, its high-specificity threshold"
    return text


def guessed(routing: Routing) -> bool:
    """The region came from the image classifier alone: the reader should check it."""
    return routing.source is RegionSource.IMAGE


def region_line(routing: Routing) -> str:
    """How one image's region was decided, as the SC header says it.

    "Region: wrist (from the header: Body Part Examined; routing confidence 95 %)", or, from
    the pixels, "Region GUESSED FROM THE IMAGE: wrist, 83 % confidence — check the body part"
    (", below the confidence threshold" before the dash when it was analysed on a weak guess).
    """
    region = str(routing.region)
    if guessed(routing):
        below = f", {BELOW_THRESHOLD}" if routing.low_confidence else ""
        return (
            f"Region {GUESSED}: {region}, {percent(routing.confidence)} confidence{below} "
            f"\u2014 {CHECK_BODY_PART}"
        )
    where = HEADER_WORDS.get(routing.source)
    if where is None:
        return f"Region: {region} (no header, code, description or image classifier named it)"
    return f"Region: {region} (from the header: {where}; routing confidence {percent(routing.confidence)})"


def site_determination(routing: Routing) -> str:
    """How one image's region was decided, as the SR's "Finding site determination" says it.

    "wrist, from the header (Body Part Examined), confidence 95 %"; from the pixels "wrist,
    GUESSED FROM THE IMAGE by the region classifier, confidence 83 % — check the body part";
    when the classifier was asked but not followed, its answer is added ("the image classifier
    said forearm, 41 %, not used").
    """
    region = str(routing.region)
    if guessed(routing):
        below = f", {BELOW_THRESHOLD}" if routing.low_confidence else ""
        return (
            f"{region}, {GUESSED} by the region classifier, confidence {percent(routing.confidence)}"
            f"{below} \u2014 {CHECK_BODY_PART}"
        )
    where = HEADER_WORDS.get(routing.source)
    text = (
        f"{region}, from the header ({where}), confidence {percent(routing.confidence)}"
        if where is not None
        else f"{region}, named by no header, code, description or image classifier"
    )
    if routing.guess is not None and routing.guess_confidence is not None:
        text += f"; the image classifier said {routing.guess}, {percent(routing.guess_confidence)}, not used"
    return text


def site_determinations(routings: Sequence[Routing]) -> list[str]:
    """One "Finding site determination: ..." text per distinct decision among ``routings``.

    When every image was decided alike the text names no image; otherwise each text names its
    images by their 1-based number in ``routings`` (the numbering the SR's other comments use).
    """
    by_text: dict[str, list[int]] = {}
    for number, routing in enumerate(routings, start=1):
        by_text.setdefault(site_determination(routing), []).append(number)
    if len(by_text) == 1:
        (text,) = by_text
        return [f"Finding site determination: {text}"]
    out: list[str] = []
    for text, numbers in by_text.items():
        label = "image" if len(numbers) == 1 else "images"
        out.append(f"Finding site determination, {label} {', '.join(map(str, numbers))}: {text}")
    return out


def priority_lines(result: StudyResult, group: GroupResult) -> list[str]:
    """The study's priority notes about ``group`` (inference.priority writes "<group>: <note>"),
    as "Worklist priority: <note>"."""
    prefix = f"{group.group}: "
    return [
        f"Worklist priority: {note.removeprefix(prefix)}"
        for note in result.priority_notes
        if note.startswith(prefix)
    ]
