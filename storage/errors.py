"""Errors raised by :mod:`storage`; the node catches these, never SQLAlchemy's.

Error tree::

    StorageError                      base of everything below
    +-- UnsupportedDatabase           the URL names no backend we run on (or in-memory SQLite)
    +-- StorageUnavailable            the database cannot be reached or written: connection
    |   |                             refused, disk full, a lock held past busy_timeout_s
    |   +-- TransientConflict         a deadlock or serialization failure that kept recurring
    |                                 after the internal retries
    +-- NotFound (also LookupError)
        +-- UnknownStudy              ``uid``
        +-- UnknownJob                ``job_id``
        +-- UnknownOutboxItem         ``item_id``

Invalid arguments (a naive datetime, an unknown priority) raise ``ValueError``: they are
programming errors, not database conditions.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of the storage errors."""


class UnsupportedDatabase(StorageError):
    """The configured URL is not ``sqlite:///<file>`` or ``postgresql[+psycopg]://``."""

    def __init__(self, scheme: str, reason: str) -> None:
        super().__init__(f"unsupported database {scheme!r}: {reason}")
        self.scheme = scheme


class StorageUnavailable(StorageError):
    """The database did not answer or refused the write; ``dialect`` names the backend."""

    def __init__(self, dialect: str, reason: str) -> None:
        super().__init__(f"{dialect} database unavailable: {reason}")
        self.dialect = dialect


class TransientConflict(StorageUnavailable):
    """PostgreSQL reported a deadlock or serialization failure (SQLSTATE 40P01 / 40001)."""


class NotFound(StorageError, LookupError):
    """A row named by the caller does not exist."""


class UnknownStudy(NotFound):
    def __init__(self, uid: str) -> None:
        super().__init__(f"no study {uid}")
        self.uid = uid


class UnknownJob(NotFound):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"no job {job_id}")
        self.job_id = job_id


class UnknownOutboxItem(NotFound):
    def __init__(self, item_id: int) -> None:
        super().__init__(f"no outbox item {item_id}")
        self.item_id = item_id
