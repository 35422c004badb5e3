"""DICOM TLS for incoming associations (PS3.15 B.1) against real TLS peers on 127.0.0.1.

The test makes its own CA, server and client certificates with the ``openssl`` command, and
sends with pynetdicom (an ``ssl`` client context) and with dcmtk ``storescu +tls``.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.scp import TlsConfig, TlsSetupError
from node.service import scp_config
from node.settings import Settings, SettingsError, load_settings
from node.status import StoreStatus
from tests.conftest import free_port
from tests.dicomgen import make_dataset, write
from tests.nodeproc import InProcessNode, start_serve, storescu, write_config
from tests.test_scp_limits import read_until_closed, rejected, start_limited

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_key: Path  # matches no certificate


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=120)


def _issue(directory: Path, name: str, usage: str) -> None:
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        "basicConstraints = CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        f"extendedKeyUsage = {usage}\n"
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
    )
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN=fracnode test {name}", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-sha256", "-extfile", extensions, "-out", f"{name}.pem", cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-sha256", "-subj", "/CN=fracnode test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _issue(directory, "server", "serverAuth")
    _issue(directory, "client", "clientAuth")
    _openssl("genpkey", "-algorithm", "RSA", "-out", "other.key", cwd=directory)
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_key=directory / "other.key",
    )


def client_context(pki: Pki, *, certificate: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if certificate:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def associate(port: int, context: ssl.SSLContext | None, sop_class: str | None = None) -> Association:
    ae = AE(ae_title="TESTSCU")
    ae.acse_timeout = 15
    ae.connection_timeout = 15
    ae.add_requested_context(sop_class or Verification)
    tls_args = (context, "127.0.0.1") if context is not None else None
    return ae.associate("127.0.0.1", port, ae_title="FRACNODE", tls_args=tls_args)


def echo(port: int, context: ssl.SSLContext | None) -> bool:
    assoc = associate(port, context)
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def start_tls(tmp_path: Path, pki: Pki, *, verify_clients: bool, own_port: bool = True) -> InProcessNode:
    tls = TlsConfig(
        cert_file=pki.server_cert,
        key_file=pki.server_key,
        ca_file=pki.ca if verify_clients else None,
        port=free_port() if own_port else None,
    )
    return start_limited(tmp_path, acse_timeout_s=5, network_timeout_s=20, max_pdu_bytes=1_048_576, tls=tls)


@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[InProcessNode]:
    running = start_tls(tmp_path, pki, verify_clients=True)
    yield running
    running.server.stop()
    running.db.dispose()


def stored(node: InProcessNode, path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return node.spool.root / f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"


def test_pynetdicom_store_over_tls(tls_node: InProcessNode, pki: Pki, tmp_path: Path) -> None:
    path = write(make_dataset(), tmp_path / "dx.dcm")
    ds = pydicom.dcmread(path)
    assert tls_node.server.tls_port is not None and tls_node.server.tls_port != tls_node.port
    assoc = associate(tls_node.server.tls_port, client_context(pki), ds.SOPClassUID)
    assert assoc.is_established
    try:
        assert assoc.dul.socket is not None
        raw = assoc.dul.socket.socket
        assert isinstance(raw, ssl.SSLSocket) and raw.version() in ("TLSv1.2", "TLSv1.3")
        assert int(assoc.send_c_store(ds).Status) == StoreStatus.SUCCESS
    finally:
        assoc.release()
    assert pydicom.dcmread(stored(tls_node, path)).SOPInstanceUID == ds.SOPInstanceUID
    assert echo(tls_node.port, None), "the plain port keeps serving beside the TLS one"


def test_storescu_over_tls(tls_node: InProcessNode, pki: Pki, tmp_path: Path) -> None:
    path = write(make_dataset(), tmp_path / "dx.dcm")
    port = tls_node.server.tls_port
    assert port is not None
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    result = storescu(path, port, *tls)
    assert result.returncode == 0, result.stdout + result.stderr
    assert stored(tls_node, path).is_file()


def test_plain_dicom_to_the_tls_port_fails(tls_node: InProcessNode, pki: Pki, tmp_path: Path) -> None:
    port = tls_node.server.tls_port
    assert port is not None
    assert not echo(port, None)
    path = write(make_dataset(), tmp_path / "dx.dcm")
    assert storescu(path, port).returncode != 0
    assert not stored(tls_node, path).exists()
    assert rejected(tls_node, "tls") == 2
    assert echo(port, client_context(pki)), "the TLS listener keeps serving"


def test_client_without_certificate_is_refused(tls_node: InProcessNode, pki: Pki) -> None:
    port = tls_node.server.tls_port
    assert port is not None
    assert not echo(port, client_context(pki, certificate=False))
    assert rejected(tls_node, "tls") == 1
    assert echo(port, client_context(pki))


def test_tls_below_1_2_is_refused(tls_node: InProcessNode, pki: Pki) -> None:
    port = tls_node.server.tls_port
    assert port is not None
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 are, which is the point
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw).close()
    wait_rejected(tls_node, "tls", 1)


def wait_rejected(node: InProcessNode, reason: str, count: float) -> None:
    deadline = time.monotonic() + 20
    while rejected(node, reason) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rejected(node, reason) == count


def test_silent_peer_does_not_block_the_tls_listener(tls_node: InProcessNode, pki: Pki) -> None:
    port = tls_node.server.tls_port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=30) as silent:
        # pynetdicom does the handshake on the listener's thread: this peer blocked every other.
        assert echo(port, client_context(pki))
        assert read_until_closed(silent) == b""  # after acse_timeout_s (5 s here)
    wait_rejected(tls_node, "timeout", 1)


def test_tls_only_on_the_main_port(tmp_path: Path, pki: Pki) -> None:
    node = start_tls(tmp_path, pki, verify_clients=False, own_port=False)
    try:
        assert node.server.tls_port == node.port
        assert not echo(node.port, None)
        assert echo(node.port, client_context(pki, certificate=False))
    finally:
        node.server.stop()
        node.db.dispose()


def test_unusable_key_fails_at_construction(tmp_path: Path, pki: Pki) -> None:
    tls = TlsConfig(cert_file=pki.server_cert, key_file=pki.other_key, port=free_port())
    with pytest.raises(TlsSetupError) as caught:
        start_limited(tmp_path, tls=tls)
    assert caught.value.path == pki.server_cert


def _settings(tmp_path: Path, dicom: str) -> Settings:
    config = tmp_path / "fracnode.toml"
    config.write_text("[dicom]\nport = 11112\n" + dicom)
    return load_settings(config)


def test_tls_settings(tmp_path: Path, pki: Pki) -> None:
    files = f'tls_cert_file = "{pki.server_cert}"\ntls_key_file = "{pki.server_key}"\n'
    settings = _settings(tmp_path, f'tls_port = 2762\n{files}tls_ca_file = "{pki.ca}"\n')
    assert scp_config(settings).tls == TlsConfig(pki.server_cert, pki.server_key, pki.ca, 2762)
    only = _settings(tmp_path, f"tls_only = true\n{files}")
    assert scp_config(only).tls == TlsConfig(pki.server_cert, pki.server_key, None, None)
    assert scp_config(_settings(tmp_path, "")).tls is None

    nope = tmp_path / "nope.pem"
    missing = f'tls_port = 2762\ntls_cert_file = "{nope}"\ntls_key_file = "{pki.server_key}"\n'
    with pytest.raises(SettingsError) as caught:
        _settings(tmp_path, missing)
    assert caught.value.key == "dicom.tls_cert_file" and "does not exist" in str(caught.value)
    other = f'tls_cert_file = "{pki.server_cert}"\ntls_key_file = "{pki.other_key}"\n'
    bad = {
        "tls_port = 11112\n" + files: "must differ from dicom.port",
        "tls_port = 2762\n": "needs dicom.tls_cert_file and dicom.tls_key_file",
        files: "neither dicom.tls_port nor dicom.tls_only",
        "tls_only = true\ntls_port = 2762\n" + files: "leave dicom.tls_port unset",
        "tls_port = 2762\n" + other: "tls_key_file",
        f'tls_port = 2762\n{files}tls_ca_file = "{pki.server_key}"\n': "dicom.tls_ca_file",
    }
    for dicom, message in bad.items():
        with pytest.raises(SettingsError) as caught:
            _settings(tmp_path, dicom)
        assert message in str(caught.value), dicom


def test_serve_over_tls_with_storescu(tmp_path: Path, pki: Pki) -> None:
    """``fracnode serve`` wires the settings: storescu over TLS is stored, plain is refused."""
    port, tls_port = free_port(), free_port()
    config = write_config(tmp_path / "node", port, extra="[worker]\nthreads = 0\n")
    env = {
        "FRACNODE_DICOM__TLS_PORT": str(tls_port),
        "FRACNODE_DICOM__TLS_CERT_FILE": str(pki.server_cert),
        "FRACNODE_DICOM__TLS_KEY_FILE": str(pki.server_key),
        "FRACNODE_DICOM__TLS_CA_FILE": str(pki.ca),
    }
    node = start_serve(config, port, tmp_path / "serve.log", env=env)
    try:
        path = write(make_dataset(), tmp_path / "dx.dcm")
        assert storescu(path, tls_port).returncode != 0
        tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
        result = storescu(path, tls_port, *tls)
        assert result.returncode == 0, result.stdout + result.stderr
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spool = tmp_path / "node" / "spool"
        assert (spool / f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm").is_file()
    finally:
        assert node.stop() == 0
    log = (tmp_path / "serve.log").read_text()
    assert "(TLS)" in log and "refused (tls)" in log
