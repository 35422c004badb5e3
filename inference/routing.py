"""Body-part routing: which region an image shows, and which group model reads it.

Radiograph headers are unreliable (blank or generic BodyPartExamined, free text in many
languages), so the region is resolved from several sources in a fixed order, each decision
recording its source and a confidence:

(a) BodyPartExamined (0018,0015): a defined term or vendor variant (0.95); a value that is not
    an exact term but holds keywords, e.g. ``L HAND`` or ``HANDGELENK`` (0.85).
(b) AnatomicRegionSequence (0008,2218): SNOMED CT / SRT codes of PS3.16 CID 4031 (0.90); a code
    not in the table is read through its CodeMeaning's keywords (0.80).
(c) Keywords in SeriesDescription, ProtocolName, StudyDescription and
    RequestedProcedureDescription, tried in that order, most image-specific first (0.80; 0.70
    when a text names several regions of one group, e.g. ``HAND AND WRIST``).
(d) An image-based region classifier, only when (a)-(c) give nothing specific (its probability).

A generic term (EXTREMITY, UPPER EXTREMITY, ARM, LEG...) names a limb, not a region: it limits
what (c) and (d) may choose and narrows with them; ARM and LEG have a usual meaning (upper arm,
lower leg) used at 0.60 when nothing narrows them. Without a region classifier, an image whose
region stays open is ``unknown``. Non-radiograph modalities and non-limb regions (chest, skull,
spine, pelvis...) are ``other``. Neither is analysed, and the routing says why.

Laterality and view words are recognised and recorded separately; they never decide a region.
The keyword tables live in ``inference/data/keywords.toml``; a site extends them with its own
file (see :func:`load_keywords`). Everything here is pure: no DICOM, no I/O except reading the
keyword files.

Errors:
    KeywordFileError (ValueError): a keyword file that cannot be read or holds an invalid entry;
        ``path`` and ``key`` name the file and the TOML key.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, NoReturn, TypeVar

import numpy as np
from numpy.typing import NDArray

from inference.pixels import PreprocessConfig, prepare
from inference.protocols import RegionClassifier
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, GroupTable, Region
from inference.values import RegionSource, Routing

# Confidence of each kind of decision; see the module docstring.
CONFIDENCE_BODY_PART = 0.95
CONFIDENCE_BODY_PART_WORDS = 0.85
CONFIDENCE_ANATOMIC_CODE = 0.90
CONFIDENCE_CODE_MEANING = 0.80
CONFIDENCE_DESCRIPTION = 0.80
CONFIDENCE_DESCRIPTION_SEVERAL = 0.70
CONFIDENCE_LIMB_DEFAULT = 0.60
CONFIDENCE_MODALITY = 1.00  # a CT is a CT
DEFAULT_MIN_IMAGE_CONFIDENCE = 0.5

BUNDLED_KEYWORDS = "keywords.toml"

UPPER_LIMB_REGIONS: frozenset[Region] = frozenset(
    {Region.SHOULDER, Region.HUMERUS, Region.ELBOW, Region.FOREARM, Region.WRIST, Region.HAND, Region.FINGER}
)
LOWER_LIMB_REGIONS: frozenset[Region] = frozenset(
    {Region.HIP, Region.FEMUR, Region.KNEE, Region.LEG, Region.ANKLE, Region.FOOT}
)
LIMB_REGIONS: frozenset[Region] = UPPER_LIMB_REGIONS | LOWER_LIMB_REGIONS
# What the image classifier may answer when nothing is known: any limb region, or other.
ANY_REGION: frozenset[Region] = LIMB_REGIONS | {Region.OTHER}


class KeywordFileError(ValueError):
    """A keyword table file is unreadable or holds an invalid entry at ``key``."""

    def __init__(self, path: str, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}")
        self.path = path
        self.key = key


class Limb(StrEnum):
    """What a generic term names: a limb, not a region."""

    ANY = "any"
    UPPER = "upper"
    LOWER = "lower"


LIMB_REGIONS_OF: Mapping[Limb, frozenset[Region]] = MappingProxyType(
    {Limb.ANY: LIMB_REGIONS, Limb.UPPER: UPPER_LIMB_REGIONS, Limb.LOWER: LOWER_LIMB_REGIONS}
)


class TermKind(StrEnum):
    REGION = "region"  # value: a Region
    LIMB = "limb"  # value: a Limb; default: the region the term usually means, if any
    LATERALITY = "laterality"  # value: "L", "R" or "B"
    VIEW = "view"  # value: the view name, e.g. "AP", "LAT", "2V"
    NON_RADIOGRAPH = "non_radiograph"  # value: the modality word
    IGNORE = "ignore"  # shields a phrase from shorter matches (R/O is not "right")


@dataclass(frozen=True, slots=True)
class Term:
    """What one keyword means. ``keyword`` is the normalised keyword, safe to show and log."""

    kind: TermKind
    value: str
    keyword: str
    default: Region | None = None

    @property
    def region(self) -> Region:
        return Region(self.value)

    @property
    def limb(self) -> Limb:
        return Limb(self.value)


@dataclass(frozen=True, slots=True)
class KeywordTable:
    """The compiled keyword tables. Build with :func:`load_keywords`."""

    body_parts: Mapping[str, Term]  # squashed BodyPartExamined term -> REGION or LIMB term
    codes: Mapping[tuple[str, str], Term]  # (scheme, code value) -> REGION or LIMB term
    phrases: Mapping[tuple[str, ...], Term]  # exact word sequences
    # Wildcard keywords, by their fixed leading words: (prefix of the last word, term), longest first.
    wildcards: Mapping[tuple[str, ...], tuple[tuple[str, Term], ...]]
    longest: int  # the most words in a keyword
    radiograph_modalities: frozenset[str]
    capture_modalities: frozenset[str]
    files: tuple[str, ...]  # where the tables came from, for messages


@dataclass(frozen=True, slots=True)
class HeaderFacts:
    """The header values routing reads, as plain strings (None when absent or empty).

    ``anatomic_codes`` holds the (code value, coding scheme designator, code meaning) of each
    AnatomicRegionSequence item.
    """

    body_part: str | None = None
    anatomic_codes: tuple[tuple[str, str, str], ...] = ()
    study_description: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    requested_procedure_description: str | None = None
    image_laterality: str | None = None
    laterality: str | None = None
    view_position: str | None = None
    modality: str | None = None


@dataclass(frozen=True, slots=True)
class RegionDecision:
    """The region (a)-(c) found, before the image classifier and the group table.

    ``specific`` is False when the region is still open (unknown, or a limb term's usual
    meaning): the image classifier may then choose among ``candidates``. ``detail`` says how the
    decision was reached using table keywords only, never header text, so it is safe to log.
    ``reason`` says why an ``other``/``unknown`` image is not analysed.
    """

    region: Region
    source: RegionSource
    confidence: float
    laterality: str | None
    view: str | None
    specific: bool
    candidates: frozenset[Region] = frozenset()
    detail: str | None = None
    reason: str | None = None
    guess: Region | None = None  # the image classifier's answer, when it was asked
    guess_confidence: float | None = None
    low_confidence: bool = False  # analysed on a guess below the minimum (by setting)


class BelowMinimum(StrEnum):
    """What to do when the image classifier's answer is below the minimum confidence."""

    NOT_ANALYSED = "not_analysed"  # the image is not analysed; its reason names the answer
    ANALYSE_FLAGGED = "analyse_flagged"  # analysed as the answer, flagged low-confidence


