"""The installed models, loaded once at start-up, and which of them serves which group.

Packages come from the bundled directory shipped with fracnode and from ``models.directory``
(a package there with the same name replaces the bundled one). Every package is verified
(sha256 of its weight files) before it is loaded; a package that fails verification stops
start-up with a clear error rather than serving results from unknown weights.

A model serves each group that contains one of the regions on its card; for a group served by
several models, one trained for that group wins over one trained on all regions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from inference.modelcard import ModelCard, ModelKind
from inference.models import load_model
from inference.packages import ModelPackage, PackageError, bundled_directory, discover, verify_package
from inference.protocols import FractureClassifier, FractureDetector, RegionClassifier
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, GroupTable

log = logging.getLogger(__name__)


class ModelSetError(Exception):
    """The installed models cannot be loaded (a package failed verification or did not load)."""


@dataclass(frozen=True, slots=True)
class GroupModels:
    classifier: FractureClassifier | None
    detector: FractureDetector | None

    @property
    def cards(self) -> tuple[ModelCard, ...]:
        return tuple(m.card for m in (self.classifier, self.detector) if m is not None)


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


def load_model_set(
    directory: Path | None,
    *,
    device: str = "cpu",
    include_bundled: bool = True,
    table: GroupTable = DEFAULT_GROUP_TABLE,
) -> ModelSet:
    packages = installed_packages(directory, include_bundled=include_bundled)
    classifiers: dict[AnatomicalGroup, FractureClassifier] = {}
    detectors: dict[AnatomicalGroup, FractureDetector] = {}
    region_model: RegionClassifier | None = None
    for package in packages:
        try:
            verified = verify_package(package.path)
            model = load_model(verified, device)
        except PackageError as exc:
            raise ModelSetError(f"model package {package.path} cannot be used: {exc}") from exc
        kind = verified.card.kind
        if kind == ModelKind.REGION:
            region_model = model  # type: ignore[assignment]
            continue
        for group in _serves(verified.card, table):
            if kind == ModelKind.CLASSIFIER:
                current = classifiers.get(group)
                if _better(verified.card, current.card if current else None, group):
                    classifiers[group] = model  # type: ignore[assignment]
            elif kind == ModelKind.DETECTOR:
                current_d = detectors.get(group)
                if _better(verified.card, current_d.card if current_d else None, group):
                    detectors[group] = model  # type: ignore[assignment]
    groups = {g: GroupModels(classifiers.get(g), detectors.get(g)) for g in set(classifiers) | set(detectors)}
    for group, models in sorted(groups.items()):
        log.info("group %s: %s", group, ", ".join(f"{c.name} {c.version}" for c in models.cards))
    return ModelSet(groups=groups, region_model=region_model, packages=tuple(packages))


def describe(cards: Iterable[ModelCard]) -> str:
    return ", ".join(f"{c.name} {c.version}" for c in cards)
