"""Model packages: a directory holding the weight files and ``model.json``, the model card.

``model.json`` is the :class:`~inference.modelcard.ModelCard` as JSON, with the sha256 of every
weight file; a fracture-map model's card adds a ``segmenter`` object (its
:class:`~inference.modelcard.SegmenterSpec`), absent from every other card. The node verifies
the checksums before it loads a package and refuses one that fails. Every written version gets
a new device UID (``2.25.`` + the integer of a UUID4, PS3.5 B.2), as IHE AI Results asks.

Errors::

    PackageError            no model.json, unreadable or invalid card, a missing weight file
      ChecksumError         a weight file whose sha256 differs from the card's
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.modelcard import (
    SEGMENTER_SCORES,
    BoxOperatingPoint,
    ModelCard,
    ModelKind,
    OperatingPoint,
    SegmenterSpec,
    Stack,
)
from inference.regions import AnatomicalGroup, Region

CARD_FILE = "model.json"
FORMAT_VERSION = 1


class PackageError(Exception):
    """A model package that cannot be used; ``path`` names the package."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message if path is None else f"{path}: {message}")
        self.path = path


class ChecksumError(PackageError):
    """A weight file changed after the package was written (or was replaced)."""

    def __init__(self, message: str, path: Path, file: str) -> None:
        super().__init__(message, path)
        self.file = file


@dataclass(frozen=True, slots=True)
class ModelPackage:
    path: Path
    card: ModelCard

    def weight_path(self, name: str | None = None) -> Path:
        """The path of weight file ``name`` (default: the only or first one in the card)."""
        if name is None:
            if not self.card.weights:
                raise PackageError("the card lists no weight file", self.path)
            name = next(iter(self.card.weights))
        return self.path / name


def new_device_uid() -> str:
    """A DICOM UID under the UUID root 2.25 (PS3.5 B.2); unique per package version."""
    return f"2.25.{uuid.uuid4().int}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _points_to_list(points: Sequence[OperatingPoint]) -> list[dict[str, Any]]:
    return [
        {
            "name": p.name,
            "threshold": p.threshold,
            "sensitivity": p.sensitivity,
            "specificity": p.specificity,
            "sensitivity_ci": list(p.sensitivity_ci),
            "specificity_ci": list(p.specificity_ci),
        }
        for p in points
    ]


def _points_from_list(items: Sequence[Mapping[str, Any]]) -> tuple[OperatingPoint, ...]:
    return tuple(
        OperatingPoint(
            name=str(p["name"]),
            threshold=float(p["threshold"]),
            sensitivity=float(p["sensitivity"]),
            specificity=float(p["specificity"]),
            sensitivity_ci=(float(p["sensitivity_ci"][0]), float(p["sensitivity_ci"][1])),
            specificity_ci=(float(p["specificity_ci"][0]), float(p["specificity_ci"][1])),
        )
        for p in items
    )


def segmenter_to_dict(spec: SegmenterSpec) -> dict[str, Any]:
    stack = spec.stack
    return {
        "score": spec.score,
        "flip": spec.flip,
        "map_temperature": spec.map_temperature,
        "map_logit_offset": spec.map_logit_offset,
        "box_operating_points": [
            {
                "name": b.name,
                "threshold": b.threshold,
                "recall": b.recall,
                "false_positives_per_image": b.false_positives_per_image,
                "iou": b.iou,
                "recall_ci": list(b.recall_ci),
            }
            for b in spec.box_operating_points
        ],
        "serves_probability": spec.serves_probability,
        "stack": None
        if stack is None
        else {
            "classifier": stack.classifier,
            "weights": list(stack.weights),
            "bias": stack.bias,
            "operating_points": _points_to_list(stack.operating_points),
            "validation_metrics": stack.validation_metrics,
            "notes": stack.notes,
        },
    }


