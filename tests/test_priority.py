"""Worklist priority: outcome ranking, score, reasons and the never-downgrade rule."""

from __future__ import annotations

import itertools

import pytest

from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY
from inference.priority import (
    NO_IMAGES,
    decide_priority,
    not_analysed_reason,
    priority_rank,
    signal_decision,
)
from inference.regions import AnatomicalGroup, Region
from inference.values import (
    PRIORITY_ORDER,
    GroupResult,
    ImageResult,
    Outcome,
    Priority,
    RegionSource,
    Routing,
)

G = AnatomicalGroup


def group(
    name: AnatomicalGroup, outcome: Outcome, probability: float | None, reason: str | None = None
) -> GroupResult:
    point = {Outcome.POSITIVE: HIGH_SPECIFICITY, Outcome.POSSIBLE: HIGH_SENSITIVITY}.get(outcome)
    return GroupResult(
        group=name,
        outcome=outcome,
        probability=probability,
        operating_point=point,
        regions=(Region.WRIST,),
        out_of_group=False,
        models=(),
        images=(),
        reason=reason,
    )


def unrouted(uid: str, region: Region, reason: str | None, error: str | None = None) -> ImageResult:
    routing = Routing(region, RegionSource.BODY_PART, 1.0, None, None, None, False, reason)
    return ImageResult(sop_instance_uid=uid, frame=0, routing=routing, probability=None, error=error)


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        ((Outcome.POSITIVE,), Priority.URGENT),
        ((Outcome.NEGATIVE, Outcome.POSITIVE), Priority.URGENT),
        ((Outcome.POSSIBLE, Outcome.POSITIVE, Outcome.NEGATIVE), Priority.URGENT),
        ((Outcome.POSSIBLE,), Priority.REVIEW),
        ((Outcome.NEGATIVE, Outcome.POSSIBLE), Priority.REVIEW),
        ((Outcome.NOT_ANALYSED, Outcome.POSSIBLE), Priority.REVIEW),
        ((Outcome.NEGATIVE,), Priority.ROUTINE),
        ((Outcome.NEGATIVE, Outcome.NEGATIVE), Priority.ROUTINE),
        ((Outcome.NOT_ANALYSED, Outcome.NEGATIVE), Priority.ROUTINE),
        ((Outcome.NOT_ANALYSED,), Priority.NOT_ANALYSED),
        ((), Priority.NOT_ANALYSED),
    ],
)
def test_most_urgent_group_outcome_decides(outcomes: tuple[Outcome, ...], expected: Priority) -> None:
    groups = [
        group(name, outcome, None if outcome is Outcome.NOT_ANALYSED else 0.5)
        for name, outcome in zip(G, outcomes, strict=False)
    ]
    assert decide_priority(groups)[0] is expected
    # The order the groups come in does not matter.
    assert decide_priority(reversed(groups))[0] is expected


def test_score_is_highest_probability_of_analysed_groups() -> None:
    groups = [
        group(G.UPPER_DISTAL, Outcome.NEGATIVE, 0.12),
        group(G.LOWER_DISTAL, Outcome.POSSIBLE, 0.41),
        group(G.UPPER_MIDDLE, Outcome.NOT_ANALYSED, None, reason="no model"),
    ]
    assert decide_priority(groups) == (Priority.REVIEW, 0.41)
    nothing = [group(G.UPPER_DISTAL, Outcome.NOT_ANALYSED, None)]
    assert decide_priority(nothing) == (Priority.NOT_ANALYSED, None)


def test_probability_outside_unit_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        decide_priority([group(G.UPPER_DISTAL, Outcome.POSITIVE, 1.5)])


def test_not_analysed_reason_collects_distinct_reasons() -> None:
    groups = [group(G.UPPER_PROXIMAL, Outcome.NOT_ANALYSED, None, reason="no model for group")]
    images = [
        unrouted("1.2.3.1", Region.OTHER, "region other"),
        unrouted("1.2.3.2", Region.OTHER, "region other"),
        unrouted("1.2.3.3", Region.UNKNOWN, None, error="pixel data cannot be decoded"),
    ]
    assert not_analysed_reason(groups, images) == (
        "no model for group; region other; pixel data cannot be decoded"
    )
    assert not_analysed_reason([], []) == NO_IMAGES
    analysed = [group(G.UPPER_DISTAL, Outcome.NEGATIVE, 0.1)]
    assert not_analysed_reason(analysed, images) is None


def test_rank_follows_priority_order() -> None:
    assert [priority_rank(p) for p in PRIORITY_ORDER] == [0, 1, 2, 3]
    assert priority_rank(Priority.URGENT) < priority_rank(Priority.NOT_ANALYSED)


def test_first_result_is_signalled() -> None:
    for new in Priority:
        assert signal_decision(None, new) == (True, new)


