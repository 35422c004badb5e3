"""Run a real node: in-process (DICOM server + storage) or as a ``fracnode serve`` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.ingest import StoreHandler
from node.metrics import Metrics
from node.scp import DicomServer, ScpConfig
from node.spool import Spool, SpoolConfig
from storage.config import StorageConfig
from storage.db import Database
from tests.conftest import free_port


def wait_for_port(
    host: str, port: int, timeout: float = 60.0, process: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the node exited with {process.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


@dataclass
class InProcessNode:
    server: DicomServer
    db: Database
    spool: Spool
    metrics: Metrics
    registry: CollectorRegistry
    port: int
    ae_title: str = "FRACNODE"


def start_in_process(
    tmp_path: Path,
    *,
    min_free_bytes: int = 0,
    min_free_fraction: float = 0.0,
    allowed_calling_aets: tuple[str, ...] = (),
    allowed_hosts: tuple[str, ...] = ("127.0.0.1",),
    max_pdu_bytes: int = 1_048_576,
    database_url: str | None = None,
) -> InProcessNode:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    db = Database(StorageConfig(url=database_url or f"sqlite:///{tmp_path / 'node.db'}"))
    db.create_all()
    spool = Spool(SpoolConfig(tmp_path / "spool", min_free_bytes, min_free_fraction))
    port = free_port()
    config = ScpConfig(
        ae_title="FRACNODE",
        host="127.0.0.1",
        port=port,
        max_pdu_bytes=max_pdu_bytes,
        max_associations=8,
        acse_timeout_s=10,
        dimse_timeout_s=20,
        network_timeout_s=20,
        allowed_calling_aets=allowed_calling_aets,
        allowed_hosts=allowed_hosts,
    )
    server = DicomServer(config, StoreHandler(spool, db, metrics), metrics)
    server.start()
    return InProcessNode(server, db, spool, metrics, registry, port)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[InProcessNode]:
    running = start_in_process(tmp_path)
    yield running
    running.server.stop()
    running.db.dispose()


def write_config(directory: Path, port: int, *, quiet_seconds: float = 1.0, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "fracnode.toml"
    config.write_text(
        f"""
[dicom]
port = {port}

[spool]
directory = "{directory / "spool"}"
min_free_bytes = 0
min_free_fraction = 0.0

[database]
url = "sqlite:///{directory / "fracnode.db"}"

[assembly]
quiet_seconds = {quiet_seconds}
poll_seconds = 0.2

[api]
port = 0
{extra}
"""
    )
    return config


def fracnode(
    *args: str, config: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "node"]
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class ServeProcess:
    process: subprocess.Popen[str]
    port: int
    config: Path
    log: Path

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_serve(config: Path, port: int, log: Path, env: dict[str, str] | None = None) -> ServeProcess:
    handle = log.open("a")
    process = subprocess.Popen(
        [sys.executable, "-m", "node", "--config", str(config), "serve"],
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    wait_for_port("127.0.0.1", port, process=process)
    return ServeProcess(process, port, config, log)


STORESCU_FLAGS = {
    ImplicitVRLittleEndian: ["-xi"],
    ExplicitVRLittleEndian: ["-xe"],
    DeflatedExplicitVRLittleEndian: ["-xd"],
}


def storescu_config(directory: Path, sop_class: str, syntax: str) -> Path:
    config = directory / "storescu.cfg"
    config.write_text(
        "[[TransferSyntaxes]]\n[TS]\nTransferSyntax1 = " + syntax + "\n"
        "[[PresentationContexts]]\n[PC]\nPresentationContext1 = " + sop_class + "\\TS\n"
        "[[Profiles]]\n[Default]\nPresentationContexts = PC\n"
    )
    return config


def storescu(
    path: Path, port: int, *extra: str, called: str = "FRACNODE"
) -> subprocess.CompletedProcess[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax in STORESCU_FLAGS:
        flags = STORESCU_FLAGS[syntax]
    else:
        cfg = storescu_config(path.parent, str(ds.file_meta.MediaStorageSOPClassUID), str(syntax))
        flags = ["-xf", str(cfg), "Default"]
    return subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", called, *flags, *extra, "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