class NotAnalysed(StrEnum):
    """Bounded label for why an image is not analysed (for metrics)."""

    OTHER_REGION = "other_region"
    UNKNOWN_REGION = "unknown_region"
    NO_MODEL = "no_model"


# ---------------------------------------------------------------------------------------------
# Text normalisation
# ---------------------------------------------------------------------------------------------

_ELIDED = re.compile(r"\b[A-Z]{1,4}['’`](?=[A-Z])")  # L'EPAULE, DELL'ANCA, D'ANCA
_NOT_WORD = re.compile(r"[^A-Z0-9*]+")
_NOT_ALNUM = re.compile(r"[^A-Z0-9]+")
_SCHEME_ALIASES = {"SNM3": "SRT", "99SDM": "SRT", "SNOMED": "SCT", "SNOMEDCT": "SCT", "SNOMED-CT": "SCT"}


def _fold(text: str) -> str:
    """Upper case without accents: MUÑECA -> MUNECA, Fuß -> FUSS, Épaule -> EPAULE."""
    decomposed = unicodedata.normalize("NFKD", text.upper())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def words(text: str, *, keep_star: bool = False) -> tuple[str, ...]:
    """The words of a header text as keywords are matched against them."""
    folded = _ELIDED.sub(" ", _fold(text))
    if not keep_star:
        folded = folded.replace("*", " ")
    return tuple(w for w in _NOT_WORD.split(folded) if w)


