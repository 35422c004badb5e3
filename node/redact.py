"""Exception text that may carry a dataset value, turned into a reason that cannot.

pydicom, highdicom and the codecs quote the offending value in their messages (``Unable to
convert '19311231' to 'DA' object`` for a birth date sent with VR PN, highdicom's warning about
a "potentially invalid" patient name). Such text must reach neither the log, the API nor the
database. :func:`safe_reason` keeps only what the code knows without looking at the data: the
exception's type, the package it was raised in, and a fixed description of its kind. Exceptions
of this node whose ``reason`` is value-free by construction (:class:`node.imaging.ImagingError`
and the other errors that carry a ``reason`` attribute built from fixed text and numbers) keep
that reason.

:class:`ValueFreeLogFilter` does the same for log records of the libraries that format values
into their messages; install it on the handlers when logging is configured.
"""

from __future__ import annotations

import errno
import logging
import struct
import zlib
from types import TracebackType
from typing import Final

from pydicom.errors import BytesLengthException, InvalidDicomError

# The most specific matching type wins (checked in this order).
_KINDS: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (RecursionError, "data nested too deeply"),
    (InvalidDicomError, "not a DICOM dataset"),
    (BytesLengthException, "binary data of the wrong length"),
    (struct.error, "binary data of the wrong length"),
    (zlib.error, "compressed data that cannot be inflated"),
    (MemoryError, "not enough memory"),
    (UnicodeError, "text that cannot be decoded"),
    (OverflowError, "a number out of range"),
    (ZeroDivisionError, "a zero where a divisor was needed"),
    (KeyError, "a required element or entry is missing"),
    (IndexError, "a value or item is missing"),
    (AttributeError, "a required attribute is missing or of the wrong kind"),
    (TypeError, "a value of the wrong type"),
    (NotImplementedError, "a feature the decoder does not support"),
    (EOFError, "the data ends early"),
    (OSError, "an input/output operation failed"),
    (ValueError, "a value that cannot be interpreted"),
    (RuntimeError, "a library reported a failure"),
    (ArithmeticError, "a calculation failed"),
)
# Packages whose messages quote dataset values (pydicom's warn_and_log, highdicom's checks).
QUOTING_LOGGERS: Final = ("pydicom", "highdicom", "pylibjpeg", "openjpeg", "libjpeg", "jpeg_ls")
WITHHELD: Final = "message withheld: it may quote values of a received dataset"


def describe(exc: BaseException) -> str:
    """The fixed description of ``exc``'s kind (no text from the exception itself)."""
    for kind, description in _KINDS:
        if isinstance(exc, kind):
            code = exc.errno if isinstance(exc, OSError) else None
            if code is not None and code in errno.errorcode:
                return f"{description} ({errno.errorcode[code]})"
            return description
    return "an unexpected error"


def _origin(tb: TracebackType | None) -> str | None:
    """Top-level package of the innermost frame that raised (``highdicom``, ``pydicom``)."""
    name: str | None = None
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__")
        if isinstance(module, str):
            name = module
        tb = tb.tb_next
    return name.split(".")[0] if name else None


def safe_reason(exc: BaseException) -> str:
    """``exc`` as ``"<Type> (in <package>): <fixed description>"``, free of dataset values.

    An exception with a string ``reason`` attribute (this node's errors, e.g.
    :class:`node.imaging.ImagingError`) keeps it: those reasons are written from fixed text,
    keywords and numbers only.
    """
    name = type(exc).__name__
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and type(exc).__module__.startswith("node."):
        return f"{name}: {reason}"
    origin = _origin(exc.__traceback__)
    where = f" (in {origin})" if origin and origin != "node" else ""
    return f"{name}{where}: {describe(exc)}"


def _quotes_values(record: logging.LogRecord) -> bool:
    if record.name.split(".")[0] in QUOTING_LOGGERS:
        return True
    if record.name == "py.warnings":  # logging.captureWarnings: "<path>:<line>: <category>: ..."
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            return True
        return any(f"/{package}/" in text.split(":", 1)[0] for package in QUOTING_LOGGERS)
    return False


class ValueFreeLogFilter(logging.Filter):
    """Replaces the message of records from :data:`QUOTING_LOGGERS` (and of warnings those
    packages raise, once ``logging.captureWarnings(True)`` routes them to ``py.warnings``) by a
    fixed text.

    A filter on a logger does not see its children's records: add this one to the handlers.
    The level, the logger name and the time stay, so an operator still sees that the library
    complained and where.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if _quotes_values(record):
            record.msg = WITHHELD
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True
