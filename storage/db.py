"""The database engine: one :class:`Database` per process, shared by every thread.

pynetdicom runs one thread per association, the node runs worker threads and a scheduler
thread, and several node processes may share one PostgreSQL database. Each thread opens its
own short session (:meth:`Database.session`) on its own pooled connection; no session is ever
held across DICOM, HL7 or model I/O.

SQLite (``sqlite:///file``)
    WAL journal (readers never block the writer), ``isolation_level=None`` on the DBAPI
    connection so pysqlite issues no BEGIN of its own, and ``BEGIN IMMEDIATE`` on SQLAlchemy's
    ``begin`` event: a transaction takes the write lock when it starts, so a read-then-write
    in one transaction can neither lose an update nor fail half-way with "database is locked"
    (the default deferred BEGIN does both under threads, see STACK-NOTES). Waiting for that
    lock is bounded by ``busy_timeout``. Read-only sessions use a deferred BEGIN and so never
    wait for writers. Foreign keys are enforced; ``synchronous=FULL`` makes every commit
    durable before the C-STORE response is sent.

PostgreSQL (``postgresql://`` or ``postgresql+psycopg://``, psycopg 3)
    READ COMMITTED; the queries in :mod:`storage.repo` make races safe with unique
    constraints, ``ON CONFLICT`` and row locks (``FOR UPDATE [SKIP LOCKED]``). ``lock_timeout``
    is ``busy_timeout_s``; the session time zone is UTC.

Errors (see :mod:`storage.errors`): SQLAlchemy's errors never leave this module;
:meth:`Database.session` turns them into :class:`StorageUnavailable`,
:class:`TransientConflict` or :class:`StorageError`, chained with ``from``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel import Session, SQLModel

from storage import tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from storage.config import StorageConfig
from storage.errors import StorageError, StorageUnavailable, TransientConflict, UnsupportedDatabase

_READ_ONLY = "fracnode_read_only"
# PostgreSQL SQLSTATEs worth retrying: serialization_failure, deadlock_detected.
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


class Database:
    """Owns the engine and its connection pool; thread-safe, one per process."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        try:
            url = make_url(config.url)
        except ArgumentError as exc:
            raise UnsupportedDatabase("?", "the URL cannot be parsed") from exc
        backend = url.get_backend_name()
        wait_s = config.busy_timeout_s
        if backend == "sqlite":
            if url.get_driver_name() not in ("pysqlite", ""):
                raise UnsupportedDatabase(url.drivername, "only the standard sqlite3 driver is supported")
            database = url.database or ""
            if database in ("", ":memory:") or database.startswith("file::memory:"):
                raise UnsupportedDatabase(
                    url.drivername, "in-memory SQLite is private to one connection; use a file"
                )
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self._engine = create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": wait_s},
                pool_size=8,
                max_overflow=32,
                pool_timeout=wait_s,
            )
            event.listen(self._engine, "connect", self._sqlite_connect)
            event.listen(self._engine, "begin", _sqlite_begin)
        elif backend == "postgresql":
            if url.drivername not in ("postgresql", "postgresql+psycopg"):
                raise UnsupportedDatabase(url.drivername, "PostgreSQL is reached through psycopg 3")
            url = url.set(drivername="postgresql+psycopg")
            lock_ms = int(wait_s * 1000)
            self._engine = create_engine(
                url,
                connect_args={
                    "connect_timeout": max(1, math.ceil(wait_s)),
                    "options": f"-c lock_timeout={lock_ms} -c TimeZone=UTC",
                },
                pool_size=8,
                max_overflow=16,
                pool_timeout=wait_s,
                pool_pre_ping=True,
            )
        else:
            raise UnsupportedDatabase(url.drivername, "use sqlite:///<file> or postgresql://")
        self.dialect: str = self._engine.dialect.name

    def _sqlite_connect(self, dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(self.config.busy_timeout_s * 1000)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @property
    def engine(self) -> Engine:
        """For tests and tools; the node goes through :mod:`storage.repo`."""
        return self._engine

    def create_all(self) -> None:
        """Create the tables that do not exist yet (idempotent)."""
        try:
            SQLModel.metadata.create_all(self._engine)
        except SQLAlchemyError as exc:
            raise self._translate(exc) from exc

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """A short transaction: committed when the block exits, rolled back on any error.

        ``read_only`` sessions on SQLite begin DEFERRED and so never queue behind writers;
        a write inside one fails. Database errors leave as :class:`StorageError` subclasses.
        """
        session = Session(self._engine, expire_on_commit=False, autoflush=True)
        try:
            if read_only and self.dialect == "sqlite":
                session.connection(execution_options={_READ_ONLY: True})
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            raise self._translate(exc) from exc
        finally:
            session.close()  # rolls back whatever was not committed

    def dispose(self) -> None:
        """Close every pooled connection (at shutdown, or in a child after fork)."""
        self._engine.dispose()

    def _translate(self, exc: SQLAlchemyError) -> StorageError:
        if isinstance(exc, DBAPIError):
            sqlstate = getattr(exc.orig, "sqlstate", None)
            if sqlstate in TRANSIENT_SQLSTATES:
                return TransientConflict(self.dialect, f"SQLSTATE {sqlstate}")
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                return StorageUnavailable(self.dialect, _first_line(exc.orig))
            return StorageError(f"{self.dialect} error: {_first_line(exc.orig)}")
        # Pool timeouts and other non-DBAPI failures: the database could not be used.
        return StorageUnavailable(self.dialect, _first_line(exc))


def _sqlite_begin(conn: Connection) -> None:
    read_only = bool(conn.get_execution_options().get(_READ_ONLY))
    conn.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


def _first_line(error: Any) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