def squash(text: str) -> str:
    """A body-part term without spaces or punctuation: 'Upper_Extremity' -> 'UPPEREXTREMITY'."""
    return _NOT_ALNUM.sub("", _fold(text))


def _scheme(designator: str) -> str:
    folded = designator.strip().upper()
    return _SCHEME_ALIASES.get(folded, folded)


# ---------------------------------------------------------------------------------------------
# Loading the keyword tables
# ---------------------------------------------------------------------------------------------


_SECTIONS = ("modalities", "non_radiograph", "ignore", "regions", "limbs", "laterality", "views")
_ENTRY_KEYS = ("body_parts", "codes", "keywords")


class _Builder:
    """Collects the terms of the keyword files, checking each entry as it comes.

    A term listed twice with different meanings is an error within one file; the site file
    (``override``) may give a bundled term a new meaning.
    """

    def __init__(self) -> None:
        self.body_parts: dict[str, tuple[Term, str]] = {}
        self.codes: dict[tuple[str, str], tuple[Term, str]] = {}
        self.phrases: dict[tuple[str, ...], tuple[Term, str]] = {}
        self.radiograph: set[str] = set()
        self.capture: set[str] = set()
        self._path = ""
        self._override = False
        self._here: dict[tuple[str, object], str] = {}

    def add_file(self, data: dict[str, object], path: str, *, override: bool) -> None:
        self._path, self._override, self._here = path, override, {}
        self._check_keys(data, _SECTIONS, "")
        modalities = self._table(data.get("modalities", {}), "modalities")
        self._check_keys(modalities, ("radiograph", "capture"), "modalities")
        for name, target in (("radiograph", self.radiograph), ("capture", self.capture)):
            if name in modalities:
                target.update(
                    m.strip().upper() for m in self._strings(modalities[name], f"modalities.{name}")
                )
        for section, kind in (("non_radiograph", TermKind.NON_RADIOGRAPH), ("ignore", TermKind.IGNORE)):
            table = self._table(data.get(section, {}), section)
            self._check_keys(table, ("keywords",), section)
            if "keywords" in table:
                self._keywords(table["keywords"], f"{section}.keywords", kind, None)
        for name, entry in self._table(data.get("regions", {}), "regions").items():
            self._region(name, entry)
        for name, entry in self._table(data.get("limbs", {}), "limbs").items():
            self._limb(name, entry)
        laterality = self._table(data.get("laterality", {}), "laterality")
        self._check_keys(laterality, ("L", "R", "B"), "laterality")
        for side, values in laterality.items():
            self._keywords(values, f"laterality.{side}", TermKind.LATERALITY, side)
        for view, values in self._table(data.get("views", {}), "views").items():
            if not re.fullmatch(r"[A-Z0-9]{1,16}", view):
                self._fail(f"views.{view}", "a view name is 1-16 upper-case letters or digits")
            self._keywords(values, f"views.{view}", TermKind.VIEW, view)

    def _region(self, name: str, entry: object) -> None:
        key = f"regions.{name}"
        try:
            region = Region(name)
        except ValueError as exc:
            raise KeywordFileError(self._path, key, "not a region of inference.regions.Region") from exc
        if region is Region.UNKNOWN:
            self._fail(key, "unknown is what routing says when nothing matches; it takes no terms")
        table = self._table(entry, key)
        self._check_keys(table, _ENTRY_KEYS, key)
        self._entry(table, key, lambda kw: Term(TermKind.REGION, region.value, kw))

    def _limb(self, name: str, entry: object) -> None:
        key = f"limbs.{name}"
        try:
            limb = Limb(name)
        except ValueError as exc:
            raise KeywordFileError(self._path, key, f"not a limb; expected one of {', '.join(Limb)}") from exc
        table = self._table(entry, key)
        self._check_keys(table, (*_ENTRY_KEYS, "defaults"), key)
        defaults: dict[str, Region] = {}
        for term, value in self._table(table.get("defaults", {}), f"{key}.defaults").items():
            where = f"{key}.defaults.{term}"
            try:
                region = Region(str(value))
            except ValueError as exc:
                raise KeywordFileError(self._path, where, "not a region") from exc
            if region not in LIMB_REGIONS_OF[limb]:
                self._fail(where, f"{region} is not a region of the {limb} limb")
            defaults[squash(term)] = region
        listed: set[str] = set()

        def make(kw: str) -> Term:
            listed.add(squash(kw))
            return Term(TermKind.LIMB, limb.value, kw, defaults.get(squash(kw)))

        self._entry(table, key, make)
        for term in defaults.keys() - listed:
            self._fail(
                f"{key}.defaults.{term}", "a default needs its term in body_parts or keywords of the limb"
            )

    def _entry(self, table: dict[str, object], key: str, make: Callable[[str], Term]) -> None:
        for value in self._strings(table.get("body_parts", []), f"{key}.body_parts"):
            squashed = squash(value)
            if not squashed:
                self._fail(f"{key}.body_parts", f"{value!r} has no letters or digits")
            shown = " ".join(words(value))
            self._put(self.body_parts, "body_parts", squashed, make(shown), f"{key}.body_parts")
        for value in self._strings(table.get("codes", []), f"{key}.codes"):
            scheme, sep, code = value.partition(":")
            if not sep or not scheme.strip() or not code.strip():
                self._fail(f"{key}.codes", f"{value!r}: write a code SCHEME:VALUE, e.g. SCT:74670003")
            index = (_scheme(scheme), code.strip())
            self._put(self.codes, "codes", index, make(f"{index[0]}:{index[1]}"), f"{key}.codes")
        for value in self._strings(table.get("keywords", []), f"{key}.keywords"):
            tokens = self._phrase(value, f"{key}.keywords")
            self._put(self.phrases, "phrases", tokens, make(" ".join(tokens)), f"{key}.keywords")

    def _keywords(self, values: object, key: str, kind: TermKind, meaning: str | None) -> None:
        """Keywords of a kind without a region; ``meaning`` None: the keyword is its own value."""
        for value in self._strings(values, key):
            tokens = self._phrase(value, key)
            keyword = " ".join(tokens)
            self._put(self.phrases, "phrases", tokens, Term(kind, meaning or keyword, keyword), key)

    def _phrase(self, value: str, key: str) -> tuple[str, ...]:
        tokens = words(value, keep_star=True)
        stars_inside = any("*" in t for t in tokens[:-1]) or (tokens and "*" in tokens[-1].rstrip("*"))
        if not tokens or stars_inside or (tokens[-1].endswith("**")):
            self._fail(key, f"{value!r}: a keyword is whole words, with one * only at its end")
        if tokens[-1].endswith("*") and len(tokens[-1]) < 5:
            self._fail(key, f"{value!r}: a wildcard needs at least 4 letters before the *")
        return tokens

    def _put(
        self, store: dict[Any, tuple[Term, str]], name: str, index: object, term: Term, key: str
    ) -> None:
        owner = self._here.get((name, index))
        if owner is not None and owner != key:
            self._fail(key, f"{term.keyword!r} is already listed under {owner}")
        self._here[(name, index)] = key
        existing = store.get(index)
        if existing is not None and not self._override and existing[1] != key:
            self._fail(key, f"{term.keyword!r} is already listed under {existing[1]}")
        store[index] = (term, key)

    def _strings(self, data: object, key: str) -> list[str]:
        if not isinstance(data, list) or not all(isinstance(v, str) and v.strip() for v in data):
            self._fail(key, "must be a list of non-empty strings")
        return [str(v) for v in data]

    def _table(self, data: object, key: str) -> dict[str, object]:
        if not isinstance(data, dict):
            self._fail(key, "must be a table")
        return data

    def _check_keys(self, data: dict[str, object], allowed: Iterable[str], prefix: str) -> None:
        allowed = tuple(allowed)
        for key in data:
            if key not in allowed:
                self._fail(
                    f"{prefix}.{key}" if prefix else key, f"unknown key; expected one of {', '.join(allowed)}"
                )

    def _fail(self, key: str, message: str) -> NoReturn:
        raise KeywordFileError(self._path, key, message)


