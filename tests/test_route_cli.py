"""``fracnode route`` through the real command line entry (node.cli.main) on real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from inference.regions import AnatomicalGroup
from node.cli import main
from tests.dicomgen import CR_STORAGE, encode, make_dataset, phantom, write
from tests.modelgen import all_groups, classifier_package

SECRETS = ("TEST^PATIENT", "TESTID001")  # dicomgen's patient name and ID


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test classifier for every group, so routing is shown as on a fully equipped node."""
    return all_groups(tmp_path_factory.mktemp("models"))


@pytest.fixture
def config(tmp_path: Path, models_dir: Path) -> Path:
    """A fracnode.toml naming the test models (no ./fracnode.toml of the machine leaks in)."""
    path = tmp_path / "fracnode.toml"
    path.write_text(f"[models]\ndirectory = {json.dumps(str(models_dir))}\n", encoding="utf-8")
    return path


def _run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(config), "route", *args])
    out, err = capsys.readouterr()
    for secret in SECRETS:
        assert secret not in out and secret not in err
    return code, out, err


def _json(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> list[dict[str, object]]:
    code, out, _ = _run(capsys, config, "--json", *args)
    assert code == 0
    data: list[dict[str, object]] = json.loads(out)
    return data


def test_rg3_routes_from_the_description(
    capsys: pytest.CaptureFixture[str], config: Path, rg3_files: dict[str, Path]
) -> None:
    """Done-when of the issue: leg or ankle, from "distal tibia", the EXTREMITY body part narrowed."""
    paths = [str(p) for p in rg3_files.values()]
    lines = _json(capsys, config, *paths)
    assert [line["file"] for line in lines] == paths
    for line in lines:
        assert line["region"] in ("leg", "ankle")
        assert (line["source"], line["laterality"], line["view"], line["out_of_group"]) == (
            "description",
            "R",
            "AP",
            False,
        )
        assert line["group"] in ("lower-middle", "lower-distal")
        assert line["confidence"] == pytest.approx(0.8)
        assert "EXTREMITY" in str(line["note"]) and "DISTAL TIBIA" in str(line["note"])
    code, table, _ = _run(capsys, config, *paths)
    assert code == 0
    header, *rows = table.splitlines()
    assert header.split()[:4] == ["FILE", "SOP", "INSTANCE", "UID"]
    assert len(rows) == 3 and all(" description " in row and "EXTREMITY" in row for row in rows)


def test_a_directory_of_generated_files(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    data = tmp_path / "study"
    write(make_dataset(), data / "wrist.dcm")
    write(
        encode(make_dataset(body_part="KNEE", study_description="", series_description=""), JPEGLSLossless),
        data / "sub" / "knee.dcm",
    )
    write(
        make_dataset(body_part="CHEST", study_description="CHEST PA", series_description=""),
        data / "sub" / "chest.dcm",
    )
    frames = np.stack([phantom(32, 24, 12, seed=i) for i in range(3)])
    write(
        make_dataset(sop_class=CR_STORAGE, rows=32, cols=24, frames=3, pixels=frames, body_part="HAND"),
        data / "multi.dcm",
    )
    (data / "notes.txt").write_text("not DICOM", encoding="utf-8")
    write(_no_pixels(), data / "sr.dcm")

    code, out, err = _run(capsys, config, "--json", str(data))
    assert code == 0
    lines = json.loads(out)
    by_file = {}
    for line in lines:
        by_file.setdefault(Path(line["file"]).name, []).append(line)
    assert set(by_file) == {"wrist.dcm", "knee.dcm", "chest.dcm", "multi.dcm"}
    [wrist] = by_file["wrist.dcm"]
    assert (wrist["region"], wrist["source"], wrist["group"], wrist["out_of_group"]) == (
        "wrist",
        "body_part",
        "upper-distal",
        False,
    )
    assert (wrist["laterality"], wrist["view"], wrist["confidence"]) == ("R", "PA", 0.95)
    assert by_file["knee.dcm"][0]["group"] == "lower-middle"
    [chest] = by_file["chest.dcm"]
    assert (chest["region"], chest["group"]) == ("other", None) and "not a limb" in str(chest["note"])
    assert [line["frame"] for line in by_file["multi.dcm"]] == [0, 1, 2]
    assert "notes.txt: not a readable DICOM file" in err
    assert "sr.dcm: not an image" in err


def _no_pixels() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_check_pixels_reports_bad_pixel_data(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    good = write(make_dataset(), tmp_path / "good.dcm")
    broken = make_dataset()
    broken.PixelData = broken.PixelData[:-200]
    bad = write(broken, tmp_path / "bad.dcm")
    lines = {
        Path(str(line["file"])).name: line
        for line in _json(capsys, config, "--check-pixels", str(good), str(bad))
    }
    assert lines["good.dcm"]["pixels"] == "ok"
    assert str(lines["bad.dcm"]["pixels"]).startswith("PixelDataError: pixel data is")
    assert lines["bad.dcm"]["region"] == "wrist"  # routing reads the header all the same


def test_nothing_readable_exits_2(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    code, _, err = _run(capsys, config, str(tmp_path / "a.txt"))
    assert code == 2 and "no readable DICOM image among 1 file" in err
    code, _, err = _run(capsys, config, str(tmp_path / "absent"))
    assert code == 2 and "no such file or directory" in err


def test_site_keywords_from_settings(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site-keywords.toml"
    site.write_text('[regions.wrist]\nkeywords = ["RANNE"]\n[laterality]\nL = ["VASEN"]\n', encoding="utf-8")
    config.write_text(
        config.read_text(encoding="utf-8") + f"[routing]\nkeywords_file = {json.dumps(str(site))}\n",
        encoding="utf-8",
    )
    ds = make_dataset(body_part=None, study_description="RANNE VASEN", series_description="")
    del ds.ImageLaterality, ds.Laterality, ds.AnatomicRegionSequence  # the description must do it all
    image = write(ds, tmp_path / "x.dcm")
    [line] = _json(capsys, config, str(image))
    assert (line["region"], line["source"], line["laterality"], line["group"]) == (
        "wrist",
        "description",
        "L",
        "upper-distal",
    )
    site.write_text("[regions.wristt]\nkeywords = ['X']\n", encoding="utf-8")
    code, _, err = _run(capsys, config, str(image))
    assert code == 2 and str(site) in err and "regions.wristt" in err


def test_a_region_without_its_own_model_goes_to_the_nearest_group(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, rg3_files: dict[str, Path]
) -> None:
    """Only a lower-middle (knee, leg) model installed: the RG3 ankle is read by it, flagged."""
    classifier_package(tmp_path / "models", AnatomicalGroup.LOWER_MIDDLE)
    config = tmp_path / "only-leg.toml"
    config.write_text(
        f"[models]\ndirectory = {json.dumps(str(tmp_path / 'models'))}\ninclude_bundled = false\n",
        encoding="utf-8",
    )
    lines = _json(capsys, config, str(rg3_files["RG3_UNCR"]))
    assert [(line["region"], line["group"], line["out_of_group"]) for line in lines] == [
        ("ankle", "lower-middle", True)
    ]
