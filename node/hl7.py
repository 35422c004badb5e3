"""HL7 v2.5 ORU^R01 result messages for the RIS worklist, delivered over MLLP.

One message per study result revision, built with python-hl7's containers (never by joining
strings) and sent with its MLLP client. The outbox persists ``str(message)`` and retries
:func:`send_mllp` like a DICOM export; this module does not retry.

Message layout (HL7 v2.5 chapter 7, ORU^R01 structure ``ORU_R01``; original-mode ACK):

- ``MSH``: sending/receiving application and facility from the settings, MSH-9
  ``ORU^R01^ORU_R01``, MSH-10 the control id the caller gives (the outbox item id), MSH-11
  ``P``, MSH-12 ``2.5``, MSH-18 ``UNICODE UTF-8``.
- No ``PID``: the PATIENT group is optional in ORU_R01 and the node keeps no patient
  identifiers; the RIS matches the result on the accession number and the Study Instance UID.
- ``OBR``: OBR-3 filler order number and OBR-18 placer field 1 = Accession Number (0008,0050)
  (OBR-18 is where IHE Radiology carries it), OBR-4 ``FRACTURE-AI^Fracture AI triage^99FRN``,
  OBR-7/OBR-22 result time, OBR-24 ``RAD``, OBR-25 ``F`` for the first result of a study and
  ``C`` (corrected) when it replaces one already sent (by default: revision > 1, as storage
  numbers revisions from 1; the caller may say so explicitly with ``corrected``).
- ``NTE`` under OBR: "Not for diagnostic use" disclaimer.
- ``TQ1``: TQ1-9 priority from HL7 table 0485 (``S`` stat for URGENT, ``A`` ASAP for REVIEW,
  ``R`` routine otherwise), so a RIS that sorts on order priority sees the signal.
- ``OBX`` (status F or C, as OBR-25):

  1. ``HD`` ``113014^DICOM Study^DCM`` = Study Instance UID (as DICOM PS3.17 imaging-report
     transcoding does);
  2. ``CWE`` ``PRIORITY^AI worklist priority^99FRN`` = ``urgent``/``review``/``routine``/
     ``not_analysed``, followed by an ``NTE`` with the reason when not analysed;
  3. ``NM`` ``SCORE^AI study score^99FRN`` = the study score (omitted when there is none);
  4. per anatomical group, with OBX-4 sub-id = the group name: ``CWE``
     ``OUTCOME^Fracture AI outcome^99FRN`` = the outcome (OBX-17 the operating point, OBX-18
     the model ``name-version^^device_uid^ISO``), an ``NM`` ``PROBABILITY^Calibrated fracture
     probability^99FRN`` when analysed, or an ``NTE`` with the reason when not.

``99FRN`` is the local coding system of this node (HL7 table 0396, ``99zzz``).

Errors::

    Hl7Error
    +-- Hl7BuildError (also ValueError): an invalid control id or empty study UID
    +-- Hl7DeliveryError: no connection, no or malformed ACK, AE/AR/CE/CR, ACK for another
        message; attributes host, port, control_id, ack_code (None without an ACK)
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Final

import hl7
from hl7.client import CR, EB, SB, MLLPClient
from pydicom.dataset import Dataset

from inference.priority import not_analysed_reason
from inference.values import GroupResult, Outcome, Priority, StudyResult
from node import received

LOCAL_CODING: Final = "99FRN"
DISCLAIMER: Final = (
    "Not for diagnostic use. AI fracture triage for worklist prioritisation; "
    "a radiologist reads every image."
)
_TQ1_PRIORITY: Final[dict[Priority, tuple[str, str]]] = {
    Priority.URGENT: ("S", "Stat"),
    Priority.REVIEW: ("A", "ASAP"),
    Priority.ROUTINE: ("R", "Routine"),
    Priority.NOT_ANALYSED: ("R", "Routine"),
}
_ACCEPTED_ACKS: Final = frozenset({"AA", "CA"})
_MAX_ACK_BYTES: Final = 1 << 20
_MAX_ACCESSION: Final = 16  # SH (PS3.5 6.2); OBR-3/OBR-18 hold more, a longer value is not one


class Hl7Error(Exception):
    """Base of this module's errors."""


class Hl7BuildError(Hl7Error, ValueError):
    """The inputs cannot make a valid ORU^R01."""


class Hl7DeliveryError(Hl7Error):
    """The RIS did not accept the message; the outbox retries it."""

    def __init__(self, host: str, port: int, control_id: str, reason: str, ack_code: str | None = None):
        super().__init__(f"HL7 message {control_id} to {host}:{port}: {reason}")
        self.host = host
        self.port = port
        self.control_id = control_id
        self.ack_code = ack_code


