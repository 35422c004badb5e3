"""A throwaway PostgreSQL cluster for tests (pytest plugin, listed in conftest.pytest_plugins).

``postgres_server`` (session scope) runs ``initdb`` into a fresh temporary directory and starts
``postgres`` on 127.0.0.1 with a free port, its socket in that directory, ``fsync=off``; it is
stopped (SIGINT: fast shutdown) and removed at the end of the session. PostgreSQL refuses to run
as root, so under root the cluster belongs to the ``postgres`` system user (``nobody`` when
there is none). ``postgres_url`` (function scope) creates an empty database per test.

Tests skip with a reason only when no ``initdb`` is installed; a server that is installed but
fails to start is an error, not a skip.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_START_TIMEOUT_S = 30.0
_names = itertools.count(1)


def _find_bindir() -> Path | None:
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True):
        return Path(initdb).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server under, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' account exists")


@dataclass(frozen=True, slots=True)
class PostgresServer:
    bindir: Path
    host: str
    port: int
    user: str

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        subprocess.run(
            [str(self.bindir / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = _find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH)")
    account = _run_as()
    root = Path(tempfile.mkdtemp(prefix="fracnode-pg-"))
    data = root / "data"
    uid = gid = None
    if account is not None:
        os.chown(root, account.pw_uid, account.pw_gid)
        uid, gid = account.pw_uid, account.pw_gid
    log_path = root / "server.log"
    server: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "fracnode", "--auth=trust", "-E", "UTF8",
             "--no-sync", "--no-instructions"],
            check=True,
            capture_output=True,
            timeout=120,
            cwd=root,
            user=uid,
            group=gid,
        )
        port = _free_port()
        with open(log_path, "wb") as log_file:
            server = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-k", str(root), "-h", "127.0.0.1",
                 "-p", str(port), "-c", "fsync=off", "-c", "synchronous_commit=off",
                 "-c", "full_page_writes=off", "-c", "max_connections=100"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=root,
                user=uid,
            group=gid,
            )
        _wait_ready(bindir, port, server, log_path)
        yield PostgresServer(bindir=bindir, host="127.0.0.1", port=port, user="fracnode")
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # fast shutdown
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(bindir: Path, port: int, server: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.returncode}: {log_path.read_text()[-2000:]}")
        ready = subprocess.run(
            [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "fracnode",
             "-d", "postgres"],
            capture_output=True,
        )
        if ready.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"postgres not ready after {_START_TIMEOUT_S} s: {log_path.read_text()[-2000:]}")


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new, empty database on the session's server."""
    return postgres_server.create_database(f"t{os.getpid()}_{next(_names)}")
