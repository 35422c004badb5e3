"""The storage package's own configuration: which database, and how long to wait for a lock.

Built by the node from ``Settings.database``; storage never reads settings or the environment.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """``url``: ``sqlite:///path/to/file.db``, ``postgresql://...`` or ``postgresql+psycopg://...``.

    ``busy_timeout_s`` bounds every wait for a lock: SQLite's busy timeout, PostgreSQL's
    ``lock_timeout`` and connect timeout, and the wait for a pooled connection.
    """

    url: str
    busy_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.busy_timeout_s <= 0:
            raise ValueError("busy_timeout_s must be positive")
