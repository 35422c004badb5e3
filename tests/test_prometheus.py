"""Prometheus metrics read back from a fresh registry after real C-STOREs and a processed study."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard, ModelKind
from inference.priority import decide_priority
from inference.regions import AnatomicalGroup, Region
from inference.values import GroupResult, Outcome, StudyResult
from node.assembly import StudyAssembler
from node.metrics import NOT_ANALYSED_REASONS, STAGES, Metrics, metric_names, sop_class_label
from node.status import StoreStatus
from storage import repo
from tests.dicomgen import (
    CR_STORAGE,
    CT_STORAGE,
    DX_PRESENTATION,
    DX_PROCESSING,
    SC_STORAGE,
    make_dataset,
    write,
)
from tests.nodeproc import InProcessNode, start_in_process

UID_LIKE = re.compile(r"^\d+(\.\d+){3,}$")

CARD = ModelCard(
    name="upper-distal-classifier",
    version="2024.03",
    device_uid="2.25.301861735926457391063211950473856423191",
    kind=ModelKind.CLASSIFIER,
    architecture="mobilenet_v3_small",
    group=AnatomicalGroup.UPPER_DISTAL,
    regions=(Region.WRIST,),
    input_size=224,
)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[InProcessNode]:
    node = start_in_process(tmp_path)
    yield node
    node.server.stop()
    node.db.dispose()


def value(registry: CollectorRegistry, metric: str, **labels: str) -> float:
    found = registry.get_sample_value(metric, labels)
    return 0.0 if found is None else found


def dataset_bytes(path: Path) -> int:
    """Length of the dataset as sent on the wire: the file minus preamble, prefix and file meta."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return path.stat().st_size - (128 + 4 + 12 + int(meta.FileMetaInformationGroupLength))


