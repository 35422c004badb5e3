"""The installed models, loaded once at start-up, and which of them serves which group.

Packages come from the bundled directory shipped with fracnode and from ``models.directory``
(a package there with the same name replaces the bundled one). Every package is verified
(sha256 of its weight files) before it is loaded; a package that fails verification stops
start-up with a clear error rather than serving results from unknown weights.

A model serves each group that contains one of the regions on its card; for a group served by
several models of one kind, one trained for that group wins over one trained on all regions.

What a group serves (:class:`GroupModels`):

- **boxes** come from its fracture-map model (kind ``segmenter``) when it has one, else from its
  detector;
- **the probability** is the stacked one when the map model's card holds a stack fitted with the
  group's classifier; else the classifier's; else the map model's (when its card says
  ``serves_probability`` or no detector is there); else the detector's top box.

Guard (issue 12): a fracture model whose validation AUROC 95 % interval contains 0.5 has not
shown it beats chance. It serves nothing, neither outcomes nor boxes: it is skipped with a
warning naming the package, unless ``models.allow_unproven`` is set. The same holds per group:
a model whose interval on one group's validation images (``per_group`` on its card) contains
0.5 does not serve that group. A card with no interval at all (an uncalibrated package) is not
judged by the guard.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from inference.modelcard import ModelCard, ModelKind, Stack
from inference.models import load_model
from inference.packages import ModelPackage, PackageError, bundled_directory, discover, verify_package
from inference.priority import unproven
from inference.protocols import FractureClassifier, FractureDetector, FractureSegmenter, RegionClassifier
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, GroupTable

log = logging.getLogger(__name__)


class ModelSetError(Exception):
    """The installed models cannot be loaded (a package failed verification or did not load)."""


class ProbabilitySource(StrEnum):
    """Which model's output is a group's image probability."""

    STACK = "stack"  # classifier + map model, the map model card's stack
    CLASSIFIER = "classifier"
    SEGMENTER = "segmenter"
    DETECTOR = "detector"  # its highest box confidence


@dataclass(frozen=True, slots=True)
class GroupModels:
    classifier: FractureClassifier | None
    detector: FractureDetector | None
    segmenter: FractureSegmenter | None = None

    @property
    def stack(self) -> Stack | None:
        """The map model's stack, when it was fitted with this group's classifier."""
        if self.segmenter is None or self.classifier is None:
            return None
        spec = self.segmenter.card.segmenter
        if spec is None or spec.stack is None or spec.stack.classifier != self.classifier.card.name:
            return None
        return spec.stack

    @property
    def probability_source(self) -> ProbabilitySource:
        if self.stack is not None:
            return ProbabilitySource.STACK
        if self.classifier is not None:
            return ProbabilitySource.CLASSIFIER
        if self.segmenter is not None:
            spec = self.segmenter.card.segmenter
            if self.detector is None or spec is None or spec.serves_probability:
                return ProbabilitySource.SEGMENTER
        if self.detector is not None:
            return ProbabilitySource.DETECTOR
        raise ModelSetError("a group without a fracture model")

    @property
    def localiser(self) -> FractureDetector | FractureSegmenter | None:
        """The model whose boxes the group reports: its map model, else its detector."""
        return self.segmenter if self.segmenter is not None else self.detector

    @property
    def deciding(self) -> ModelCard:
        """The card whose operating points decide the outcome (the stack's points on the map
        model's card when the probability is stacked)."""
        source = self.probability_source
        if source is ProbabilitySource.STACK:
            assert self.segmenter is not None and self.stack is not None
            return replace(self.segmenter.card, operating_points=self.stack.operating_points)
        model = {
            ProbabilitySource.CLASSIFIER: self.classifier,
            ProbabilitySource.SEGMENTER: self.segmenter,
            ProbabilitySource.DETECTOR: self.detector,
        }[source]
        assert model is not None
        return model.card

    @property
    def cards(self) -> tuple[ModelCard, ...]:
        """The models that speak in the group's results, the deciding one first."""
        deciding = self.deciding
        out = [deciding]
        for model in (self.classifier, self.localiser):
            if model is not None and model.card.device_uid != deciding.device_uid:
                out.append(model.card)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class ModelSet:
    groups: dict[AnatomicalGroup, GroupModels] = field(default_factory=dict)
    region_model: RegionClassifier | None = None
    packages: tuple[ModelPackage, ...] = ()

    @property
    def available(self) -> frozenset[AnatomicalGroup]:
        return frozenset(self.groups)

    def cards(self) -> list[ModelCard]:
        return [p.card for p in self.packages]


def installed_packages(directory: Path | None, *, include_bundled: bool = True) -> list[ModelPackage]:
    """Bundled packages, overridden by name by those in ``directory``; not yet verified."""
    if directory is not None and not directory.is_dir():
        raise ModelSetError(f"models.directory {directory} is not a directory")
    by_name: dict[str, ModelPackage] = {}
    roots = ([bundled_directory()] if include_bundled else []) + (
        [directory] if directory is not None else []
    )
    for root in roots:
        if root.is_dir():
            for package in discover(root):
                by_name[package.card.name] = package
    return sorted(by_name.values(), key=lambda p: p.card.name)


def _serves(card: ModelCard, table: GroupTable) -> set[AnatomicalGroup]:
    groups = {g for g in (table.group_of(r) for r in card.regions) if g is not None}
    if card.group is not None:
        groups.add(card.group)
    return groups


def _better(candidate: ModelCard, current: ModelCard | None, group: AnatomicalGroup) -> bool:
    if current is None:
        return True
    return candidate.group == group and current.group != group


def unproven_in(card: ModelCard, group: AnatomicalGroup) -> str | None:
    """Why a model may not serve ``group``: its AUROC interval on that group's validation images
    (the card's ``validation_metrics.per_group``) contains 0.5; else None."""
    if card.kind is ModelKind.REGION:
        return None
    per_group = card.validation_metrics.get("per_group")
    entry = per_group.get(str(group)) if isinstance(per_group, dict) else None
    interval = entry.get("auroc_ci") if isinstance(entry, dict) else None
    if not isinstance(interval, list | tuple) or len(interval) != 2:
        return None
    try:
        low, high = float(interval[0]), float(interval[1])
    except (TypeError, ValueError):
        return None
    if low <= 0.5 <= high:
        return f"its {group} validation AUROC 95 % interval [{low:.3f}, {high:.3f}] contains 0.5 (chance)"
    return None


def load_model_set(
    directory: Path | None,
    *,
    device: str = "cpu",
    include_bundled: bool = True,
    table: GroupTable = DEFAULT_GROUP_TABLE,
    allow_unproven: bool = False,
) -> ModelSet:
    """Verify and load the installed packages and choose each group's models.

    ``packages`` of the result lists the packages that serve (a package the guard refuses is
    verified, named in a warning and left out).
    """
    packages = installed_packages(directory, include_bundled=include_bundled)
    chosen: dict[ModelKind, dict[AnatomicalGroup, FractureClassifier | FractureDetector | FractureSegmenter]]
    chosen = {ModelKind.CLASSIFIER: {}, ModelKind.DETECTOR: {}, ModelKind.SEGMENTER: {}}
    region_model: RegionClassifier | None = None
    serving: list[ModelPackage] = []
    for package in packages:
        try:
            verified = verify_package(package.path)
        except PackageError as exc:
            raise ModelSetError(f"model package {package.path} cannot be used: {exc}") from exc
        reason = unproven(verified.card)
        if reason is not None:
            if not allow_unproven:
                log.warning(
                    "model package %s (%s %s) does not serve: %s; set models.allow_unproven to serve it",
                    package.path.name,
                    verified.card.name,
                    verified.card.version,
                    reason,
                )
                continue
            log.warning(
                "model package %s serves although %s (models.allow_unproven)", package.path.name, reason
            )
        try:
            model = load_model(verified, device)
        except PackageError as exc:
            raise ModelSetError(f"model package {package.path} cannot be used: {exc}") from exc
        serving.append(verified)
        kind = verified.card.kind
        if kind == ModelKind.REGION:
            region_model = model  # type: ignore[assignment]
            continue
        by_group = chosen[kind]
        for group in sorted(_serves(verified.card, table)):
            reason = unproven_in(verified.card, group)
            if reason is not None and not allow_unproven:
                log.warning(
                    "model package %s (%s %s) does not serve group %s: %s; "
                    "set models.allow_unproven to serve it",
                    package.path.name,
                    verified.card.name,
                    verified.card.version,
                    group,
                    reason,
                )
                continue
            current = by_group.get(group)
            if _better(verified.card, current.card if current else None, group):
                by_group[group] = model  # type: ignore[assignment]
    classifiers, detectors, segmenters = (
        chosen[ModelKind.CLASSIFIER],
        chosen[ModelKind.DETECTOR],
        chosen[ModelKind.SEGMENTER],
    )
    groups = {
        g: GroupModels(
            classifiers.get(g),  # type: ignore[arg-type]
            detectors.get(g),  # type: ignore[arg-type]
            segmenters.get(g),  # type: ignore[arg-type]
        )
        for g in set(classifiers) | set(detectors) | set(segmenters)
    }
    for group, models in sorted(groups.items()):
        log.info(
            "group %s: %s (probability: %s)",
            group,
            ", ".join(f"{c.name} {c.version}" for c in models.cards),
            models.probability_source,
        )
    return ModelSet(groups=groups, region_model=region_model, packages=tuple(serving))


def describe(cards: Iterable[ModelCard]) -> str:
    return ", ".join(f"{c.name} {c.version}" for c in cards)
