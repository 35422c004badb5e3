"""End to end with a real PACS: Orthanc auto-forwards radiographs to `fracnode serve`, which
analyses them with the bundled models and sends a TID 1500 SR and Secondary Captures back."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from storage import repo
from storage.config import StorageConfig
from storage.db import Database
from tests.conftest import free_port
from tests.dicomgen import make_study
from tests.nodeproc import fracnode, start_serve, write_config
from tests.orthanc import OrthancInstance, OrthancServer

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SOURCE_CLASSES = {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"}

pytestmark = pytest.mark.orthanc


def _done(db: Database, study_uid: str) -> dict[str, object] | None:
    detail = repo.get_study(db, study_uid)
    if detail is None or detail.study.state != "done" or not detail.outbox:
        return None
    if any(item.state != "delivered" for item in detail.outbox):
        return None
    return json.loads(detail.study.outcome_json or "{}")


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _results(instances: list[OrthancInstance]) -> tuple[list[OrthancInstance], list[OrthancInstance]]:
    srs = [i for i in instances if i.sop_class_uid == COMPREHENSIVE_3D_SR]
    scs = [i for i in instances if i.sop_class_uid == SECONDARY_CAPTURE]
    return srs, scs


def test_orthanc_round_trip_and_idempotent_resend(
    tmp_path: Path, orthanc_factory: Callable[..., OrthancServer], rg3_files: dict[str, Path]
) -> None:
    node_port = free_port()
    orthanc = orthanc_factory(forward_port=node_port)
    config = write_config(
        tmp_path / "node",
        node_port,
        quiet_seconds=2.0,
        extra=(
            "\n[[export.destinations]]\n"
            f'name = "orthanc"\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
            "\n[export]\nbase_delay_s = 0.5\nmax_delay_s = 2.0\n"
        ),
    )
    node = start_serve(config, node_port, tmp_path / "serve.log")
    db = Database(StorageConfig(url=f"sqlite:///{tmp_path / 'node' / 'fracnode.db'}"))
    try:
        study, paths = make_study(tmp_path / "dx", 3)
        for path in paths:
            orthanc.upload(path)
        for name in ("RG3_UNCR", "RG3_J2KR", "RG3_J2KI"):
            orthanc.upload(rg3_files[name])
        rg3_study = str(pydicom.dcmread(rg3_files["RG3_UNCR"], stop_before_pixels=True).StudyInstanceUID)

        outcomes = {}
        for uid in (study.study_uid, rg3_study):
            outcomes[uid] = _wait(lambda uid=uid: _done(db, uid), 300, f"study {uid} processed and delivered")

        held: dict[str, tuple[list[OrthancInstance], list[OrthancInstance]]] = {}
        for uid, sources in ((study.study_uid, 3), (rg3_study, 3)):
            outcome = outcomes[uid]
            assert isinstance(outcome, dict)
            analysed = sum(int(g["images"]) for g in outcome["groups"] if g["outcome"] != "not_analysed")
            instances = orthanc.wait_for(
                uid,
                lambda found, n=analysed: len(_results(found)[0]) == 1 and len(_results(found)[1]) == n,
                60,
            )
            srs, scs = _results(instances)
            held[uid] = (srs, scs)
            assert sum(1 for i in instances if i.sop_class_uid in SOURCE_CLASSES) == sources
            # The SR references the study's source images as evidence and its series is new.
            sr_file = orthanc.client.get(f"/instances/{srs[0].orthanc_id}/file")
            sr_file.raise_for_status()
            sr = pydicom.dcmread(io.BytesIO(sr_file.content))
            assert sr.StudyInstanceUID == uid
            evidence = {
                item.ReferencedSOPInstanceUID
                for series in sr.CurrentRequestedProcedureEvidenceSequence
                for ref in series.ReferencedSeriesSequence
                for item in ref.ReferencedSOPSequence
            }
            assert evidence == {i.sop_instance_uid for i in instances if i.sop_class_uid in SOURCE_CLASSES}
            assert "not for diagnostic use" in str(sr.SeriesDescription)
            assert sr.VerificationFlag == "UNVERIFIED"
            for sc in scs:
                assert sc.series_instance_uid not in {
                    i.series_instance_uid for i in instances if i.sop_class_uid in SOURCE_CLASSES
                }

        # The DX study is a wrist (BodyPartExamined WRIST): it is analysed by the upper-distal model.
        groups = {g["group"] for g in outcomes[study.study_uid]["groups"]}  # type: ignore[index]
        assert "upper-distal" in groups

        # Send the same study again: the node acknowledges duplicates, and Orthanc keeps one copy.
        response = orthanc.client.post(
            "/modalities/fracnode/store",
            json={
                "Resources": [orthanc.instances_of_study(study.study_uid)[0].orthanc_id],
                "Synchronous": True,
            },
            timeout=60,
        )
        response.raise_for_status()
        time.sleep(5)  # longer than the quiet window: a re-processing would have started
        srs, scs = _results(orthanc.instances_of_study(study.study_uid))
        assert ([s.sop_instance_uid for s in srs], sorted(s.sop_instance_uid for s in scs)) == (
            [s.sop_instance_uid for s in held[study.study_uid][0]],
            sorted(s.sop_instance_uid for s in held[study.study_uid][1]),
        )
        listed = fracnode("studies", "list", config=config)
        assert study.study_uid in listed.stdout and rg3_study in listed.stdout
        log_text = (tmp_path / "serve.log").read_text()
        assert "TEST^PATIENT" not in log_text
    finally:
        db.dispose()
        node.stop()