def load_keywords(extra: Path | None = None) -> KeywordTable:
    """The bundled keyword tables, extended by the site file ``extra`` when given.

    Entries of ``extra`` are added to the bundled ones; a term the bundled tables already hold
    takes the meaning ``extra`` gives it. Raises :class:`KeywordFileError` naming the file and the
    key of the first invalid entry.
    """
    name = f"inference/data/{BUNDLED_KEYWORDS}"
    bundled = resources.files("inference") / "data" / BUNDLED_KEYWORDS
    builder = _Builder()
    builder.add_file(_parse(bundled.read_text(encoding="utf-8"), name), name, override=False)
    files = [name]
    if extra is not None:
        try:
            text = Path(extra).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeywordFileError(str(extra), "file", f"cannot read: {exc}") from exc
        builder.add_file(_parse(text, str(extra)), str(extra), override=True)
        files.append(str(extra))
    return _compile(builder, tuple(files))


def _parse(text: str, path: str) -> dict[str, object]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeywordFileError(path, "file", f"not valid TOML: {exc}") from exc


def _compile(builder: _Builder, files: tuple[str, ...]) -> KeywordTable:
    phrases: dict[tuple[str, ...], Term] = {}
    wild: dict[tuple[str, ...], list[tuple[str, Term]]] = {}
    for tokens, (term, _key) in builder.phrases.items():
        if tokens[-1].endswith("*"):
            wild.setdefault(tokens[:-1], []).append((tokens[-1][:-1], term))
        else:
            phrases[tokens] = term
    wildcards = {
        head: tuple(sorted(entries, key=lambda e: (-len(e[0]), e[0]))) for head, entries in wild.items()
    }
    longest = max((len(t) for t in builder.phrases), default=1)
    return KeywordTable(
        body_parts=MappingProxyType({k: v[0] for k, v in builder.body_parts.items()}),
        codes=MappingProxyType({k: v[0] for k, v in builder.codes.items()}),
        phrases=MappingProxyType(phrases),
        wildcards=MappingProxyType(wildcards),
        longest=longest,
        radiograph_modalities=frozenset(builder.radiograph),
        capture_modalities=frozenset(builder.capture),
        files=files,
    )


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


