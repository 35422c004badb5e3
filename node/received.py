"""Reading a received dataset without trusting it: every read returns a value or ``None``.

A sender decides what a dataset holds. A Type 2 or 3 attribute may be absent or empty, a Type 1
one absent too; an element may come with another VR than the dictionary's (a sequence sent as a
string, a code string sent as OB, a birth date as PN), several values where one is expected, a
number written as text, NaN, or bytes pydicom cannot convert at all. pydicom converts raw
elements when they are first read, so the read itself may raise (``BytesLengthException``,
``ValueError``, ``OSError`` from a sequence parser, ``RecursionError`` from a nesting bomb).

These accessors are the only way the node reads a received dataset's values outside the C-STORE
identity check. None of them raises; none of them logs: a value that does not fit is treated
as absent, and the caller decides whether absence is acceptable (the pixel pipeline turns a
missing pixel description into an :class:`node.imaging.ImagingError` with a fixed reason).

- :func:`raw_value`: the converted value, or ``None`` when absent or not convertible;
- :func:`text`: one stripped string (multiple values joined with ``\\``), never bytes;
- :func:`uid`: a UID exactly as sent (no stripping beyond pydicom's of the trailing padding);
- :func:`integer` / :func:`number`: exactly one integral / finite value;
- :func:`numbers`: every value, all finite, or an empty tuple;
- :func:`items`: the :class:`~pydicom.dataset.Dataset` items of a sequence, whatever arrived.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Final

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

MAX_TEXT: Final = 10_240  # UT-sized values are not what any reader here wants


def raw_value(ds: object, keyword: str) -> object | None:
    """The value of ``keyword`` in ``ds`` as pydicom converts it; ``None`` when absent, empty,
    when ``ds`` is not a dataset, or when the conversion fails."""
    if not isinstance(ds, Dataset):
        return None
    try:
        if keyword not in ds:
            return None
        value: object = ds[keyword].value
    # pydicom's converters raise what their parsing meets (ValueError, TypeError, struct.error,
    # BytesLengthException, OSError, RecursionError, UnicodeDecodeError...): an unreadable
    # value is an absent one, whatever the exception says (it may quote the value).
    except Exception:  # noqa: BLE001
        return None
    if value is None or value == "" or value == b"":
        return None
    return value


def _values(value: object) -> list[object]:
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _as_text(value: object) -> str | None:
    if isinstance(value, PersonName):
        value = str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None  # bytes, datasets, sequences, tags: not text


def text(ds: object, keyword: str) -> str | None:
    """One string: stripped (spaces and NUL padding), values joined with ``\\``; ``None`` when
    absent, empty, or not text (a binary VR, a sequence)."""
    value = raw_value(ds, keyword)
    if value is None or isinstance(value, Sequence):
        return None
    parts = [_as_text(v) for v in _values(value)]
    if any(part is None for part in parts):
        return None
    joined = "\\".join(part for part in parts if part is not None).strip(" \x00")
    return joined[:MAX_TEXT] or None


def uid(ds: object, keyword: str) -> str | None:
    """A UID value as it was sent, without its trailing NUL or space padding (PS3.5 6.2, VR UI).

    Nothing else is stripped (pydicom's UID strips surrounding whitespace, so an element not yet
    converted is read from its bytes): a leading space, a newline or a second value stays, and
    the value fails a UID check instead of being silently repaired.
    """
    if not isinstance(ds, Dataset):
        return None
    try:
        element = ds.get_item(keyword) if keyword in ds else None
    except Exception:  # noqa: BLE001  (a keyword pydicom cannot map, a broken dataset)
        return None
    if isinstance(element, RawDataElement):
        # Implicit VR (None), UI, or UN as a relay writes an element it did not know.
        if element.VR not in (None, "UI", "UN") or not isinstance(element.value, bytes):
            return None
        try:
            text = element.value.decode("ascii").rstrip("\x00 ")
        except UnicodeDecodeError:
            return None
        return text or None
    value = raw_value(ds, keyword)
    return str(value) if isinstance(value, str) and value else None


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip(" \x00"))
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def numbers(ds: object, keyword: str) -> tuple[float, ...]:
    """Every value of ``keyword`` as a finite float; empty when absent or when any value is not
    a finite number."""
    value = raw_value(ds, keyword)
    if value is None or isinstance(value, Sequence | bytes | bytearray):
        return ()
    out: list[float] = []
    for item in _values(value):
        number = _as_float(item)
        if number is None:
            return ()
        out.append(number)
    return tuple(out)


def number(ds: object, keyword: str) -> float | None:
    """The single finite value of ``keyword``; ``None`` when absent, multi-valued or not a
    number."""
    found = numbers(ds, keyword)
    return found[0] if len(found) == 1 else None


def first_number(ds: object, keyword: str) -> float | None:
    """The first value of a multi-valued numeric attribute (Window Center, Rescale Slope)."""
    found = numbers(ds, keyword)
    return found[0] if found else None


def integer(ds: object, keyword: str) -> int | None:
    """The single integral value of ``keyword``; ``None`` when absent, multi-valued, fractional
    or not a number."""
    found = number(ds, keyword)
    if found is None or not found.is_integer():
        return None
    return int(found)


def items(ds: object, keyword: str) -> tuple[Dataset, ...]:
    """The dataset items of sequence ``keyword``; empty when absent, not a sequence (a string, a
    number, bytes) or unreadable. Items that are not datasets are left out."""
    value = raw_value(ds, keyword)
    if not isinstance(value, Sequence | list | tuple):
        return ()
    return tuple(item for item in value if isinstance(item, Dataset))


def first_text(candidates: Iterable[tuple[object, str]]) -> str | None:
    """The first present :func:`text` among (dataset, keyword) pairs."""
    for ds, keyword in candidates:
        found = text(ds, keyword)
        if found is not None:
            return found
    return None
