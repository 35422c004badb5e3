"""Durable state of fracnode: sqlmodel tables and the queries on them (studies, series,
instances, jobs, audit, outbox). Never imports ``node`` or ``inference``.

Modules:

* :mod:`storage.config` -- ``StorageConfig(url, busy_timeout_s)``, built by the node from settings.
* :mod:`storage.db` -- ``Database``: the engine, thread-safe, one per process; short sessions.
* :mod:`storage.repo` -- every query; each takes the ``Database`` first, runs one transaction and
  returns frozen values. The module docstring explains why each one is race-free on SQLite and
  PostgreSQL.
* :mod:`storage.views` -- the StrEnums and frozen dataclasses that go in and come out.
* :mod:`storage.tables` -- the sqlmodel tables (no patient names or IDs anywhere).
* :mod:`storage.errors` -- the error tree; SQLAlchemy's exceptions never reach the caller.
"""