def segmenter_from_dict(data: Mapping[str, Any]) -> SegmenterSpec:
    """Parse a card's ``segmenter`` object (KeyError, TypeError or ValueError when invalid)."""
    score = str(data.get("score", "max"))
    if score not in SEGMENTER_SCORES:
        raise ValueError(f"segmenter score {score!r} is not one of {', '.join(SEGMENTER_SCORES)}")
    map_temperature = float(data.get("map_temperature", 1.0))
    if not map_temperature > 0.0:
        raise ValueError(f"segmenter map_temperature {map_temperature} must be positive")
    raw_stack = data.get("stack")
    stack = None
    if raw_stack is not None:
        weights = [float(w) for w in raw_stack["weights"]]
        if len(weights) != 2:
            raise ValueError(f"a stack has two weights (classifier, map), got {len(weights)}")
        stack = Stack(
            classifier=str(raw_stack["classifier"]),
            weights=(weights[0], weights[1]),
            bias=float(raw_stack["bias"]),
            operating_points=_points_from_list(raw_stack.get("operating_points", [])),
            validation_metrics=dict(raw_stack.get("validation_metrics", {})),
            notes=str(raw_stack.get("notes", "")),
        )
    return SegmenterSpec(
        score=score,
        flip=bool(data.get("flip", False)),
        map_temperature=map_temperature,
        map_logit_offset=float(data.get("map_logit_offset", 0.0)),
        box_operating_points=tuple(
            BoxOperatingPoint(
                name=str(b["name"]),
                threshold=float(b["threshold"]),
                recall=float(b["recall"]),
                false_positives_per_image=float(b["false_positives_per_image"]),
                iou=float(b.get("iou", 0.3)),
                recall_ci=(float(b["recall_ci"][0]), float(b["recall_ci"][1]))
                if "recall_ci" in b
                else (0.0, 1.0),
            )
            for b in data.get("box_operating_points", [])
        ),
        serves_probability=bool(data.get("serves_probability", True)),
        stack=stack,
    )


def card_to_dict(card: ModelCard) -> dict[str, Any]:
    data: dict[str, Any] = {"format_version": FORMAT_VERSION}
    for f in fields(card):
        value = getattr(card, f.name)
        if f.name == "operating_points":
            value = _points_to_list(value)
        elif f.name == "regions":
            value = [str(r) for r in value]
        elif f.name in ("kind", "group"):
            value = None if value is None else str(value)
        elif f.name == "segmenter":
            if value is None:
                continue  # older readers and every other kind: no key at all
            value = segmenter_to_dict(value)
        data[f.name] = value
    return data


def card_from_dict(data: Mapping[str, Any], path: Path | None = None) -> ModelCard:
    """Parse a card; unknown keys are ignored so newer cards still load."""
    try:
        points = _points_from_list(data.get("operating_points", []))
        kind = ModelKind(data["kind"])
        raw_segmenter = data.get("segmenter")
        segmenter = None
        if raw_segmenter is not None:
            segmenter = segmenter_from_dict(raw_segmenter)
        elif kind is ModelKind.SEGMENTER:
            segmenter = SegmenterSpec()
        group = data.get("group")
        return ModelCard(
            name=str(data["name"]),
            version=str(data["version"]),
            device_uid=str(data["device_uid"]),
            kind=kind,
            architecture=str(data["architecture"]),
            group=None if group is None else AnatomicalGroup(group),
            regions=tuple(Region(r) for r in data.get("regions", [])),
            input_size=int(data["input_size"]),
            preprocessing=dict(data.get("preprocessing", {})),
            temperature=float(data.get("temperature", 1.0)),
            logit_offset=float(data.get("logit_offset", 0.0)),
            operating_points=points,
            training_data=dict(data.get("training_data", {})),
            validation_metrics=dict(data.get("validation_metrics", {})),
            created=str(data.get("created", "")),
            weights={str(k): str(v) for k, v in dict(data.get("weights", {})).items()},
            manufacturer=str(data.get("manufacturer", "fracnode")),
            notes=str(data.get("notes", "")),
            segmenter=segmenter,
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise PackageError(f"invalid {CARD_FILE}: {exc!r}", path) from exc


def read_package(path: Path) -> ModelPackage:
    """Parse ``model.json`` of the package at ``path``; checksums are not checked."""
    card_path = path / CARD_FILE
    if not card_path.is_file():
        raise PackageError(f"no {CARD_FILE}", path)
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"cannot read {CARD_FILE}: {exc}", path) from exc
    if not isinstance(data, dict):
        raise PackageError(f"{CARD_FILE} is not a JSON object", path)
    return ModelPackage(path=path, card=card_from_dict(data, path))


