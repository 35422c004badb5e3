"""What the result objects take from a received source image: a checked copy, never the dataset.

highdicom copies the Patient and General Study modules of the source into every SR, SC and GSPS
(``evidence[0].PatientID``, ``DA(ref.PatientBirthDate)``, ``PatientSexValues(ref.PatientSex)``)
and reads the pixel description and VOI attributes of a presentation state's image. Read from
the received dataset, a missing Type 2 attribute is an ``AttributeError``, a birth date sent
with VR PN a ``ValueError`` that quotes the date, a patient name without a caret a warning that
quotes the name. :func:`source_view` hands highdicom a new dataset instead, built through
:mod:`node.received`: every attribute highdicom reads, in its dictionary VR, with a value that
passes that VR's validation (PS3.5 6.2) and highdicom's own parsing. A Type 2 attribute that is
missing or invalid becomes present and empty (PS3.3 C.7.1.1, C.7.2.1); a Type 3 one is left out.

Type 1 attributes (the four UIDs) are copied only when valid; the C-STORE handler has already
refused instances without them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.valuerep import DA, TM, DSfloat, validate_value

from node import received
from node.uids import is_valid_uid

_RAISE: Final = 2  # pydicom.config.RAISE

# Patient (PS3.3 C.7.1.1) and General Study (C.7.2.1) Type 2 attributes highdicom copies, and
# Modality: Type 1 in General Series, but highdicom's image references read it whether or not
# the source has one (empty is what an absent or invalid one becomes).
TYPE_2: Final = (
    "Modality",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
TYPE_1: Final = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
# What the SR image library, the SC and the GSPS read when present.
TYPE_3: Final = (
    "Laterality",
    "ImageLaterality",
    "PatientOrientation",
    "FrameOfReferenceUID",
    "ImagerPixelSpacing",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PresentationLUTShape",
    "ModalityLUTSequence",
    "VOILUTSequence",
)
_VM2: Final = frozenset({"PatientOrientation", "ImagerPixelSpacing", "PixelSpacing"})
_SEXES: Final = frozenset({"M", "F", "O"})
_INTEGER_VRS: Final = frozenset({"US", "SS", "UL", "SL", "IS"})
_TEXT_VRS: Final = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"})


def _valid(vr: str, value: object) -> bool:
    try:
        validate_value(vr, value, _RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _parses(parse: Callable[[str], object], value: str) -> bool:
    try:
        parse(value)
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def _person_name(value: str) -> str:
    """A name of one component gets its trailing caret (PS3.5 6.2.1.2 allows it): the same
    name, and highdicom then does not warn with the name quoted."""
    groups = value.split("=")
    if groups[0] and "^" not in groups[0]:
        groups[0] += "^"
    return "=".join(groups)


def _text_value(ds: Dataset, keyword: str, vr: str) -> str | list[str] | None:
    found = received.text(ds, keyword)
    if found is None:
        return None
    parts = [part.strip() for part in found.split("\\")]
    if keyword == "PatientSex":
        return parts[0] if len(parts) == 1 and parts[0] in _SEXES else None
    if vr == "PN":
        parts = [_person_name(part) for part in parts]
    if vr == "DA" and not all(_parses(DA, part) for part in parts):
        return None
    if vr == "TM" and not all(_parses(TM, part) for part in parts):
        return None
    if not all(_valid(vr, part) for part in parts):
        return None
    return parts[0] if len(parts) == 1 else parts


def _number_value(ds: Dataset, keyword: str, vr: str) -> object | None:
    values = received.numbers(ds, keyword)
    if not values:
        return None
    if vr in _INTEGER_VRS:
        if not all(v.is_integer() for v in values):
            return None
        ints = [int(v) for v in values]
        limits = {"US": (0, 65535), "SS": (-32768, 32767), "UL": (0, 2**32 - 1)}
        low, high = limits.get(vr, (-(2**31), 2**31 - 1))
        if not all(low <= v <= high for v in ints):
            return None
        return ints[0] if len(ints) == 1 else ints
    if vr == "DS":
        numbers = [DSfloat(v, auto_format=True) for v in values]
        return numbers[0] if len(numbers) == 1 else numbers
    return values[0] if len(values) == 1 else list(values)


def _value(ds: Dataset, keyword: str) -> object | None:
    """The checked value of ``keyword`` in its dictionary VR and VM, or None."""
    value = _value_in_vr(ds, keyword)
    # A multi-valued element where the dictionary allows one value (a PatientName sent as SS
    # with two values, a Columns sent as UN) is not that attribute: highdicom rejects it.
    if isinstance(value, list) and dictionary_VM(keyword) == "1":
        return None
    return value


def _value_in_vr(ds: Dataset, keyword: str) -> object | None:
    vr = dictionary_VR(keyword)
    if vr == "SQ":
        found = received.items(ds, keyword)
        return Sequence(list(found)) if found else None
    if vr == "UI":
        uid = received.uid(ds, keyword)
        return uid if uid is not None and is_valid_uid(uid) else None
    if vr in _TEXT_VRS:
        value: object | None = _text_value(ds, keyword, vr)
    else:
        value = _number_value(ds, keyword, vr)
    if keyword in _VM2 and not (isinstance(value, list) and len(value) == 2):
        return None
    return value


def source_view(ds: Dataset) -> Dataset:
    """A new dataset of the source attributes result objects copy, each valid (module docstring)."""
    view = Dataset()
    for keyword in (*TYPE_1, *TYPE_2, *TYPE_3):
        value = _value(ds, keyword)
        if value is not None:
            view.add_new(keyword, dictionary_VR(keyword), value)
        elif keyword in TYPE_2:
            view.add_new(keyword, dictionary_VR(keyword), None)
    return view


def has_pixel_description(view: Dataset) -> bool:
    """Whether a view holds what an image reference needs (TID 1601, SC, GSPS): its size and
    sample layout."""
    return all(keyword in view for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated"))
