"""Shared fixtures. Fixture modules owned by one area are listed in ``pytest_plugins``."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

# ultralytics reads these at import: keep every test offline and out of the home directory.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATASETS = SHARED / "datasets"

pytest_plugins: list[str] = ["tests.pg", "tests.orthanc", "tests.nodeproc"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def fracatlas() -> Path:
    root = DATASETS / "fracatlas"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"../shared/datasets/fracatlas is not present ({root})")
    return root


@pytest.fixture
def upper_limb_web() -> Path:
    root = DATASETS / "upper-limb-web"
    if not (root / "labels.csv").is_file():
        pytest.skip(f"../shared/datasets/upper-limb-web is not present ({root})")
    return root


@pytest.fixture
def rg3_files() -> dict[str, Path]:
    """The pydicom-data CR files of one ankle in three encodings (one SOP Instance UID)."""
    from pydicom.data import get_testdata_file

    files: dict[str, Path] = {}
    for name in ("RG3_UNCR.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm"):
        found = get_testdata_file(name, download=False)
        assert found is not None, f"{name} missing: pydicom-data is a test dependency"
        files[name.removesuffix(".dcm")] = Path(str(found))
    return files


@pytest.fixture(autouse=True)
def _no_fracnode_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests build their settings explicitly; an operator's FRACNODE_* variables must not leak in."""
    for key in list(os.environ):
        if key.startswith("FRACNODE_"):
            monkeypatch.delenv(key)
    yield