def verify_package(path: Path) -> ModelPackage:
    """Read the package and check the sha256 of every weight file against the card."""
    package = read_package(path)
    if not package.card.weights:
        raise PackageError("the card lists no weight file", path)
    for name, expected in package.card.weights.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise PackageError(f"weight file name {name!r} leaves the package", path)
        if not file.is_file():
            raise PackageError(f"weight file {name} is missing", path)
        actual = sha256_file(file)
        if actual != expected:
            raise ChecksumError(
                f"weight file {name} fails its checksum (sha256 {actual[:12]}..., card {expected[:12]}...)",
                path,
                name,
            )
    return package


def write_package(directory: Path, card: ModelCard, weights: Mapping[str, Path]) -> ModelPackage:
    """Write a package: copy the weight files in (unless already there), hash them, write the card.

    The card's ``weights`` is replaced by the hashes of ``weights``; a blank ``device_uid`` or
    ``created`` is filled in. ``model.json`` is written last, through a temporary file, so a
    crash never leaves a card that names weights that are not there yet.
    """
    directory.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, str] = {}
    for name, source in weights.items():
        if Path(name).name != name:
            raise PackageError(f"weight file name {name!r} must be a plain file name", directory)
        target = directory / name
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        hashes[name] = sha256_file(target)
    card = replace(
        card,
        weights=hashes,
        device_uid=card.device_uid or new_device_uid(),
        created=card.created or datetime.now(UTC).replace(microsecond=0).isoformat(),
    )
    temporary = directory / (CARD_FILE + ".tmp")
    temporary.write_text(json.dumps(card_to_dict(card), indent=2) + "\n", encoding="utf-8")
    temporary.replace(directory / CARD_FILE)
    return ModelPackage(path=directory, card=card)


def next_version(version: str) -> str:
    """``1.0.3`` -> ``1.0.4``; a version without a numeric last part gets ``.1`` appended."""
    head, _, last = version.rpartition(".")
    if last.isdigit():
        return f"{head}.{int(last) + 1}" if head else str(int(last) + 1)
    return f"{version}.1"


def rewrite_card(package: ModelPackage, **changes: Any) -> ModelPackage:
    """A new version of the package's card with ``changes``: new version, device UID and date."""
    version = str(changes.pop("version", next_version(package.card.version)))
    card = replace(
        package.card,
        **changes,
        version=version,
        device_uid=new_device_uid(),
        created=datetime.now(UTC).replace(microsecond=0).isoformat(),
    )
    weights = {name: package.path / name for name in package.card.weights}
    return write_package(package.path, card, weights)


def bundled_directory() -> Path:
    """The default model packages shipped inside the ``inference`` package."""
    return Path(__file__).resolve().parent / "bundled"


def discover(directory: Path) -> list[ModelPackage]:
    """Every package directly under ``directory`` (sub-folders with a model.json), sorted by name.

    A folder whose card cannot be parsed raises :class:`PackageError`: a broken package must not
    disappear silently from the node's model list.
    """
    if not directory.is_dir():
        return []
    return [
        read_package(child)
        for child in sorted(directory.iterdir())
        if child.is_dir() and (child / CARD_FILE).is_file()
    ]