def scan(text: str | None, keywords: KeywordTable) -> tuple[Term, ...]:
    """The terms of ``text`` in order: whole words only, longest keyword first at each position."""
    if not text:
        return ()
    tokens = words(text)
    found: list[Term] = []
    i = 0
    while i < len(tokens):
        match = _match_at(tokens, i, keywords)
        if match is None:
            i += 1
            continue
        length, term = match
        found.append(term)
        i += length
    return tuple(found)


def _match_at(tokens: Sequence[str], i: int, keywords: KeywordTable) -> tuple[int, Term] | None:
    for length in range(min(keywords.longest, len(tokens) - i), 0, -1):
        candidate = tuple(tokens[i : i + length])
        term = keywords.phrases.get(candidate)
        if term is not None:
            return length, term
        for prefix, wild_term in keywords.wildcards.get(candidate[:-1], ()):
            if candidate[-1].startswith(prefix):
                return length, wild_term
    return None


# ---------------------------------------------------------------------------------------------
# Resolution (a)-(c)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _LimbClue:
    limb: Limb
    default: Region | None
    source: RegionSource
    keyword: str
    where: str


@dataclass(frozen=True, slots=True)
class _Found:
    region: Region
    confidence: float
    keyword: str
    several: bool


def _pick(
    terms: Sequence[Term], allowed: frozenset[Region], table: GroupTable
) -> tuple[_Found | None, frozenset[Region]]:
    """The region a text decides among ``allowed``; else the regions it leaves open (several groups)."""
    regions = [t for t in terms if t.kind is TermKind.REGION and t.region in allowed]
    limb = [t for t in regions if t.region is not Region.OTHER]
    if limb:
        regions = limb  # "PELVIS AND LEFT HIP": the hip is what a fracture model can read
    if not regions:
        return None, frozenset()
    groups = {table.group_of(t.region) for t in regions}
    if len(groups) > 1:
        return None, frozenset(t.region for t in regions)
    first = regions[0]
    several = len({t.region for t in regions}) > 1
    confidence = CONFIDENCE_DESCRIPTION_SEVERAL if several else CONFIDENCE_DESCRIPTION
    return _Found(first.region, confidence, first.keyword, several), frozenset()


def _texts(facts: HeaderFacts) -> tuple[tuple[str, str | None], ...]:
    return (
        ("series description", facts.series_description),
        ("protocol name", facts.protocol_name),
        ("study description", facts.study_description),
        ("requested procedure description", facts.requested_procedure_description),
    )


def _laterality(facts: HeaderFacts, scans: Sequence[Sequence[Term]]) -> str | None:
    for value in (facts.image_laterality, facts.laterality):
        side = (value or "").strip().upper()
        if side in ("L", "R", "B"):
            return side
    for terms in scans:
        sides = {t.value for t in terms if t.kind is TermKind.LATERALITY}
        if "B" in sides or {"L", "R"} <= sides:
            return "B"
        if sides:
            return sides.pop()
    return None


def _view(facts: HeaderFacts, keywords: KeywordTable, scans: Sequence[Sequence[Term]]) -> str | None:
    position = (facts.view_position or "").strip()
    if position:
        named = [t.value for t in scan(position, keywords) if t.kind is TermKind.VIEW]
        return named[0] if named else position.upper()
    for terms in scans:
        views = list(dict.fromkeys(t.value for t in terms if t.kind is TermKind.VIEW))
        if views:
            return "+".join(views)
    return None


