"""Body-part routing (inference/routing.py) on real-world header values.

Table-driven: BodyPartExamined defined terms and vendor variants, SNOMED codes, descriptions in
English, German, French, Spanish, Italian, Portuguese and Dutch with laterality and view words,
the substring traps, and the negative cases (chest, pelvis, spine, CT). Step (d) runs the
project's real region classifier (inference.models.region) on small random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, Region
from inference.routing import (
    CONFIDENCE_ANATOMIC_CODE,
    CONFIDENCE_BODY_PART,
    CONFIDENCE_BODY_PART_WORDS,
    CONFIDENCE_CODE_MEANING,
    CONFIDENCE_DESCRIPTION,
    CONFIDENCE_DESCRIPTION_SEVERAL,
    CONFIDENCE_LIMB_DEFAULT,
    LIMB_REGIONS,
    UPPER_LIMB_REGIONS,
    HeaderFacts,
    KeywordFileError,
    KeywordTable,
    NotAnalysed,
    TermKind,
    group_study,
    load_keywords,
    not_analysed_label,
    resolve_region,
    route,
    scan,
)
from inference.values import RegionSource, Routing

ALL = frozenset(AnatomicalGroup)
G = AnatomicalGroup
R = Region
S = RegionSource


@pytest.fixture(scope="module")
def keywords() -> KeywordTable:
    return load_keywords()


def _facts(**kwargs: Any) -> HeaderFacts:
    return HeaderFacts(**kwargs)


# ---------------------------------------------------------------------------------------------
# (a) BodyPartExamined: every term of the issue, mixed case and vendor spellings
# ---------------------------------------------------------------------------------------------

BODY_PARTS = [
    ("HAND", R.HAND),
    ("hand", R.HAND),
    ("WRIST", R.WRIST),
    ("Wrist", R.WRIST),
    ("FINGER", R.FINGER),
    ("THUMB", R.FINGER),
    ("ELBOW", R.ELBOW),
    ("FOREARM", R.FOREARM),
    ("HUMERUS", R.HUMERUS),
    ("SHOULDER", R.SHOULDER),
    ("CLAVICLE", R.SHOULDER),
    ("ACJOINT", R.SHOULDER),
    ("HIP", R.HIP),
    ("FEMUR", R.FEMUR),
    ("THIGH", R.FEMUR),
    ("KNEE", R.KNEE),
    ("PATELLA", R.KNEE),
    ("TIBIA", R.LEG),
    ("LOWER_LEG", R.LEG),
    ("ANKLE", R.ANKLE),
    ("FOOT", R.FOOT),
    ("TOE", R.FOOT),
    ("CALCANEUS", R.FOOT),
    ("UPPER ARM", R.HUMERUS),
]


@pytest.mark.parametrize(("body_part", "region"), BODY_PARTS)
def test_body_part_defined_terms(keywords: KeywordTable, body_part: str, region: Region) -> None:
    decision = resolve_region(_facts(body_part=body_part, modality="DX"), keywords)
    assert (decision.region, decision.source, decision.confidence) == (
        region,
        S.BODY_PART,
        CONFIDENCE_BODY_PART,
    )
    assert decision.specific


@pytest.mark.parametrize(
    ("body_part", "region", "laterality"),
    [
        ("L HAND", R.HAND, "L"),
        ("HAND RIGHT", R.HAND, "R"),
        ("HANDGELENK", R.WRIST, None),  # a localised modality writes German terms
        ("Poignet", R.WRIST, None),
        ("R-KNEE", R.KNEE, "R"),
        ("LOWER ARM", R.FOREARM, None),
    ],
)
def test_body_part_variants_through_keywords(
    keywords: KeywordTable, body_part: str, region: Region, laterality: str | None
) -> None:
    decision = resolve_region(_facts(body_part=body_part), keywords)
    assert (decision.region, decision.source) == (region, S.BODY_PART)
    assert decision.confidence in (CONFIDENCE_BODY_PART, CONFIDENCE_BODY_PART_WORDS)
    assert decision.laterality == laterality


# ---------------------------------------------------------------------------------------------
# (c) descriptions: languages, abbreviations, laterality and view words
# ---------------------------------------------------------------------------------------------

DESCRIPTIONS = [
    # text, region, laterality, view
    ("R WRIST 2V", R.WRIST, "R", "2V"),
    ("XR WRIST LEFT 3+ VIEWS", R.WRIST, "L", "3V"),
    ("Rt Hand PA/Obl", R.HAND, "R", "PA+OBL"),
    ("LT THUMB AP LAT", R.FINGER, "L", "AP+LAT"),
    ("SHOULDER TRAUMA SERIES LEFT", R.SHOULDER, "L", None),
    ("XR CLAVICLE RT", R.SHOULDER, "R", None),
    ("ELBOW 2 VIEWS BIL", R.ELBOW, "B", "2V"),
    ("forearm ap + lateral", R.FOREARM, None, "AP+LAT"),
    ("HUMERUS RIGHT", R.HUMERUS, "R", None),
    ("PELVIS AND LEFT HIP", R.HIP, "L", None),
    ("NOF LEFT", R.HIP, "L", None),
    ("FEMUR SHAFT RIGHT", R.FEMUR, "R", None),
    ("R KNEE 3 VIEWS + SKYLINE", R.KNEE, "R", "3V+AXIAL"),
    ("TIB/FIB LT", R.LEG, "L", None),
    ("Non-ossifying fibroma of distal tibia", R.ANKLE, None, None),
    ("ANKLE MORTISE R", R.ANKLE, "R", "MORTISE"),
    ("LEFT FOOT DP OBL", R.FOOT, "L", "DP+OBL"),
    ("GREAT TOE RIGHT", R.FOOT, "R", None),
    ("Both knees standing AP", R.KNEE, "B", "AP"),
    # German
    ("HANDGELENK", R.WRIST, None, None),
    ("Röntgen Handgelenk links in 2 Ebenen", R.WRIST, "L", "2V"),
    ("Handgelenks re. seitlich", R.WRIST, "R", "LAT"),
    ("Unterarm li.", R.FOREARM, "L", None),
    ("Oberarm rechts", R.HUMERUS, "R", None),
    ("Schulter re. a.p.", R.SHOULDER, "R", "AP"),
    ("Kniegelenk beidseits", R.KNEE, "B", None),
    ("OSG links 2 E.", R.ANKLE, "L", "2V"),
    ("Oberes Sprunggelenk rechts", R.ANKLE, "R", None),
    ("Fuß li. d.p. schräg", R.FOOT, "L", "DP+OBL"),
    ("Hüfte rechts axial", R.HIP, "R", "AXIAL"),
    ("Daumen links", R.FINGER, "L", None),
    # French
    ("POIGNET", R.WRIST, None, None),
    ("RADIO DU POIGNET GAUCHE", R.WRIST, "L", None),
    ("Radiographie de l'épaule droite face profil", R.SHOULDER, "R", "LAT"),
    ("AVANT-BRAS DROIT", R.FOREARM, "R", None),
    ("Cheville gauche", R.ANKLE, "L", None),
    ("Genou droit", R.KNEE, "R", None),
    ("Pied bilatéral", R.FOOT, "B", None),
    # Spanish
    ("MUÑECA", R.WRIST, None, None),
    ("RX MUÑECA DERECHA AP Y LATERAL", R.WRIST, "R", "AP+LAT"),
    ("Rx muneca izq", R.WRIST, "L", None),
    ("Antebrazo izquierdo", R.FOREARM, "L", None),
    ("DEDOS DEL PIE IZQUIERDO", R.FOOT, "L", None),
    ("Dedo mano derecha", R.FINGER, "R", None),
    ("Tobillo derecho", R.ANKLE, "R", None),
    ("Rodilla izquierda", R.KNEE, "L", None),
    # Italian
    ("POLSO", R.WRIST, None, None),
    ("RX POLSO DX", R.WRIST, "R", None),
    ("Gomito sinistro", R.ELBOW, "L", None),
    ("Caviglia SX", R.ANKLE, "L", None),
    ("Dell'anca destra", R.HIP, "R", None),
    ("Avambraccio destro", R.FOREARM, "R", None),
    # Portuguese
    ("PUNHO", R.WRIST, None, None),
    ("RX PUNHO ESQUERDO", R.WRIST, "L", None),
    ("Mão direita", R.HAND, "R", None),
    ("Tornozelo esquerdo", R.ANKLE, "L", None),
    ("Joelho direito", R.KNEE, "R", None),
    ("Cotovelo", R.ELBOW, None, None),
    # Dutch
    ("POLS", R.WRIST, None, None),
    ("X-POLS LINKS", R.WRIST, "L", None),
    ("Enkel rechts", R.ANKLE, "R", None),
    ("Schouder links", R.SHOULDER, "L", None),
    ("Onderarm rechter", R.FOREARM, "R", None),
    ("Knie beiderzijds", R.KNEE, "B", None),
]


@pytest.mark.parametrize(("text", "region", "laterality", "view"), DESCRIPTIONS)
def test_descriptions(
    keywords: KeywordTable, text: str, region: Region, laterality: str | None, view: str | None
) -> None:
    decision = resolve_region(_facts(study_description=text, modality="CR"), keywords)
    assert decision.region is region, decision.detail
    assert decision.source is S.DESCRIPTION
    assert decision.confidence in (CONFIDENCE_DESCRIPTION, CONFIDENCE_DESCRIPTION_SEVERAL)
    assert (decision.laterality, decision.view) == (laterality, view)


@pytest.mark.parametrize(
    "field", ["study_description", "series_description", "protocol_name", "requested_procedure_description"]
)
def test_every_description_field_is_read(keywords: KeywordTable, field: str) -> None:
    decision = resolve_region(_facts(**{field: "XR KNEE LEFT"}), keywords)
    assert (decision.region, decision.source, decision.laterality) == (R.KNEE, S.DESCRIPTION, "L")


def test_series_description_is_read_before_study_description(keywords: KeywordTable) -> None:
    """A study of hand and wrist views: each series says which one it is."""
    study = "HAND AND WRIST LEFT"
    hand = resolve_region(_facts(study_description=study, series_description="HAND PA"), keywords)
    wrist = resolve_region(_facts(study_description=study, series_description="WRIST LAT"), keywords)
    assert (hand.region, wrist.region) == (R.HAND, R.WRIST)
    both = resolve_region(_facts(study_description=study), keywords)
    assert (both.region, both.confidence) == (R.HAND, CONFIDENCE_DESCRIPTION_SEVERAL)


# ---------------------------------------------------------------------------------------------
# Substring traps: whole words, longest match
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "region"),
    [
        ("FOREARM", R.FOREARM),  # not ARM
        ("UNTERARM", R.FOREARM),  # not ARM
        ("HANDGELENK", R.WRIST),  # not HAND
        ("LOWER ARM", R.FOREARM),  # not ARM
        ("DEDO DEL PIE", R.FOOT),  # not DEDO (finger)
        ("FROG LEG LATERAL HIPS", R.HIP),  # FROG LEG is a view, not the leg
        ("FEMORAL NECK", R.HIP),  # not NECK (other)
        ("HUMERAL HEAD", R.SHOULDER),  # not HEAD (other)
        ("LATERAL MALLEOLUS", R.ANKLE),  # not the LAT view
    ],
)
def test_longest_whole_word_wins(keywords: KeywordTable, text: str, region: Region) -> None:
    assert resolve_region(_facts(study_description=text), keywords).region is region


@pytest.mark.parametrize(
    "text",
    ["FOOTBALL INJURY", "COLLEGE SPORTS", "ARMOUR", "HANDLING", "KNEEL", "LEGACY IMPORT", "POLSON", "POLSOX"],
)
def test_words_inside_words_do_not_match(keywords: KeywordTable, text: str) -> None:
    decision = resolve_region(_facts(study_description=text), keywords)
    assert decision.region is R.UNKNOWN and decision.source is S.NONE


def test_pols_and_polso_are_different_words(keywords: KeywordTable) -> None:
    assert [t.keyword for t in scan("POLSO", keywords)] == ["POLSO"]
    assert [t.keyword for t in scan("POLS", keywords)] == ["POLS"]


def test_elided_articles_are_not_laterality(keywords: KeywordTable) -> None:
    """L'EPAULE DROITE: the L of the article is not "left", so the side is R, not bilateral."""
    assert resolve_region(_facts(study_description="RADIO DE L'EPAULE DROITE"), keywords).laterality == "R"


