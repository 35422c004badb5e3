"""`fracnode serve` as a real process: durability across kill -9, the quiet window, late arrivals,
the operator commands, and configuration errors."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from storage import repo
from storage.config import StorageConfig
from storage.db import Database
from tests.conftest import free_port
from tests.dicomgen import DX_PRESENTATION, make_dataset, make_study, write
from tests.nodeproc import fracnode, start_serve, write_config
from tests.nodeproc import storescu as storescu_file


def studies_json(config: Path) -> list[dict[str, object]]:
    result = fracnode("studies", "list", "--json", config=config)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def storescu(port: int, *paths: Path) -> None:
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "FRACNODE", "127.0.0.1", str(port), *map(str, paths)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def test_done_when_dx_study_and_rg3_files(tmp_path: Path, rg3_files: dict[str, Path]) -> None:
    """Issue 2's acceptance: storescu of a 3-image DX study and of the RG3 files."""
    port = free_port()
    config = write_config(tmp_path / "node", port, quiet_seconds=1.0, extra="[worker]\nthreads = 0\n")
    node = start_serve(config, port, tmp_path / "serve.log")
    try:
        study, paths = make_study(tmp_path / "dx", 3)
        storescu(port, *paths)
        for name in ("RG3_UNCR", "RG3_J2KR", "RG3_J2KI"):
            sent = storescu_file(rg3_files[name], port)
            assert sent.returncode == 0, sent.stderr
        rg3_study = str(pydicom.dcmread(rg3_files["RG3_UNCR"], stop_before_pixels=True).StudyInstanceUID)

        def both_ready() -> list[dict[str, object]] | None:
            rows = {str(r["uid"]): r for r in studies_json(config)}
            if all(rows.get(uid, {}).get("state") == "ready" for uid in (study.study_uid, rg3_study)):
                return list(rows.values())
            return None

        rows = {str(r["uid"]): r for r in wait_until(both_ready, timeout=30)}
        assert rows[study.study_uid]["instance_count"] == 3
        # The RG3 files carry three different SOP Instance UIDs (one per encoding).
        assert rows[rg3_study]["instance_count"] == 3
        shown = fracnode("studies", "show", rg3_study, config=config)
        assert shown.returncode == 0, shown.stderr
        detail = json.loads(shown.stdout)
        assert detail["changes"] == [] and detail["series"][0]["instance_count"] == 3
        table = fracnode("studies", "list", config=config).stdout
        assert study.study_uid in table and rg3_study in table
        assert "TEST^PATIENT" not in table + shown.stdout and "TESTID001" not in shown.stdout
    finally:
        node.stop()
    assert "TEST^PATIENT" not in (tmp_path / "serve.log").read_text()


def test_kill_9_mid_study_loses_nothing_acknowledged(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "node", port, quiet_seconds=1.0, extra="[worker]\nthreads = 0\n")
    node = start_serve(config, port, tmp_path / "serve.log")
    study_uid = str(pydicom.uid.generate_uid())
    series_uid = str(pydicom.uid.generate_uid())
    datasets = [
        make_dataset(
            study_uid=study_uid, series_uid=series_uid, instance_number=i, rows=512, cols=512, seed=i
        )
        for i in range(200)
    ]
    acknowledged: list[str] = []
    stop = threading.Event()

    def sender() -> None:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="FRACNODE")
        if not assoc.is_established:
            return
        for ds in datasets:
            if stop.is_set():
                break
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, ValueError, OSError):
                break
            if status and getattr(status, "Status", None) == 0:
                acknowledged.append(str(ds.SOPInstanceUID))
            if not assoc.is_established:
                break
        if assoc.is_established:
            assoc.abort()

    thread = threading.Thread(target=sender)
    thread.start()
    wait_until(lambda: len(acknowledged) >= 20, timeout=120, interval=0.01)
    node.kill9()
    stop.set()
    thread.join(timeout=60)
    assert 20 <= len(acknowledged) < len(datasets), "the kill must land mid-study"

    # Everything acknowledged is in the database and whole on disk, before any restart.
    db = Database(StorageConfig(url=f"sqlite:///{tmp_path / 'node' / 'fracnode.db'}"))
    try:
        stored = {i.sop_uid: i for i in repo.study_instances(db, study_uid)}
    finally:
        db.dispose()
    missing = [uid for uid in acknowledged if uid not in stored]
    assert not missing, f"{len(missing)} acknowledged instances lost"
    for uid in acknowledged:
        ds = pydicom.dcmread(tmp_path / "node" / "spool" / stored[uid].path)
        assert str(ds.SOPInstanceUID) == uid and len(ds.PixelData) == 512 * 512 * 2

    # After a restart the study is resumed: it becomes ready after its quiet window.
    restarted = start_serve(config, port, tmp_path / "serve.log")
    try:
        rows = wait_until(
            lambda: [r for r in studies_json(config) if r["uid"] == study_uid and r["state"] == "ready"],
            timeout=30,
        )
        assert rows[0]["instance_count"] >= len(acknowledged)
    finally:
        restarted.stop()