def resolve_region(
    facts: HeaderFacts, keywords: KeywordTable, *, table: GroupTable = DEFAULT_GROUP_TABLE
) -> RegionDecision:
    """The region the header names, following steps (a)-(c) of the module docstring.

    ``table`` decides when regions named together belong to different groups (ambiguous).
    """
    texts = _texts(facts)
    text_scans = [scan(text, keywords) for _, text in texts]
    body_scan = scan(facts.body_part, keywords)
    laterality = _laterality(facts, [*text_scans, body_scan])
    view = _view(facts, keywords, [*text_scans, body_scan])

    def decided(
        region: Region,
        source: RegionSource,
        confidence: float,
        detail: str,
        *,
        specific: bool = True,
        candidates: frozenset[Region] = frozenset(),
        reason: str | None = None,
    ) -> RegionDecision:
        if region is Region.OTHER and reason is None:
            reason = f"not a limb region ({detail})"
        return RegionDecision(
            region, source, confidence, laterality, view, specific, candidates, detail, reason
        )

    modality = (facts.modality or "").strip().upper()
    if modality and modality not in keywords.radiograph_modalities | keywords.capture_modalities:
        return decided(
            Region.OTHER,
            RegionSource.NONE,
            CONFIDENCE_MODALITY,
            f"modality {modality}",
            reason=f"modality {modality} is not a projection radiograph",
        )
    if modality not in keywords.radiograph_modalities:
        for (name, _), terms in zip(texts, text_scans, strict=True):
            other = [t for t in terms if t.kind is TermKind.NON_RADIOGRAPH]
            if other:
                return decided(
                    Region.OTHER,
                    RegionSource.DESCRIPTION,
                    CONFIDENCE_DESCRIPTION,
                    f"{name} names modality {other[0].keyword}",
                    reason=f"a capture of a {other[0].keyword} image, not a projection radiograph",
                )

    clue: _LimbClue | None = None
    allowed: frozenset[Region] = ANY_REGION
    notes: list[str] = []

    def take_clue(term: Term, source: RegionSource, where: str) -> None:
        nonlocal clue, allowed
        narrower = LIMB_REGIONS_OF[term.limb] & allowed
        if not narrower:
            notes.append(f"{where} {term.keyword} disagrees with the limb already named")
            return
        if clue is None or narrower != allowed or (clue.default is None and term.default in narrower):
            clue = _LimbClue(
                term.limb, term.default if term.default in narrower else None, source, term.keyword, where
            )
            allowed = narrower

    # (a) BodyPartExamined
    if facts.body_part:
        exact = keywords.body_parts.get(squash(facts.body_part))
        if exact is not None and exact.kind is TermKind.REGION:
            return decided(
                exact.region, RegionSource.BODY_PART, CONFIDENCE_BODY_PART, f"body part {exact.keyword}"
            )
        if exact is not None:
            take_clue(exact, RegionSource.BODY_PART, "body part")
        else:
            found, open_set = _pick(body_scan, allowed, table)
            limb_terms = [t for t in body_scan if t.kind is TermKind.LIMB]
            if found is not None:
                return decided(
                    found.region,
                    RegionSource.BODY_PART,
                    CONFIDENCE_BODY_PART_WORDS,
                    f"keyword {found.keyword} in body part",
                )
            if limb_terms:
                take_clue(limb_terms[0], RegionSource.BODY_PART, "body part")
            elif open_set:
                notes.append(f"body part names regions of several groups ({', '.join(sorted(open_set))})")
            else:
                notes.append("body part not recognised")

    # (b) AnatomicRegionSequence
    for code_value, designator, _meaning in facts.anatomic_codes:
        term = keywords.codes.get((_scheme(designator), code_value.strip()))
        if term is None:
            continue
        if term.kind is TermKind.REGION and term.region in allowed:
            return decided(
                term.region, RegionSource.ANATOMIC_CODE, CONFIDENCE_ANATOMIC_CODE, f"code {term.keyword}"
            )
        if term.kind is TermKind.REGION:
            notes.append(f"code {term.keyword} ({term.region}) disagrees with the limb already named")
        elif term.kind is TermKind.LIMB:
            take_clue(term, RegionSource.ANATOMIC_CODE, "anatomic code")
    for code_value, designator, meaning in facts.anatomic_codes:
        if (_scheme(designator), code_value.strip()) in keywords.codes:
            continue
        meaning_terms = scan(meaning, keywords)
        found, _open = _pick(meaning_terms, allowed, table)
        if found is not None:
            return decided(
                found.region,
                RegionSource.ANATOMIC_CODE,
                CONFIDENCE_CODE_MEANING,
                f"keyword {found.keyword} in the meaning of code {_scheme(designator)}:{code_value.strip()}",
            )
        for term in meaning_terms:
            if term.kind is TermKind.LIMB:
                take_clue(term, RegionSource.ANATOMIC_CODE, "anatomic code meaning")
                break

    # (c) descriptions, most image-specific first
    open_regions: frozenset[Region] = frozenset()
    for (name, _), terms in zip(texts, text_scans, strict=True):
        found, open_set = _pick(terms, allowed, table)
        if found is not None:
            detail = f"keyword {found.keyword} in {name}"
            if found.several:
                detail += " (several regions of one group; the first is kept)"
            if clue is not None:
                detail += f"; narrows {clue.where} {clue.keyword}"
            return decided(found.region, RegionSource.DESCRIPTION, found.confidence, detail)
        if open_set:
            open_regions = open_set
            allowed = allowed & open_set
            notes.append(f"{name} names regions of several groups ({', '.join(sorted(open_set))})")
        outside = {t.region for t in terms if t.kind is TermKind.REGION and t.region not in allowed}
        if outside - {Region.OTHER} and not open_set:
            names = ", ".join(sorted(outside - {Region.OTHER}))
            notes.append(f"{name} names {names}, outside the limb already named; ignored")
        for term in terms:
            if term.kind is TermKind.LIMB:
                take_clue(term, RegionSource.DESCRIPTION, name)
                break

    # Nothing specific: the image classifier may choose among what is still allowed.
    note = "; ".join(notes) if notes else None
    if clue is not None:
        candidates = allowed & LIMB_REGIONS_OF[clue.limb]
        if clue.default is not None and clue.default in candidates:
            return decided(
                clue.default,
                clue.source,
                CONFIDENCE_LIMB_DEFAULT,
                f"{clue.where} {clue.keyword} read as {clue.default}, nothing narrowed it"
                + (f"; {note}" if note else ""),
                specific=False,
                candidates=candidates,
            )
        return decided(
            Region.UNKNOWN,
            clue.source,
            0.0,
            f"{clue.where} {clue.keyword} names the {clue.limb} limb, nothing narrowed it"
            + (f"; {note}" if note else ""),
            specific=False,
            candidates=candidates,
            reason=f"{clue.where} names a limb ({clue.keyword}) but no region",
        )
    if open_regions:
        return decided(
            Region.UNKNOWN,
            RegionSource.DESCRIPTION,
            0.0,
            note or "several groups",
            specific=False,
            candidates=allowed,
            reason=f"the descriptions name regions of several groups ({', '.join(sorted(open_regions))})",
        )
    return decided(
        Region.UNKNOWN,
        RegionSource.NONE,
        0.0,
        note or "no body part, anatomic code or description keyword",
        specific=False,
        candidates=ANY_REGION,
        reason="no body part, anatomic code or description keyword names a region",
    )


