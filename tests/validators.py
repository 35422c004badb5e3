"""Real validators for the objects the node writes: dicom3tools ``dciodvfy`` and dcmtk ``dsrdump``.

``dciodvfy`` checks a file against its IOD and prints ``Error - ...`` and ``Warning - ...``
lines; only errors fail (warnings include attributes the 2020s standard has and dicom3tools does not
know yet, e.g. Device UID in Contributing Equipment). ``dsrdump`` parses an SR document and prints
its content tree; a line starting ``E:`` or ``F:`` (or a non-zero exit) is a failure.

Each helper skips the calling test when the tool is not installed (``make test`` installs both).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True, slots=True)
class Report:
    """What a validator said about one file."""

    path: Path
    iod: str  # dciodvfy's name of the IOD it checked against, e.g. "SCImage"
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (apt-get install dcmtk dicom3tools)")
    return found


def dciodvfy(path: Path) -> Report:
    """Run ``dciodvfy`` on ``path`` and sort its lines into errors and warnings."""
    run = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = tuple(line for line in lines if line.startswith("Error"))
    warnings = tuple(line for line in lines if line.startswith("Warning"))
    iod = next((line for line in lines if not line.startswith(("Error", "Warning"))), "")
    if run.returncode != 0 and not errors:
        errors = (f"dciodvfy exited with {run.returncode}", *lines)
    return Report(path, iod, errors, warnings)


def assert_valid(path: Path, iod: str | None = None) -> Report:
    """Fail the test on any dciodvfy error (or when the IOD is not ``iod``)."""
    report = dciodvfy(path)
    assert not report.errors, f"dciodvfy errors in {path}:\n" + "\n".join(report.errors)
    if iod is not None:
        assert report.iod == iod, f"dciodvfy checked {path} as {report.iod!r}, expected {iod!r}"
    return report


def dsrdump(path: Path) -> str:
    """The content tree as dsrdump prints it; fails the test when dsrdump cannot parse the SR."""
    run = subprocess.run([_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("E:", "F:"))]
    assert run.returncode == 0 and not problems, (
        f"dsrdump failed on {path} (exit {run.returncode}):\n" + "\n".join(problems or [run.stderr])
    )
    return run.stdout