def test_rule_out_is_not_right(keywords: KeywordTable) -> None:
    decision = resolve_region(_facts(study_description="ANKLE R/O FX"), keywords)
    assert (decision.region, decision.laterality) == (R.ANKLE, None)


def test_header_laterality_and_view_win_over_words(keywords: KeywordTable) -> None:
    facts = _facts(
        study_description="LEFT WRIST 2V", image_laterality="R", laterality="L", view_position="LL"
    )
    decision = resolve_region(facts, keywords)
    assert (decision.laterality, decision.view) == ("R", "LAT")
    assert resolve_region(_facts(study_description="WRIST", laterality="L"), keywords).laterality == "L"
    unpaired = resolve_region(_facts(study_description="WRIST RIGHT", image_laterality="U"), keywords)
    assert unpaired.laterality == "R"


# ---------------------------------------------------------------------------------------------
# (b) anatomic codes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "region"),
    [
        (("74670003", "SCT", "Wrist joint"), R.WRIST),
        (("T-15460", "SRT", "Wrist joint"), R.WRIST),
        (("T-15460", "SNM3", "Wrist joint"), R.WRIST),  # the old designator of the same codes
        (("72696002", "SCT", "Knee"), R.KNEE),
        (("30021000", "SCT", "Lower leg"), R.LEG),
        (("70258002", "SCT", "Ankle joint"), R.ANKLE),
        (("51299004", "SCT", "Clavicle"), R.SHOULDER),
        (("76505004", "SCT", "Thumb"), R.FINGER),
    ],
)
def test_anatomic_codes(keywords: KeywordTable, code: tuple[str, str, str], region: Region) -> None:
    decision = resolve_region(_facts(body_part=None, anatomic_codes=(code,)), keywords)
    assert (decision.region, decision.source, decision.confidence) == (
        region,
        S.ANATOMIC_CODE,
        CONFIDENCE_ANATOMIC_CODE,
    )