# ---------------------------------------------------------------------------------------------
# Routing (d) and the group table
# ---------------------------------------------------------------------------------------------


def needs_image(decision: RegionDecision, region_model: RegionClassifier | None) -> bool:
    """Whether :func:`route_decision` will ask ``region_model`` (so the caller decodes pixels)."""
    return region_model is not None and not decision.specific


def route(
    facts: HeaderFacts,
    *,
    table: GroupTable,
    available: frozenset[AnatomicalGroup],
    keywords: KeywordTable,
    region_model: RegionClassifier | None = None,
    image: NDArray[np.float32] | None = None,
    min_image_confidence: float = DEFAULT_MIN_IMAGE_CONFIDENCE,
    below_minimum: BelowMinimum = BelowMinimum.NOT_ANALYSED,
) -> Routing:
    """Route one image: resolve its region (a)-(d), then the group whose model reads it.

    ``image`` is the source frame (2-D float32 in [0, 1], MONOCHROME2); it is prepared with the
    region model's card (preprocessing, input size) and read only when (a)-(c) leave the region
    open. ``available`` are the groups with an installed model.
    """
    decision = resolve_region(facts, keywords, table=table)
    return route_decision(
        decision,
        table=table,
        available=available,
        region_model=region_model,
        image=image,
        min_image_confidence=min_image_confidence,
        below_minimum=below_minimum,
    )


