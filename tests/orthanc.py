"""A real PACS for tests: the Debian Orthanc binary, started per test on free loopback ports.

The fixture writes a configuration into the test's ``tmp_path`` (storage and index there, free
DICOM and HTTP ports, HTTP reachable from this machine only, PDU length within Orthanc's
4096-131072 range, no plugins) and, when asked, a Lua script that forwards every CR and DX
instance it stores to the modality "fracnode" (``SendToModality``) - the node under test. Results
the node sends back (SR, SC) are not forwarded, so nothing loops. The server is stopped by PID.

Fixtures:

- ``orthanc``: a server that forwards nothing.
- ``orthanc_factory``: ``start(forward_port=None, forward_aet="FRACNODE") -> OrthancServer``,
  for a test that starts its node first and then an Orthanc that forwards to it.

Both skip the test when Orthanc is not installed (``make test`` installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ORTHANC_AET = "ORTHANC"
START_TIMEOUT_S = 30.0
FORWARD_MODALITY = "fracnode"

_LUA_FORWARD = """
-- Written by tests/orthanc.py: forward acquired radiographs to the node under test.
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if (modality == 'CR' or modality == 'DX') and origin['RequestOrigin'] ~= 'Lua' then
    SendToModality(instanceId, '%s')
  end
end
"""


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)


@dataclass(frozen=True, slots=True)
class OrthancInstance:
    """One instance as Orthanc's REST API lists it."""

    orthanc_id: str
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    modality: str


@dataclass
class OrthancServer:
    """A running Orthanc and the REST calls the tests need."""

    root: Path
    http_port: int
    dicom_port: int
    aet: str
    process: subprocess.Popen[bytes]
    client: httpx.Client = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self, lines: int = 40) -> str:
        path = self.root / "orthanc.log"
        text = path.read_text(errors="replace") if path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def upload(self, path: Path) -> str:
        """POST /instances; returns Orthanc's instance ID."""
        response = self.client.post("/instances", content=Path(path).read_bytes())
        response.raise_for_status()
        return str(response.json()["ID"])

    def tags(self, orthanc_id: str) -> dict[str, object]:
        """The instance's tags by keyword (GET /instances/{id}/simplified-tags)."""
        response = self.client.get(f"/instances/{orthanc_id}/simplified-tags")
        response.raise_for_status()
        data: dict[str, object] = response.json()
        return data

    def instances_of_study(self, study_uid: str) -> list[OrthancInstance]:
        """Every instance Orthanc holds for the study, with its SOP class."""
        found = self.client.post(
            "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        )
        found.raise_for_status()
        out: list[OrthancInstance] = []
        for orthanc_id in found.json():
            tags = self.tags(orthanc_id)
            out.append(
                OrthancInstance(
                    orthanc_id=orthanc_id,
                    sop_instance_uid=str(tags.get("SOPInstanceUID", "")),
                    sop_class_uid=str(tags.get("SOPClassUID", "")),
                    series_instance_uid=str(tags.get("SeriesInstanceUID", "")),
                    modality=str(tags.get("Modality", "")),
                )
            )
        return out

    def count_instances(self) -> int:
        response = self.client.get("/statistics")
        response.raise_for_status()
        return int(response.json()["CountInstances"])

    def wait_for(
        self,
        study_uid: str,
        predicate: Callable[[list[OrthancInstance]], bool],
        timeout_s: float = 30.0,
    ) -> list[OrthancInstance]:
        """Poll the study's instances until ``predicate`` holds; fail the test on timeout."""
        deadline = time.monotonic() + timeout_s
        instances = self.instances_of_study(study_uid)
        while not predicate(instances):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"Orthanc did not reach the expected state in {timeout_s} s; it holds "
                    f"{[(i.modality, i.sop_class_uid) for i in instances]}\n{self.log_tail()}"
                )
            time.sleep(0.2)
            instances = self.instances_of_study(study_uid)
        return instances

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def write_config(
    root: Path,
    *,
    http_port: int,
    dicom_port: int,
    forward_port: int | None = None,
    forward_aet: str = "FRACNODE",
    forward_host: str = "127.0.0.1",
) -> Path:
    """Orthanc's configuration (and Lua script when forwarding) under ``root``; returns the JSON."""
    (root / "storage").mkdir(parents=True, exist_ok=True)
    config: dict[str, object] = {
        "Name": "fracnode-test-pacs",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "MaximumPduLength": 131072,
        "DicomAssociationCloseDelay": 0,  # Lua's association to the node closes after each send
        "StableAge": 2,
        "SaveJobs": False,
        "Plugins": [],
        "LuaScripts": [],
        "DicomModalities": {},
        "HttpThreadsCount": 8,
        "DicomThreadsCount": 4,
    }
    if forward_port is not None:
        config["DicomModalities"] = {FORWARD_MODALITY: [forward_aet, forward_host, forward_port]}
        script = root / "forward.lua"
        script.write_text(_LUA_FORWARD % FORWARD_MODALITY)
        config["LuaScripts"] = [str(script)]
    path = root / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def start_orthanc(
    root: Path, *, forward_port: int | None = None, forward_aet: str = "FRACNODE"
) -> OrthancServer:
    """Start Orthanc under ``root`` and wait until ``GET /system`` answers."""
    binary = orthanc_binary()
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    root.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config = write_config(
        root, http_port=http_port, dicom_port=dicom_port, forward_port=forward_port, forward_aet=forward_aet
    )
    log = (root / "orthanc.log").open("wb")
    process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=root)
    log.close()
    server = OrthancServer(
        root=root,
        http_port=http_port,
        dicom_port=dicom_port,
        aet=ORTHANC_AET,
        process=process,
        client=httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30.0),
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _answers(server):
        if process.poll() is not None:
            server.stop()
            pytest.fail(f"Orthanc exited with {process.returncode} at start-up:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(
                f"Orthanc did not answer GET /system within {START_TIMEOUT_S} s:\n{server.log_tail()}"
            )
        time.sleep(0.1)
    return server


def _answers(server: OrthancServer) -> bool:
    try:
        return server.client.get("/system").status_code == 200
    except httpx.TransportError:  # not listening yet
        return False


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    servers: list[OrthancServer] = []

    def start(forward_port: int | None = None, forward_aet: str = "FRACNODE") -> OrthancServer:
        server = start_orthanc(
            tmp_path / f"orthanc{len(servers)}", forward_port=forward_port, forward_aet=forward_aet
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    return orthanc_factory()