def test_quiet_window_and_late_arrival_reopen(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "node", port, quiet_seconds=4.0, extra="[worker]\nthreads = 0\n")
    node = start_serve(config, port, tmp_path / "serve.log")
    db = Database(StorageConfig(url=f"sqlite:///{tmp_path / 'node' / 'fracnode.db'}"))
    try:
        study, paths = make_study(tmp_path / "dx", 2)
        storescu(port, *paths)
        assert [s.state for s in repo.list_studies(db) if s.uid == study.study_uid] == ["receiving"]
        wait_until(
            lambda: [r for r in studies_json(config) if r["uid"] == study.study_uid and r["state"] == "ready"]
        )

        # Process the job by hand (no worker threads in this node): claim it and finish it.
        job = repo.claim_job(db, "test", datetime.now(UTC), 60)
        assert job is not None and job.revision == 1
        assert repo.finish_job(db, job.id, revision=1, priority="routine", score=0.1, outcome_json="{}")
        assert [r["state"] for r in studies_json(config) if r["uid"] == study.study_uid] == ["done"]

        late = write(
            make_dataset(study_uid=study.study_uid, series_uid=study.series_uid, instance_number=9, seed=9),
            tmp_path / "late.dcm",
        )
        storescu(port, late)
        (row,) = [s for s in repo.list_studies(db) if s.uid == study.study_uid]
        assert (
            row.state == "receiving"
            and row.revision == 2
            and row.reopened is True
            and row.instance_count == 3
        )
        wait_until(
            lambda: [r for r in studies_json(config) if r["uid"] == study.study_uid and r["state"] == "ready"]
        )
    finally:
        db.dispose()
        node.stop()


def test_config_show_masks_secrets_and_invalid_values_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, 11112, extra='token = "0123456789abcdef-hunter2"\n')
    shown = fracnode("config", "show", config=config)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["api"]["token"] == "**********" and "hunter2" not in shown.stdout
    assert data["dicom"]["port"] == 11112

    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 99999\n")
    result = fracnode("config", "show", config=bad)
    assert result.returncode == 2 and "dicom.port" in result.stderr

    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[dicom]\nportt = 1\n")
    result = fracnode("config", "show", config=unknown)
    assert result.returncode == 2 and "dicom.portt" in result.stderr

    hosts = tmp_path / "hosts.toml"
    hosts.write_text('[dicom]\nallowed_hosts = ["pacs.example.org"]\n')
    result = fracnode("config", "show", config=hosts)
    assert result.returncode == 2 and "dicom.allowed_hosts" in result.stderr

    result = fracnode("config", "show", config=tmp_path / "missing.toml")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from node.settings import load_settings

    config = write_config(tmp_path, 11112)
    monkeypatch.setenv("FRACNODE_DICOM__PORT", "11113")
    assert load_settings(config).dicom.port == 11113
    monkeypatch.setenv("FRACNODE_CONFIG", str(config))
    monkeypatch.delenv("FRACNODE_DICOM__PORT")
    assert load_settings(None).dicom.port == 11112
