"""Supervision: loop threads survive any exception, dead and stuck threads are replaced, leases
are renewed while their holder lives and reaped when it dies, a job's failures are bounded by
``max_attempts`` and end on the worklist as NOT ANALYSED, and the next study is still analysed."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydicom.uid import generate_uid

from inference.routing import load_keywords
from node.analysis import AnalysisConfig
from node.logcontext import ContextFilter, log_context
from node.metrics import Metrics
from node.modelset import load_model_set
from node.outputs import OutputConfig
from node.redact import safe_reason
from node.supervision import LeaseBook, LoopThread, Supervisor, SupervisorConfig
from node.worker import StudyProcessor, WorkerConfig, failure_reason
from storage import repo
from storage.config import StorageConfig
from storage.db import Database
from storage.views import JobState, StudyState
from tests.dicomgen import make_dataset
from tests.modelgen import all_groups
from tests.nodeproc import InProcessNode
from tests.test_worker import _send


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_a_loop_thread_survives_any_exception() -> None:
    calls: list[int] = []

    def step(_name: str) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise AttributeError("'str' object has no attribute 'CodeValue' (value 19311231)")
        if len(calls) == 2:
            raise MemoryError()
        return False

    stop = threading.Event()
    loop = LoopThread("worker", "w-0", step, idle_s=0.01, stop=stop)
    loop.start()
    wait_for(lambda: len(calls) >= 4)
    assert loop.alive and loop.failures == 2
    stop.set()
    loop.join(2)
    assert not loop.alive


def test_exception_descriptions_carry_no_values() -> None:
    exc = ValueError("Unable to convert '19311231' to 'DA'")
    assert "19311231" not in safe_reason(exc)
    assert "19311231" not in failure_reason(exc)
    assert failure_reason(exc).startswith("ValueError")


def _supervisor(db: Database, **config: float) -> tuple[Supervisor, CollectorRegistry]:
    registry = CollectorRegistry()
    supervisor = Supervisor(db, Metrics(registry, process=False), LeaseBook(), SupervisorConfig(**config))
    return supervisor, registry


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_thread_is_replaced_and_health_says_so(db: Database) -> None:
    supervisor, registry = _supervisor(db)
    generations: list[int] = []

    def factory(generation: int) -> LoopThread:
        generations.append(generation)

        def step(_name: str) -> bool:
            if generation == 0:
                raise SystemExit  # not an Exception: the thread really dies
            return False

        return LoopThread("worker", f"w-0-r{generation}", step, idle_s=0.01)

    supervisor.supervise("worker-0", factory)
    wait_for(lambda: not supervisor.loops[0].alive)
    live = supervisor.liveness()
    assert live["w-0-r0"] == "dead" and not supervisor.components_alive("worker")
    supervisor.tick()
    assert generations == [0, 1]
    assert supervisor.loops[0].alive and supervisor.components_alive("worker")
    assert all(v is True for v in supervisor.liveness().values())
    assert registry.get_sample_value("fracnode_thread_restarts_total", {"component": "worker"}) == 1
    supervisor.loops[0].stop_event.set()


def test_a_stuck_thread_is_replaced_and_its_lease_let_go(db: Database) -> None:
    supervisor, _ = _supervisor(db, stuck_after_s=0.3, job_lease_s=3.0)
    release = threading.Event()

    def factory(generation: int) -> LoopThread:
        def step(_name: str) -> bool:
            if generation == 0:
                release.wait(30)  # a model call that never returns
            return False

        return LoopThread("worker", f"w-r{generation}", step, idle_s=0.01)

    supervisor.supervise("worker-0", factory)
    stuck = supervisor.loops[0]
    time.sleep(0.4)
    assert str(supervisor.liveness()["w-r0"]).startswith("stuck")
    supervisor.leases.hold_job(1, "w-r0")
    assert not supervisor._holder_ok("w-r0", time.monotonic())  # no renewal for a stuck holder
    supervisor.tick()
    assert stuck.abandoned.is_set() and supervisor.loops[0] is not stuck and supervisor.loops[0].alive
    release.set()
    stuck.join(2)
    assert not stuck.alive  # an abandoned thread ends after its pass
    supervisor.loops[0].stop_event.set()


def _ready_job(db: Database, uid: str = "1.2.3") -> None:
    from tests.test_storage import rec

    repo.record_instance(db, rec("1.1", study=uid, at=datetime.now(UTC) - timedelta(minutes=1)))
    assert repo.promote_quiet_studies(db, 5, datetime.now(UTC)) == [uid]


def test_live_holders_keep_their_lease_and_dead_ones_are_reaped(db: Database) -> None:
    supervisor, registry = _supervisor(db, job_lease_s=3.0)
    _ready_job(db)
    job = repo.claim_job(db, "w-live", datetime.now(UTC), 3.0)
    assert job is not None
    live = LoopThread("worker", "w-live", lambda _n: False, idle_s=0.05)
    supervisor.supervise("worker-0", lambda _g: live)
    supervisor.leases.hold_job(job.id, "w-live")
    in_4s = datetime.now(UTC) + timedelta(seconds=4)
    supervisor.renew_leases()  # a fresh 3 s from now
    supervisor.clock = lambda: in_4s
    supervisor.renew_leases()  # the live holder renews: the lease runs to in_4s + 3 s
    supervisor.reap()
    assert job_state(db, job.id) is JobState.RUNNING
    # The holder dies (its process is gone): nobody renews; past the lease the reaper takes it back.
    supervisor.leases.release_job(job.id)
    supervisor.clock = lambda: in_4s + timedelta(seconds=3.5)
    supervisor.reap()
    assert job_state(db, job.id) is JobState.PENDING
    assert registry.get_sample_value("fracnode_leases_reaped_total", {"kind": "job"}) == 1
    live.stop_event.set()


class _Exploding(StudyProcessor):
    """The real processor, with analysis replaced by what a hostile dataset once did to it."""

    explode_for: set[str] = set()

    def process(self, job, worker_id=None):  # type: ignore[no-untyped-def]
        if job.study_uid in self.explode_for:
            raise AttributeError("'str' object has no attribute 'CodeValue'")
        return super().process(job, worker_id)


def test_failures_are_bounded_by_max_attempts_and_the_next_study_is_analysed(
    node: InProcessNode, tmp_path: Path
) -> None:
    models = all_groups(tmp_path / "models")
    bad_study, good_study = str(generate_uid()), str(generate_uid())
    for study in (bad_study, good_study):
        series = generate_uid()
        _send(node, [make_dataset(study_uid=study, series_uid=series, rows=200, cols=160)])
    assert sorted(repo.promote_quiet_studies(node.db, 0.0, datetime.now(UTC), max_attempts=2)) == sorted(
        [bad_study, good_study]
    )
    processor = _Exploding(
        node.db,
        node.spool,
        load_model_set(models),
        load_keywords(None),
        AnalysisConfig(batch_size=4),
        OutputConfig(directory=tmp_path / "results", software_version="test", destinations=("pacs",)),
        node.metrics,
        WorkerConfig(retry_delay_s=0.0),
    )
    processor.explode_for = {bad_study}
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.addFilter(ContextFilter())
    worker_log = logging.getLogger("node.worker")
    worker_log.addHandler(handler)
    level = worker_log.level
    worker_log.setLevel(logging.INFO)
    try:
        for _ in range(3):  # bad (1st attempt), good, bad (2nd and last attempt)
            assert processor.run_once("w")
        assert not processor.run_once("w")
    finally:
        worker_log.removeHandler(handler)
        worker_log.setLevel(level)
    # Every line about a job says which study, job and revision it is about.
    logged = lines.getvalue().splitlines()
    failed = [line for line in logged if line.startswith("study processing failed")]
    assert len(failed) == 2
    assert all(f"[study={bad_study} job=" in line and "revision=1]" in line for line in failed)
    assert any(line.startswith("study processed") and f"study={good_study}" in line for line in logged)

    bad = repo.get_study(node.db, bad_study)
    assert bad is not None and bad.study.state is StudyState.FAILED
    # the type and a fixed description: library text may quote values
    assert bad.study.error is not None and bad.study.error.startswith("AttributeError")
    assert "CodeValue" not in bad.study.error
    assert [j.attempts for j in bad.jobs] == [2] and bad.jobs[0].state is JobState.DEAD
    good = repo.get_study(node.db, good_study)
    assert good is not None and good.study.state is StudyState.DONE
    assert json.loads(good.study.outcome_json or "{}")["groups"]
    # A given-up study stays on the worklist, as NOT ANALYSED with its reason.
    listed = {s.uid: s for s in repo.worklist(node.db)}
    assert listed[bad_study].priority == "not_analysed"
    assert node.registry.get_sample_value("fracnode_studies_failed_total") == 1


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(StorageConfig(f"sqlite:///{tmp_path / 'node.db'}"))
    database.create_all()
    yield database
    database.dispose()


def job_state(db: Database, job_id: int) -> JobState:
    (job,) = [j for j in repo.list_jobs(db) if j.id == job_id]
    return job.state


def test_healthz_is_red_for_a_dead_thread_and_ignores_destinations(db: Database, port: int) -> None:
    import httpx

    from node.api import ApiServer

    live: dict[str, bool | str] = {"supervisor": True, "worker-0": True, "destination:pacs": "unreachable"}
    server = ApiServer(
        db=db,
        metrics=Metrics(CollectorRegistry(), process=False),
        readiness=lambda: {"database": True},
        liveness=lambda: live,
        token=None,
        port=port,
    )
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}") as client:
            ok = client.get("/healthz")
            assert ok.status_code == 200 and ok.json()["checks"]["destination:pacs"] == "unreachable"
            live["worker-0"] = "dead"
            red = client.get("/healthz")
            assert red.status_code == 503 and red.json()["status"] == "unhealthy"
            assert client.get("/readyz").status_code == 200  # readiness is about receiving
    finally:
        server.stop()


def test_the_cli_logging_withholds_values_that_pydicom_quotes(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = """
import logging
import pydicom.config
from pydicom.valuerep import validate_value
from node.cli import configure_logging
configure_logging("INFO")
assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
validate_value("DA", "1931-13-45", pydicom.config.WARN)  # pydicom warns, quoting the value
logging.getLogger("pydicom").warning("Invalid value for VR PN: %r", "DOE^JOHN")
logging.getLogger("node.worker").info("study processed (job %d)", 7)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "1931-13-45" not in done.stderr and "DOE^JOHN" not in done.stderr
    assert "withheld" in done.stderr and "study processed (job 7)" in done.stderr


def test_log_context_nests_and_is_per_thread() -> None:
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("test.logcontext")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with log_context(study="1.2.3", job=7):
            with log_context(destination="pacs", missing=None):
                logger.info("sent %d objects", 2)
            other = threading.Thread(target=lambda: logger.info("elsewhere"))
            other.start()
            other.join()
        logger.info("after")
    finally:
        logger.removeHandler(handler)
    assert lines.getvalue().splitlines() == [
        "sent 2 objects [study=1.2.3 job=7 destination=pacs]",
        "elsewhere",
        "after",
    ]
