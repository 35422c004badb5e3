"""`fracnode studies list` and `outbox list` page through what the node holds and say when there
is more: a listing never cuts off silently."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from storage import repo
from storage.config import StorageConfig
from storage.db import Database
from storage.views import OutboxKind, OutboxRecord
from tests.nodeproc import fracnode, write_config
from tests.test_storage import rec


def _node_with(tmp_path: Path, studies: int) -> Path:
    config = write_config(tmp_path, 11112)  # never served here
    db = Database(StorageConfig(f"sqlite:///{tmp_path / 'fracnode.db'}"))
    db.create_all()
    t0 = datetime.now(UTC) - timedelta(hours=1)
    for n in range(studies):
        uid = f"1.2.3.{n + 1}"
        repo.record_instance(db, rec(f"{uid}.1.1", study=uid, at=t0 + timedelta(minutes=n)))
        repo.enqueue_outbox(
            db,
            [
                OutboxRecord(
                    study_uid=uid,
                    revision=1,
                    destination="pacs",
                    kind=OutboxKind.DICOM,
                    payload_path=str(tmp_path / f"{n}.dcm"),
                    sop_instance_uid=f"{uid}.9",
                    dimse_priority=0,
                )
            ],
        )
    db.dispose()
    return config


def test_studies_list_pages_and_says_what_is_left(tmp_path: Path) -> None:
    config = _node_with(tmp_path, 5)
    first = fracnode("studies", "list", "--limit", "2", config=config)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.strip().splitlines()
    assert len(lines) == 1 + 2 + 1  # header, two rows, the page line
    assert lines[-1] == "rows 1-2 of 5; more with --offset 2"
    assert "1.2.3.5" in lines[1]  # most recently received first
    last = fracnode("studies", "list", "--limit", "2", "--offset", "4", config=config)
    assert last.stdout.strip().splitlines()[-1] == "rows 5-5 of 5"
    as_json = fracnode("studies", "list", "--limit", "3", "--json", config=config)
    assert [s["uid"] for s in json.loads(as_json.stdout)] == ["1.2.3.5", "1.2.3.4", "1.2.3.3"]
    assert "rows 1-3 of 5; more with --offset 3" in as_json.stderr
    bad = fracnode("studies", "list", "--offset", "-1", config=config)
    assert bad.returncode == 2 and "must not be negative" in bad.stderr


def test_outbox_list_pages_and_help_states_the_limits(tmp_path: Path) -> None:
    config = _node_with(tmp_path, 3)
    listed = fracnode("outbox", "list", "--limit", "2", config=config)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip().splitlines()[-1] == "rows 1-2 of 3; more with --offset 2"
    helped = fracnode("outbox", "list", "--help", config=config)
    assert "default 500" in helped.stdout and "--offset" in helped.stdout
    helped = fracnode("studies", "list", "--help", config=config)
    assert "default 100" in helped.stdout
