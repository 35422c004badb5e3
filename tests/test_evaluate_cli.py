"""``fracnode evaluate`` and ``fracnode explain`` end to end: real packages loaded by the node's
runtime, real image files and DICOM files, outputs read back."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inference.packages import ModelPackage
from inference.regions import AnatomicalGroup, Region
from node.cli import main
from tests.test_gradcam import write_tiny_classifier

REGIONS = (Region.HAND, Region.WRIST, Region.LEG)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelPackage]:
    root = tmp_path_factory.mktemp("models")
    return {
        "upper": write_tiny_classifier(root, name="tiny-upper-distal", seed=0),
        "lower": write_tiny_classifier(
            root, name="tiny-lower-middle", regions=(Region.LEG,), group=AnatomicalGroup.LOWER_MIDDLE, seed=1
        ),
    }


@pytest.fixture(scope="module")
def csv_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site CSV (path,label,region,study_id) of small PNG radiographs, two views per study."""
    root = tmp_path_factory.mktemp("site")
    rng = np.random.default_rng(0)
    rows = []
    for region in REGIONS:
        for k in range(8):
            label = (k // 2) % 2
            pixels = (40 + 30 * rng.random((90, 70))).astype(np.uint8)
            pixels[20:70, 25:40] = 180
            if label:
                pixels[40:44, 20:45] = 255
            name = f"{region}_{k}.png"
            Image.fromarray(pixels).save(root / name)
            rows.append(
                {"path": name, "label": label, "region": region.value, "study_id": f"{region}-{k // 2}"}
            )
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "region", "study_id"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def run(*argv: str) -> int:
    return main(list(argv))


def test_evaluate_one_package_writes_report_json_and_figures(
    csv_source: Path, packages: dict[str, ModelPackage], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    code = run(
        "evaluate", str(csv_source), "--model", str(packages["upper"].path), "--out", str(out),
        "--bootstrap", "50", "--no-progress",
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "fracnode-evaluation/1"
    assert data["source"]["layout"] == "csv" and data["source"]["labelled"] == 24
    (model,) = data["models"]
    assert model["card"]["name"] == "tiny-upper-distal" and model["served"] is None
    assert data["node"] is None  # no routing with --model
    rows = {(r["subset"]["scope"], r["subset"]["name"]): r for r in model["rows"]}
    assert rows[("overall", "all")]["image"]["n"] == 24
    assert rows[("overall", "all")]["study_mean"]["n"] == 12  # two views per study
    assert rows[("overall", "all")]["study_max"]["n"] == 12
    assert rows[("group", "upper-distal")]["image"]["n"] == 16
    assert rows[("region", "leg")]["subset"]["out_of_group"] is True
    assert rows[("region", "hand")]["subset"]["out_of_group"] is False
    points = [p["name"] for p in rows[("overall", "all")]["image"]["operating_points"]]
    assert points == ["high_sensitivity", "youden", "high_specificity"]
    for interval in ("auroc", "average_precision", "brier", "ece"):
        value = rows[("overall", "all")]["image"][interval]
        assert value["low"] <= value["estimate"] <= value["high"]
    assert model["calibration"]["temperature"] == pytest.approx(1.3)
    kinds = ("roc", "pr", "reliability")
    assert set(model["figures"]) == {f"tiny-upper-distal-0.0.1_{kind}.png" for kind in kinds}
    for name in model["figures"]:
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "## tiny-upper-distal 0.0.1" in report and "Operating point `youden`" in report
    assert "region: leg (out of group)" in report
    predictions = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(predictions) == 24 and {p["model"] for p in predictions} == {"tiny-upper-distal"}
    # The report's probability is the runtime's: the same package predicts the same number.
    assert 0.0 <= float(predictions[0]["probability"]) <= 1.0
    assert "report:" in capsys.readouterr().out


def test_matrix_and_docs_from_results(
    csv_source: Path, packages: dict[str, ModelPackage], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    docs = tmp_path / "evaluation.md"
    docs.write_text(
        "# Evaluation\n\nProse may quote `<!-- BEGIN GENERATED: results -->` inline.\n\n"
        "<!-- BEGIN GENERATED: results -->\nstale numbers\n<!-- END GENERATED: results -->\n\nafter\n"
    )
    code = run(
        "evaluate", str(csv_source), "--matrix", "--model", str(packages["upper"].path),
        "--model", str(packages["lower"].path), "--out", str(out), "--bootstrap", "30", "--no-progress",
        "--docs", str(docs),
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    matrix = data["matrix"]
    assert [c["name"] for c in matrix["cards"]] == ["tiny-upper-distal", "tiny-lower-middle"]
    assert matrix["regions"] == ["wrist", "hand", "leg"]
    assert len(matrix["cells"]) == 6
    relations = {(c["model"], c["region"]): c["relation"] for c in matrix["cells"]}
    assert relations[("tiny-upper-distal", "wrist")] == "same region"
    assert relations[("tiny-lower-middle", "hand")] == "other group"
    assert {s["relation"] for s in matrix["summary"]} == {"same region", "same group", "other group"}
    for name in matrix["figures"]:
        assert (out / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    text = docs.read_text()
    assert "stale numbers" not in text and text.endswith("after\n")
    assert "Prose may quote `<!-- BEGIN GENERATED: results -->` inline.\n" in text
    assert "tiny-lower-middle" in text and "Cross-region transfer matrix" in text

    # Rendering again from the JSON alone gives the same report.
    first = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert run("evaluate", "--from-results", str(out / "results.json"), "--docs", str(docs)) == 0
    assert (out / "report.md").read_text() == first


def test_operator_errors_exit_2(
    csv_source: Path, packages: dict[str, ModelPackage], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("evaluate", str(tmp_path / "missing"), "--out", str(tmp_path / "o")) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert run("evaluate", str(csv_source), "--model", str(tmp_path), "--out", str(tmp_path / "o")) == 2
    assert "model package" in capsys.readouterr().err
    assert run("evaluate", str(csv_source), "--split", "test", "--model", str(packages["upper"].path)) == 2
    assert "no labelled image" in capsys.readouterr().err
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing to replace\n")
    bogus = tmp_path / "results.json"
    bogus.write_text("{}")
    assert run("evaluate", "--from-results", str(bogus)) == 2
    assert "not a fracnode evaluation results file" in capsys.readouterr().err
    assert run("explain", "lower-nowhere", str(csv_source), "--out", str(tmp_path / "x")) == 2
    assert "neither a package folder nor a group" in capsys.readouterr().err


def test_evaluate_installed_models_routed_as_the_node_routes(
    csv_source: Path, packages: dict[str, ModelPackage], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "fracnode.toml"
    config.write_text(
        f'[models]\ndirectory = "{packages["upper"].path.parent}"\ndevice = "cpu"\ninclude_bundled = false\n'
    )
    out = tmp_path / "eval"
    code = run(
        "--config",
        str(config),
        "evaluate",
        str(csv_source),
        "--out",
        str(out),
        "--bootstrap",
        "20",
        "--no-progress",
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    mine = {m["card"]["name"]: m for m in data["models"]}
    assert set(mine) == {"tiny-upper-distal", "tiny-lower-middle"}  # the bundled models left out
    assert mine["tiny-upper-distal"]["served"] == ["upper-distal"]
    assert mine["tiny-lower-middle"]["served"] == ["lower-middle"]
    upper_rows = {r["subset"]["name"] for r in mine["tiny-upper-distal"]["rows"]}
    assert "leg" not in upper_rows and {"hand", "wrist"} <= upper_rows
    lower_overall = mine["tiny-lower-middle"]["rows"][0]
    assert lower_overall["subset"]["name"] == "all" and lower_overall["image"]["n"] == 8
    assert data["node"]["deciding"] == [
        ["upper-distal", "tiny-upper-distal"],
        ["lower-middle", "tiny-lower-middle"],
    ]
    node_overall = data["node"]["rows"][0]
    assert node_overall["subset"]["name"] == "all" and node_overall["image"]["n"] == 24


def test_explain_writes_overlays(
    csv_source: Path, packages: dict[str, ModelPackage], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [csv_source.parent / "hand_1.png", csv_source.parent / "wrist_2.png"]
    out = tmp_path / "cams"
    code = run("explain", str(packages["upper"].path), *map(str, images), "--out", str(out), "--no-progress")
    assert code == 0, capsys.readouterr().err
    for image in images:
        overlay = Image.open(out / f"{image.stem}_gradcam.png")
        assert overlay.mode == "RGB" and overlay.size == Image.open(image).size
    rows = list(csv.DictReader((out / "explain.csv").open()))
    assert [r["image"] for r in rows] == [i.name for i in images]
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)


def test_evaluate_a_dicom_folder_with_a_label_csv(
    packages: dict[str, ModelPackage], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("node.imaging", reason="node/imaging.py (DICOM pixel decoding) has not landed yet")
    from tests.dicomgen import make_study

    folder = tmp_path / "dicom"
    lines = ["sop_instance_uid,label"]
    for index, label in enumerate((0, 1, 0, 1)):
        study, _ = make_study(folder / f"s{index}", 2, body_part="WRIST", rows=96, cols=80)
        lines += [f"{uid},{label}" for uid in study.sop_uids]
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    code = run(
        "evaluate",
        str(folder),
        "--model",
        str(packages["upper"].path),
        "--out",
        str(out),
        "--bootstrap",
        "20",
        "--no-progress",
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["source"]["layout"] == "dicom" and data["source"]["failures"] == []
    overall = data["models"][0]["rows"][0]
    assert overall["image"]["n"] == 8 and overall["study_mean"]["n"] == 4
    # The region came from BodyPartExamined, resolved by the node's routing tables.
    assert {r["subset"]["name"] for r in data["models"][0]["rows"]} == {"all", "upper-distal", "wrist"}


def test_evaluate_the_bundled_detector_on_fracatlas_images(
    fracatlas: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """FROC, mAP and the three levels on real boxes: a small FracAtlas-layout copy of `valid`."""
    from inference.modelcard import ModelKind
    from inference.packages import bundled_directory, discover

    detectors = [p for p in discover(bundled_directory()) if p.card.kind == ModelKind.DETECTOR]
    if not detectors:
        pytest.skip(f"no detector package committed under {bundled_directory()} yet")
    with (fracatlas / "labels.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "valid"]
    chosen = [r for r in rows if r["fractured"] == "1"][:6] + [r for r in rows if r["fractured"] == "0"][:6]
    subset = tmp_path / "fracatlas-mini"
    (subset / "images").mkdir(parents=True)
    (subset / "yolo").mkdir()
    with (subset / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    for row in chosen:
        stem = Path(row["image_id"]).stem
        (subset / "images" / row["image_id"]).symlink_to(fracatlas / "images" / row["image_id"])
        boxes = fracatlas / "yolo" / f"{stem}.txt"
        if boxes.is_file():
            (subset / "yolo" / f"{stem}.txt").symlink_to(boxes)
    out = tmp_path / "eval"
    code = run(
        "evaluate", str(subset), "--model", str(detectors[0].path), "--out", str(out),
        "--bootstrap", "20", "--no-progress",
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    found = data["models"][0]["rows"][0]["detection"]
    assert found["images"] == 12 and found["lesions"] >= 6
    assert found["map50"] is not None and 0.0 <= found["map50"] <= 1.0
    assert [rate for rate, _ in found["froc"]["recall_at"]] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert found["image_level"]["n"] == 12 and found["case_level"]["n"] == 12
    assert any(name.endswith("_froc.png") for name in data["models"][0]["figures"])
