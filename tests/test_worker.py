"""The worker on a real received study: routing, models, SR/SC files, outbox, metrics, priority."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from inference.regions import AnatomicalGroup
from inference.routing import load_keywords
from node.analysis import AnalysisConfig
from node.modelset import load_model_set
from node.outputs import OutputConfig
from node.worker import StudyProcessor, WorkerConfig
from storage import repo
from tests.dicomgen import DX_PRESENTATION, make_dataset
from tests.modelgen import all_groups, classifier_package
from tests.nodeproc import InProcessNode
from tests.validators import assert_valid

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _send(node: InProcessNode, datasets: list[pydicom.Dataset]) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FRACNODE")
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return all_groups(tmp_path_factory.mktemp("models"))


def _processor(node: InProcessNode, models_dir: Path, tmp_path: Path) -> StudyProcessor:
    return StudyProcessor(
        node.db,
        node.spool,
        load_model_set(models_dir),
        load_keywords(None),
        AnalysisConfig(batch_size=4),
        OutputConfig(directory=tmp_path / "results", software_version="test", destinations=("pacs",)),
        node.metrics,
        WorkerConfig(),
    )


def _study(broken: bool = False) -> tuple[str, list[pydicom.Dataset]]:
    study, series = generate_uid(), generate_uid()
    wrist = [
        make_dataset(study_uid=study, series_uid=series, instance_number=i, seed=i, rows=200, cols=160)
        for i in range(2)
    ]
    chest = make_dataset(
        study_uid=study,
        series_uid=generate_uid(),
        body_part="CHEST",
        study_description="XR CHEST",
        series_description="PA",
        instance_number=3,
    )
    datasets = [*wrist, chest]
    if broken:
        bad = make_dataset(study_uid=study, series_uid=series, instance_number=4, rows=200, cols=160)
        bad.PixelData = bad.PixelData[: len(bad.PixelData) // 2]  # a whole dataset with too few pixels
        datasets.append(bad)
    return str(study), datasets


def test_a_study_is_analysed_reported_and_queued(
    node: InProcessNode, models_dir: Path, tmp_path: Path
) -> None:
    study_uid, datasets = _study(broken=True)
    _send(node, datasets)
    assert repo.promote_quiet_studies(node.db, 0.0, datetime.now(UTC)) == [study_uid]
    processor = _processor(node, models_dir, tmp_path)
    assert processor.run_once("test-worker")
    assert not processor.run_once("test-worker")  # the queue is empty now

    detail = repo.get_study(node.db, study_uid)
    assert detail is not None and detail.study.state == "done"
    outcome = json.loads(detail.study.outcome_json or "{}")
    (group,) = outcome["groups"]
    assert group["group"] == "upper-distal" and group["images"] == 2 and group["regions"] == ["wrist"]
    assert 0.0 <= group["probability"] <= 1.0 and group["outcome"] in ("positive", "possible", "negative")
    # How each image's region was decided travels with the result (and GET /studies/{uid}).
    assert [(r["region"], r["source"], r["out_of_group"]) for r in group["routing"]] == [
        ("wrist", "body_part", False),
        ("wrist", "body_part", False),
    ]
    assert all(0.0 < r["confidence"] <= 1.0 for r in group["routing"])
    chest = [item for item in outcome["not_analysed"] if item["region"] == "other"]
    assert chest and all("source" in item and "confidence" in item for item in chest)
    reasons = {item["region"]: item["reason"] for item in outcome["not_analysed"]}
    assert "other" in reasons and "chest" in reasons["other"].lower()
    assert any("pixel" in str(reason).lower() for reason in reasons.values()), reasons

    # One SR and one SC per analysed image, queued for the destination, each a valid object.
    items = detail.outbox
    assert len(items) == 3 and {i.destination for i in items} == {"pacs"}
    classes = []
    for item in items:
        path = Path(item.payload_path)
        assert_valid(path)
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study_uid
        classes.append(str(ds.SOPClassUID))
    assert classes.count(COMPREHENSIVE_3D_SR) == 1

    registry = node.registry
    assert registry.get_sample_value("fracnode_group_probability_ratio_count", {"group": "upper-distal"}) == 1
    assert registry.get_sample_value("fracnode_stage_duration_seconds_count", {"stage": "inference"}) >= 1
    outcome_label = {"group": "upper-distal", "outcome": group["outcome"]}
    assert registry.get_sample_value("fracnode_studies_completed_total", outcome_label) == 1


def test_a_signalled_priority_is_not_lowered(node: InProcessNode, tmp_path: Path) -> None:
    # Operating points no image reaches: every group is negative, the study ROUTINE.
    models = tmp_path / "negative-models"
    classifier_package(models, AnatomicalGroup.UPPER_DISTAL, thresholds=(0.9999, 0.99999))
    study_uid, datasets = _study()
    _send(node, datasets)
    repo.promote_quiet_studies(node.db, 0.0, datetime.now(UTC))
    assert repo.set_signalled_priority(node.db, study_uid, "urgent")  # an earlier revision's signal
    assert _processor(node, models, tmp_path).run_once("w")
    detail = repo.get_study(node.db, study_uid)
    assert detail is not None
    outcome = json.loads(detail.study.outcome_json or "{}")
    assert outcome["priority"] == "routine"  # what this revision found is recorded ...
    assert detail.study.priority == "urgent" == detail.study.signalled_priority  # ... but not pushed
    assert outcome["effective_priority"] == "urgent"
    withheld = node.registry.get_sample_value(
        "fracnode_priority_lowering_withheld_total", {"priority": "urgent"}
    )
    assert withheld == 1


def test_a_study_with_only_unroutable_images(node: InProcessNode, models_dir: Path, tmp_path: Path) -> None:
    study = generate_uid()
    chest = make_dataset(
        study_uid=study, body_part="CHEST", study_description="XR CHEST", series_description=""
    )
    _send(node, [chest])
    repo.promote_quiet_studies(node.db, 0.0, datetime.now(UTC))
    processor = _processor(node, models_dir, tmp_path)
    assert processor.run_once("w")
    detail = repo.get_study(node.db, str(study))
    assert detail is not None and detail.study.state == "done" and detail.study.priority == "not_analysed"
    assert (
        node.registry.get_sample_value(
            "fracnode_studies_not_analysed_total", {"reason": "region_not_supported"}
        )
        == 1
    )
    # The PACS still gets an SR saying why nothing was analysed.
    assert [Path(i.payload_path).is_file() for i in detail.outbox] == [True]


def test_gradcam_series_when_asked(node: InProcessNode, models_dir: Path, tmp_path: Path) -> None:
    study_uid, datasets = _study()
    _send(node, datasets)
    repo.promote_quiet_studies(node.db, 0.0, datetime.now(UTC))
    processor = _processor(node, models_dir, tmp_path)
    processor.analysis = AnalysisConfig(batch_size=4, gradcam=True)
    assert processor.run_once("w")
    detail = repo.get_study(node.db, study_uid)
    assert detail is not None
    gradcams = []
    for item in detail.outbox:
        ds = pydicom.dcmread(item.payload_path)
        if "Grad-CAM" in str(ds.get("SeriesDescription", "")):
            assert_valid(Path(item.payload_path))
            assert ds.PhotometricInterpretation == "RGB" and ds.StudyInstanceUID == study_uid
            assert (ds.Rows, ds.Columns) == (200, 160)  # the source frame's size
            gradcams.append(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    wrist = {str(ds.SOPInstanceUID) for ds in datasets if ds.BodyPartExamined == "WRIST"}
    assert set(gradcams) == wrist and len(gradcams) == 2


def test_an_hl7_result_is_queued_when_a_ris_is_configured(
    node: InProcessNode, models_dir: Path, tmp_path: Path
) -> None:
    import hl7

    study_uid, datasets = _study()
    _send(node, datasets)
    repo.promote_quiet_studies(node.db, 0.0, datetime.now(UTC))
    processor = _processor(node, models_dir, tmp_path)
    processor.outputs = OutputConfig(
        directory=tmp_path / "results", software_version="test", destinations=(), hl7_destination="hl7"
    )
    assert processor.run_once("w")
    detail = repo.get_study(node.db, study_uid)
    assert detail is not None
    (item,) = detail.outbox
    assert (item.kind, item.destination) == ("hl7", "hl7")
    message = hl7.parse(Path(item.payload_path).read_bytes().decode("utf-8"))
    assert str(message.segment("MSH")(9)) == "ORU^R01^ORU_R01"
    assert str(message.segment("OBR")(3)) == "ACC0001"  # the accession number of the source images
    assert len(str(message.segment("MSH")(10))) <= 20
