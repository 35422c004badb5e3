"""A `fracnode serve` process under test, with what the reliability tests and benches watch.

- :class:`CountingDestination`: a real pynetdicom storage SCP (SR, SC and radiograph classes)
  on a fixed loopback port that counts every C-STORE it receives by SOP Instance UID, and can
  answer a refusal status (e.g. 0xA700) or reject every association; it can be stopped and
  started again on the same port (a PACS outage).
- :class:`NodeProcess`: ``fracnode serve`` started with the bundled models, a fixed HTTP API
  port (``/healthz``, ``/studies/{uid}``, ``/metrics``), restartable on the same spool and
  database (kill -9 then start again), with an RSS watchdog thread that samples
  ``/proc/<pid>/status`` and records the peak. The watchdog also protects the shared machine: a
  node above ``hard_rss_bytes`` is killed (and the kill recorded) before it can exhaust memory.
- :func:`wait_until`, :func:`send_datasets`: polling and a pynetdicom SCU that reports statuses.

Nothing here patches the node: everything is observed from outside the process, as an operator
or a PACS would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless
from pynetdicom import AE, evt

from storage import repo
from storage.config import StorageConfig
from storage.db import Database
from storage.views import StudyDetail
from tests.conftest import free_port
from tests.nodeproc import wait_for_port

T = TypeVar("T")

# What the node sends (node.results): Comprehensive 3D SR, Secondary Capture, GSPS; plus the
# radiograph classes, so a misrouted source image would be counted too.
RESULT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
)
RESULT_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, JPEGBaseline8Bit)

TERMINAL_STATES = frozenset({"done", "failed"})


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class CountingDestination:
    """A storage SCP that counts what it receives (by SOP Instance UID) and answers ``status``.

    ``reject=True`` rejects every association (the calling AE title is never the allowed one).
    """

    def __init__(self, port: int | None = None, *, status: int = 0x0000, reject: bool = False) -> None:
        self.port = port or free_port()
        self.ae_title = "COUNTER"
        self.status = status
        self.reject = reject
        self.received: list[str] = []
        self.associations = 0
        self._lock = threading.Lock()
        self._ae: AE | None = None

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 1_048_576
        ae.network_timeout = 30
        ae.dimse_timeout = 30
        for uid in RESULT_SOP_CLASSES:
            ae.add_supported_context(uid, list(RESULT_SYNTAXES))
        if self.reject:
            ae.require_calling_aet = ["NOT-THE-NODE"]
        return ae

    def _on_store(self, event: Any) -> int:
        with self._lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self.associations += 1

    @property
    def running(self) -> bool:
        return self._ae is not None

    def start(self) -> None:
        self._ae = self._make_ae()
        self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_ACCEPTED, self._on_accepted)],
        )

    def stop(self) -> None:
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self.received)

    def toml(self, name: str) -> str:
        """The ``[[export.destinations]]`` table that points the node here."""
        return (
            f'\n[[export.destinations]]\nname = "{name}"\nae_title = "{self.ae_title}"\n'
            f'host = "127.0.0.1"\nport = {self.port}\n'
        )

    def __enter__(self) -> CountingDestination:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """What the reliability tests change from the embedded defaults (everything else stays)."""

    quiet_seconds: float = 0.5
    worker_threads: int = 1
    worker_retry_delay_s: float = 10.0
    max_associations: int = 16
    acse_timeout_s: float = 10.0
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 30.0
    export_max_attempts: int = 8
    export_base_delay_s: float = 0.5
    export_max_delay_s: float = 2.0
    extra: str = ""  # appended TOML (tables), e.g. destinations


def write_node_config(directory: Path, dicom_port: int, api_port: int, options: NodeOptions) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "fracnode.toml"
    o = options
    config.write_text(
        f"""
[dicom]
port = {dicom_port}
max_associations = {o.max_associations}
acse_timeout_s = {o.acse_timeout_s}
dimse_timeout_s = {o.dimse_timeout_s}
network_timeout_s = {o.network_timeout_s}

[spool]
directory = "{directory / "spool"}"
min_free_bytes = 0
min_free_fraction = 0.0

[database]
url = "sqlite:///{directory / "fracnode.db"}"

[assembly]
quiet_seconds = {o.quiet_seconds}
poll_seconds = 0.2

[worker]
threads = {o.worker_threads}
retry_delay_s = {o.worker_retry_delay_s}

[api]
port = {api_port}

