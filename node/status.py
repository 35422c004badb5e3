"""DIMSE statuses the node returns, in one place (PS3.4 Annex B.2.3, PS3.7 Annex C).

Exceptions raised while handling a request become one of these in :mod:`node.ingest`; nowhere
else writes a bare status number.
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    # Refused: Out of Resources (PS3.4 B.2.3): the spool is below its free-space watermark or
    # full, or the database cannot take the record (disk full, locked, unreachable).
    OUT_OF_RESOURCES = 0xA700
    # Error: Data Set does not match SOP Class (PS3.4 B.2.3): the dataset's SOP Class or SOP
    # Instance UID differs from the C-STORE request's Affected SOP Class / Instance UID.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Error: Cannot understand (PS3.4 B.2.3, 0xC000-0xCFFF). The low bits say why.
    CANNOT_UNDERSTAND = 0xC000  # the dataset cannot be parsed
    CANNOT_UNDERSTAND_MISSING_UID = 0xC001  # Study, Series or SOP Instance UID absent
    CANNOT_UNDERSTAND_INVALID_UID = 0xC003  # a UID that is not digits and dots, max 64
    # Failure: Processing failure (PS3.7 C.4.2): the instance could not be recorded.
    PROCESSING_FAILURE = 0x0110


class EchoStatus(IntEnum):
    SUCCESS = 0x0000