def test_unknown_code_is_read_through_its_meaning(keywords: KeywordTable) -> None:
    decision = resolve_region(_facts(anatomic_codes=(("99001", "99LOCAL", "Left elbow joint"),)), keywords)
    assert (decision.region, decision.confidence) == (R.ELBOW, CONFIDENCE_CODE_MEANING)


def test_body_part_is_read_before_codes_and_codes_before_descriptions(keywords: KeywordTable) -> None:
    code = (("74670003", "SCT", "Wrist joint"),)
    assert resolve_region(_facts(body_part="HAND", anatomic_codes=code), keywords).region is R.HAND
    assert resolve_region(_facts(anatomic_codes=code, study_description="ELBOW"), keywords).region is R.WRIST


def test_bundled_snomed_codes_exist_in_the_dicom_code_dictionary(keywords: KeywordTable) -> None:
    from pydicom.sr._concepts_dict import concepts

    known = {code for entry in concepts["SCT"].values() for code in entry}
    bundled = {value for (scheme, value) in keywords.codes if scheme == "SCT"}
    assert len(bundled) > 80
    assert bundled - known == set()


# ---------------------------------------------------------------------------------------------
# Generic terms narrow with descriptions
# ---------------------------------------------------------------------------------------------


def test_extremity_narrows_with_the_description_rg3(keywords: KeywordTable) -> None:
    """The RG3 header: CR, EXTREMITY, 'Non-ossifying fibroma of distal tibia', Laterality R, AP."""
    facts = _facts(
        body_part="EXTREMITY",
        study_description="Non-ossifying fibroma of distal tibia",
        laterality="R",
        view_position="AP",
        modality="CR",
    )
    decision = resolve_region(facts, keywords)
    assert decision.region in (R.LEG, R.ANKLE)
    assert (decision.source, decision.laterality, decision.view) == (S.DESCRIPTION, "R", "AP")
    assert decision.detail is not None and "EXTREMITY" in decision.detail


