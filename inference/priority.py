"""Worklist priority of a study from its group outcomes, and the never-downgrade rule.

A study is:

- ``URGENT`` when any group is positive (at or above its high-specificity operating point) and
  that group's evidence is strong (:class:`PriorityPolicy`: read in group, region not guessed
  from the pixels alone, a model with proven discrimination),
- ``REVIEW`` when any group is possible (at or above its high-sensitivity point only), or
  positive on weak evidence,
- ``ROUTINE`` when every analysed group is negative,
- ``NOT_ANALYSED`` when no group could be analysed; :func:`not_analysed_reason` says why.

The outcome of each group is decided by the aggregation at the operating points of the group's
model card; this module only ranks outcomes, so the thresholds live in one place. Groups that
were not analysed do not lower a study that has analysed groups: a negative wrist beside an
unreadable skull is ROUTINE (the skull image is listed in the study's ``not_analysed``).

The score orders studies within one priority: the highest calibrated probability over the
analysed groups, ``None`` when nothing was analysed.

Once a priority has been signalled (DIMSE priority, HL7 ORU, worklist), a later revision may
raise it but never silently lower it: :func:`signal_decision` keeps the signalled priority and
tells the caller not to push the lower one, which is recorded instead.

Pure functions, no errors of their own beyond ``ValueError`` for a probability outside [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from inference.modelcard import ModelCard, ModelKind
from inference.values import PRIORITY_ORDER, GroupResult, ImageResult, Outcome, Priority, RegionSource

_PRIORITY_OF_OUTCOME: dict[Outcome, Priority] = {
    Outcome.POSITIVE: Priority.URGENT,
    Outcome.POSSIBLE: Priority.REVIEW,
    Outcome.NEGATIVE: Priority.ROUTINE,
    Outcome.NOT_ANALYSED: Priority.NOT_ANALYSED,
}

NO_IMAGES = "no images"


def priority_rank(priority: Priority) -> int:
    """0 for the most urgent priority, increasing towards NOT_ANALYSED (``PRIORITY_ORDER``)."""
    return PRIORITY_ORDER.index(priority)


@dataclass(frozen=True, slots=True)
class PriorityPolicy:
    """How far weak evidence may raise a study (settings ``[priority]``; docs/operations.md).

    - ``cap_out_of_group``: a group read by a model of another group (a region without its own
      model) raises the study to REVIEW at most, never URGENT.
    - ``cap_pixel_guessed``: the same for a group whose region only the image classifier named
      (no header, code or description did).
    - A model without proven discrimination (:func:`unproven`: its validation AUROC interval
      contains 0.5) never raises a study above ROUTINE; the node refuses such models unless
      ``models.allow_unproven`` is set, and this is the second line of that guard.
    """

    cap_out_of_group: bool = True
    cap_pixel_guessed: bool = True


DEFAULT_POLICY = PriorityPolicy()


def unproven(card: ModelCard) -> str | None:
    """Why a fracture model has no proven discrimination: its validation AUROC 95 % interval
    contains 0.5; ``None`` otherwise. A card without an interval is not judged (a site's own
    package before ``fracnode calibrate`` wrote one). The node's package guard and the priority
    policy share this rule."""
    if card.kind is ModelKind.REGION:
        return None
    interval = card.auroc_interval()
    if interval is None:
        return None
    low, high = interval
    if low <= 0.5 <= high:
        return f"its validation AUROC 95 % interval [{low:.3f}, {high:.3f}] contains 0.5 (chance)"
    return None


def proven(card: ModelCard) -> bool:
    return unproven(card) is None


def priority_cap(group: GroupResult, policy: PriorityPolicy = DEFAULT_POLICY) -> tuple[Priority, str | None]:
    """The most urgent priority ``group`` may give its study, and why it is capped (or None)."""
    deciding = group.models[0] if group.models else None
    if deciding is not None and not proven(deciding):
        return Priority.ROUTINE, f"model {deciding.name} is not proven to discriminate: cannot raise priority"
    if policy.cap_out_of_group and group.out_of_group:
        return Priority.REVIEW, "read out of group: REVIEW at most"
    if policy.cap_pixel_guessed and group.images and all(
        image.routing.source is RegionSource.IMAGE for image in group.images
    ):
        return Priority.REVIEW, "region guessed from the pixels: REVIEW at most"
    return Priority.URGENT, None


def group_priority(group: GroupResult, policy: PriorityPolicy = DEFAULT_POLICY) -> Priority:
    """The priority one group gives its study: its outcome's, within its cap."""
    wanted = _PRIORITY_OF_OUTCOME[group.outcome]
    if wanted is Priority.NOT_ANALYSED:
        return wanted
    cap, _ = priority_cap(group, policy)
    return cap if priority_rank(wanted) < priority_rank(cap) else wanted


def priority_notes(
    result_groups: Iterable[GroupResult], policy: PriorityPolicy = DEFAULT_POLICY
) -> list[str]:
    """One line per group whose outcome was capped by the policy (for the SR, SC and API)."""
    notes = []
    for group in result_groups:
        if group_priority(group, policy) is not _PRIORITY_OF_OUTCOME[group.outcome]:
            _, why = priority_cap(group, policy)
            notes.append(f"{group.group}: {group.outcome} capped at {group_priority(group, policy)} ({why})")
    return notes


def decide_priority(
    result_groups: Iterable[GroupResult], policy: PriorityPolicy = DEFAULT_POLICY
) -> tuple[Priority, float | None]:
    """Return ``(priority, score)`` for a study whose groups have these results."""
    priority = Priority.NOT_ANALYSED
    score: float | None = None
    for group in result_groups:
        candidate = group_priority(group, policy)
        if priority_rank(candidate) < priority_rank(priority):
            priority = candidate
        if group.outcome is Outcome.NOT_ANALYSED or group.probability is None:
            continue
        if not 0.0 <= group.probability <= 1.0:
            raise ValueError(f"group {group.group} has probability {group.probability} outside [0, 1]")
        score = group.probability if score is None else max(score, group.probability)
    return priority, score


def not_analysed_reason(
    result_groups: Sequence[GroupResult], not_analysed: Sequence[ImageResult]
) -> str | None:
    """Why a study is NOT_ANALYSED: its distinct reasons joined by "; ", ``None`` if it was analysed.

    Reasons come from the groups (e.g. no model installed) and from the images routed nowhere
    (region other/unknown, decode failure), in the order first met.
    """
    if decide_priority(result_groups)[0] is not Priority.NOT_ANALYSED:
        return None
    reasons: list[str] = []
    for group in result_groups:
        _add_reason(reasons, group.reason)
        for image in group.images:
            _add_reason(reasons, image.error or image.routing.reason)
    for image in not_analysed:
        _add_reason(reasons, image.error or image.routing.reason)
    if not reasons:
        return NO_IMAGES if not result_groups and not not_analysed else "not analysed"
    return "; ".join(reasons)


def _add_reason(reasons: list[str], reason: str | None) -> None:
    if reason and reason not in reasons:
        reasons.append(reason)


def signal_decision(previous_signalled: Priority | None, new: Priority) -> tuple[bool, Priority]:
    """Return ``(signal, effective)`` for a new revision's priority.

    ``signal`` is True when ``new`` should be pushed to the reading room (first result, same
    priority again, or a raise); ``effective`` is what the worklist shows. A lower priority than
    the one already signalled is not pushed and the signalled one stays effective: the caller
    records the lower priority and score with the revision, so the change is visible, not silent.
    """
    if previous_signalled is None or priority_rank(new) <= priority_rank(previous_signalled):
        return True, new
    return False, previous_signalled
