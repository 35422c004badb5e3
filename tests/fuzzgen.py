"""Hostile inputs for the fuzz campaign: encoded datasets, mutated at the element and byte level.

Every input starts as a well-formed DX wrist radiograph (``tests.dicomgen``) with its own study,
series and SOP Instance UIDs (derived from the seed, so a campaign is reproducible) and patient
data made of markers (:data:`PHI_MARKERS`) that must never show up in the node's log or API.
The dataset is held as its top-level elements, each encoded alone in Explicit VR Little Endian,
so a mutation can remove, replace or insert an element with any VR, length and bytes, and the
result is sent as it is (``tests.rawdicom``). Kinds (:class:`Kind`):

- ``missing_attribute``: Type 1/2/3 attributes removed (PatientID, StudyDate, AccessionNumber,
  SamplesPerPixel, BitsStored, ..., several at once);
- ``wrong_vr``: an attribute encoded with another VR (AnatomicRegionSequence as a string,
  PatientBirthDate as PN, Modality as OB, Rows as LO, a text attribute as a sequence, ...);
- ``wrong_value``: the right VR with an impossible value (BitsStored 0 or 40, SamplesPerPixel 3
  on a monochrome image, NumberOfFrames "junk", a window width of 0, a date of 2026-99-99, ...);
- ``wrong_length``: an element's length field rewritten (odd, too long, too short, undefined);
- ``truncation``: the encoded stream cut anywhere;
- ``bitflip``: bits flipped, mostly in the header;
- ``deep_sequence``: nested sequences (undefined and defined lengths, up to thousands deep) and
  sequences of many thousands of items;
- ``rows_columns_bomb``: Rows x Columns (x NumberOfFrames) far beyond the pixel data sent;
- ``compressed_bomb``: a tiny JPEG / JPEG-LS / JPEG 2000 / RLE stream whose own header claims
  65000 x 65000 (or whose DICOM Rows/Columns do);
- ``bad_uid``: UIDs with '/', '..', spaces, NUL, 65+ characters, non-ASCII and other malformed
  forms (these must be refused at C-STORE);
- ``charset``: odd Specific Character Sets and bytes that are not valid in them;
- ``hypothesis``: edits drawn by hypothesis (any tag of interest, any VR, any bytes, removals,
  truncation).

:func:`generate` returns ``count`` inputs of one kind for a seed; :func:`campaign` mixes kinds.
"""

from __future__ import annotations

import copy
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import cache
from typing import TYPE_CHECKING

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from tests.dicomgen import DX_PRESENTATION, encode, make_dataset

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

# Patient data in every input: none of these may appear in the node's log or API responses.
PHI_NAME = "ZQXFUZZ"
PHI_ID = "PIDZQX"
PHI_BIRTH_DATE = "19311231"
PHI_MARKERS = (PHI_NAME, PHI_ID, PHI_BIRTH_DATE)

_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

# Tags by keyword, for readable mutation tables.
T = {
    "SpecificCharacterSet": 0x00080005,
    "ImageType": 0x00080008,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "StudyDate": 0x00080020,
    "ContentDate": 0x00080023,
    "StudyTime": 0x00080030,
    "AccessionNumber": 0x00080050,
    "Modality": 0x00080060,
    "Manufacturer": 0x00080070,
    "ReferringPhysicianName": 0x00080090,
    "StudyDescription": 0x00081030,
    "SeriesDescription": 0x0008103E,
    "ReferencedImageSequence": 0x00081140,
    "AnatomicRegionSequence": 0x00082218,
    "PatientName": 0x00100010,
    "PatientID": 0x00100020,
    "PatientBirthDate": 0x00100030,
    "PatientSex": 0x00100040,
    "BodyPartExamined": 0x00180015,
    "ProtocolName": 0x00181030,
    "ImagerPixelSpacing": 0x00181164,
    "ViewPosition": 0x00185101,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "StudyID": 0x00200010,
    "SeriesNumber": 0x00200011,
    "InstanceNumber": 0x00200013,
    "PatientOrientation": 0x00200020,
    "Laterality": 0x00200060,
    "ImageLaterality": 0x00200062,
    "SamplesPerPixel": 0x00280002,
    "PhotometricInterpretation": 0x00280004,
    "PlanarConfiguration": 0x00280006,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "PixelSpacing": 0x00280030,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "HighBit": 0x00280102,
    "PixelRepresentation": 0x00280103,
    "WindowCenter": 0x00281050,
    "WindowWidth": 0x00281051,
    "RescaleIntercept": 0x00281052,
    "RescaleSlope": 0x00281053,
    "PresentationLUTShape": 0x20500020,
    "ViewCodeSequence": 0x00540220,
    "PixelData": 0x7FE00010,
}
_NAMES = {tag: name for name, tag in T.items()}


