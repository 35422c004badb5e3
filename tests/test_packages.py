"""Model packages: round trip, checksums, device UIDs, the bundled defaults, ``fracnode models``."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inference.modelcard import (
    HIGH_SENSITIVITY,
    HIGH_SPECIFICITY,
    YOUDEN,
    ModelCard,
    ModelKind,
    OperatingPoint,
)
from inference.models import load_model
from inference.packages import (
    CARD_FILE,
    ChecksumError,
    PackageError,
    bundled_directory,
    card_from_dict,
    card_to_dict,
    discover,
    next_version,
    read_package,
    rewrite_card,
    verify_package,
    write_package,
)
from inference.pixels import PreprocessConfig
from inference.priority import unproven
from inference.protocols import FractureClassifier, FractureDetector, RegionClassifier
from inference.regions import AnatomicalGroup, Region
from node.cli import main

UID = re.compile(r"^2\.25\.[1-9][0-9]*$")


def _card(**changes: object) -> ModelCard:
    card = ModelCard(
        name="test-hand",
        version="1.0.0",
        device_uid="",
        kind=ModelKind.CLASSIFIER,
        architecture="mobilenet_v3_small",
        group=AnatomicalGroup.UPPER_DISTAL,
        regions=(Region.HAND, Region.WRIST),
        input_size=32,
        preprocessing=PreprocessConfig().as_dict(),
        temperature=1.5,
        operating_points=(OperatingPoint(YOUDEN, 0.4, 0.8, 0.7, (0.6, 0.9), (0.5, 0.8)),),
        training_data={"images": 10},
        validation_metrics={"auroc": 0.75, "auroc_ci": [0.6, 0.9], "n": 40, "positives": 10},
    )
    return replace(card, **changes)  # type: ignore[arg-type]


@pytest.fixture
def package_dir(tmp_path: Path) -> Path:
    from inference.models.backbones import GreyNet
    from inference.models.torchio import save_weights

    weights = save_weights(GreyNet("mobilenet_v3_small", 1), tmp_path / "staging" / "model.pt")
    out = tmp_path / "packages" / "test-hand"
    write_package(out, _card(), {"model.pt": weights})
    return out


def test_round_trip_and_checksums(package_dir: Path) -> None:
    package = verify_package(package_dir)
    card = package.card
    assert UID.match(card.device_uid) and len(card.device_uid) <= 64
    assert card.created and set(card.weights) == {"model.pt"} and len(card.weights["model.pt"]) == 64
    assert card == card_from_dict(card_to_dict(card))
    assert read_package(package_dir).card == card
    on_disk = json.loads((package_dir / CARD_FILE).read_text())
    assert on_disk["kind"] == "classifier" and on_disk["group"] == "upper-distal"
    assert on_disk["regions"] == ["hand", "wrist"]
    model = load_model(package)
    assert isinstance(model, FractureClassifier)
    probabilities = model.probabilities(np.zeros((2, 32, 32), dtype=np.float32))
    assert probabilities.shape == (2,) and np.all((probabilities > 0) & (probabilities < 1))


def test_tampered_weight_file_is_refused(package_dir: Path) -> None:
    weights = package_dir / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="model.pt fails its checksum") as caught:
        verify_package(package_dir)
    assert caught.value.file == "model.pt"
    with pytest.raises(ChecksumError):
        load_model(read_package(package_dir))
    assert main(["models", "verify", str(package_dir)]) == 1


def test_missing_weight_and_broken_card(package_dir: Path) -> None:
    (package_dir / "model.pt").unlink()
    with pytest.raises(PackageError, match="weight file model.pt is missing"):
        verify_package(package_dir)
    (package_dir / CARD_FILE).write_text("{not json")
    with pytest.raises(PackageError, match="cannot read model.json"):
        read_package(package_dir)
    (package_dir / CARD_FILE).write_text(json.dumps({"name": "x"}))
    with pytest.raises(PackageError, match="invalid model.json"):
        read_package(package_dir)
    with pytest.raises(PackageError, match="no model.json"):
        read_package(package_dir.parent / "absent")


def test_a_new_version_gets_a_new_device_uid(package_dir: Path) -> None:
    first = verify_package(package_dir)
    older = json.loads((package_dir / CARD_FILE).read_text())
    del older["logit_offset"]  # cards written before the offset load as temperature scaling alone
    assert card_from_dict(older).logit_offset == 0.0
    second = rewrite_card(first, temperature=2.0, logit_offset=-1.25)
    assert second.card.version == "1.0.1" and second.card.temperature == 2.0
    assert json.loads((package_dir / CARD_FILE).read_text())["logit_offset"] == -1.25
    assert second.card.device_uid != first.card.device_uid and UID.match(second.card.device_uid)
    assert verify_package(package_dir).card == second.card
    assert next_version("2.3") == "2.4" and next_version("beta") == "beta.1"


def test_discover_lists_packages_only(package_dir: Path) -> None:
    (package_dir.parent / "not-a-package").mkdir()
    found = discover(package_dir.parent)
    assert [p.card.name for p in found] == ["test-hand"]
    assert discover(package_dir.parent / "absent") == []


# --------------------------------------------------------------------------------------------
# the bundled defaults


def test_bundled_packages_verify_load_and_cover_the_groups() -> None:
    packages = discover(bundled_directory())
    assert packages, "the bundled default models are part of the package"
    total = sum(f.stat().st_size for p in packages for f in p.path.iterdir())
    assert total < 60 * 1024 * 1024
    names = [p.card.name for p in packages]
    assert len(names) == len(set(names))
    covered: set[AnatomicalGroup] = set()
    kinds = set()
    for package in packages:
        verify_package(package.path)
        card = package.card
        kinds.add(card.kind)
        assert UID.match(card.device_uid)
        assert card.training_data.get("train"), f"{card.name}: the card says what it was trained on"
        if card.kind in (ModelKind.CLASSIFIER, ModelKind.SEGMENTER):
            points = {p.name for p in card.operating_points}
            assert {HIGH_SENSITIVITY, HIGH_SPECIFICITY, YOUDEN} <= points, card.name
            assert card.validation_metrics.get("auroc_ci"), card.name
        # A group counts as covered only by a model the node serves by default: one whose
        # validation AUROC interval excludes 0.5 (the bundled YOLO detector of upper-middle is at
        # chance, [0.44, 0.58], so the node no longer serves it; issue 12).
        if card.kind is not ModelKind.REGION and unproven(card) is None and card.group is not None:
            covered.add(card.group)
    assert {ModelKind.CLASSIFIER, ModelKind.DETECTOR, ModelKind.REGION} <= kinds
    assert {
        AnatomicalGroup.UPPER_DISTAL,
        AnatomicalGroup.LOWER_MIDDLE,
        AnatomicalGroup.UPPER_PROXIMAL,
    } <= covered


def test_bundled_models_run_on_prepared_pixels() -> None:
    for package in discover(bundled_directory()):
        if package.card.kind is ModelKind.DETECTOR:
            continue  # ultralytics start-up is exercised in test_training
        model = load_model(package)
        size = package.card.input_size
        batch = np.random.default_rng(0).random((2, size, size)).astype(np.float32)
        if isinstance(model, RegionClassifier) and package.card.kind is ModelKind.REGION:
            answers = model.predict(batch)
            assert len(answers) == 2 and all(r in package.card.regions and 0 < p <= 1 for r, p in answers)
        else:
            assert isinstance(model, FractureClassifier)
            assert model.module.training is False  # type: ignore[attr-defined]
            assert model.probabilities(batch).shape == (2,)
    assert not isinstance(object(), FractureDetector)


def test_models_list_shows_the_bundled_packages_with_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for package in discover(bundled_directory()):
        assert package.card.name in out
    assert "AUROC" in out and "accuracy" in out


def test_models_show_and_verify(capsys: pytest.CaptureFixture[str]) -> None:
    name = discover(bundled_directory())[0].card.name
    assert main(["models", "show", name]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == name and UID.match(shown["device_uid"])
    assert main(["models", "verify"]) == 0
    assert "FAILED" not in capsys.readouterr().out
    assert main(["models", "show", "no-such-model"]) == 2
    assert "no model package named" in capsys.readouterr().err