def test_raise_is_signalled_and_lowering_is_withheld() -> None:
    assert signal_decision(Priority.ROUTINE, Priority.URGENT) == (True, Priority.URGENT)
    assert signal_decision(Priority.REVIEW, Priority.URGENT) == (True, Priority.URGENT)
    assert signal_decision(Priority.NOT_ANALYSED, Priority.ROUTINE) == (True, Priority.ROUTINE)
    assert signal_decision(Priority.URGENT, Priority.ROUTINE) == (False, Priority.URGENT)
    assert signal_decision(Priority.URGENT, Priority.REVIEW) == (False, Priority.URGENT)
    assert signal_decision(Priority.REVIEW, Priority.NOT_ANALYSED) == (False, Priority.REVIEW)
    assert signal_decision(Priority.REVIEW, Priority.REVIEW) == (True, Priority.REVIEW)


def test_no_sequence_of_revisions_ever_lowers_the_effective_priority() -> None:
    for revisions in itertools.product(list(Priority), repeat=4):
        signalled: Priority | None = None
        for new in revisions:
            signal, effective = signal_decision(signalled, new)
            if signalled is not None:
                assert priority_rank(effective) <= priority_rank(signalled)
            assert signal == (effective is new)
            if signal:
                signalled = new
        assert signalled is not None
        assert priority_rank(signalled) == min(priority_rank(p) for p in revisions)


# -- the policy: weak evidence cannot make a study URGENT ------------------------------------

from dataclasses import replace  # noqa: E402

from inference.modelcard import ModelCard, ModelKind  # noqa: E402
from inference.priority import DEFAULT_POLICY, PriorityPolicy, priority_notes, proven  # noqa: E402

PROVEN = ModelCard(
    "wrist", "1", "1.2.3.4", ModelKind.CLASSIFIER, "mobilenet_v3_small", G.UPPER_DISTAL, (Region.WRIST,), 256,
    validation_metrics={"auroc": 0.83, "auroc_ci": [0.76, 0.90]},
)
CHANCE = replace(PROVEN, name="chance", validation_metrics={"auroc": 0.51, "auroc_ci": [0.42, 0.60]})


def read(
    outcome: Outcome,
    *,
    card: ModelCard = PROVEN,
    out_of_group: bool = False,
    source: RegionSource = RegionSource.BODY_PART,
) -> GroupResult:
    routing = Routing(Region.WRIST, source, 0.9, None, None, G.UPPER_DISTAL, out_of_group)
    image = ImageResult(sop_instance_uid="1.2.3.9", frame=0, routing=routing, probability=0.6)
    base = group(G.UPPER_DISTAL, outcome, 0.6)
    return replace(base, out_of_group=out_of_group, models=(card,), images=(image,))


@pytest.mark.parametrize(
    ("case", "outcome", "policy", "expected"),
    [
        (dict(), Outcome.POSITIVE, DEFAULT_POLICY, Priority.URGENT),
        (dict(out_of_group=True), Outcome.POSITIVE, DEFAULT_POLICY, Priority.REVIEW),
        (dict(out_of_group=True), Outcome.POSSIBLE, DEFAULT_POLICY, Priority.REVIEW),
        (dict(out_of_group=True), Outcome.NEGATIVE, DEFAULT_POLICY, Priority.ROUTINE),
        (dict(source=RegionSource.IMAGE), Outcome.POSITIVE, DEFAULT_POLICY, Priority.REVIEW),
        (dict(source=RegionSource.DESCRIPTION), Outcome.POSITIVE, DEFAULT_POLICY, Priority.URGENT),
        (dict(card=CHANCE), Outcome.POSITIVE, DEFAULT_POLICY, Priority.ROUTINE),
        (dict(card=CHANCE), Outcome.POSSIBLE, DEFAULT_POLICY, Priority.ROUTINE),
        (dict(card=CHANCE), Outcome.NOT_ANALYSED, DEFAULT_POLICY, Priority.NOT_ANALYSED),
        (dict(out_of_group=True), Outcome.POSITIVE, PriorityPolicy(cap_out_of_group=False), Priority.URGENT),
        (dict(source=RegionSource.IMAGE), Outcome.POSITIVE, PriorityPolicy(cap_pixel_guessed=False),
         Priority.URGENT),
        # an unproven model stays capped whatever the policy says
        (dict(card=CHANCE), Outcome.POSITIVE, PriorityPolicy(False, False), Priority.ROUTINE),
    ],
)
def test_priority_policy_table(
    case: dict[str, object], outcome: Outcome, policy: PriorityPolicy, expected: Priority
) -> None:
    result = read(outcome, **case)  # type: ignore[arg-type]
    assert decide_priority([result], policy)[0] is expected
    notes = priority_notes([result], policy)
    capped = expected is not {Outcome.POSITIVE: Priority.URGENT, Outcome.POSSIBLE: Priority.REVIEW}.get(
        outcome, expected
    )
    assert bool(notes) == capped, notes


def test_a_strong_group_still_makes_the_study_urgent_beside_a_capped_one() -> None:
    strong = replace(read(Outcome.POSITIVE), group=G.LOWER_DISTAL)
    groups = [read(Outcome.POSITIVE, out_of_group=True), strong]
    assert decide_priority(groups)[0] is Priority.URGENT


def test_proven_means_an_interval_above_chance() -> None:
    assert proven(PROVEN) and not proven(CHANCE)
    assert proven(replace(PROVEN, validation_metrics={}))  # no interval: not judged, like the guard
