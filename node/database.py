"""The node's database, opened from the settings (for ``serve`` and the operator commands)."""

from __future__ import annotations

from node.settings import Settings
from storage.config import StorageConfig
from storage.db import Database


def storage_config(settings: Settings) -> StorageConfig:
    return StorageConfig(url=settings.database.url, busy_timeout_s=settings.database.busy_timeout_s)


def open_database(settings: Settings) -> Database:
    """Open the configured database and create any missing table."""
    db = Database(storage_config(settings))
    db.create_all()
    return db