[export]
max_attempts = {o.export_max_attempts}
base_delay_s = {o.export_base_delay_s}
max_delay_s = {o.export_max_delay_s}
{o.extra}
"""
    )
    return config


def rss_of(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes (VmRSS), None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


@dataclass
class NodeProcess:
    """``fracnode serve`` in ``directory``; start, kill -9 and restart on the same state."""

    directory: Path
    options: NodeOptions = field(default_factory=NodeOptions)
    hard_rss_bytes: int = 3 * 1024**3
    dicom_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    process: subprocess.Popen[str] | None = field(default=None, init=False)
    starts: int = field(default=0, init=False)
    peak_rss: int = field(default=0, init=False)
    watchdog_kills: int = field(default=0, init=False)
    config: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config = write_node_config(self.directory, self.dicom_port, self.api_port, self.options)
        self.log = self.directory / "serve.log"
        self._client = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=10.0)
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- lifetime ---------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        handle = self.log.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node", "--config", str(self.config), "serve"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"},
        )
        handle.close()
        self.starts += 1
        self._start_watchdog()
        wait_for_port("127.0.0.1", self.dicom_port, timeout=timeout, process=self.process)
        wait_until(self.healthy, timeout, "the node's /healthz")

    def _start_watchdog(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join()
        self._watch_stop = threading.Event()
        process = self.process
        assert process is not None
        self._watcher = threading.Thread(
            target=self._watch, args=(process, self._watch_stop), name="rss-watchdog", daemon=True
        )
        self._watcher.start()

    def _watch(self, process: subprocess.Popen[str], stop: threading.Event) -> None:
        while not stop.wait(0.05):
            rss = rss_of(process.pid)
            if rss is None or process.poll() is not None:
                return
            self.peak_rss = max(self.peak_rss, rss)
            if rss > self.hard_rss_bytes:
                self.watchdog_kills += 1
                process.send_signal(signal.SIGKILL)
                return

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int | None:
        self._watch_stop.set()
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        self._client.close()

    # -- observation ------------------------------------------------------------------------
    def rss(self) -> int:
        assert self.process is not None
        return rss_of(self.process.pid) or 0

    def healthy(self) -> bool:
        try:
            return self._client.get("/healthz", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> httpx.Response:
        return self._client.get(path)

    def study_json(self, uid: str) -> dict[str, Any] | None:
        response = self._client.get(f"/studies/{uid}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def metrics_text(self) -> str:
        response = self._client.get("/metrics")
        response.raise_for_status()
        return response.text

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample of ``/metrics`` (0.0 when absent); labels must match exactly."""
        want = labels or {}
        for line in self.metrics_text().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric_name, _, label_text = head.partition("{")
            if metric_name != name:
                continue
            found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part)
            if {k: v.strip('"') for k, v in found.items()} == want:
                return float(value)
        return 0.0

    def database(self) -> Database:
        return Database(StorageConfig(url=f"sqlite:///{self.directory / 'fracnode.db'}"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def study_details(db: Database, uids: Iterable[str]) -> dict[str, StudyDetail | None]:
    return {uid: repo.get_study(db, uid) for uid in uids}


def delivered_sop_uids(detail: StudyDetail) -> set[str]:
    return {
        item.sop_instance_uid
        for item in detail.outbox
        if item.kind == "dicom" and item.state == "delivered" and item.sop_instance_uid
    }


def analysed(detail: StudyDetail | None) -> bool:
    """The study is done and at least one anatomical group was analysed."""
    if detail is None or detail.study.state != "done" or not detail.study.outcome_json:
        return False
    outcome = json.loads(detail.study.outcome_json)
    return any(g.get("outcome") != "not_analysed" for g in outcome.get("groups", []))


def failure_reason(detail: StudyDetail) -> str | None:
    """Why a terminal study was not analysed: the study/job error or the not-analysed reasons."""
    if detail.study.state == "failed":
        return detail.study.error or next((j.last_error for j in detail.jobs if j.last_error), None)
    if detail.study.outcome_json:
        outcome = json.loads(detail.study.outcome_json)
        reasons = [str(i.get("reason") or i.get("error") or "") for i in outcome.get("not_analysed", [])]
        reasons += [str(g.get("reason") or "") for g in outcome.get("groups", []) if g.get("reason")]
        joined = "; ".join(r for r in reasons if r)
        return joined or None
    return None


@dataclass(frozen=True, slots=True)
class Sent:
    sop_uid: str
    study_uid: str
    status: int | None  # None: no response (association refused, aborted or reset)
    seconds: float


def send_datasets(
    port: int,
    datasets: Sequence[Dataset],
    *,
    calling: str = "FUZZSCU",
    called: str = "FRACNODE",
    max_pdu: int = 1_048_576,
    stop: threading.Event | None = None,
) -> list[Sent]:
    """One association sending ``datasets`` in order; stops at the first connection failure."""
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = 30
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    out: list[Sent] = []
    assoc = ae.associate("127.0.0.1", port, ae_title=called, max_pdu=max_pdu)
    if not assoc.is_established:
        return [Sent(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), None, 0.0) for ds in datasets]
    try:
        for ds in datasets:
            if stop is not None and stop.is_set():
                break
            started = time.perf_counter()
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, ValueError, OSError, AttributeError):
                status = None
            seconds = time.perf_counter() - started
            code = int(status.Status) if status is not None and "Status" in status else None
            out.append(Sent(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), code, seconds))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return out
