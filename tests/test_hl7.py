"""HL7 ORU^R01: built with python-hl7, parsed back field by field, delivered over real MLLP."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import hl7
import pytest

from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard, ModelKind
from inference.regions import AnatomicalGroup, Region
from inference.values import (
    GroupResult,
    ImageResult,
    Outcome,
    Priority,
    RegionSource,
    Routing,
    StudyResult,
)
from node.hl7 import (
    DISCLAIMER,
    Hl7BuildError,
    Hl7DeliveryError,
    build_oru,
    send_mllp,
)

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"
WHEN = datetime(2024, 3, 5, 14, 30, 15, tzinfo=UTC)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1234567890"

WRIST = ModelCard(
    name="upper-distal-classifier",
    version="2024.03",
    device_uid="2.25.301861735926457391063211950473856423191",
    kind=ModelKind.CLASSIFIER,
    architecture="mobilenet_v3_small",
    group=AnatomicalGroup.UPPER_DISTAL,
    regions=(Region.WRIST, Region.HAND, Region.FINGER),
    input_size=224,
)
ANKLE = ModelCard(
    name="lower-distal-classifier",
    version="2024.02",
    device_uid="2.25.11223344556677889900",
    kind=ModelKind.CLASSIFIER,
    architecture="mobilenet_v3_small",
    group=AnatomicalGroup.LOWER_DISTAL,
    regions=(Region.ANKLE, Region.FOOT),
    input_size=224,
)


def group_result(
    card: ModelCard | None,
    group: AnatomicalGroup,
    outcome: Outcome,
    probability: float | None,
    point: str | None,
    reason: str | None = None,
) -> GroupResult:
    return GroupResult(
        group=group,
        outcome=outcome,
        probability=probability,
        operating_point=point,
        regions=card.regions if card else (),
        out_of_group=False,
        models=(card,) if card else (),
        images=(),
        reason=reason,
    )


def urgent_study(revision: int = 1) -> StudyResult:
    return StudyResult(
        study_instance_uid=STUDY_UID,
        revision=revision,
        groups=(
            group_result(WRIST, AnatomicalGroup.UPPER_DISTAL, Outcome.POSITIVE, 0.9137, HIGH_SPECIFICITY),
            group_result(ANKLE, AnatomicalGroup.LOWER_DISTAL, Outcome.POSSIBLE, 0.31, HIGH_SENSITIVITY),
            group_result(
                None, AnatomicalGroup.LOWER_PROXIMAL, Outcome.NOT_ANALYSED, None, None,
                reason="no model for lower-proximal | hip^femur",
            ),
        ),
        not_analysed=(),
        priority=Priority.URGENT,
        score=0.9137,
    )


def oru(
    result: StudyResult,
    accession: str | None = "ACC-2024&0042",
    control_id: str = "OUT000017",
    corrected: bool | None = None,
) -> str:
    message = build_oru(
        result,
        accession_number=accession,
        sending_app="FRACNODE",
        receiving_app="RIS",
        receiving_facility="GENERAL HOSPITAL",
        control_id=control_id,
        sending_facility="RADIOLOGY",
        timestamp=WHEN,
        corrected=corrected,
    )
    return str(message)


def test_oru_parses_back_field_by_field() -> None:
    text = oru(urgent_study())
    assert text.count("\r") == len(text.rstrip("\r").split("\r"))  # segments end with CR
    msg = hl7.parse(text)
    assert [str(s[0]) for s in msg] == [
        "MSH", "OBR", "NTE", "TQ1", "OBX", "OBX", "OBX", "OBX", "OBX", "OBX", "OBX", "OBX", "NTE",
    ]
    # MSH
    assert msg["MSH.3"] == "FRACNODE"
    assert msg["MSH.4"] == "RADIOLOGY"
    assert msg["MSH.5"] == "RIS"
    assert msg["MSH.6"] == "GENERAL HOSPITAL"
    assert msg["MSH.7"] == "20240305143015+0000"
    assert (msg["MSH.9.1.1"], msg["MSH.9.1.2"], msg["MSH.9.1.3"]) == ("ORU", "R01", "ORU_R01")
    assert msg["MSH.10"] == "OUT000017"
    assert msg["MSH.11"] == "P"
    assert msg["MSH.12"] == "2.5"
    assert msg["MSH.18"] == "UNICODE UTF-8"
    assert "PID" not in text  # no patient identifiers leave the node
    # OBR: the accession number where RIS systems look for it, delimiters escaped and restored
    assert "ACC-2024\\T\\0042" in text
    assert msg["OBR.3"] == "ACC-2024&0042"
    assert msg["OBR.18"] == "ACC-2024&0042"
    assert (msg["OBR.4.1.1"], msg["OBR.4.1.3"]) == ("FRACTURE-AI", "99FRN")
    assert msg["OBR.7"] == "20240305143015+0000"
    assert msg["OBR.24"] == "RAD"
    assert msg["OBR.25"] == "F"
    assert msg["NTE.3"] == DISCLAIMER
    assert "not for diagnostic use" in msg["NTE.3"].lower()
    # TQ1: order priority stat for URGENT
    assert (msg["TQ1.9.1.1"], msg["TQ1.9.1.3"]) == ("S", "HL70485")

    obx = msg.segments("OBX")
    rows = [
        (
            obx(i).extract_field(field_num=1),
            obx(i).extract_field(field_num=2),
            obx(i).extract_field(field_num=3, component_num=1),
            obx(i).extract_field(field_num=4),
            obx(i).extract_field(field_num=5, component_num=1),
            obx(i).extract_field(field_num=11),
        )
        for i in range(1, len(obx) + 1)
    ]
    assert rows == [
        ("1", "HD", "113014", "", STUDY_UID, "F"),
        ("2", "CWE", "PRIORITY", "", "urgent", "F"),
        ("3", "NM", "SCORE", "", "0.9137", "F"),
        ("4", "CWE", "OUTCOME", "upper-distal", "positive", "F"),
        ("5", "NM", "PROBABILITY", "upper-distal", "0.9137", "F"),
        ("6", "CWE", "OUTCOME", "lower-distal", "possible", "F"),
        ("7", "NM", "PROBABILITY", "lower-distal", "0.3100", "F"),
        ("8", "CWE", "OUTCOME", "lower-proximal", "not_analysed", "F"),
    ]
    assert obx(1).extract_field(field_num=3, component_num=3) == "DCM"
    # model identification and operating point on the outcome of the positive group
    assert obx(4).extract_field(field_num=17, component_num=1) == HIGH_SPECIFICITY
    assert obx(4).extract_field(field_num=18, component_num=1) == "upper-distal-classifier-2024.03"
    assert obx(4).extract_field(field_num=18, component_num=3) == WRIST.device_uid
    assert obx(4).extract_field(field_num=18, component_num=4) == "ISO"
    assert obx(6).extract_field(field_num=17, component_num=1) == HIGH_SENSITIVITY
    assert obx(6).extract_field(field_num=18, component_num=3) == ANKLE.device_uid
    assert obx(3).extract_field(field_num=6, component_num=3) == "UCUM"
    # the not-analysed group's reason follows its OBX, delimiters round-trip
    assert msg.segments("NTE")(2).extract_field(field_num=3) == "no model for lower-proximal | hip^femur"


def test_revision_is_a_correction_and_priority_maps_to_tq1() -> None:
    routine = StudyResult(
        study_instance_uid=STUDY_UID,
        revision=2,
        groups=(group_result(WRIST, AnatomicalGroup.UPPER_DISTAL, Outcome.NEGATIVE, 0.02, None),),
        not_analysed=(),
        priority=Priority.ROUTINE,
        score=0.02,
    )
    msg = hl7.parse(oru(routine, accession=None))
    assert msg["OBR.25"] == "C"
    assert msg["OBR.3"] == "" and msg["OBR.18"] == ""
    assert msg["TQ1.9.1.1"] == "R"
    assert {obx.extract_field(field_num=11) for obx in msg.segments("OBX")} == {"C"}
    assert msg.segments("OBX")(2).extract_field(field_num=5, component_num=1) == "routine"
    review = StudyResult(STUDY_UID, 1, routine.groups, (), Priority.REVIEW, 0.4)
    assert hl7.parse(oru(review))["TQ1.9.1.1"] == "A"
    assert hl7.parse(oru(review))["OBR.25"] == "F"
    # revision 2 whose revision 1 was superseded before any result went out: still final
    assert hl7.parse(oru(routine, corrected=False))["OBR.25"] == "F"
    assert hl7.parse(oru(review, corrected=True))["OBR.25"] == "C"


def test_not_analysed_study_carries_its_reason_and_no_score() -> None:
    reason = "region other: CHEST"
    routing = Routing(Region.OTHER, RegionSource.BODY_PART, 1.0, None, None, None, False, reason)
    image = ImageResult(sop_instance_uid="1.2.3.4.5", frame=0, routing=routing, probability=None)
    result = StudyResult(STUDY_UID, 1, (), (image,), Priority.NOT_ANALYSED, None)
    msg = hl7.parse(oru(result))
    codes = [obx.extract_field(field_num=3, component_num=1) for obx in msg.segments("OBX")]
    assert codes == ["113014", "PRIORITY"]
    assert msg.segments("OBX")(2).extract_field(field_num=5, component_num=1) == "not_analysed"
    assert msg.segments("NTE")(2).extract_field(field_num=3) == "region other: CHEST"
    assert "1.2.3.4.5" not in str(msg)


@pytest.mark.parametrize("control_id", ["", "X" * 21, "A|B", "Ä1"])
def test_invalid_control_id_is_refused(control_id: str) -> None:
    with pytest.raises(Hl7BuildError):
        oru(urgent_study(), control_id=control_id)


class MllpListener:
    """A real MLLP server on 127.0.0.1 that parses each message with python-hl7 and ACKs it."""

    def __init__(self, port: int, ack_code: str = "AA", *, wrong_control_id: bool = False) -> None:
        self.port = port
        self.ack_code = ack_code
        self.wrong_control_id = wrong_control_id
        self.received: list[hl7.Message] = []
        listener = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data = b""
                while EB + CR not in data:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                message = hl7.parse(data[data.index(SB) + 1 : data.index(EB)].decode("utf-8"))
                listener.received.append(message)
                ack = message.create_ack(listener.ack_code, message_id="ACK1")
                if listener.wrong_control_id:
                    ack.segment("MSA").assign_field("SOMETHING-ELSE", 2)
                self.request.sendall(SB + str(ack).encode("utf-8") + EB + CR)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> MllpListener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_delivery_retried_after_the_listener_was_down(port: int) -> None:
    message = oru(urgent_study())
    with pytest.raises(Hl7DeliveryError) as down:
        send_mllp("127.0.0.1", port, message, timeout=2.0)
    assert down.value.ack_code is None
    assert down.value.control_id == "OUT000017"
    assert down.value.port == port
    with MllpListener(port) as listener:
        assert send_mllp("127.0.0.1", port, message, timeout=5.0) == "AA"
    assert len(listener.received) == 1
    received = listener.received[0]
    assert str(received) == message
    assert received["MSH.10"] == "OUT000017"
    assert received.segments("OBX")(1).extract_field(field_num=5) == STUDY_UID


@pytest.mark.parametrize("code", ["AE", "AR"])
def test_negative_ack_raises(port: int, code: str) -> None:
    with MllpListener(port, ack_code=code), pytest.raises(Hl7DeliveryError) as rejected:
        send_mllp("127.0.0.1", port, oru(urgent_study()), timeout=5.0)
    assert rejected.value.ack_code == code


def test_ack_for_another_message_raises(port: int) -> None:
    with MllpListener(port, wrong_control_id=True), pytest.raises(Hl7DeliveryError, match="ACK is for"):
        send_mllp("127.0.0.1", port, hl7.parse(oru(urgent_study())), timeout=5.0)


@pytest.fixture
def silent_listener(port: int) -> Iterator[int]:
    """Accepts the connection, reads, never answers; then closes when the test ends."""
    server = socket.create_server(("127.0.0.1", port))
    accepted: list[socket.socket] = []

    def accept() -> None:
        conn, _ = server.accept()
        accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield port
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


def test_no_ack_within_timeout_raises(silent_listener: int) -> None:
    with pytest.raises(Hl7DeliveryError, match="no delivery"):
        send_mllp("127.0.0.1", silent_listener, oru(urgent_study()), timeout=0.5)