def send(paths: list[Path], port: int) -> list[int]:
    """One association, one C-STORE per file, as a modality sends a study."""
    ae = AE(ae_title="MODALITY")
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(ds.file_meta.MediaStorageSOPClassUID, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACNODE")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(path).Status) for path in paths]
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
    return statuses


def test_sop_class_labels_are_short_names() -> None:
    assert sop_class_label(CR_STORAGE) == "cr"
    assert sop_class_label(DX_PRESENTATION) == "dx"
    assert sop_class_label(DX_PROCESSING) == "dx"
    assert sop_class_label(SC_STORAGE) == "sc"
    assert sop_class_label("1.2.840.10008.5.1.4.1.1.7.4") == "sc"
    assert sop_class_label(CT_STORAGE) == "other"
    assert sop_class_label("1.2.840.10008.5.1.4.1.1.1\0") == "cr"


def test_c_stores_then_a_processed_study(running: InProcessNode, tmp_path: Path) -> None:
    registry = running.registry
    metrics = running.metrics
    study_uid = "1.2.826.0.1.3680043.8.498.4242"
    classes = (CR_STORAGE, DX_PRESENTATION, DX_PRESENTATION, SC_STORAGE)
    files = [
        write(make_dataset(sop_class=cls, study_uid=study_uid, instance_number=n), tmp_path / f"{n}.dcm")
        for n, cls in enumerate(classes, start=1)
    ]
    # The same DX again (a duplicate) in a second association.
    assert send(files, running.port) == [StoreStatus.SUCCESS] * 4
    assert send(files[1:2], running.port) == [StoreStatus.SUCCESS]

    assert value(registry, "fracnode_instances_received_total", sop_class="cr", outcome="stored") == 1
    assert value(registry, "fracnode_instances_received_total", sop_class="dx", outcome="stored") == 2
    assert value(registry, "fracnode_instances_received_total", sop_class="sc", outcome="stored") == 1
    assert value(registry, "fracnode_instances_received_total", sop_class="dx", outcome="duplicate") == 1
    # Dataset bytes of every accepted C-STORE, the duplicate included, without the file meta.
    sent = [*files, files[1]]
    assert value(registry, "fracnode_received_bytes_total") == sum(dataset_bytes(path) for path in sent)
    assert value(registry, "fracnode_cstore_handling_seconds_count") == 5
    assert value(registry, "fracnode_cstore_handling_seconds_sum") > 0
    assert value(registry, "fracnode_echoes_total") == 2
    assert value(registry, "fracnode_associations_active") == 0

    # The real assembler makes the study ready.
    assembler = StudyAssembler(running.db, metrics, quiet_seconds=0.0, poll_seconds=1.0)
    assert assembler.tick() == [study_uid]
    assert value(registry, "fracnode_studies_ready_total") == 1

    # The worker's calls for one processed study: stages, batch, result, exports.
    metrics.set_models([CARD])
    with metrics.time_stage("decode"):
        pass
    metrics.observe_stage("inference", 0.2)
    metrics.inference_batch_images.observe(4)
    groups = (
        GroupResult(AnatomicalGroup.UPPER_DISTAL, Outcome.POSITIVE, 0.93, HIGH_SPECIFICITY,
                    (Region.WRIST,), False, (CARD,), ()),
        GroupResult(AnatomicalGroup.LOWER_DISTAL, Outcome.POSSIBLE, 0.32, HIGH_SENSITIVITY,
                    (Region.ANKLE,), False, (), ()),
        GroupResult(AnatomicalGroup.UPPER_PROXIMAL, Outcome.NOT_ANALYSED, None, None,
                    (Region.SHOULDER,), False, (), (), reason="no model"),
    )
    priority, score = decide_priority(groups)
    metrics.observe_study(StudyResult(study_uid, 1, groups, (), priority, score))
    metrics.export_attempt("pacs", sent=False, will_retry=True)
    metrics.export_attempt("pacs", sent=True)
    metrics.export_attempt("hl7", sent=False, will_retry=False)
    metrics.study_latency.observe(12.5)
    job = repo.claim_job(running.db, "w1", datetime.now(UTC) + timedelta(seconds=1), 60.0)
    assert job is not None
    free, total = 10 * 1024**3, 100 * 1024**3
    metrics.refresh(
        queue_depth=repo.queue_depth(running.db),
        outbox_depth=repo.outbox_depth(running.db),
        spool_free_bytes=free,
        spool_capacity_bytes=total,
        now=1_700_000_000.0,
    )

    assert value(registry, "fracnode_stage_duration_seconds_count", stage="decode") == 1
    assert value(registry, "fracnode_stage_duration_seconds_sum", stage="inference") == pytest.approx(0.2)
    assert value(registry, "fracnode_stage_duration_seconds_bucket", stage="inference", le="0.25") == 1
    assert value(registry, "fracnode_stage_duration_seconds_bucket", stage="inference", le="0.1") == 0
    assert value(registry, "fracnode_inference_batch_images_bucket", le="4.0") == 1
    assert value(registry, "fracnode_inference_batch_images_bucket", le="2.0") == 0
    completed = "fracnode_studies_completed_total"
    assert value(registry, completed, group="upper-distal", outcome="positive") == 1
    assert value(registry, completed, group="lower-distal", outcome="possible") == 1
    assert value(registry, completed, group="upper-proximal", outcome="not_analysed") == 1
    assert value(registry, "fracnode_studies_prioritised_total", priority="urgent") == 1
    probability = "fracnode_group_probability_ratio_bucket"
    assert value(registry, probability, group="upper-distal", le="0.9") == 0
    assert value(registry, probability, group="upper-distal", le="0.95") == 1
    assert value(registry, probability, group="lower-distal", le="0.35") == 1
    assert value(registry, "fracnode_group_probability_ratio_count", group="upper-proximal") == 0
    assert value(registry, "fracnode_exports_total", destination="pacs", outcome="failed") == 1
    assert value(registry, "fracnode_exports_total", destination="pacs", outcome="sent") == 1
    assert value(registry, "fracnode_export_retries_total", destination="pacs") == 1
    assert value(registry, "fracnode_export_dead_letters_total", destination="hl7") == 1
    assert value(registry, "fracnode_export_dead_letters_total", destination="pacs") == 0
    assert value(registry, "fracnode_study_latency_seconds_bucket", le="15.0") == 1
    assert value(registry, "fracnode_queue_jobs", state="running") == 1
    assert value(registry, "fracnode_queue_jobs", state="pending") == 0
    assert value(registry, "fracnode_outbox_items", state="pending") == 0
    assert value(registry, "fracnode_spool_free_bytes") == free
    assert value(registry, "fracnode_spool_capacity_bytes") == total
    assert value(registry, "fracnode_last_refresh_timestamp_seconds") == 1_700_000_000.0
    assert value(
        registry, "fracnode_model_info", group="upper-distal", kind="classifier",
        name=CARD.name, version=CARD.version, device_uid=CARD.device_uid,
    ) == 1

    # Nothing in any label value looks like a UID but the model's device UID; no patient data.
    exposition = generate_latest(registry).decode()
    assert study_uid not in exposition and "TEST^PATIENT" not in exposition and "TESTID001" not in exposition
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            for label, text in sample.labels.items():
                if label != "device_uid":
                    assert not UID_LIKE.match(text), (sample.name, label, text)


def test_refresh_zeroes_states_that_disappear() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process=False)
    metrics.refresh(queue_depth={"pending": 3, "running": 1}, outbox_depth={"pending": 2},
                    spool_free_bytes=1, spool_capacity_bytes=2)
    metrics.refresh(queue_depth={"running": 2}, outbox_depth={},
                    spool_free_bytes=1, spool_capacity_bytes=2)
    assert value(registry, "fracnode_queue_jobs", state="pending") == 0
    assert value(registry, "fracnode_queue_jobs", state="running") == 2
    assert value(registry, "fracnode_outbox_items", state="pending") == 0