@pytest.mark.parametrize(
    ("body_part", "text", "region", "source", "specific"),
    [
        ("ARM", None, R.HUMERUS, S.BODY_PART, False),  # PS3.16: ARM is the upper arm
        ("ARM", "FOREARM 2V", R.FOREARM, S.DESCRIPTION, True),
        ("ARM", "WRIST PA", R.WRIST, S.DESCRIPTION, True),
        ("LEG", None, R.LEG, S.BODY_PART, False),  # PS3.16: LEG is the lower leg
        ("LEG", "R KNEE 2V", R.KNEE, S.DESCRIPTION, True),
        ("LEG", "ANKLE", R.ANKLE, S.DESCRIPTION, True),
        ("UPPER_EXTREMITY", "XR ELBOW", R.ELBOW, S.DESCRIPTION, True),
        ("LOWER EXTREMITY", "FOOT 3V", R.FOOT, S.DESCRIPTION, True),
        ("EXTREMITY", None, R.UNKNOWN, S.BODY_PART, False),
        ("EXTREMITY", "LEFT ARM", R.HUMERUS, S.DESCRIPTION, False),  # narrowed to a limb, still open
        ("UPPER EXTREMITY", "XR KNEE", R.UNKNOWN, S.BODY_PART, False),  # the knee is not in the upper limb
        ("EXTREMITY", "CHEST", R.UNKNOWN, S.BODY_PART, False),  # other is not a limb region
    ],
)
def test_generic_terms(
    keywords: KeywordTable,
    body_part: str,
    text: str | None,
    region: Region,
    source: RegionSource,
    specific: bool,
) -> None:
    decision = resolve_region(_facts(body_part=body_part, study_description=text), keywords)
    assert (decision.region, decision.source, decision.specific) == (region, source, specific), (
        decision.detail
    )
    if region is R.HUMERUS and not specific:
        assert decision.confidence == CONFIDENCE_LIMB_DEFAULT
        assert decision.candidates == UPPER_LIMB_REGIONS
    if region is R.UNKNOWN:
        assert decision.reason and decision.confidence == 0.0


