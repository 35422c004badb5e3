"""Deterministic UIDs for the objects fracnode sends back to the PACS.

A result that is sent twice (a retry, a re-sent study whose models and revision did not change)
must carry the same Study/Series/SOP Instance UIDs both times, so the PACS stores one copy
instead of two. The UIDs are therefore derived, not generated: a SHA-256 of (study, model
versions, result revision, role, index) turned into a ``2.25.<integer>`` UID (PS3.5 B.2), with the
integer laid out as an RFC 9562 version-8 UUID so it is a well-formed UUID-derived UID.

Errors: :class:`ValueError` for an empty study UID, a negative revision or index, or an empty role.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum

from inference.values import StudyResult

_UUID_BITS = 128
_VERSION_MASK = 0xF << 76  # the 4 version bits of a UUID laid out as a 128-bit integer
_VARIANT_MASK = 0x3 << 62  # the 2 variant bits


class Role(StrEnum):
    """What a derived UID names; part of the hash, so two roles never share a UID."""

    SR_SERIES = "sr-series"
    SR_INSTANCE = "sr"
    SC_SERIES = "sc-series"
    SC_INSTANCE = "sc"
    SUMMARY_INSTANCE = "summary-sc"
    GSPS_SERIES = "gsps-series"
    GSPS_INSTANCE = "gsps"
    GRADCAM_SERIES = "gradcam-series"
    GRADCAM_INSTANCE = "gradcam"
    TRACKING = "tracking"  # TID 4108 tracking identifiers of SR measurement groups
    OBSERVER = "observer"  # the fracnode device observer of TID 1004


def result_uid(
    study_uid: str, model_versions: Sequence[str], revision: int, role: str, index: int = 0
) -> str:
    """A ``2.25.<int>`` UID (at most 44 characters) that depends only on its arguments.

    ``model_versions`` is order-insensitive (sorted before hashing): the same set of models gives
    the same UIDs whatever order the worker listed them in.
    """
    if not study_uid:
        raise ValueError("study_uid is empty")
    if revision < 0 or index < 0:
        raise ValueError(f"revision ({revision}) and index ({index}) must be >= 0")
    if not role:
        raise ValueError("role is empty")
    fields = [study_uid, *sorted(model_versions), str(revision), str(role), str(index)]
    # A unit separator cannot occur in a UID or a version string: no two inputs hash alike.
    digest = hashlib.sha256("\x1f".join(fields).encode("utf-8")).digest()
    value = int.from_bytes(digest[: _UUID_BITS // 8], "big")
    value = (value & ~_VERSION_MASK) | (0x8 << 76)
    value = (value & ~_VARIANT_MASK) | (0x2 << 62)
    return f"2.25.{value}"


def model_versions(result: StudyResult) -> tuple[str, ...]:
    """``name@version`` of every model that contributed to ``result``, sorted and unique."""
    return tuple(sorted({f"{card.name}@{card.version}" for group in result.groups for card in group.models}))