def accession_number_of(sources: Iterable[Dataset]) -> str | None:
    """The first Accession Number (0008,0050) among the study's source datasets, read with
    :func:`node.received.text`: absent, empty or wrongly-typed values are skipped."""
    for ds in sources:
        found = clean_accession(received.text(ds, "AccessionNumber"))
        if found is not None:
            return found
    return None


def clean_accession(value: object) -> str | None:
    """An accession number fit for OBR-3/OBR-18: text, no control characters, at most 16
    characters; anything else is no accession number."""
    if not isinstance(value, str):
        return None
    text = "".join(c for c in value if c.isprintable()).strip()
    return text[:_MAX_ACCESSION] or None


def hl7_timestamp(moment: datetime) -> str:
    """HL7 DTM with seconds and UTC offset, e.g. ``20240131154500+0000``."""
    if moment.tzinfo is None:
        raise Hl7BuildError("HL7 timestamps need an aware datetime")
    return moment.strftime("%Y%m%d%H%M%S%z")


def build_oru(
    result: StudyResult,
    *,
    accession_number: object,
    sending_app: str,
    receiving_app: str,
    receiving_facility: str,
    control_id: str,
    sending_facility: str = "",
    timestamp: datetime | None = None,
    corrected: bool | None = None,
) -> hl7.Message:
    """The ORU^R01 of one study result revision (layout in the module docstring).

    ``corrected``: whether an earlier result of this study was already sent (result status C
    instead of F); ``None`` derives it from the revision (revisions start at 1).
    ``accession_number`` may be anything a dataset held: :func:`clean_accession` keeps text only
    (use :func:`accession_number_of` to read it from the sources).
    """
    if not control_id or len(control_id) > 20 or not control_id.isascii() or any(
        c in control_id for c in "|^~\\&\r\n"
    ):
        raise Hl7BuildError(f"control id {control_id!r} is not 1-20 characters without HL7 delimiters")
    if not result.study_instance_uid:
        raise Hl7BuildError("the study result has no Study Instance UID")
    when = hl7_timestamp(timestamp or datetime.now(UTC))
    if corrected is None:
        corrected = result.revision > 1
    status = "C" if corrected else "F"
    accession = clean_accession(accession_number) or ""

    message = hl7.Message("\r")
    msh = _segment(message, "MSH")
    msh.assign_field("|", 1)
    msh.assign_field("^~\\&", 2)
    _put(message, msh, 3, sending_app)
    _put(message, msh, 4, sending_facility)
    _put(message, msh, 5, receiving_app)
    _put(message, msh, 6, receiving_facility)
    _put(message, msh, 7, when)
    _put(message, msh, 9, ("ORU", "R01", "ORU_R01"))
    _put(message, msh, 10, control_id)
    _put(message, msh, 11, "P")
    _put(message, msh, 12, "2.5")
    _put(message, msh, 18, "UNICODE UTF-8")

    obr = _segment(message, "OBR")
    _put(message, obr, 1, "1")
    _put(message, obr, 3, accession)
    _put(message, obr, 4, ("FRACTURE-AI", "Fracture AI triage", LOCAL_CODING))
    _put(message, obr, 7, when)
    _put(message, obr, 18, accession)
    _put(message, obr, 22, when)
    _put(message, obr, 24, "RAD")
    _put(message, obr, 25, status)
    _note(message, 1, DISCLAIMER)

    tq1 = _segment(message, "TQ1")
    _put(message, tq1, 1, "1")
    code, text = _TQ1_PRIORITY[result.priority]
    _put(message, tq1, 9, (code, text, "HL70485"))

    observations = _Observations(message, status, when)
    observations.add("HD", ("113014", "DICOM Study", "DCM"), "", result.study_instance_uid)
    observations.add(
        "CWE",
        ("PRIORITY", "AI worklist priority", LOCAL_CODING),
        "",
        (str(result.priority), result.priority.name.replace("_", " ").capitalize(), LOCAL_CODING),
    )
    if result.priority is Priority.NOT_ANALYSED:
        reason = not_analysed_reason(result.groups, result.not_analysed)
        if reason:
            _note(message, 1, reason)
    if result.score is not None:
        observations.add("NM", ("SCORE", "AI study score", LOCAL_CODING), "", _number(result.score))
    for group in result.groups:
        observations.add_group(group)
    return message