def route_decision(
    decision: RegionDecision,
    *,
    table: GroupTable,
    available: frozenset[AnatomicalGroup],
    region_model: RegionClassifier | None = None,
    image: NDArray[np.float32] | None = None,
    min_image_confidence: float = DEFAULT_MIN_IMAGE_CONFIDENCE,
    below_minimum: BelowMinimum = BelowMinimum.NOT_ANALYSED,
) -> Routing:
    """Finish a :class:`RegionDecision`: step (d) when it is open, then the group table."""
    if region_model is not None and not decision.specific and image is not None:
        decision = _classify(decision, region_model, image, min_image_confidence, below_minimum)

    if decision.region in (Region.OTHER, Region.UNKNOWN):
        return Routing(
            region=decision.region,
            source=decision.source,
            confidence=decision.confidence,
            laterality=decision.laterality,
            view=decision.view,
            group=None,
            out_of_group=False,
            reason=decision.reason
            or ("not a limb region" if decision.region is Region.OTHER else "no region could be read"),
            guess=decision.guess,
            guess_confidence=decision.guess_confidence,
            low_confidence=decision.low_confidence,
        )
    group, out_of_group = table.route(decision.region, available)
    reason = None
    if group is None:
        own = table.group_of(decision.region)
        reason = f"no installed model for group {own} or the groups next to it"
    return Routing(
        region=decision.region,
        source=decision.source,
        confidence=decision.confidence,
        laterality=decision.laterality,
        view=decision.view,
        group=group,
        out_of_group=out_of_group,
        reason=reason,
        guess=decision.guess,
        guess_confidence=decision.guess_confidence,
        low_confidence=decision.low_confidence,
    )


def _classify(
    decision: RegionDecision,
    model: RegionClassifier,
    image: NDArray[np.float32],
    minimum: float,
    below_minimum: BelowMinimum = BelowMinimum.NOT_ANALYSED,
) -> RegionDecision:
    card = model.card
    prepared = prepare(image, PreprocessConfig.from_dict(dict(card.preprocessing)), card.input_size)
    [(answer, probability)] = model.predict(prepared.pixels[np.newaxis])
    region = Region(answer)
    said = f"image classifier {card.name} {card.version} said {region} ({probability:.2f})"
    asked = replace(decision, guess=region, guess_confidence=float(probability))
    confident = probability >= minimum
    flagged = not confident and below_minimum is BelowMinimum.ANALYSE_FLAGGED and region is not Region.OTHER
    if region in decision.candidates and (confident or flagged):
        reason = f"not a limb region ({said})" if region is Region.OTHER else None
        return replace(
            asked,
            region=region,
            source=RegionSource.IMAGE,
            confidence=float(probability),
            specific=True,
            detail=f"{said}{'' if confident else f', below {minimum:.2f}, analysed as set'}; "
            f"{decision.detail}",
            reason=reason,
            low_confidence=not confident,
        )
    if region in decision.candidates:
        why = f"below the minimum confidence {minimum:.2f}"
    else:
        why = "outside what the header allows"
    # The header's reason stays first; the classifier's answer says why it did not decide.
    lead = decision.reason or "no region could be read"
    return replace(asked, detail=f"{said}, {why}; {decision.detail}", reason=f"{lead}; {said}, {why}")


def not_analysed_label(routing: Routing) -> NotAnalysed | None:
    """The bounded metric label of an image that is not analysed; None when it is analysed."""
    if routing.group is not None:
        return None
    if routing.region is Region.OTHER:
        return NotAnalysed.OTHER_REGION
    if routing.region is Region.UNKNOWN:
        return NotAnalysed.UNKNOWN_REGION
    return NotAnalysed.NO_MODEL


# ---------------------------------------------------------------------------------------------
# Routing a study
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StudyRouting(Generic[T]):
    """A study's images grouped by the group model that reads them (table order)."""

    groups: tuple[tuple[AnatomicalGroup, tuple[T, ...]], ...]
    not_analysed: tuple[T, ...]


def group_study(items: Iterable[tuple[T, Routing]]) -> StudyRouting[T]:
    """Group routed images by their group; each group is analysed and reported separately."""
    by_group: dict[AnatomicalGroup, list[T]] = {}
    rest: list[T] = []
    for item, routing in items:
        if routing.group is None:
            rest.append(item)
        else:
            by_group.setdefault(routing.group, []).append(item)
    ordered = tuple((g, tuple(by_group[g])) for g in AnatomicalGroup if g in by_group)
    return StudyRouting(groups=ordered, not_analysed=tuple(rest))