def test_regions_of_several_groups_stay_open(keywords: KeywordTable) -> None:
    decision = resolve_region(_facts(study_description="KNEE AND ANKLE RIGHT"), keywords)
    assert (decision.region, decision.specific) == (R.UNKNOWN, False)
    assert decision.candidates == {R.KNEE, R.ANKLE}
    assert decision.reason is not None and "several groups" in decision.reason
    # A later field that names one of them settles it.
    settled = resolve_region(_facts(series_description="KNEE AND ANKLE", study_description="ANKLE"), keywords)
    assert settled.region is R.ANKLE


# ---------------------------------------------------------------------------------------------
# Negative cases: not a limb, not a radiograph
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "facts",
    [
        _facts(body_part="CHEST", modality="CR"),
        _facts(body_part="PELVIS", modality="DX"),
        _facts(body_part="LSPINE", modality="DX"),
        _facts(body_part="SKULL"),
        _facts(study_description="CHEST PA AND LATERAL", modality="DX"),
        _facts(study_description="Thorax p.a. stehend"),
        _facts(study_description="AP PELVIS"),
        _facts(study_description="L-SPINE 2V"),
        _facts(study_description="C SPINE TRAUMA"),
        _facts(study_description="HWS seitlich"),
        _facts(study_description="Rachis lombaire"),
        _facts(anatomic_codes=(("816094009", "SCT", "Chest"),)),
        _facts(body_part="KNEE", modality="CT"),
        _facts(body_part="WRIST", study_description="MR WRIST", modality="MR"),
        _facts(study_description="CT KNEE LEFT", modality="OT"),  # a secondary capture of a CT
        _facts(study_description="US SHOULDER"),
    ],
)
def test_not_analysed_as_other(keywords: KeywordTable, facts: HeaderFacts) -> None:
    decision = resolve_region(facts, keywords)
    assert decision.region is R.OTHER and decision.specific
    assert decision.reason
    routing = route(facts, table=DEFAULT_GROUP_TABLE, available=ALL, keywords=keywords)
    assert routing.group is None and routing.reason
    assert not_analysed_label(routing) is NotAnalysed.OTHER_REGION


def test_modality_words_in_a_radiograph_description_are_not_a_modality(keywords: KeywordTable) -> None:
    decision = resolve_region(_facts(study_description="KNEE (CT TO FOLLOW)", modality="DX"), keywords)
    assert decision.region is R.KNEE


