"""Identifiers on every log line about a study, job or delivery (never patient data).

:func:`log_context` adds ``key=value`` pairs (study UID, job id, revision, outbox item,
destination, calling AE) for the code it wraps, per thread and per task (``contextvars``);
nested contexts add to each other. :class:`ContextFilter`, installed on the handlers by
:func:`node.cli.configure_logging`, appends them to each record's message as
`` [study=1.2.3 job=7 revision=1]``, so ``grep study=1.2.3`` finds everything the node did with
a study. UIDs of studies and instances are not patient identifiers; names and IDs never go here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CONTEXT: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("fracnode_log_context", default=())


@contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Within the block, every log record carries ``fields`` (``None`` values are left out)."""
    added = tuple((key, str(value)) for key, value in fields.items() if value is not None)
    token = _CONTEXT.set(_CONTEXT.get() + added)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> dict[str, str]:
    return dict(_CONTEXT.get())


class ContextFilter(logging.Filter):
    """Appends the current :func:`log_context` to each record's message (``record.context``
    holds it too, for structured formatters)."""

    def filter(self, record: logging.LogRecord) -> bool:
        pairs = _CONTEXT.get()
        context = " ".join(f"{key}={value}" for key, value in pairs)
        setattr(record, "context", context)  # noqa: B010 - LogRecord has no declared field for it
        if pairs and not getattr(record, "fracnode_context_added", False):
            record.msg = f"{record.getMessage()} [{context}]"
            record.args = None
            setattr(record, "fracnode_context_added", True)  # noqa: B010 - two handlers, one record
        return True
