"""The coded concepts fracnode writes into its results, in one place.

Every code here is taken from pydicom's copy of the DICOM content mapping resource (PS3.16) so a
test can check it against ``pydicom.sr.codedict.codes`` - except the finding itself, SNOMED CT
125605004 "Fracture of bone", which DICOM has no context group for; it is the disorder concept of
SNOMED CT's clinical finding hierarchy.

Choices a reader might question:

- The study-level qualitative evaluation is the question/answer pair "Fracture of bone" =
  Present / Equivocal / Absent (TID 1501 qualitative evaluation). Its concept name is not DCM
  121071 "Finding": that is the concept name of the finding type row, and highdicom merges the two
  on read-back. "Present" and "Absent" are CID 240 (Present-Absent); "possible" is SNOMED CT
  42425007 "Equivocal" (CID 3120): the probability is past the high-sensitivity point but not the
  high-specificity one, neither a positive nor a negative call. A group that was not analysed is
  "Undetermined" (CID 240).
- The calibrated probability is DCM 122157 "Probability" with the UCUM unit "1" (a ratio).
- Anatomy: the SNOMED CT region concepts of CID 4009 "DX Anatomy Imaged" / CID 4031; laterality
  from CID 244.

Errors: none (lookups of the closed enums are total; :func:`laterality_code` returns None for an
unknown value).
"""

from __future__ import annotations

from types import MappingProxyType

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.regions import Region
from inference.values import Outcome

FRACTURE_OF_BONE = Code("125605004", "SCT", "Fracture of bone")
PROBABILITY = Code("122157", "DCM", "Probability")
UNIT_RATIO = Code("1", "UCUM", "no units")
COMMENT = Code("121106", "DCM", "Comment")
PLAIN_RADIOGRAPHY = Code("168537006", "SCT", "Plain radiography")

PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
EQUIVOCAL = Code("42425007", "SCT", "Equivocal")
UNDETERMINED = Code("373068000", "SCT", "Undetermined")

OUTCOME_CODES: MappingProxyType[Outcome, Code] = MappingProxyType(
    {
        Outcome.POSITIVE: PRESENT,
        Outcome.POSSIBLE: EQUIVOCAL,
        Outcome.NEGATIVE: ABSENT,
        Outcome.NOT_ANALYSED: UNDETERMINED,
    }
)

REGION_CODES: MappingProxyType[Region, Code] = MappingProxyType(
    {
        Region.SHOULDER: Code("16982005", "SCT", "Shoulder"),
        Region.HUMERUS: Code("85050009", "SCT", "Humerus"),
        Region.ELBOW: Code("16953009", "SCT", "Elbow joint"),
        Region.FOREARM: Code("14975008", "SCT", "Forearm"),
        Region.WRIST: Code("74670003", "SCT", "Wrist joint"),
        Region.HAND: Code("85562004", "SCT", "Hand"),
        Region.FINGER: Code("7569003", "SCT", "Finger"),
        Region.HIP: Code("29836001", "SCT", "Hip"),
        Region.FEMUR: Code("71341001", "SCT", "Femur"),
        Region.KNEE: Code("72696002", "SCT", "Knee"),
        Region.LEG: Code("30021000", "SCT", "Lower leg"),
        Region.ANKLE: Code("70258002", "SCT", "Ankle joint"),
        Region.FOOT: Code("56459004", "SCT", "Foot"),
    }
)

LATERALITY_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {"L": codes.SCT.Left, "R": codes.SCT.Right, "B": codes.SCT.Bilateral}
)


def region_code(region: Region) -> Code | None:
    """The SNOMED CT concept of ``region``; None for OTHER and UNKNOWN, which have none."""
    return REGION_CODES.get(region)


def laterality_code(laterality: str | None) -> Code | None:
    """CID 244 concept for "L", "R" or "B"; None for anything else (unpaired or unknown)."""
    if laterality is None:
        return None
    return LATERALITY_CODES.get(laterality.strip().upper())