def test_nothing_to_read_is_unknown(keywords: KeywordTable) -> None:
    facts = _facts(modality="CR")
    decision = resolve_region(facts, keywords)
    assert (decision.region, decision.source, decision.specific, decision.confidence) == (
        R.UNKNOWN,
        S.NONE,
        False,
        0.0,
    )
    routing = route(facts, table=DEFAULT_GROUP_TABLE, available=ALL, keywords=keywords)
    assert routing.group is None and routing.reason
    assert not_analysed_label(routing) is NotAnalysed.UNKNOWN_REGION


# ---------------------------------------------------------------------------------------------
# Groups: own group, nearest group with a model, none
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "available", "group", "out_of_group"),
    [
        ("WRIST", ALL, G.UPPER_DISTAL, False),
        ("HAND", ALL, G.UPPER_DISTAL, False),
        ("ELBOW", ALL, G.UPPER_MIDDLE, False),
        ("SHOULDER", ALL, G.UPPER_PROXIMAL, False),
        ("HIP", ALL, G.LOWER_PROXIMAL, False),
        ("KNEE", ALL, G.LOWER_MIDDLE, False),
        ("ANKLE", ALL, G.LOWER_DISTAL, False),
        ("WRIST", frozenset({G.UPPER_MIDDLE, G.LOWER_DISTAL}), G.UPPER_MIDDLE, True),
        ("SHOULDER", frozenset({G.UPPER_DISTAL}), G.UPPER_DISTAL, True),
        ("ANKLE", frozenset({G.LOWER_PROXIMAL, G.LOWER_MIDDLE}), G.LOWER_MIDDLE, True),
        ("WRIST", frozenset({G.LOWER_DISTAL}), None, False),  # never across the upper/lower limb
    ],
)
def test_groups_and_out_of_group(
    keywords: KeywordTable,
    text: str,
    available: frozenset[AnatomicalGroup],
    group: AnatomicalGroup | None,
    out_of_group: bool,
) -> None:
    routing = route(
        _facts(series_description=text), table=DEFAULT_GROUP_TABLE, available=available, keywords=keywords
    )
    assert (routing.group, routing.out_of_group) == (group, out_of_group)
    if group is None:
        assert routing.reason and "no installed model" in routing.reason
        assert not_analysed_label(routing) is NotAnalysed.NO_MODEL
    else:
        assert routing.reason is None and not_analysed_label(routing) is None


def test_generated_wrist_dx_routes_to_upper_distal(keywords: KeywordTable) -> None:
    """The header of tests/dicomgen.make_dataset() defaults, read by node.imaging."""
    from node.imaging import header_facts
    from tests.dicomgen import make_dataset

    routing = route(header_facts(make_dataset()), table=DEFAULT_GROUP_TABLE, available=ALL, keywords=keywords)
    assert routing == Routing(R.WRIST, S.BODY_PART, CONFIDENCE_BODY_PART, "R", "PA", G.UPPER_DISTAL, False)


def test_group_study_splits_a_study_by_group(keywords: KeywordTable) -> None:
    texts = {"a": "HAND PA", "b": "WRIST LAT", "c": "CHEST", "d": "ELBOW AP", "e": "SCAPHOID"}
    routed = [
        (k, route(_facts(series_description=t), table=DEFAULT_GROUP_TABLE, available=ALL, keywords=keywords))
        for k, t in texts.items()
    ]
    study = group_study(routed)
    assert study.groups == ((G.UPPER_MIDDLE, ("d",)), (G.UPPER_DISTAL, ("a", "b", "e")))
    assert study.not_analysed == ("c",)


# ---------------------------------------------------------------------------------------------
# (d) the image-based region classifier (the real one, small random weights)
# ---------------------------------------------------------------------------------------------


