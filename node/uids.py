"""DICOM UID validation (PS3.5 9.1), the one rule every part of the node uses.

A UID is at most 64 characters of digit components separated by single dots, and a component
has no leading zero ("0" itself is allowed): pydicom's ``UID.is_valid`` rule (its regular
expression, used here without building a ``UID``, which warns on every invalid value).
UIDs become directory and file names in the spool, so nothing else may reach a path.
"""

from __future__ import annotations

import re

from pydicom.uid import RE_VALID_UID

_UID = re.compile(RE_VALID_UID)


def is_valid_uid(value: object) -> bool:
    """True for a valid DICOM UID (PS3.5 9.1); False for anything else, whatever its type."""
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.fullmatch(value) is not None
