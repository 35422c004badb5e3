"""The HTTP API against a real uvicorn server in a thread and a real SQLite file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from node.api import ApiServer, ApiStartError, is_valid_uid
from node.metrics import Metrics
from storage import repo
from storage.config import StorageConfig
from storage.db import Database
from storage.views import InstanceRecord, OutboxKind, OutboxRecord

T0 = datetime(2024, 5, 6, 8, 0, tzinfo=UTC)
TOKEN = "s3cret-token-for-tests-0123456789"
ROOT = "1.2.826.0.1.3680043.8.498.77"
CR = "1.2.840.10008.5.1.4.1.1.1"
SR = "1.2.840.10008.5.1.4.1.1.88.33"


@dataclass(frozen=True)
class Planned:
    """A study to put in the database: arrival offset (minutes) and its result, if processed."""

    uid: str
    minutes: int
    priority: str | None
    score: float | None = None
    groups: tuple[str, ...] = ()


PLAN = (
    Planned(f"{ROOT}.1", 0, "routine", 0.05, ("upper-distal",)),
    Planned(f"{ROOT}.2", 1, "urgent", 0.81, ("lower-distal",)),
    Planned(f"{ROOT}.3", 2, "urgent", 0.95, ("upper-distal", "lower-distal")),
    Planned(f"{ROOT}.4", 3, "review", 0.40, ("upper-distal",)),
    Planned(f"{ROOT}.5", 4, "not_analysed", None, ()),
    Planned(f"{ROOT}.6", 5, None),  # still receiving
    Planned(f"{ROOT}.7", 6, "urgent", 0.81, ("upper-middle",)),
)
# NOT ANALYSED (5) above ROUTINE (1) by default: a study the node could not read is never hidden.
BY_PRIORITY = [f"{ROOT}.{n}" for n in (3, 2, 7, 4, 5, 1, 6)]


def record(db: Database, n: int, plan: Planned) -> None:
    at = T0 + timedelta(minutes=plan.minutes)
    repo.record_instance(
            db,
        InstanceRecord(
            study_uid=plan.uid,
            series_uid=f"{plan.uid}.1",
            sop_uid=f"{plan.uid}.1.1",
            sop_class_uid=CR,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"spool/{n}.dcm",
            size_bytes=1000 + n,
            sha256=f"{n:064x}",
            modality="CR",
            body_part="WRIST",
            calling_ae="MODALITY",
            received_at=at,
        ),
    )


def populate(db: Database) -> None:
    """Studies received, made ready and finished by a worker through the storage API."""
    processed = {plan.uid: plan for plan in PLAN if plan.priority is not None}
    for n, plan in enumerate(PLAN):
        if plan.priority is not None:
            record(db, n, plan)
    done_at = T0 + timedelta(minutes=10)
    repo.promote_quiet_studies(db, quiet_seconds=0, now=T0 + timedelta(minutes=7))
    receiving = [plan.uid for plan in PLAN if plan.priority is None]
    for n, plan in enumerate(PLAN):
        if plan.priority is None:
            record(db, n, plan)
    while (job := repo.claim_job(db, "test-worker", done_at, 60.0)) is not None:
        plan = processed[job.study_uid]
        outbox = [
            OutboxRecord(
                study_uid=plan.uid,
                revision=job.revision,
                kind=OutboxKind.DICOM,
                destination="pacs",
                payload_path=f"results/{plan.uid}/sr.dcm",
                sop_instance_uid=f"{plan.uid}.99",
                dimse_priority=1 if plan.priority == "urgent" else 0,
            )
        ]
        assert repo.finish_job(
            db,
            job.id,
            revision=job.revision,
            priority=plan.priority or "",
            score=plan.score,
            outcome_json=json.dumps({"priority": plan.priority, "groups": list(plan.groups)}),
            groups=plan.groups,
            outbox=outbox,
            now=done_at,
        )
    for uid in receiving:
        detail = repo.get_study(db, uid)
        assert detail is not None and detail.study.state == "receiving"
    # The urgent study's SR is acknowledged by the PACS.
    item = repo.claim_outbox(db, done_at, "test-outbox")
    assert item is not None and item.study_uid in {f"{ROOT}.2", f"{ROOT}.3", f"{ROOT}.7"}
    repo.outbox_delivered(db, item.id, 0x0000, done_at + timedelta(seconds=2))


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    path = tmp_path_factory.mktemp("api") / "fracnode.db"
    db = Database(StorageConfig(url=f"sqlite:///{path}"))
    db.create_all()
    populate(db)
    yield db
    db.dispose()


@dataclass
class Running:
    server: ApiServer
    metrics: Metrics
    ready: dict[str, bool | str]

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"http://127.0.0.1:{self.server.port}", headers=headers, timeout=10)


def start(db: Database, token: str | None, port: int = 0) -> Running:
    metrics = Metrics(CollectorRegistry())
    ready: dict[str, bool | str] = {"database": True, "spool": True, "models": True}
    server = ApiServer(db=db, metrics=metrics, readiness=lambda: ready, token=token, port=port)
    server.start()
    return Running(server, metrics, ready)


@pytest.fixture(scope="module")
def open_api(database: Database) -> Iterator[Running]:
    running = start(database, token=None)
    yield running
    running.server.stop()


@pytest.fixture(scope="module")
def guarded_api(database: Database) -> Iterator[Running]:
    running = start(database, token=TOKEN)
    yield running
    running.server.stop()


def uids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["studies"])
    return [study["uid"] for study in body["studies"]]


def test_worklist_orders_by_priority_score_then_arrival(open_api: Running) -> None:
    with open_api.client() as client:
        response = client.get("/worklist")
        assert uids(response) == BY_PRIORITY
        first = response.json()["studies"][0]
    assert first["priority"] == "urgent"
    assert first["score"] == 0.95
    assert first["state"] == "done"
    assert first["groups"] == ["lower-distal", "upper-distal"]
    assert first["outcome"] == {"priority": "urgent", "groups": ["upper-distal", "lower-distal"]}
    assert "outcome_json" not in first
    assert datetime.fromisoformat(first["first_received_at"]) == T0 + timedelta(minutes=2)


def test_worklist_filters(open_api: Running) -> None:
    with open_api.client() as client:
        assert uids(client.get("/worklist", params={"status": "receiving"})) == [f"{ROOT}.6"]
        done = uids(client.get("/worklist", params={"status": "done"}))
        assert done == [uid for uid in BY_PRIORITY if uid != f"{ROOT}.6"]
        both = client.get("/worklist", params=[("status", "done"), ("status", "receiving")])
        assert uids(both) == BY_PRIORITY
        assert uids(client.get("/worklist", params={"status": "receiving,failed"})) == [f"{ROOT}.6"]
        assert uids(client.get("/worklist", params={"group": "upper-distal"})) == [
            f"{ROOT}.3", f"{ROOT}.4", f"{ROOT}.1",
        ]
        assert uids(client.get("/worklist", params={"group": "lower-proximal"})) == []
        window = {"since": (T0 + timedelta(minutes=2)).isoformat(), "until": "2024-05-06T08:05:00Z"}
        assert uids(client.get("/worklist", params=window)) == [f"{ROOT}.3", f"{ROOT}.4", f"{ROOT}.5"]
        # a time without offset is UTC
        assert uids(client.get("/worklist", params={"since": "2024-05-06T08:06:00"})) == [f"{ROOT}.7"]
        assert uids(client.get("/worklist", params={"limit": 2})) == BY_PRIORITY[:2]


def test_worklist_pages_say_how_many_and_what_is_left(open_api: Running) -> None:
    with open_api.client() as client:
        first = client.get("/worklist", params={"limit": 3}).json()
        assert (first["count"], first["total"], first["more"], first["next_offset"]) == (3, 7, True, 3)
        expected = {"urgent": 3, "review": 1, "not_analysed": 1, "routine": 1, "pending": 1}
        assert first["by_priority"] == expected
        second = client.get("/worklist", params={"limit": 3, "offset": 3}).json()
        last = client.get("/worklist", params={"limit": 3, "offset": 6}).json()
        assert (last["count"], last["more"], last["next_offset"]) == (1, False, None)
        paged = [s["uid"] for page in (first, second, last) for s in page["studies"]]
        assert paged == BY_PRIORITY
        studies = client.get("/studies", params={"limit": 5}).json()
        assert (studies["count"], studies["total"], studies["more"]) == (5, 7, True)
        assert studies["studies"][0]["uid"] == f"{ROOT}.7"  # most recently received first
        assert client.get("/studies", params={"offset": -1}).status_code == 422


def test_worklist_can_put_not_analysed_below_routine(database: Database) -> None:
    from node.settings import WorklistSettings

    server = ApiServer(
        db=database,
        metrics=Metrics(CollectorRegistry(), process=False),
        readiness=dict,
        token=None,
        worklist_order=WorklistSettings(not_analysed="below_routine").order(),
    )
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
            listed = [s["uid"] for s in client.get("/worklist").json()["studies"]]
    finally:
        server.stop()
    assert listed == [f"{ROOT}.{n}" for n in (3, 2, 7, 4, 1, 5, 6)]


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        ({"status": "finished"}, 422, "unknown status finished"),
        ({"group": "skull"}, 422, "upper-proximal"),
        ({"since": "yesterday"}, 422, "datetime"),
        ({"limit": 0}, 422, "greater than or equal to 1"),
        ({"limit": 5000}, 422, "less than or equal to 1000"),
        ({"since": "2024-05-06T09:00:00Z", "until": "2024-05-06T08:00:00Z"}, 400, "since must be earlier"),
    ],
)
def test_bad_filters_get_4xx_with_a_message(
    open_api: Running, params: dict[str, str | int], status: int, words: str
) -> None:
    with open_api.client() as client:
        response = client.get("/worklist", params=params)
    assert response.status_code == status
    assert words in json.dumps(response.json()["detail"])


def test_study_detail(open_api: Running) -> None:
    with open_api.client() as client:
        delivered = [
            uid for uid in (f"{ROOT}.2", f"{ROOT}.3", f"{ROOT}.7")
            if any(o["state"] == "delivered" for o in client.get(f"/studies/{uid}").json()["outputs"])
        ]
        assert len(delivered) == 1
        body = client.get(f"/studies/{delivered[0]}").json()
    study = body["study"]
    assert study["uid"] == delivered[0]
    assert study["priority"] == "urgent"
    assert [s["body_part"] for s in body["series"]] == ["WRIST"]
    assert [(j["state"], j["attempts"]) for j in body["jobs"]] == [("done", 1)]
    (output,) = body["outputs"]
    assert (output["destination"], output["state"], output["dimse_priority"]) == ("pacs", "delivered", 1)
    processing = datetime.fromisoformat(study["completed_at"]) - datetime.fromisoformat(study["ready_at"])
    assert body["timings"]["processing_seconds"] == pytest.approx(processing.total_seconds())
    assert body["timings"]["ready_to_last_delivered_seconds"] > body["timings"]["processing_seconds"]
    assert "patient" not in json.dumps(body).lower()


def test_study_not_yet_processed_has_no_outcome(open_api: Running) -> None:
    with open_api.client() as client:
        body = client.get(f"/studies/{ROOT}.6").json()
    assert body["study"]["state"] == "receiving"
    assert body["study"]["outcome"] is None
    assert body["outputs"] == [] and body["jobs"] == []
    assert body["timings"]["processing_seconds"] is None


def test_unknown_study_is_404_and_malformed_uid_is_400(open_api: Running) -> None:
    with open_api.client() as client:
        missing = client.get(f"/studies/{ROOT}.999")
        assert missing.status_code == 404
        assert "no such study" in missing.json()["detail"]
        for bad in ("1.2.abc", "01.2.3", "1..2", "1." + "2" * 70, "1.2.3%20"):
            response = client.get(f"/studies/{bad}")
            assert response.status_code == 400, bad
            assert "digits and dots" in response.json()["detail"]


def test_malformed_uid_is_refused_before_any_query(tmp_path: Path) -> None:
    # A database without tables: any query fails with a server error.
    db = Database(StorageConfig(url=f"sqlite:///{tmp_path / 'empty.db'}"))
    running = start(db, token=None)
    try:
        with running.client() as client:
            assert client.get("/studies/1.2.x").status_code == 400
            assert client.get(f"/studies/{ROOT}.1").status_code == 500
        codes = {
            code: running.metrics.registry.get_sample_value(
                "fracnode_http_requests_total", {"route": "/studies/{study_uid}", "code": code}
            )
            for code in ("400", "500")
        }
        assert codes == {"400": 1.0, "500": 1.0}
    finally:
        running.server.stop()
        db.dispose()


def test_uid_rule_is_pydicoms() -> None:
    import warnings

    from pydicom.uid import UID

    from node import uids

    assert is_valid_uid is uids.is_valid_uid  # one rule, shared by ingest, spool, API and CLI
    cases = ["1.2.840.10008.5.1.4.1.1.1", "2.25.0", "1", "1.02", "1.2." + "3" * 61, "1..2", "1.2.", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in cases:
            assert is_valid_uid(case) == UID(case).is_valid, case
    assert not is_valid_uid("1.02") and not is_valid_uid(b"1.2")
    assert not is_valid_uid(" 1.2")  # pydicom strips the padding; a spool path must not


def test_token_guards_everything_but_health(guarded_api: Running) -> None:
    with guarded_api.client() as anonymous, guarded_api.client("wrong-token-of-some-length") as wrong:
        for path in ("/worklist", f"/studies/{ROOT}.1", "/metrics", "/docs", "/openapi.json", "/nowhere"):
            for client in (anonymous, wrong):
                response = client.get(path)
                assert response.status_code == 401, path
                assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        assert anonymous.get("/worklist", headers={"Authorization": TOKEN}).status_code == 401
    with guarded_api.client(TOKEN) as client:
        assert uids(client.get("/worklist")) == BY_PRIORITY
        assert client.get(f"/studies/{ROOT}.1").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert "/worklist" in client.get("/openapi.json").json()["paths"]
        assert client.get("/nowhere").status_code == 404


def test_readiness_reports_failing_checks(open_api: Running) -> None:
    with open_api.client() as client:
        ok = client.get("/readyz")
        assert ok.status_code == 200
        assert ok.json() == {"ready": True, "checks": {"database": True, "spool": True, "models": True}}
        open_api.ready["spool"] = "below the free-space watermark"
        try:
            failing = client.get("/readyz")
        finally:
            open_api.ready["spool"] = True
    assert failing.status_code == 503
    assert failing.json()["ready"] is False
    assert failing.json()["checks"]["spool"] == "below the free-space watermark"


def test_metrics_endpoint_serves_the_registry(open_api: Running) -> None:
    with open_api.client() as client:
        before = open_api.metrics.registry.get_sample_value(
            "fracnode_http_requests_total", {"route": "/studies/{study_uid}", "code": "404"}
        ) or 0.0
        client.get(f"/studies/{ROOT}.12345")
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "fracnode_build_info{" in response.text
    after = open_api.metrics.registry.get_sample_value(
        "fracnode_http_requests_total", {"route": "/studies/{study_uid}", "code": "404"}
    )
    assert after == before + 1
    assert 'route="/studies/{study_uid}"' in response.text
    assert ROOT not in response.text  # no UID in any label


def test_openapi_documents_the_endpoints(open_api: Running) -> None:
    with open_api.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200
    assert {"/worklist", "/studies", "/studies/{study_uid}", "/healthz", "/readyz", "/metrics"} <= set(paths)
    names = {p["name"] for p in paths["/worklist"]["get"]["parameters"]}
    assert names == {"status", "group", "since", "until", "limit", "offset"}


def test_fixed_port_and_busy_port(database: Database, port: int) -> None:
    running = start(database, token=None, port=port)
    try:
        assert running.server.port == port
        with running.client() as client:
            assert client.get("/healthz").status_code == 200
        with pytest.raises(ApiStartError, match="cannot bind"):
            start(database, token=None, port=port)
    finally:
        running.server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