class Kind(StrEnum):
    MISSING_ATTRIBUTE = "missing_attribute"
    WRONG_VR = "wrong_vr"
    WRONG_VALUE = "wrong_value"
    WRONG_LENGTH = "wrong_length"
    TRUNCATION = "truncation"
    BITFLIP = "bitflip"
    DEEP_SEQUENCE = "deep_sequence"
    ROWS_COLUMNS_BOMB = "rows_columns_bomb"
    COMPRESSED_BOMB = "compressed_bomb"
    BAD_UID = "bad_uid"
    CHARSET = "charset"
    HYPOTHESIS = "hypothesis"


class Expect(StrEnum):
    """What the node must do with an input."""

    REFUSED = "refused"  # a failure status at C-STORE; nothing stored
    NOT_ANALYSED = "not_analysed"  # refused, or stored and ended failed / not analysed with a reason
    ANY = "any"  # refused, or stored and ended in a terminal state (a failure with its reason)


@dataclass(frozen=True, slots=True)
class FuzzInput:
    kind: Kind
    label: str  # what was done, e.g. "wrong_vr:PatientBirthDate=PN"
    index: int
    sop_class: str  # the C-STORE request's Affected SOP Class UID
    sop_uid: str  # the C-STORE request's Affected SOP Instance UID
    study_uid: str  # the study the unmutated dataset belongs to
    transfer_syntax: str
    data: bytes  # the encoded dataset (no file meta), sent as is
    expect: Expect