class _Observations:
    """Appends OBX segments with consecutive set ids."""

    def __init__(self, message: hl7.Message, status: str, when: str) -> None:
        self.message = message
        self.status = status
        self.when = when
        self.count = 0

    def add(
        self,
        value_type: str,
        identifier: tuple[str, str, str],
        sub_id: str,
        value: str | tuple[str, ...],
        *,
        method: tuple[str, ...] | None = None,
        equipment: tuple[str, ...] | None = None,
    ) -> None:
        self.count += 1
        obx = _segment(self.message, "OBX")
        _put(self.message, obx, 1, str(self.count))
        _put(self.message, obx, 2, value_type)
        _put(self.message, obx, 3, identifier)
        _put(self.message, obx, 4, sub_id)
        _put(self.message, obx, 5, value)
        if value_type == "NM":
            _put(self.message, obx, 6, ("1", "", "UCUM"))
        _put(self.message, obx, 11, self.status)
        _put(self.message, obx, 14, self.when)
        if method is not None:
            _put(self.message, obx, 17, method)
        if equipment is not None:
            _put(self.message, obx, 18, equipment)

    def add_group(self, group: GroupResult) -> None:
        name = str(group.group)
        method = None
        if group.operating_point:
            method = (group.operating_point, group.operating_point.replace("_", " "), LOCAL_CODING)
        equipment = None
        if group.models:
            card = group.models[0]
            equipment = (f"{card.name}-{card.version}", "", card.device_uid, "ISO")
        outcome = group.outcome
        self.add(
            "CWE",
            ("OUTCOME", "Fracture AI outcome", LOCAL_CODING),
            name,
            (str(outcome), outcome.name.replace("_", " ").capitalize(), LOCAL_CODING),
            method=method,
            equipment=equipment,
        )
        if outcome is not Outcome.NOT_ANALYSED and group.probability is not None:
            self.add(
                "NM",
                ("PROBABILITY", "Calibrated fracture probability", LOCAL_CODING),
                name,
                _number(group.probability),
            )
        elif group.reason:
            _note(self.message, 1, group.reason)


def _number(value: float) -> str:
    return f"{value:.4f}"


def _segment(message: hl7.Message, name: str) -> hl7.Segment:
    segment = message.create_segment([message.create_field([name])])
    message.append(segment)
    return segment


def _put(message: hl7.Message, segment: hl7.Segment, field: int, value: str | Sequence[str]) -> None:
    """Assign an escaped field, or its components when ``value`` is a tuple."""
    if isinstance(value, str):
        segment.assign_field(message.escape(value), field)
        return
    for index, component in enumerate(value, start=1):
        segment.assign_field(message.escape(component), field, 1, index)


def _note(message: hl7.Message, set_id: int, text: str) -> None:
    nte = _segment(message, "NTE")
    _put(message, nte, 1, str(set_id))
    _put(message, nte, 2, "L")  # source: ancillary (filler) department, HL7 table 0105
    _put(message, nte, 3, text)


class _TimedMLLPClient(MLLPClient):  # type: ignore[misc]
    """python-hl7's MLLP client with a connect/read timeout and a complete ACK read."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.socket = socket.create_connection((host, port), timeout=timeout)
        self.encoding = "utf-8"

    def send(self, data: bytes) -> bytes:
        self.socket.sendall(data)
        received = b""
        while EB not in received:
            chunk = self.socket.recv(4096)
            if not chunk:
                break
            received += chunk
            if len(received) > _MAX_ACK_BYTES:
                break
        return received


def send_mllp(host: str, port: int, message: hl7.Message | str, timeout: float) -> str:
    """Send one message and return the ACK code (``AA``, or ``CA`` in enhanced mode).

    Raises :class:`Hl7DeliveryError` when the connection fails, no well-formed ACK for this
    message's control id arrives within ``timeout``, or the ACK code is AE/AR/CE/CR.
    """
    parsed = message if isinstance(message, hl7.Message) else hl7.parse(message)
    control_id = str(parsed.segment("MSH")(10))
    try:
        with _TimedMLLPClient(host, port, timeout) as client:
            raw = client.send_message(str(parsed))
    except OSError as exc:
        raise Hl7DeliveryError(host, port, control_id, f"no delivery: {exc}") from exc
    ack = _parse_ack(raw, host, port, control_id)
    code = str(ack.segment("MSA")(1))
    acked = str(ack.segment("MSA")(2))
    if acked != control_id:
        raise Hl7DeliveryError(host, port, control_id, f"ACK is for message {acked!r}", code)
    if code not in _ACCEPTED_ACKS:
        text = str(ack.segment("MSA")(3)) if len(ack.segment("MSA")) > 3 else ""
        raise Hl7DeliveryError(host, port, control_id, f"rejected with {code} {text}".rstrip(), code)
    return code


def _parse_ack(raw: bytes, host: str, port: int, control_id: str) -> hl7.Message:
    start, end = raw.find(SB), raw.find(EB + CR)
    if start < 0 or end < start:
        raise Hl7DeliveryError(host, port, control_id, f"no complete MLLP ACK ({len(raw)} bytes)")
    try:
        ack = hl7.parse(raw[start + 1 : end].decode("utf-8"))
        ack.segment("MSA")
    except (UnicodeDecodeError, hl7.ParseException, KeyError, IndexError, ValueError) as exc:
        raise Hl7DeliveryError(host, port, control_id, f"malformed ACK: {exc}") from exc
    return ack
