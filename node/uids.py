"""DICOM UID validation (PS3.5 9.1): digits and dots, at most 64 characters.

UIDs become directory and file names in the spool, so nothing else may reach a path.
"""

from __future__ import annotations

import re

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: object) -> bool:
    """True for a non-empty string of digit groups separated by single dots, max 64 chars."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.fullmatch(value) is not None