class _CountingClassifier:
    """Wraps the real classifier to count calls and record what it was given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.card = inner.card
        self.batches: list[np.ndarray] = []

    def predict(self, batch: np.ndarray) -> list[tuple[Region, float]]:
        self.batches.append(batch)
        result: list[tuple[Region, float]] = self.inner.predict(batch)
        return result


@pytest.fixture(scope="module")
def region_model() -> Any:
    """A factory of real region classifiers; one small random network per output width."""
    import torch

    from inference.modelcard import ModelCard, ModelKind
    from inference.models.backbones import GreyNet
    from inference.models.region import TorchRegionClassifier

    modules: dict[int, GreyNet] = {}

    def make(regions: tuple[Region, ...], temperature: float = 1.0) -> _CountingClassifier:
        if len(regions) not in modules:
            torch.manual_seed(0)
            modules[len(regions)] = GreyNet("mobilenet_v3_small", len(regions)).eval()
        card = ModelCard(
            name="region-test",
            version="0.0.1",
            device_uid="2.25.1",
            kind=ModelKind.REGION,
            architecture="mobilenet_v3_small",
            group=None,
            regions=regions,
            input_size=64,
            preprocessing={"stretch": True, "clahe": False},
            temperature=temperature,
        )
        return _CountingClassifier(TorchRegionClassifier(card, modules[len(regions)], torch.device("cpu")))

    return make


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0.0, 1.0, size=(150, 100)).astype(np.float32)


def test_region_model_decides_an_open_region(
    keywords: KeywordTable, image: np.ndarray, region_model: Any
) -> None:
    model = region_model((R.WRIST,))  # one output: probability 1
    routing = route(
        _facts(body_part="EXTREMITY"),
        table=DEFAULT_GROUP_TABLE,
        available=ALL,
        keywords=keywords,
        region_model=model,
        image=image,
    )
    assert (routing.region, routing.source, routing.group) == (R.WRIST, S.IMAGE, G.UPPER_DISTAL)
    assert routing.confidence == pytest.approx(1.0)
    assert [b.shape for b in model.batches] == [(1, 64, 64)]  # prepared with the card's size


def test_region_model_is_not_asked_when_the_header_is_specific(
    keywords: KeywordTable, image: np.ndarray, region_model: Any
) -> None:
    model = region_model((R.KNEE,))
    routing = route(
        _facts(body_part="WRIST"),
        table=DEFAULT_GROUP_TABLE,
        available=ALL,
        keywords=keywords,
        region_model=model,
        image=image,
    )
    assert (routing.region, routing.source) == (R.WRIST, S.BODY_PART)
    assert model.batches == []


def test_region_model_answer_outside_the_limb_is_ignored(
    keywords: KeywordTable, image: np.ndarray, region_model: Any
) -> None:
    model = region_model((R.KNEE,))
    routing = route(
        _facts(body_part="ARM"),
        table=DEFAULT_GROUP_TABLE,
        available=ALL,
        keywords=keywords,
        region_model=model,
        image=image,
    )
    assert (routing.region, routing.source, routing.confidence) == (
        R.HUMERUS,
        S.BODY_PART,
        CONFIDENCE_LIMB_DEFAULT,
    )
    assert len(model.batches) == 1


def test_region_model_below_the_minimum_confidence_is_ignored(
    keywords: KeywordTable, image: np.ndarray, region_model: Any
) -> None:
    model = region_model((R.WRIST, R.HAND), temperature=1e6)  # both near 0.5
    routing = route(
        _facts(),
        table=DEFAULT_GROUP_TABLE,
        available=ALL,
        keywords=keywords,
        region_model=model,
        image=image,
        min_image_confidence=0.6,
    )
    assert (routing.region, routing.source) == (R.UNKNOWN, S.NONE)
    # The reason is true: the classifier ran, and its answer and confidence are named.
    assert routing.guess in (R.WRIST, R.HAND) and routing.guess_confidence == pytest.approx(0.5, abs=0.01)
    assert routing.reason is not None
    assert "region-test 0.0.1 said" in routing.reason
    assert "below the minimum confidence 0.60" in routing.reason
    assert routing.reason.startswith("no body part, anatomic code or description keyword names a region")


def test_below_the_minimum_the_image_can_be_analysed_flagged(
    keywords: KeywordTable, image: np.ndarray, region_model: Any
) -> None:
    from inference.routing import BelowMinimum

    model = region_model((R.WRIST, R.HAND), temperature=1e6)
    routing = route(
        _facts(),
        table=DEFAULT_GROUP_TABLE,
        available=ALL,
        keywords=keywords,
        region_model=model,
        image=image,
        min_image_confidence=0.6,
        below_minimum=BelowMinimum.ANALYSE_FLAGGED,
    )
    assert routing.region in (R.WRIST, R.HAND) and routing.source is S.IMAGE
    assert routing.group is G.UPPER_DISTAL and routing.low_confidence
    assert routing.confidence == pytest.approx(0.5, abs=0.01)


def test_without_a_region_model_an_open_region_is_unknown(keywords: KeywordTable, image: np.ndarray) -> None:
    routing = route(
        _facts(body_part="EXTREMITY"),
        table=DEFAULT_GROUP_TABLE,
        available=ALL,
        keywords=keywords,
        image=image,
    )
    assert (routing.region, routing.group) == (R.UNKNOWN, None)
    assert routing.reason and "EXTREMITY" in routing.reason


# ---------------------------------------------------------------------------------------------
# Keyword files
# ---------------------------------------------------------------------------------------------


def test_bundled_tables(keywords: KeywordTable) -> None:
    regions = {Region(t.value) for t in keywords.phrases.values() if t.kind is TermKind.REGION}
    assert regions == LIMB_REGIONS | {R.OTHER}
    assert {"CR", "DX"} <= keywords.radiograph_modalities
    assert "CT" not in keywords.radiograph_modalities | keywords.capture_modalities


def test_site_file_extends_the_tables(tmp_path: Path) -> None:
    extra = tmp_path / "site.toml"
    extra.write_text(
        '[regions.wrist]\nkeywords = ["RANNE"]\nbody_parts = ["PULSO"]\n'
        '[regions.knee]\nkeywords = ["POLS"]\n'  # re-maps a bundled term: the site's meaning wins
        '[laterality]\nL = ["VASEN"]\n',
        encoding="utf-8",
    )
    table = load_keywords(extra)
    assert table.files[-1] == str(extra)
    decision = resolve_region(_facts(study_description="Ranne vasen"), table)
    assert (decision.region, decision.laterality) == (R.WRIST, "L")
    assert resolve_region(_facts(body_part="pulso"), table).region is R.WRIST
    assert resolve_region(_facts(study_description="POLS"), table).region is R.KNEE
    assert resolve_region(_facts(study_description="Ranne"), load_keywords()).region is R.UNKNOWN


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[regions.wristt]\nkeywords = ['X']\n", "regions.wristt"),
        ("[regions.unknown]\nkeywords = ['X']\n", "regions.unknown"),
        ("[regions.wrist]\nkeyword = ['X']\n", "regions.wrist.keyword"),
        ("[regions.wrist]\nkeywords = 'X'\n", "regions.wrist.keywords"),
        ("[regions.wrist]\nkeywords = ['HA*ND']\n", "regions.wrist.keywords"),
        ("[regions.wrist]\nkeywords = ['HA*']\n", "regions.wrist.keywords"),
        ("[regions.wrist]\ncodes = ['74670003']\n", "regions.wrist.codes"),
        (
            "[regions.wrist]\nkeywords = ['RANNE']\n[regions.hand]\nkeywords = ['RANNE']\n",
            "regions.hand.keywords",
        ),
        ("[limbs.upper]\nkeywords = ['KASI']\ndefaults = { KASI = 'knee' }\n", "limbs.upper.defaults.KASI"),
        ("[limbs.upper]\ndefaults = { KASI = 'hand' }\n", "limbs.upper.defaults.KASI"),
        ("[limbs.middle]\nkeywords = ['X']\n", "limbs.middle"),
        ("[laterality]\nX = ['Y']\n", "laterality.X"),
        ("[views]\nap = ['Y']\n", "views.ap"),
        ("[colours]\nred = 1\n", "colours"),
        ("[regions.wrist\n", "file"),
    ],
)
def test_bad_site_file_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    extra = tmp_path / "bad.toml"
    extra.write_text(text, encoding="utf-8")
    with pytest.raises(KeywordFileError) as caught:
        load_keywords(extra)
    assert (caught.value.path, caught.value.key) == (str(extra), key)
    assert str(extra) in str(caught.value) and key in str(caught.value)


def test_missing_site_file(tmp_path: Path) -> None:
    with pytest.raises(KeywordFileError, match="cannot read"):
        load_keywords(tmp_path / "absent.toml")