def test_closed_label_sets_are_enforced() -> None:
    metrics = Metrics(CollectorRegistry(), process=False)
    with pytest.raises(ValueError, match="unknown pipeline stage"):
        metrics.observe_stage("postprocess", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown reason"):
        metrics.study_not_analysed("CHEST")  # type: ignore[arg-type]
    for reason in NOT_ANALYSED_REASONS:
        metrics.study_not_analysed(reason)  # type: ignore[arg-type]
    assert value(metrics.registry, "fracnode_studies_not_analysed_total", reason="no_model") == 1
    with pytest.raises(ZeroDivisionError), metrics.time_stage("report"):
        raise ZeroDivisionError
    assert value(metrics.registry, "fracnode_stage_duration_seconds_count", stage="report") == 1
    assert set(STAGES) == {"decode", "preprocess", "inference", "report", "send"}


def test_metric_names_include_unused_labelled_metrics_and_suffixes() -> None:
    registry = CollectorRegistry()
    names = metric_names(Metrics(registry))
    assert {
        "fracnode_instances_received_total",
        "fracnode_received_bytes_total",
        "fracnode_stage_duration_seconds_bucket",
        "fracnode_stage_duration_seconds_count",
        "fracnode_group_probability_ratio_bucket",
        "fracnode_model_info",
        "fracnode_build_info",
        "fracnode_queue_jobs",
        "fracnode_spool_free_bytes",
        "process_resident_memory_bytes",
    } <= names
    assert "fracnode_instances_received" not in names
    # Every fracnode metric carries a unit or a counter/info suffix in its exposed name.
    units = ("_total", "_seconds", "_bytes", "_ratio", "_images", "_jobs", "_items", "_info", "_active",
             "_bucket", "_count", "_sum", "_created")
    for name in names:
        if name.startswith("fracnode_"):
            assert name.endswith(units), name
    # One registry per Metrics: a second one on the same registry is refused.
    with pytest.raises(ValueError, match="Duplicated"):
        Metrics(registry)
