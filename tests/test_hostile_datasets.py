"""One bad image must never silence the node: every reader of a received dataset tolerates it.

Datasets here parse well enough to be acknowledged, but a Type 2/3 attribute is missing, an
element arrives with another VR than the dictionary's (a sequence as a string, a birth date as
PN, a code string as OB), a number is text, NaN or several values, a required pixel description
is missing. Each is written to bytes and read back as the worker reads its spool, then given to
every reader: header facts, the pixel pipeline, the SR/SC/GSPS builders, the HL7 builder, and
the worker end to end on a real node. Errors and logs must not quote a value of the dataset.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pydicom
import pytest
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from inference.regions import Region
from inference.routing import load_keywords
from inference.values import ImageResult, Priority, RegionSource, Routing, StudyResult
from node import received
from node.analysis import AnalysisConfig
from node.hl7 import accession_number_of, build_oru
from node.imaging import ImagingError, PixelDescriptionError, header_facts, load_frames
from node.modelset import load_model_set
from node.outputs import OutputConfig
from node.redact import WITHHELD, ValueFreeLogFilter, safe_reason
from node.results.gsps import build_gsps
from node.results.overlay import build_overlays
from node.results.sources import source_view
from node.results.sr import build_sr
from node.results.summary import build_summary
from node.worker import StudyProcessor, WorkerConfig
from storage import repo
from storage.views import OutboxKind, StudyDetail
from tests.dicomgen import DX_PRESENTATION, make_dataset
from tests.modelgen import all_groups
from tests.nodeproc import InProcessNode
from tests.resultgen import frames_of, study_result
from tests.validators import assert_valid

LIMIT = 100_000_000
SOFTWARE = "0.1.0-test"
BIRTH_DATE = "19311231"
NAME = "JOHN DOE"  # no caret: highdicom warns with the name quoted unless the node adds one

Mutation = Callable[[Dataset], None]


def _reread(ds: Dataset) -> Dataset:
    if "PixelData" in ds and ds["PixelData"].VR not in ("OB", "OW"):
        ds["PixelData"].VR = "OW"  # pydicom resolves "OB or OW" from BitsAllocated, maybe deleted
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _replace(keyword: str, vr: str, value: object) -> Mutation:
    """Send ``keyword`` with VR ``vr`` instead of its dictionary VR."""

    def mutate(ds: Dataset) -> None:
        if keyword in ds:
            delattr(ds, keyword)
        ds.add(DataElement(Tag(keyword), vr, value))

    return mutate


def _delete(*keywords: str) -> Mutation:
    def mutate(ds: Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    return mutate


def _unconvertible(keyword: str, vr: str, raw: bytes) -> Dataset:
    """A dataset whose ``keyword`` pydicom cannot convert on first access (as read from bytes)."""
    tag = Tag(keyword)
    return Dataset({tag: RawDataElement(tag, vr, len(raw), raw, 0, False, True)})


# ---------------------------------------------------------------------------------------------
# The accessors
# ---------------------------------------------------------------------------------------------


def test_text_reads_text_only() -> None:
    ds = Dataset()
    ds.PatientName = "DOE^JOHN"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDescription = "  XR WRIST \x00"
    ds.SeriesDescription = ""
    ds.add(DataElement(Tag("Modality"), "OB", b"DX"))
    ds.add(DataElement(Tag("BodyPartExamined"), "SQ", [Dataset()]))
    assert received.text(ds, "PatientName") == "DOE^JOHN"
    assert received.text(ds, "ImageType") == "ORIGINAL\\PRIMARY"
    assert received.text(ds, "StudyDescription") == "XR WRIST"
    assert received.text(ds, "SeriesDescription") is None
    assert received.text(ds, "Modality") is None  # bytes are not text
    assert received.text(ds, "BodyPartExamined") is None
    assert received.text(ds, "ProtocolName") is None
    assert received.text("not a dataset", "PatientName") is None


def test_numbers_read_finite_numbers_only() -> None:
    ds = Dataset()
    ds.WindowCenter = [40.0, 400.0]
    ds.Rows = 128
    ds.add(DataElement(Tag("Columns"), "LO", " 96 "))
    ds.add(DataElement(Tag("RescaleSlope"), "LO", "abc"))
    ds.add(DataElement(Tag("RescaleIntercept"), "LO", "nan"))
    ds.add(DataElement(Tag("BitsStored"), "LO", "1.5"))
    ds.add(DataElement(Tag("BitsAllocated"), "US", [16, 8]))
    assert received.numbers(ds, "WindowCenter") == (40.0, 400.0)
    assert received.number(ds, "WindowCenter") is None and received.first_number(ds, "WindowCenter") == 40.0
    assert received.integer(ds, "Rows") == 128 and received.integer(ds, "Columns") == 96
    assert received.number(ds, "RescaleSlope") is None
    assert received.number(ds, "RescaleIntercept") is None
    assert received.integer(ds, "BitsStored") is None
    assert received.integer(ds, "BitsAllocated") is None


def test_unconvertible_elements_read_as_absent() -> None:
    assert received.integer(_unconvertible("Rows", "US", b"\x01\x02\x03"), "Rows") is None
    assert received.text(_unconvertible("Modality", "SQ", b"DX"), "Modality") is None
    assert (
        received.items(
            _unconvertible("AnatomicRegionSequence", "SQ", b"\x01\x02\xff\xfe"), "AnatomicRegionSequence"
        )
        == ()
    )


@pytest.mark.parametrize(
    ("vr", "raw", "expected"),
    [
        ("UI", b"1.2.3\x00", "1.2.3"),
        ("UI", b"1.2.3 ", "1.2.3"),
        ("UI", b" 1.2.3", " 1.2.3"),
        ("UI", b"1.2.3\n", "1.2.3\n"),
        ("OB", b"1.2.3\x00", None),
        ("UI", b"1.2\xe9", None),
    ],
    ids=["nul-padding", "space-padding", "leading-space", "newline", "binary-vr", "not-ascii"],
)
def test_uid_is_read_as_sent(vr: str, raw: bytes, expected: str | None) -> None:
    assert received.uid(_unconvertible("StudyInstanceUID", vr, raw), "StudyInstanceUID") == expected


def test_items_are_datasets_only() -> None:
    code = Dataset()
    code.CodeValue = "T-15460"
    ds = Dataset()
    ds.AnatomicRegionSequence = [code]
    ds.add(DataElement(Tag("ViewCodeSequence"), "LO", ["a", "b"]))
    ds.add(DataElement(Tag("RequestAttributesSequence"), "LO", "WRIST"))
    assert received.items(ds, "AnatomicRegionSequence") == (code,)
    assert received.items(ds, "ViewCodeSequence") == ()
    assert received.items(ds, "RequestAttributesSequence") == ()
    assert received.items(ds, "ModalityLUTSequence") == ()


# ---------------------------------------------------------------------------------------------
# Header facts and the pixel pipeline
# ---------------------------------------------------------------------------------------------

HEADER_MUTATIONS: dict[str, Mutation] = {
    "anatomic-region-as-string": _replace("AnatomicRegionSequence", "LO", "WRIST"),
    "anatomic-region-items-not-datasets": _replace("AnatomicRegionSequence", "LO", ["WRIST", "HAND"]),
    "request-attributes-as-string": _replace("RequestAttributesSequence", "LO", "XR HAND"),
    "body-part-as-ob": _replace("BodyPartExamined", "OB", b"\x01\x02"),
    "modality-as-us": _replace("Modality", "US", 7),
    "laterality-as-ds": _replace("ImageLaterality", "DS", "1.5"),
    "no-descriptions": _delete("StudyDescription", "SeriesDescription", "BodyPartExamined"),
}


@pytest.mark.parametrize("name", HEADER_MUTATIONS)
def test_header_facts_tolerate(name: str) -> None:
    ds = make_dataset()
    HEADER_MUTATIONS[name](ds)
    facts = header_facts(_reread(ds))
    assert facts.view_position == "PA"  # what is intact is still read
    if name.startswith("anatomic"):
        assert facts.anatomic_codes == ()
    if name == "body-part-as-ob":
        assert facts.body_part is None
    if name == "no-descriptions":
        assert (facts.body_part, facts.study_description, facts.series_description) == (None, None, None)


@pytest.mark.parametrize(
    "keyword",
    [
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "PhotometricInterpretation",
    ],
)
def test_missing_pixel_description_is_an_imaging_error(keyword: str) -> None:
    ds = make_dataset()
    delattr(ds, keyword)
    with pytest.raises(PixelDescriptionError) as caught:
        load_frames(_reread(ds), max_pixels=LIMIT)
    assert keyword in caught.value.reason
    assert caught.value.sop_instance_uid == str(ds.SOPInstanceUID)


@pytest.mark.parametrize(
    "mutate",
    [
        _replace("Rows", "LO", "abc"),
        _replace("Columns", "US", [96, 2]),
        _replace("BitsStored", "DS", "nan"),
        _replace("SamplesPerPixel", "OB", b"\x01\x00"),
    ],
    ids=["rows-text", "columns-two-values", "bits-nan", "samples-binary"],
)
def test_invalid_pixel_description_is_an_imaging_error(mutate: Mutation) -> None:
    ds = make_dataset()
    mutate(ds)
    with pytest.raises(PixelDescriptionError, match="missing or invalid"):
        load_frames(_reread(ds), max_pixels=LIMIT)


OPTIONAL_MUTATIONS: dict[str, Mutation] = {
    "rescale-slope-text": _replace("RescaleSlope", "LO", "abc"),
    "rescale-intercept-two": _replace("RescaleIntercept", "DS", ["0", "1"]),
    "window-center-nan": _replace("WindowCenter", "LO", "nan"),
    "window-width-binary": _replace("WindowWidth", "OB", b"\x00\x01"),
    "voi-function-binary": _replace("VOILUTFunction", "OB", b"SIGMOID\x00"),
    "padding-text": _replace("PixelPaddingValue", "LO", "x"),
    "modality-lut-as-string": _replace("ModalityLUTSequence", "LO", "LUT"),
    "voi-lut-items-not-datasets": _replace("VOILUTSequence", "LO", ["a", "b"]),
    "frames-text": _replace("NumberOfFrames", "LO", "zz"),
    "planar-text": _replace("PlanarConfiguration", "LO", "?"),
}


@pytest.mark.parametrize("name", OPTIONAL_MUTATIONS)
def test_wrongly_typed_optional_attributes_do_not_stop_decoding(name: str) -> None:
    ds = make_dataset()
    OPTIONAL_MUTATIONS[name](ds)
    (frame,) = load_frames(_reread(ds), max_pixels=LIMIT)
    assert frame.pixels.shape == (128, 96)
    assert 0.0 <= float(frame.pixels.min()) <= float(frame.pixels.max()) <= 1.0


# ---------------------------------------------------------------------------------------------
# Result objects on hostile sources
# ---------------------------------------------------------------------------------------------

SOURCE_MUTATIONS: dict[str, Mutation] = {
    "no-patient-id": _delete("PatientID"),
    "no-study-date": _delete("StudyDate"),
    "no-accession": _delete("AccessionNumber"),
    "no-patient-module": _delete("PatientName", "PatientID", "PatientBirthDate", "PatientSex"),
    "birth-date-as-pn": _replace("PatientBirthDate", "PN", BIRTH_DATE),
    "birth-date-invalid": _replace("PatientBirthDate", "DA", "1931-13-45"),
    "sex-x": _replace("PatientSex", "CS", "X"),
    "name-without-caret": _replace("PatientName", "PN", NAME),
    "study-time-invalid": _replace("StudyTime", "TM", "256199"),
    "study-id-binary": _replace("StudyID", "OB", b"\x01\x02"),
    "orientation-one-value": _replace("PatientOrientation", "CS", "L"),
    "spacing-text": _replace("ImagerPixelSpacing", "LO", "a\\b"),
    "laterality-binary": _replace("Laterality", "OB", b"R\x00"),
}


@pytest.mark.parametrize("name", SOURCE_MUTATIONS)
def test_result_objects_tolerate_source_attributes(name: str, tmp_path: Path) -> None:
    sources = [make_dataset(), make_dataset()]
    study, series = generate_uid(), generate_uid()
    for ds in sources:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        SOURCE_MUTATIONS[name](ds)
    sources = [_reread(ds) for ds in sources]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    result = study_result(sources)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sr = build_sr(result, by_uid, software_version=SOFTWARE)
        overlays = build_overlays(result, by_uid, frames_of(sources), software_version=SOFTWARE)
        summary = build_summary(result, by_uid, software_version=SOFTWARE)
        gsps = build_gsps(result, by_uid, software_version=SOFTWARE)
    quoted = [str(w.message) for w in caught if NAME in str(w.message) or BIRTH_DATE in str(w.message)]
    assert quoted == []
    for index, (obj, iod) in enumerate(
        [
            (sr, "Comprehensive3DSR"),
            (overlays[0], "SCImage"),
            (summary, "SCImage"),
            (gsps[0], "GrayscaleSoftcopyPresentationState"),
        ]
    ):
        path = tmp_path / f"{index}.dcm"
        obj.save_as(path, enforce_file_format=True)
        assert_valid(path, iod)
        back = pydicom.dcmread(path)
        assert back.StudyInstanceUID == study
        if name == "birth-date-as-pn":
            assert back.PatientBirthDate == BIRTH_DATE  # the date itself survives, as DA
        if name == "name-without-caret":
            assert str(back.PatientName) == NAME + "^"  # the same name (PS3.5 6.2.1.2)
        if name.startswith("no-"):
            assert all(
                back[k].value in (None, "")
                for k in ("PatientID", "StudyDate", "AccessionNumber")
                if k not in sources[0]
            )


def test_source_view_empties_invalid_type_2_and_drops_invalid_type_3() -> None:
    ds = make_dataset()
    for mutate in (
        SOURCE_MUTATIONS["sex-x"],
        SOURCE_MUTATIONS["study-time-invalid"],
        SOURCE_MUTATIONS["spacing-text"],
        SOURCE_MUTATIONS["birth-date-invalid"],
    ):
        mutate(ds)
    view = source_view(_reread(ds))
    assert view.PatientSex is None and view.StudyTime is None and view.PatientBirthDate is None
    assert "ImagerPixelSpacing" not in view
    assert view.PatientID == "TESTID001" and view.Rows == 128 and list(view.PatientOrientation) == ["L", "F"]


def _failed(uid: str, reason: str) -> ImageResult:
    routing = Routing(Region.UNKNOWN, RegionSource.NONE, 0.0, None, None, None, False, reason)
    return ImageResult(uid, 0, routing, None, (), reason)


def test_sr_of_a_study_whose_only_image_has_no_pixel_description(tmp_path: Path) -> None:
    ds = make_dataset()
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "PixelData"):
        delattr(ds, keyword)
    ds = _reread(ds)
    with pytest.raises(ImagingError) as caught:
        load_frames(ds, max_pixels=LIMIT)
    image = _failed(str(ds.SOPInstanceUID), caught.value.reason)
    result = StudyResult(str(ds.StudyInstanceUID), 1, (), (image,), Priority.NOT_ANALYSED, None)
    sr = build_sr(result, {image.sop_instance_uid: ds}, software_version=SOFTWARE)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert_valid(path, "Comprehensive3DSR")
    back = pydicom.dcmread(path)
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert str(ds.SOPInstanceUID) not in _content_references(back)  # no library entry, no source image
    assert caught.value.reason in _content_texts(back)


def _content_references(item: Dataset) -> list[str]:
    found = [str(ref.ReferencedSOPInstanceUID) for ref in item.get("ReferencedSOPSequence", [])]
    for child in item.get("ContentSequence", []):
        found.extend(_content_references(child))
    return found


def _content_texts(item: Dataset) -> str:
    return " ".join(
        [str(item.get("TextValue", ""))] + [_content_texts(c) for c in item.get("ContentSequence", [])]
    )


# ---------------------------------------------------------------------------------------------
# HL7 and redaction
# ---------------------------------------------------------------------------------------------


def _not_analysed_result() -> StudyResult:
    return StudyResult("1.2.3.4", 1, (), (), Priority.NOT_ANALYSED, None)


@pytest.mark.parametrize(
    ("accession", "expected"),
    [
        (b"ACC\x01", ""),
        (["A1", "B2"], ""),
        ("AC\rC|1\x00", "ACC|1"),
        ("X" * 40, "X" * 16),
        (None, ""),
        (7, ""),
    ],
    ids=["bytes", "list", "control-characters", "too-long", "none", "number"],
)
def test_oru_takes_any_accession_value(accession: object, expected: str) -> None:
    message = build_oru(
        _not_analysed_result(),
        accession_number=accession,
        sending_app="FRACNODE",
        receiving_app="RIS",
        receiving_facility="H",
        control_id="FN1R1",
        timestamp=datetime(2026, 12, 4, tzinfo=UTC),
    )
    parsed = hl7.parse(str(message))
    assert str(parsed.segment("OBR")(3)) == hl7.Message("\r").escape(expected)


def test_accession_number_of_skips_what_is_not_text() -> None:
    absent, binary, good = Dataset(), Dataset(), Dataset()
    binary.add(DataElement(Tag("AccessionNumber"), "OB", b"\x00\x01"))
    good.AccessionNumber = " ACC0001 "
    assert (
        accession_number_of([absent, binary, _unconvertible("AccessionNumber", "SQ", b"x"), good])
        == "ACC0001"
    )
    assert accession_number_of([absent]) is None


def test_safe_reason_keeps_no_value() -> None:
    ds = _reread(make_dataset())
    _replace("PatientBirthDate", "PN", BIRTH_DATE)(ds)
    ds = _reread(ds)
    with pytest.raises(ValueError) as caught:
        pydicom.valuerep.DA(ds.PatientBirthDate)
    assert BIRTH_DATE in str(caught.value)  # the library quotes it ...
    reason = safe_reason(caught.value)
    assert BIRTH_DATE not in reason  # ... the node does not
    assert reason == "ValueError (in pydicom): a value that cannot be interpreted"
    error = PixelDescriptionError("1.2.3", "missing or invalid Rows")
    assert safe_reason(error) == "PixelDescriptionError: missing or invalid Rows"
    assert safe_reason(OSError(28, "No space left on device", "/spool/" + BIRTH_DATE)).endswith("(ENOSPC)")


def test_log_filter_withholds_library_messages() -> None:
    value_free = ValueFreeLogFilter()
    quoting = logging.LogRecord(
        "pydicom.valuerep", logging.WARNING, "x", 1, "Invalid value %r", (NAME,), None
    )
    warning = logging.LogRecord(
        "py.warnings",
        logging.WARNING,
        "x",
        1,
        "%s",
        (f"/venv/site-packages/pydicom/valuerep.py:440: {NAME}",),
        None,
    )
    ours = logging.LogRecord("node.worker", logging.INFO, "x", 1, "study %s", ("done",), None)
    for record in (quoting, warning, ours):
        assert value_free.filter(record)
    assert quoting.getMessage() == WITHHELD and warning.getMessage() == WITHHELD
    assert ours.getMessage() == "study done"


# ---------------------------------------------------------------------------------------------
# End to end: C-STORE, then the worker
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return all_groups(tmp_path_factory.mktemp("models"))


def _send(node: InProcessNode, datasets: list[Dataset]) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FRACNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()


def _process(node: InProcessNode, models_dir: Path, tmp_path: Path, study_uid: str) -> StudyDetail:
    assert repo.promote_quiet_studies(node.db, 0.0, datetime.now(UTC)) == [study_uid]
    processor = StudyProcessor(
        node.db,
        node.spool,
        load_model_set(models_dir),
        load_keywords(None),
        AnalysisConfig(batch_size=4),
        OutputConfig(
            directory=tmp_path / "results",
            software_version="test",
            destinations=("pacs",),
            hl7_destination="hl7",
        ),
        node.metrics,
        WorkerConfig(),
    )
    assert processor.run_once("test-worker")
    detail = repo.get_study(node.db, study_uid)
    assert detail is not None
    return detail


def test_a_study_whose_only_image_has_no_pixel_description_is_not_analysed(
    node: InProcessNode, models_dir: Path, tmp_path: Path
) -> None:
    ds = make_dataset(rows=200, cols=160)
    _delete("SamplesPerPixel", "BitsStored")(ds)
    _send(node, [ds])
    detail = _process(node, models_dir, tmp_path, str(ds.StudyInstanceUID))
    assert (detail.study.state, detail.study.priority) == ("done", "not_analysed")
    assert [job.last_error for job in repo.list_jobs(node.db)] == [None]
    outcome = json.loads(detail.study.outcome_json or "{}")
    (image,) = outcome["not_analysed"]
    assert "SamplesPerPixel" in image["reason"] and "BitsStored" in image["reason"]
    sr = next(Path(item.payload_path) for item in detail.outbox if item.kind == OutboxKind.DICOM)
    assert_valid(sr, "Comprehensive3DSR")


def test_hostile_headers_end_to_end_leak_nothing(
    node: InProcessNode, models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = []
    for index, mutate in enumerate(
        [
            _delete("PatientID", "StudyDate", "AccessionNumber"),
            _replace("PatientBirthDate", "PN", BIRTH_DATE),
            _replace("AnatomicRegionSequence", "LO", "WRIST"),
            _replace("PatientName", "PN", NAME),
        ]
    ):
        ds = make_dataset(
            study_uid=study, series_uid=series, instance_number=index + 1, seed=index, rows=200, cols=160
        )
        mutate(ds)
        datasets.append(ds)
    _send(node, datasets)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detail = _process(node, models_dir, tmp_path, str(study))
    assert detail.study.state == "done", [job.last_error for job in repo.list_jobs(node.db)]
    assert [job.last_error for job in repo.list_jobs(node.db)] == [None]
    outcome = json.loads(detail.study.outcome_json or "{}")
    assert outcome["groups"][0]["images"] == 4
    texts = [r.getMessage() for r in caplog.records if r.name.startswith("node")] + [
        str(w.message) for w in caught
    ]
    assert not [text for text in texts if BIRTH_DATE in text or NAME in text]
    for item in detail.outbox:
        if item.kind == OutboxKind.DICOM:
            assert_valid(Path(item.payload_path))
