"""Durable state of fracnode: sqlmodel tables and the queries on them (studies, series,
instances, jobs, audit, outbox). Never imports ``node`` or ``inference``."""