# -- encoding ---------------------------------------------------------------------------------
def raw_element(tag: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element; ``length`` overrides the length field."""
    if len(value) % 2 and length is None:
        value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
    group, element = tag >> 16, tag & 0xFFFF
    declared = len(value) if length is None else length
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHL", group, element, vr.encode("ascii"), 0, declared) + value
    return struct.pack("<HH2sH", group, element, vr.encode("ascii"), declared & 0xFFFF) + value


def _item(body: bytes, undefined: bool) -> bytes:
    if undefined:
        return struct.pack("<HHL", 0xFFFE, 0xE000, _UNDEFINED) + body + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body


def sequence(tag: int, items: list[bytes], undefined: bool) -> bytes:
    body = b"".join(_item(i, undefined) for i in items)
    if undefined:
        return raw_element(tag, "SQ", body, length=_UNDEFINED) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return raw_element(tag, "SQ", body)


def _encode_element(elem: DataElement) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem)
    return bytes(fp.getvalue())


class Elements:
    """A dataset as its encoded top-level elements, in tag order."""

    def __init__(self, items: dict[int, bytes]) -> None:
        self.items = dict(items)

    @classmethod
    def of(cls, ds: Dataset) -> Elements:
        resolved = correct_ambiguous_vr(copy.deepcopy(ds), is_little_endian=True)
        return cls({int(elem.tag): _encode_element(elem) for elem in resolved})

    def copy(self) -> Elements:
        return Elements(self.items)

    def set(self, tag: int, data: bytes) -> Elements:
        self.items[tag] = data
        return self

    def drop(self, *tags: int) -> Elements:
        for tag in tags:
            self.items.pop(tag, None)
        return self

    def encode(self) -> bytes:
        return b"".join(self.items[tag] for tag in sorted(self.items))


# -- base inputs ------------------------------------------------------------------------------
def uid(rng: random.Random) -> str:
    """A UUID-derived UID (PS3.5 B.2): ``2.25.`` and a decimal integer without leading zeros."""
    return f"2.25.{rng.getrandbits(120) | (1 << 119)}"


@dataclass(frozen=True, slots=True)
class Base:
    elements: Elements
    study_uid: str
    series_uid: str
    sop_uid: str
    transfer_syntax: str = EXPLICIT_VR_LE


def well_formed(rng: random.Random, index: int, *, rows: int = 96, cols: int = 80) -> Dataset:
    """A DX wrist with marker patient data: what every fuzz input starts from."""
    ds = make_dataset(
        rows=rows,
        cols=cols,
        seed=index % 7,
        study_uid=uid(rng),
        series_uid=uid(rng),
        sop_uid=uid(rng),
        instance_number=1,
    )
    ds.PatientName = f"{PHI_NAME}^P{index}"
    ds.PatientID = f"{PHI_ID}{index:06d}"
    ds.PatientBirthDate = PHI_BIRTH_DATE
    ds.AccessionNumber = f"A{index:08d}"
    return ds


def base(rng: random.Random, index: int) -> Base:
    ds = well_formed(rng, index)
    return Base(Elements.of(ds), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def _input(
    kind: Kind,
    label: str,
    index: int,
    b: Base,
    data: bytes,
    expect: Expect = Expect.ANY,
    sop_uid: str | None = None,
) -> FuzzInput:
    made = FuzzInput(
        kind=kind,
        label=label,
        index=index,
        sop_class=str(DX_PRESENTATION),
        sop_uid=b.sop_uid,
        study_uid=b.study_uid,
        transfer_syntax=b.transfer_syntax,
        data=data,
        expect=expect,
    )
    return replace(made, sop_uid=sop_uid) if sop_uid is not None else made


def _cs(text: str) -> bytes:
    return text.encode("latin-1")


def _us(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}H", *values)


# -- kinds ------------------------------------------------------------------------------------
MISSABLE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "SamplesPerPixel",
    "BitsStored",
    "BitsAllocated",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "PixelData",
    "Modality",
    "BodyPartExamined",
    "ImageLaterality",
    "Laterality",
    "ViewPosition",
    "AnatomicRegionSequence",
    "ViewCodeSequence",
    "StudyDescription",
    "SeriesDescription",
    "WindowCenter",
    "WindowWidth",
    "RescaleSlope",
    "RescaleIntercept",
    "PresentationLUTShape",
    "ImagerPixelSpacing",
    "InstanceNumber",
    "SeriesNumber",
    "ImageType",
    "PatientOrientation",
    "SpecificCharacterSet",
    "StudyID",
)
_UNDECODABLE_WHEN_MISSING = frozenset({"PixelData", "Rows", "Columns"})


def missing_attribute(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    names = rng.sample(MISSABLE, k=rng.choice((1, 1, 1, 2, 3)))
    data = b.elements.copy().drop(*(T[n] for n in names)).encode()
    expect = Expect.NOT_ANALYSED if _UNDECODABLE_WHEN_MISSING & set(names) else Expect.ANY
    return _input(Kind.MISSING_ATTRIBUTE, "missing:" + "+".join(sorted(names)), index, b, data, expect)


def _wrong_vr_cases() -> list[tuple[str, str, bytes]]:
    code_item = raw_element(0x00080100, "SH", b"T-15460 ") + raw_element(0x00080102, "SH", b"SRT ")
    return [
        ("AnatomicRegionSequence", "LO", b"WRIST"),
        ("AnatomicRegionSequence", "UN", b"\x01\x02\x03\x04"),
        ("ViewCodeSequence", "LO", b"PA"),
        ("ViewCodeSequence", "CS", b"R-10214"),
        ("PatientBirthDate", "PN", _cs(PHI_BIRTH_DATE)),
        ("PatientBirthDate", "SQ", b""),
        ("Modality", "OB", b"\x00\xffDX\x00"),
        ("Modality", "US", _us(7)),
        ("Rows", "LO", b"abc"),
        ("Rows", "UL", struct.pack("<L", 96)),
        ("Rows", "FD", struct.pack("<d", 96.0)),
        ("Columns", "SS", struct.pack("<h", -80)),
        ("SamplesPerPixel", "CS", b"ONE"),
        ("BitsStored", "DS", b"12.5"),
        ("BitsAllocated", "OB", b"\x10\x00"),
        ("PhotometricInterpretation", "US", _us(2)),
        ("PhotometricInterpretation", "SQ", b""),
        ("StudyDate", "SQ", _item(code_item, False)),
        ("BodyPartExamined", "SQ", _item(code_item, False)),
        ("BodyPartExamined", "OB", bytes(range(1, 33))),
        ("ImageLaterality", "OB", b"\xfe\xff"),
        ("ImagerPixelSpacing", "FD", struct.pack("<dd", 0.1, 0.1)),
        ("PixelSpacing", "OB", b"\x00" * 8),
        ("WindowCenter", "SQ", b""),
        ("WindowWidth", "US", _us(0)),
        ("RescaleSlope", "FL", struct.pack("<f", 1.0)),
        ("SpecificCharacterSet", "US", _us(192)),
        ("PatientName", "DA", b"20260101"),
        ("PatientID", "SQ", _item(code_item, False)),
        ("AccessionNumber", "SQ", _item(code_item, False)),
        ("StudyDescription", "US", _us(1, 2, 3)),
        ("SeriesDescription", "UN", b"\xc3\x28\xa0\xa1"),
        ("ViewPosition", "DS", b"1e999"),
        ("NumberOfFrames", "US", _us(1)),
        ("PresentationLUTShape", "SQ", b""),
        ("PixelData", "LO", b"not pixels"),
        ("PixelData", "SQ", _item(code_item, False)),
    ]


def wrong_vr(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    name, vr, value = rng.choice(_wrong_vr_cases())
    data = b.elements.copy().set(T[name], raw_element(T[name], vr, value)).encode()
    expect = Expect.NOT_ANALYSED if name == "PixelData" else Expect.ANY
    return _input(Kind.WRONG_VR, f"wrong_vr:{name}={vr}", index, b, data, expect)


def _wrong_value_cases() -> list[tuple[str, str, bytes]]:
    return [
        ("BitsStored", "US", _us(0)),
        ("BitsStored", "US", _us(40)),
        ("BitsStored", "US", _us(17)),
        ("BitsAllocated", "US", _us(12)),
        ("BitsAllocated", "US", _us(0)),
        ("BitsAllocated", "US", _us(64)),
        ("HighBit", "US", _us(200)),
        ("SamplesPerPixel", "US", _us(0)),
        ("SamplesPerPixel", "US", _us(3)),
        ("SamplesPerPixel", "US", _us(4)),
        ("SamplesPerPixel", "US", _us(1, 3)),
        ("PixelRepresentation", "US", _us(5)),
        ("PlanarConfiguration", "US", _us(7)),
        ("PhotometricInterpretation", "CS", b"PALETTE COLOR"),
        ("PhotometricInterpretation", "CS", b"YBR_FULL"),
        ("PhotometricInterpretation", "CS", b"FOO\\BAR"),
        ("PhotometricInterpretation", "CS", b""),
        ("NumberOfFrames", "IS", b"0"),
        ("NumberOfFrames", "IS", b"-1"),
        ("NumberOfFrames", "IS", b"junk"),
        ("NumberOfFrames", "IS", b"2"),
        ("WindowCenter", "DS", b"abc"),
        ("WindowCenter", "DS", b"1e400"),
        ("WindowCenter", "DS", b"nan"),
        ("WindowWidth", "DS", b"0"),
        ("WindowWidth", "DS", b"-5"),
        ("WindowWidth", "DS", b"1\\2\\3"),
        ("RescaleSlope", "DS", b"0"),
        ("RescaleSlope", "DS", b"inf"),
        ("RescaleSlope", "DS", b"abc"),
        ("RescaleIntercept", "DS", b"-1e308"),
        ("StudyDate", "DA", b"2026-99-99"),
        ("StudyDate", "DA", b"99999999"),
        ("StudyTime", "TM", b"256161"),
        ("ImagerPixelSpacing", "DS", b"0\\0"),
        ("ImagerPixelSpacing", "DS", b"a\\b"),
        ("PixelSpacing", "DS", b"-1\\1e300"),
        ("Rows", "US", _us(0)),
        ("Columns", "US", _us(0)),
        ("Rows", "US", _us(97)),
        ("Columns", "US", _us(1)),
        ("BodyPartExamined", "CS", b"../../etc/passwd"),
        ("BodyPartExamined", "CS", b"W" * 64),
        ("BodyPartExamined", "CS", b"SKULL"),
        ("ImageLaterality", "CS", b"Q"),
        ("Laterality", "CS", b"LR\\RL"),
        ("ViewPosition", "CS", b"\\\\\\"),
        ("PresentationLUTShape", "CS", b"WEIRD"),
        ("InstanceNumber", "IS", b"99999999999999"),
        ("SeriesNumber", "IS", b"x"),
        ("ImageType", "CS", b"\\"),
        ("AnatomicRegionSequence", "SQ", b""),
        ("ViewCodeSequence", "SQ", b""),
        ("PatientOrientation", "CS", b"Q\\Z\\Y"),
        ("SpecificCharacterSet", "CS", b"ISO_IR 999"),
        ("PixelData", "OW", b"\x00\x01" * 10),
    ]


def wrong_value(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    name, vr, value = rng.choice(_wrong_value_cases())
    if name in ("AnatomicRegionSequence", "ViewCodeSequence"):
        element = sequence(T[name], [b"", raw_element(0x00080100, "SH", b"\xff\xfe")], rng.random() < 0.5)
    else:
        element = raw_element(T[name], vr, value)
    data = b.elements.copy().set(T[name], element).encode()
    label = f"wrong_value:{name}={value[:24]!r}"
    return _input(Kind.WRONG_VALUE, label, index, b, data)


def wrong_length(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    elements = b.elements.copy()
    tag = rng.choice(sorted(elements.items))
    raw = bytearray(elements.items[tag])
    vr = bytes(raw[4:6]).decode("ascii", "replace")
    if vr in _LONG_VRS:
        (length,) = struct.unpack_from("<L", raw, 8)
        choices = [length + 1, max(0, length - 1), length + 2, length * 2 + 2, 0, 0x7FFFFFF0, _UNDEFINED - 1]
        if vr != "SQ":
            choices.append(_UNDEFINED)
        new = rng.choice(choices)
        struct.pack_into("<L", raw, 8, new & 0xFFFFFFFF)
    else:
        (length,) = struct.unpack_from("<H", raw, 6)
        new = rng.choice([length + 1, max(0, length - 1), length + 2, length + 64, 0, 0xFFFF, 0xFFFE])
        struct.pack_into("<H", raw, 6, new & 0xFFFF)
    elements.set(tag, bytes(raw))
    label = f"wrong_length:{_NAMES.get(tag, f'{tag:08X}')}:{length}->{new}"
    return _input(Kind.WRONG_LENGTH, label, index, b, elements.encode())


def truncation(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    data = b.elements.encode()
    header = len(data) - len(b.elements.items[T["PixelData"]])
    cut = rng.randrange(1, header) if rng.random() < 0.7 else rng.randrange(header, len(data) - 1)
    return _input(Kind.TRUNCATION, f"truncation:{cut}/{len(data)}", index, b, data[:cut])


def bitflip(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    data = bytearray(b.elements.encode())
    header = len(data) - len(b.elements.items[T["PixelData"]]) + 12
    flips = rng.choice((1, 1, 2, 4, 8, 16))
    for _ in range(flips):
        position = rng.randrange(header) if rng.random() < 0.9 else rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
    return _input(Kind.BITFLIP, f"bitflip:{flips}", index, b, bytes(data))


def _nested(tag: int, depth: int, undefined: bool, leaf: bytes) -> bytes:
    element = sequence(tag, [leaf], undefined)
    for _ in range(depth - 1):
        element = sequence(tag, [element], undefined)
    return element


def deep_sequence(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    elements = b.elements.copy()
    name = rng.choice(("AnatomicRegionSequence", "ViewCodeSequence", "ReferencedImageSequence"))
    undefined = rng.random() < 0.6
    leaf = raw_element(0x00080100, "SH", b"T-15460 ") + raw_element(0x00080102, "SH", b"SRT ")
    if rng.random() < 0.25:
        count = rng.choice((1_000, 10_000, 30_000))
        element = sequence(T[name], [leaf] * count, undefined)
        label = f"deep_sequence:{name}:wide={count}:{'undefined' if undefined else 'defined'}"
    else:
        depth = rng.choice((8, 64, 200, 500, 1_000, 3_000))
        element = _nested(T[name], depth, undefined, leaf)
        label = f"deep_sequence:{name}:depth={depth}:{'undefined' if undefined else 'defined'}"
    elements.set(T[name], element)
    return _input(Kind.DEEP_SEQUENCE, label, index, b, elements.encode())


def rows_columns_bomb(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    elements = b.elements.copy()
    variant = rng.choice(("rows_cols", "frames", "both", "bits"))
    if variant in ("rows_cols", "both", "bits"):
        side = rng.choice((65535, 40000, 20000))
        elements.set(T["Rows"], raw_element(T["Rows"], "US", _us(side)))
        elements.set(T["Columns"], raw_element(T["Columns"], "US", _us(side)))
    if variant in ("frames", "both"):
        frames = rng.choice((b"2147483647", b"100000", b"65535"))
        elements.set(T["NumberOfFrames"], raw_element(T["NumberOfFrames"], "IS", frames))
    if variant == "bits":
        elements.set(T["BitsAllocated"], raw_element(T["BitsAllocated"], "US", _us(32)))
        elements.set(T["BitsStored"], raw_element(T["BitsStored"], "US", _us(32)))
        elements.set(T["HighBit"], raw_element(T["HighBit"], "US", _us(31)))
    return _input(
        Kind.ROWS_COLUMNS_BOMB,
        f"rows_columns_bomb:{variant}",
        index,
        b,
        elements.encode(),
        Expect.NOT_ANALYSED,
    )


@cache
def _compressed_template(syntax: str) -> tuple[bytes, int, int, int, int]:
    """(encapsulated PixelData element, BitsAllocated, BitsStored, rows, cols) of a 64x64 image."""
    bits = 8 if syntax == JPEGBaseline8Bit else 12
    ds = encode(make_dataset(rows=64, cols=64, bits_stored=bits), syntax)  # type: ignore[arg-type]
    return Elements.of(ds).items[T["PixelData"]], int(ds.BitsAllocated), bits, 64, 64


def _patch_marker(data: bytearray, marker: bytes, offset: int, fmt: str, values: tuple[int, ...]) -> bool:
    at = bytes(data).find(marker)
    if at < 0:
        return False
    struct.pack_into(fmt, data, at + offset, *values)
    return True


def _first_fragment(pixel: bytearray) -> int:
    """Offset of the first fragment's bytes in an encapsulated Pixel Data element (PS3.5 A.4)."""
    (table_length,) = struct.unpack_from("<L", pixel, 12 + 4)  # the Basic Offset Table item
    return 12 + 8 + table_length + 8


def compressed_bomb(rng: random.Random, index: int) -> FuzzInput:
    syntax = rng.choice((JPEGBaseline8Bit, JPEGLSLossless, JPEG2000Lossless, RLELossless))
    pixel, bits_allocated, bits_stored, rows, cols = _compressed_template(str(syntax))
    b = replace(base(rng, index), transfer_syntax=str(syntax))
    elements = b.elements.copy()
    for name, value in (
        ("BitsAllocated", bits_allocated),
        ("BitsStored", bits_stored),
        ("HighBit", bits_stored - 1),
        ("Rows", rows),
        ("Columns", cols),
    ):
        elements.set(T[name], raw_element(T[name], "US", _us(value)))
    if bits_stored == 8:
        elements.set(T["WindowCenter"], raw_element(T["WindowCenter"], "DS", b"128"))
        elements.set(T["WindowWidth"], raw_element(T["WindowWidth"], "DS", b"256"))
    side = rng.choice((65000, 65000, 30000, 20000))
    lie = rng.choice(("stream", "stream", "dicom", "both"))
    patched = bytearray(pixel)
    if lie in ("stream", "both"):
        if syntax == JPEGBaseline8Bit:
            _patch_marker(patched, b"\xff\xc0", 5, ">HH", (side, side))
        elif syntax == JPEGLSLossless:
            _patch_marker(patched, b"\xff\xf7", 5, ">HH", (side, side))
        elif syntax == JPEG2000Lossless:
            # SIZ: marker, Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz (PS3.5 A.4.4, T.800 A.5.1)
            _patch_marker(patched, b"\xff\x51", 6, ">LLLLLL", (side, side, 0, 0, side, side))
        else:
            # RLE header (PS3.5 G.5): 15 segments whose offsets point far past the fragment.
            header = _first_fragment(patched)
            offsets = [64] + [0x7FFFFFF0 - i for i in range(14)]
            struct.pack_into("<16L", patched, header, 15, *offsets)
    if lie in ("dicom", "both"):
        elements.set(T["Rows"], raw_element(T["Rows"], "US", _us(side)))
        elements.set(T["Columns"], raw_element(T["Columns"], "US", _us(side)))
    elements.set(T["PixelData"], bytes(patched))
    label = f"compressed_bomb:{syntax.name}:{lie}:{side}"
    return _input(Kind.COMPRESSED_BOMB, label, index, b, elements.encode(), Expect.NOT_ANALYSED)


BAD_UIDS = (
    "1.2.3/4",
    "1.2.840/../../etc",
    "../../../tmp/x",
    "..",
    "1.2.3 4",
    " 1.2.3",
    "1.2.3\x004",
    "\x00",
    "1.2." + "3" * 70,
    "1." + ".".join(["2"] * 40),
    "1.2.\u00e9",
    "1.2.\u0661\u0662",
    "1.02.3",
    "1..2",
    "1.2.",
    ".1.2",
    "1.2.3\n",
    "1.2.3;rm -rf",
    "1.2.3\\1.2.4",
    "1.2.3*",
    "2.25.-1",
)


def bad_uid(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    which = rng.choice(("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    value = rng.choice(BAD_UIDS)
    data = b.elements.copy().set(T[which], raw_element(T[which], "UI", value.encode("utf-8"))).encode()
    sop_uid = value if which == "SOPInstanceUID" else None
    label = f"bad_uid:{which}={value[:20]!r}"
    return _input(Kind.BAD_UID, label, index, b, data, Expect.REFUSED, sop_uid=sop_uid)


_CHARSETS = (
    b"ISO_IR 192",
    b"ISO 2022 IR 87",
    b"GB18030",
    b"ISO_IR 999",
    b"\\ISO 2022 IR 149",
    b"ISO_IR 100",
    b"ISO 2022 IR 6\\ISO 2022 IR 87",
    b"",
    b"ISO_IR 13\\ISO 2022 IR 87",
    b"GBK",
    b"ISO_IR 166",
)
_ODD_BYTES = (
    b"\xff\xfe\xfd",
    b"\x1b$B\x3b\x33\x45\x44",
    b"\x1b(J\x1b$)C",
    b"\xc3\x28",
    b"\xe9\xe8",
    b"\xc0\xaf",
    b"\x00mid\x00",
    b"\xf0\x9f\x92\xa9",
    b"\x1b\x1b\x1b",
    b"\x8e\xa1",
)


def charset(rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    elements = b.elements.copy()
    chosen = rng.choice(_CHARSETS)
    elements.set(T["SpecificCharacterSet"], raw_element(T["SpecificCharacterSet"], "CS", chosen))
    odd = rng.choice(_ODD_BYTES)
    name = f"{PHI_NAME}^".encode() + odd + f"^P{index}".encode()
    elements.set(T["PatientName"], raw_element(T["PatientName"], "PN", name))
    target = rng.choice(
        (
            "StudyDescription",
            "SeriesDescription",
            "BodyPartExamined",
            "ProtocolName",
            "Manufacturer",
            "ReferringPhysicianName",
        )
    )
    vr = {"BodyPartExamined": "CS", "ReferringPhysicianName": "PN"}.get(target, "LO")
    elements.set(T[target], raw_element(T[target], vr, b"XR " + odd + b" WRIST"))
    label = f"charset:{chosen.decode('latin-1')!r}:{target}"
    return _input(Kind.CHARSET, label, index, b, elements.encode())


# -- hypothesis-driven edits -------------------------------------------------------------------
_HYPOTHESIS_VRS = (
    "AE",
    "AS",
    "CS",
    "DA",
    "DS",
    "DT",
    "FD",
    "FL",
    "IS",
    "LO",
    "LT",
    "OB",
    "OW",
    "PN",
    "SH",
    "SL",
    "SQ",
    "SS",
    "ST",
    "TM",
    "UI",
    "UL",
    "UN",
    "US",
    "UT",
)


@dataclass(frozen=True, slots=True)
class Edit:
    tag: int
    vr: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Mutation:
    edits: tuple[Edit, ...]
    removals: tuple[int, ...]
    cut: int | None  # keep this fraction (per mille) of the stream, None: whole


def mutations_strategy() -> SearchStrategy[Mutation]:
    """A hypothesis strategy of :class:`Mutation` (imported lazily: only the fuzz tests need it)."""
    from hypothesis import strategies as st

    tags = st.sampled_from(sorted(T.values()))
    values = st.one_of(
        st.binary(max_size=48),
        st.text(max_size=24).map(lambda s: s.encode("utf-8")),
        st.integers(min_value=0, max_value=0xFFFF).map(lambda n: _us(n)),
        st.sampled_from([b"", b"\x00", b"\\", b"0", b"-1", b"65535", b"nan", b"WRIST", b"1.2.3"]),
    )
    edit = st.builds(Edit, tags, st.sampled_from(_HYPOTHESIS_VRS), values)
    return st.builds(
        Mutation,
        st.lists(edit, min_size=1, max_size=4).map(tuple),
        st.lists(tags, max_size=3).map(tuple),
        st.one_of(st.none(), st.none(), st.none(), st.integers(min_value=1, max_value=999)),
    )


def hypothesis_mutations(count: int, seed: int) -> list[Mutation]:
    """``count`` mutations drawn by hypothesis, the same ones for the same seed."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    drawn: list[Mutation] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutations_strategy())
    def collect(mutation: Mutation) -> None:
        drawn.append(mutation)

    collect()
    return drawn


def apply_mutation(mutation: Mutation, rng: random.Random, index: int) -> FuzzInput:
    b = base(rng, index)
    elements = b.elements.copy().drop(*mutation.removals)
    for edit in mutation.edits:
        elements.set(edit.tag, raw_element(edit.tag, edit.vr, edit.value))
    data = elements.encode()
    if mutation.cut is not None:
        data = data[: max(1, len(data) * mutation.cut // 1000)]
    touched = sorted({_NAMES.get(e.tag, "?") + "=" + e.vr for e in mutation.edits})
    label = "hypothesis:" + ",".join(touched) + (f":cut{mutation.cut}" if mutation.cut else "")
    sop_uid: str | None = None
    if any(e.tag == T["SOPInstanceUID"] for e in mutation.edits):
        last = [e for e in mutation.edits if e.tag == T["SOPInstanceUID"]][-1]
        sop_uid = last.value.decode("latin-1")
    return _input(Kind.HYPOTHESIS, label, index, b, data, sop_uid=sop_uid)


def custom(
    kind: Kind,
    label: str,
    edit: Callable[[Elements], Elements],
    *,
    index: int,
    sop_uid: str | None = None,
    expect: Expect = Expect.ANY,
) -> FuzzInput:
    """One precisely built input (for a regression test): ``edit`` changes the base elements."""
    b = base(random.Random(f"custom:{label}:{index}"), index)
    data = edit(b.elements.copy()).encode()
    return _input(kind, label, index, b, data, expect, sop_uid=sop_uid)


GENERATORS: dict[Kind, Callable[[random.Random, int], FuzzInput]] = {
    Kind.MISSING_ATTRIBUTE: missing_attribute,
    Kind.WRONG_VR: wrong_vr,
    Kind.WRONG_VALUE: wrong_value,
    Kind.WRONG_LENGTH: wrong_length,
    Kind.TRUNCATION: truncation,
    Kind.BITFLIP: bitflip,
    Kind.DEEP_SEQUENCE: deep_sequence,
    Kind.ROWS_COLUMNS_BOMB: rows_columns_bomb,
    Kind.COMPRESSED_BOMB: compressed_bomb,
    Kind.BAD_UID: bad_uid,
    Kind.CHARSET: charset,
}


def generate(kind: Kind, count: int, seed: int, start: int = 0) -> list[FuzzInput]:
    """``count`` inputs of ``kind``; the same list for the same (kind, count, seed, start)."""
    rng = random.Random(f"{seed}:{kind}:{start}")
    if kind is Kind.HYPOTHESIS:
        mutations = hypothesis_mutations(count, seed + start)
        return [apply_mutation(m, rng, start + i) for i, m in enumerate(mutations)]
    return [GENERATORS[kind](rng, start + i) for i in range(count)]


def campaign(total: int, seed: int, batch: int) -> Iterator[list[FuzzInput]]:
    """Batches of ``batch`` inputs, every kind in turn, ``total`` in all (the long campaign)."""
    kinds = list(Kind)
    made = 0
    round_no = 0
    while made < total:
        per_kind = max(1, batch // len(kinds))
        inputs: list[FuzzInput] = []
        for kind in kinds:
            n = min(per_kind, total - made - len(inputs))
            if n <= 0:
                break
            inputs.extend(generate(kind, n, seed, start=round_no * 1_000_000 + len(inputs)))
        made += len(inputs)
        round_no += 1
        yield inputs
