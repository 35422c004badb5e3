"""A short fuzz campaign against a real `fracnode serve` process on loopback (issue 11, item 4).

Hostile datasets (``tests.fuzzgen``: missing and wrongly typed attributes, wrong VRs and
lengths, truncations, bit flips, deep sequences, Rows x Columns and compressed-stream bombs, bad
UIDs, odd character sets, hypothesis-drawn edits) go through the real C-STORE path byte for byte
(``tests.rawdicom``) and then through processing with the bundled models; malformed PDUs go on
the raw socket. After each batch a well-formed study must be analysed and its results delivered
to a counting storage SCP. Throughout: every input gets a failure status or ends with a recorded
outcome, the node never dies or hangs, its RSS stays bounded, and no patient data from the inputs
reaches the log, the API or the CLI. ``bench/fuzz.py`` runs the same generators for 10,000+
inputs. Seeds are fixed: every run sends the same bytes.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.fuzzgen import PHI_BIRTH_DATE, Elements, Expect, Kind, T, custom, generate, raw_element
from tests.fuzzrun import FuzzCampaign, outcomes_by_kind, summary_rows
from tests.nodeharness import CountingDestination, NodeOptions, NodeProcess
from tests.rawdicom import A_ABORT, P_DATA_TF, Closed, RawAssociation, Reply, associate_rq, wait_closed

SEED = 20261204
PER_KIND = 20
RSS_BOUND = int(1.5 * 1024**3)  # generous: the node idles at ~1.25 GB with the bundled models
ACSE_TIMEOUT_S = 5.0
NETWORK_TIMEOUT_S = 10.0
MAX_ASSOCIATIONS = 8
CLOSE_BOUND_S = 30.0  # a stalled or trickling connection must be closed within this
DX = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzCampaign]:
    root = tmp_path_factory.mktemp("fuzz")
    destination = CountingDestination()
    destination.start()
    node = NodeProcess(
        root / "node",
        NodeOptions(
            extra=destination.toml("pacs"),
            max_associations=MAX_ASSOCIATIONS,
            acse_timeout_s=ACSE_TIMEOUT_S,
            dimse_timeout_s=NETWORK_TIMEOUT_S,
            network_timeout_s=NETWORK_TIMEOUT_S,
            worker_retry_delay_s=2.0,  # given-up studies settle within the test's time
        ),
    )
    node.start()
    run = FuzzCampaign(node, destination, good_timeout_s=45.0)
    try:
        yield run
    finally:
        node.close()
        destination.stop()


# -- hostile datasets through C-STORE and processing -------------------------------------------
@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_batch_gets_statuses_and_the_next_good_study_is_analysed(campaign: FuzzCampaign, kind: Kind) -> None:
    inputs = generate(kind, PER_KIND, SEED)
    deaths, restarts = campaign.deaths, campaign.restarts
    good = campaign.run_batch(inputs)
    results = [r for r in campaign.results[-len(inputs) :] if not _open_bug(r.input.label)]

    unanswered = [
        (r.input.label, r.status_text)
        for r in results
        if r.outcome.reply is not Reply.STATUS and not r.refused
    ]
    assert not unanswered, f"inputs without a DIMSE status: {unanswered}"
    # 0xC211: an exception escaped the C-STORE handler; 0xC002: it returned nothing (STACK-NOTES).
    unhandled = [r.input.label for r in results if r.outcome.status in (0xC211, 0xC002)]
    assert not unhandled, f"statuses from an unhandled error in the handler: {unhandled}"
    accepted_bad = [r.input.label for r in results if r.input.expect is Expect.REFUSED and not r.refused]
    assert not accepted_bad, f"acknowledged although they must be refused: {accepted_bad}"
    assert campaign.deaths == deaths, f"the node died during the batch:\n{campaign.node.log_text()[-3000:]}"
    assert good.analysed and good.delivered, (
        f"the well-formed study after the {kind} batch was not analysed and delivered within "
        f"{campaign.good_timeout_s:.0f} s: {good.detail}\nstatuses: {summary_rows(results)}"
    )
    assert campaign.restarts == restarts
    assert campaign.node.healthy()
    assert campaign.node.peak_rss < RSS_BOUND, f"peak RSS {campaign.node.peak_rss / 1e9:.2f} GB"
    assert campaign.node.watchdog_kills == 0


# -- regressions: one input each, found by the campaign ------------------------------------------
@dataclass(frozen=True, slots=True)
class Regression:
    """One precisely built input and what the node must do with it.

    ``want``: ``refused`` (a failure status), ``analysed``, ``not_analysed`` (done, NOT ANALYSED
    with a reason containing ``reason``) or ``done`` (analysed or not analysed, but not given up
    as failed after retries). ``open_bug`` marks a case that fails today: the test is
    ``xfail(strict=True)`` and the batch tests skip inputs labelled ``batch_label``; delete
    ``open_bug`` once the owner fixes it.
    """

    name: str
    edit: Callable[[Elements], Elements]
    want: str
    reason: str = ""
    sop_uid: str | None = None
    open_bug: str | None = None
    batch_label: str | None = None


def _drop(*names: str) -> Callable[[Elements], Elements]:
    return lambda e: e.drop(*(T[n] for n in names))


def _put(name: str, vr: str, value: bytes) -> Callable[[Elements], Elements]:
    return lambda e: e.set(T[name], raw_element(T[name], vr, value))


def _both(*edits: Callable[[Elements], Elements]) -> Callable[[Elements], Elements]:
    def run(e: Elements) -> Elements:
        for edit in edits:
            e = edit(e)
        return e

    return run


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


REGRESSIONS = [
    # Type 2 attributes absent: readers must tolerate them (issue 11, item 1).
    Regression("no AccessionNumber", _drop("AccessionNumber"), "analysed"),
    Regression("no PatientID", _drop("PatientID"), "analysed"),
    Regression("no StudyDate", _drop("StudyDate"), "analysed"),
    Regression("no StudyTime", _drop("StudyTime"), "analysed"),
    Regression("no StudyID", _drop("StudyID"), "analysed"),
    Regression("no PatientName or PatientBirthDate", _drop("PatientName", "PatientBirthDate"), "analysed"),
    Regression("no Modality", _drop("Modality"), "done"),
    Regression("no SamplesPerPixel", _drop("SamplesPerPixel"), "done"),
    Regression("no BitsStored", _drop("BitsStored"), "done"),
    Regression("no pixel description", _drop("PhotometricInterpretation", "Rows"), "not_analysed"),
    Regression("no PixelData", _drop("PixelData"), "not_analysed"),
    # Wrongly typed attributes.
    Regression(
        "AnatomicRegionSequence as a string", _put("AnatomicRegionSequence", "LO", b"WRIST"), "analysed"
    ),
    Regression("ViewCodeSequence as a string", _put("ViewCodeSequence", "LO", b"PA"), "analysed"),
    Regression(
        "PatientBirthDate with VR PN", _put("PatientBirthDate", "PN", PHI_BIRTH_DATE.encode()), "analysed"
    ),
    Regression("PatientID as a sequence", _put("PatientID", "SQ", b""), "done"),
    Regression("AccessionNumber as a sequence", _put("AccessionNumber", "SQ", b""), "done"),
    Regression("StudyDate 99999999", _put("StudyDate", "DA", b"99999999"), "analysed"),
    Regression("Rows as text", _put("Rows", "LO", b"abc"), "not_analysed"),
    # Found by the long campaign (bench/fuzz.py, seed 20261204: inputs 10000237, 10000238, 13000229).
    Regression(
        "PatientName with VR SS and two values",
        _put("PatientName", "SS", b"\xb9\x97\x03\xdb"),
        "analysed",
    ),
    Regression(
        "Columns with VR UN",
        _put("Columns", "UN", b"P\x00P\x00"),
        "done",
    ),
    # Bombs: refused before decoding, with the size in the reason.
    Regression(
        "65535 x 65535 x 100000 frames",
        _both(
            _put("Rows", "US", _us(65535)),
            _put("Columns", "US", _us(65535)),
            _put("NumberOfFrames", "IS", b"100000"),
        ),
        "not_analysed",
        reason="pixels",
    ),
    Regression("NumberOfFrames 2147483647", _put("NumberOfFrames", "IS", b"2147483647"), "not_analysed"),
    # UIDs that are not PS3.5 9.1 UIDs must be refused at C-STORE, not normalised.
    Regression(
        "StudyInstanceUID with a leading zero component",
        _put("StudyInstanceUID", "UI", b"1.02.3"),
        "refused",
    ),
    Regression(
        "StudyInstanceUID with a leading space",
        _put("StudyInstanceUID", "UI", b" 1.2.3"),
        "refused",
    ),
    Regression(
        "SOPInstanceUID with a trailing newline",
        _put("SOPInstanceUID", "UI", b"1.2.3\n"),
        "refused",
        sop_uid="1.2.3\n",
    ),
]


def _open_bug(label: str) -> bool:
    return any(r.open_bug and r.batch_label and r.batch_label in label for r in REGRESSIONS)


def _params() -> list[object]:
    return [
        pytest.param(
            r, id=r.name, marks=[pytest.mark.xfail(strict=True, reason=r.open_bug)] if r.open_bug else []
        )
        for r in REGRESSIONS
    ]


@pytest.mark.parametrize("case", _params())
def test_regression(campaign: FuzzCampaign, case: Regression) -> None:
    index = 800_000 + REGRESSIONS.index(case)
    expect = Expect.REFUSED if case.want == "refused" else Expect.ANY
    item = custom(
        Kind.HYPOTHESIS,
        f"regression:{case.name}",
        case.edit,
        index=index,
        sop_uid=case.sop_uid,
        expect=expect,
    )
    result = campaign.send(item)
    if case.want == "refused":
        assert result.refused, f"{case.name}: answered {result.status_text}"
        assert not campaign.stored_study_of([item.sop_uid.strip()]), "refused but stored"
        return
    assert result.acknowledged, f"{case.name}: answered {result.status_text}"
    (settled,) = campaign.settle_inputs([result], timeout_s=90)
    detail = f"{case.name}: {settled.state} / {settled.outcome}: {settled.reason}"
    if case.want == "analysed":
        assert settled.outcome == "analysed", detail
    elif case.want == "not_analysed":
        assert settled.outcome == "not_analysed" and settled.reason, detail
        assert case.reason in settled.reason, detail
    else:
        assert settled.outcome in ("analysed", "not_analysed"), detail
        assert settled.outcome == "analysed" or settled.reason, detail


# -- malformed PDUs on the raw socket ----------------------------------------------------------
def _associated(port: int) -> RawAssociation:
    assoc = RawAssociation(port, timeout=CLOSE_BOUND_S)
    refused = assoc.associate(DX, EXPLICIT)
    assert refused is None, f"association refused: {refused}"
    return assoc


def _case_send_then_wait(payload: bytes, *, associate_first: bool = False) -> Callable[[int], Closed]:
    def run(port: int) -> Closed:
        assoc = _associated(port) if associate_first else RawAssociation(port, timeout=CLOSE_BOUND_S)
        with assoc:
            started = time.monotonic()
            assoc.send_raw(payload)
            return wait_closed(assoc.sock, CLOSE_BOUND_S, started)

    return run


def _case_trickle(
    payload: bytes, interval: float, *, associate_first: bool = False
) -> Callable[[int], Closed]:
    def run(port: int) -> Closed:
        assoc = _associated(port) if associate_first else RawAssociation(port, timeout=CLOSE_BOUND_S)
        with assoc:
            started = time.monotonic()
            assoc.sock.settimeout(interval)
            for byte in payload:
                if time.monotonic() - started > CLOSE_BOUND_S:
                    return Closed(Reply.TIMEOUT, None)
                if not assoc.send_raw(bytes([byte])):
                    return Closed(Reply.RESET, time.monotonic() - started)
                try:
                    data = assoc.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return Closed(Reply.RESET, time.monotonic() - started)
                if not data:
                    return Closed(Reply.CLOSED, time.monotonic() - started)
                if data[0] == A_ABORT:
                    return Closed(Reply.ABORTED, time.monotonic() - started)
            return Closed(Reply.PROTOCOL, time.monotonic() - started)  # the whole PDU went through

    return run


_RQ = associate_rq("FRACNODE", "RAWSCU", [(1, DX, [EXPLICIT])])
_GARBAGE = random.Random(SEED)


def _garbage(size: int) -> bytes:
    return bytes(_GARBAGE.getrandbits(8) for _ in range(size))


HOSTILE: dict[str, Callable[[int], Closed]] = {
    # Declared lengths beyond anything negotiated (pynetdicom itself trusts them: STACK-NOTES).
    "associate-rq-declares-4GiB": _case_send_then_wait(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0)),
    "p-data-declares-2GiB": _case_send_then_wait(
        struct.pack(">BBL", P_DATA_TF, 0, 0x7FFFFFFF) + bytes(64), associate_first=True
    ),
    "p-data-declares-max-pdu-plus-one": _case_send_then_wait(
        struct.pack(">BBL", P_DATA_TF, 0, 1_048_576 + 1) + bytes(64), associate_first=True
    ),
    "unknown-pdu-type": _case_send_then_wait(struct.pack(">BBL", 0x42, 0, 4) + bytes(4)),
    # Garbage: random bytes, and random bodies behind valid PDU types.
    **{f"garbage-{n}": _case_send_then_wait(_garbage(size)) for n, size in enumerate((1, 7, 300, 5000))},
    **{
        f"garbage-body-type-{t}": _case_send_then_wait(struct.pack(">BBL", t, 0, 200) + _garbage(200))
        for t in (0x01, 0x04, 0x05, 0x07)
    },
    # Truncated PDUs that then stall.
    **{f"truncated-rq-{k}-bytes": _case_send_then_wait(_RQ[:k]) for k in (1, 2, 3, 6, 20)},
    "truncated-p-data-after-associate": _case_send_then_wait(
        struct.pack(">BBL", P_DATA_TF, 0, 500) + bytes(100), associate_first=True
    ),
    # Slow senders.
    "trickled-associate-rq": _case_trickle(_RQ, 1.0),
    "trickled-p-data": _case_trickle(
        struct.pack(">BBL", P_DATA_TF, 0, 10_000) + bytes(10_000), 0.5, associate_first=True
    ),
    # Connected, then silent.
    "silent-connection": _case_send_then_wait(b""),
    "silent-after-associate": _case_send_then_wait(b"", associate_first=True),
}


@pytest.fixture(scope="module")
def hostile(campaign: FuzzCampaign) -> dict[str, Closed | BaseException]:
    """Every hostile connection at once (in threads, fewer than the association limit at a time)."""
    port = campaign.node.dicom_port
    results: dict[str, Closed | BaseException] = {}
    limiter = threading.Semaphore(MAX_ASSOCIATIONS - 2)

    def run(name: str, case: Callable[[int], Closed]) -> None:
        with limiter:
            try:
                results[name] = case(port)
            except (OSError, AssertionError) as exc:
                results[name] = exc

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in HOSTILE.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * CLOSE_BOUND_S + 60)
    return results


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_connection_is_closed_within_bound(
    hostile: dict[str, Closed | BaseException], case: str
) -> None:
    result = hostile[case]
    assert not isinstance(result, BaseException), f"{case}: {result!r}"
    assert result.reply in (Reply.ABORTED, Reply.CLOSED, Reply.RESET), (
        f"{case}: the connection was still open after {CLOSE_BOUND_S:.0f} s ({result.reply})"
    )


def test_node_serves_after_hostile_connections(
    campaign: FuzzCampaign, hostile: dict[str, Closed | BaseException]
) -> None:
    assert campaign.node.alive() and campaign.node.healthy()
    good = campaign.good_study()
    assert good.analysed and good.delivered, good.detail


def _echo_association(port: int, timeout: float) -> Reply | None:
    with RawAssociation(port, timeout=timeout) as assoc:
        refused = assoc.associate("1.2.840.10008.1.1", EXPLICIT)
        if refused is None:
            assoc.release()
        return refused


def test_idle_connections_do_not_lock_the_port(campaign: FuzzCampaign) -> None:
    """More silent connections than association slots: a real sender gets in within the bound."""
    port = campaign.node.dicom_port
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_ASSOCIATIONS + 4)]
    started = time.monotonic()
    try:
        outcome = _echo_association(port, 10)
        while outcome is not None and time.monotonic() - started < CLOSE_BOUND_S:
            time.sleep(1.0)
            outcome = _echo_association(port, 10)
        assert outcome is None, f"a real sender still got {outcome} {CLOSE_BOUND_S:.0f} s after idle connects"
        still_open = [s for s in idle if wait_closed(s, CLOSE_BOUND_S, started).seconds is None]
        assert not still_open, f"{len(still_open)} idle connections still open after {CLOSE_BOUND_S:.0f} s"
    finally:
        for sock in idle:
            sock.close()


def test_aborted_associations_free_their_slots_at_once(campaign: FuzzCampaign) -> None:
    port = campaign.node.dicom_port
    for _ in range(3):
        opened = [_associated(port) for _ in range(MAX_ASSOCIATIONS)]
        for assoc in opened:
            assoc.send_raw(struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, 0, 0))
            assoc.close()
    outcome = _echo_association(port, 10)
    deadline = time.monotonic() + 3.0
    while outcome is not None and time.monotonic() < deadline:
        time.sleep(0.2)
        outcome = _echo_association(port, 10)
    assert outcome is None, f"a sender after {3 * MAX_ASSOCIATIONS} aborted associations got {outcome}"


# -- after the campaign --------------------------------------------------------------------------
def test_every_acknowledged_input_ends_with_a_recorded_outcome(campaign: FuzzCampaign) -> None:
    settled = campaign.settle(timeout_s=150)
    assert campaign.results, "the batches ran first"
    stuck = [(s.result.input.label, s.state, s.reason) for s in settled if s.outcome in ("stuck", "lost")]
    assert not stuck, f"{len(stuck)} acknowledged inputs never reached done/failed: {stuck[:10]}"
    unexplained = [s.result.input.label for s in settled if s.outcome != "analysed" and not s.reason]
    assert not unexplained, f"not analysed without a reason: {unexplained}"
    decoded_bombs = [
        s.result.input.label
        for s in settled
        if s.result.input.expect is Expect.NOT_ANALYSED and s.outcome == "analysed"
    ]
    assert not decoded_bombs, f"inputs that cannot be decoded were reported as analysed: {decoded_bombs}"
    assert not campaign.refused_but_stored()
    # The same outcome through the HTTP API and the CLI.
    for s in [s for s in settled if s.outcome != "analysed"]:
        body = campaign.node.study_json(str(s.study_uid))
        assert body is not None and body["study"]["state"] == s.state
        if s.state == "failed":
            assert body["study"]["error"] or any(j["last_error"] for j in body["jobs"])
        else:
            assert body["study"]["outcome"]["priority"] == "not_analysed"
    listed = campaign.node.cli("studies", "list", "--limit", "100000")
    assert listed.returncode == 0, listed.stderr
    assert all(str(s.study_uid) in listed.stdout for s in settled)
    print("\nreplies by kind:", summary_rows(campaign.results))
    print("outcomes by kind:", outcomes_by_kind(settled))


def test_no_patient_data_in_log_api_or_cli(campaign: FuzzCampaign) -> None:
    studies = campaign.stored_study_of([r.input.sop_uid for r in campaign.acknowledged()])
    good = [g.study_uid for g in campaign.good]
    leaks = campaign.phi_leaks(sorted(set(studies.values())) + good)
    assert not leaks, leaks


def test_node_never_restarted_and_memory_stayed_bounded(campaign: FuzzCampaign) -> None:
    assert campaign.deaths == 0 and campaign.restarts == 0 and campaign.node.starts == 1
    assert campaign.node.watchdog_kills == 0
    assert campaign.node.peak_rss < RSS_BOUND, f"peak RSS {campaign.node.peak_rss / 1e9:.2f} GB"
