"""The HTTP API: worklist, study status, health, readiness and ``/metrics`` on one server.

Endpoints (OpenAPI at ``/openapi.json``, Swagger UI at ``/docs``):

- ``GET /worklist``: studies by priority (urgent, review, not_analysed, routine by default —
  ``worklist.not_analysed`` — then not yet processed), score (highest first) and arrival;
  filters ``status`` (study states, repeated or comma-separated), ``group`` (anatomical group),
  ``since``/``until`` (ISO 8601, first arrival; a time without offset is UTC); paging ``limit``
  (1-1000, default 200) and ``offset``. The answer says ``total``, ``more``, ``next_offset`` and
  the count per priority (``by_priority``), so no study is silently cut off.
- ``GET /studies``: every study, most recently received first; ``status``, ``limit``,
  ``offset``; the same paging fields.
- ``GET /studies/{study_uid}``: state, routing and outcomes, outputs and their delivery,
  processing jobs and timings. 400 for a malformed UID (checked before any query), 404 when
  the node has never seen the study.
- ``GET /healthz``: liveness (from the ``liveness`` callable): 200 while every worker, sender
  and assembler thread is alive and not stuck and the supervisor ticks, else 503; the
  destinations' last TCP probe is shown as detail and never makes it red. Always open.
- ``GET /readyz``: can the node receive and process: database, spool writable, workers alive,
  models (from the ``readiness`` callable): 200 when every check is ``True``, else 503 with the
  failing checks. Destinations are deliberately not in it (a PACS outage must not remove the
  node from its Service). Always open, so that probes need no secret (it tells nothing about
  studies).
- ``GET /metrics``: Prometheus text format of the node's registry.

With a token, every other path (``/metrics`` and the docs included) needs
``Authorization: Bearer <token>``, compared in constant time; a missing or wrong token gets
401. The storage layer keeps no patient names or IDs, so no response carries any. Uvicorn's
access log is off: request counts go to ``fracnode_http_requests_total`` instead.

Errors::

    ApiError
    +-- ApiStartError: the address cannot be bound or the server did not start in time
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Final

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from inference.regions import AnatomicalGroup
from node import __version__
from node.metrics import Metrics
from node.uids import is_valid_uid
from storage import repo
from storage.db import Database
from storage.views import WORKLIST_ORDER, OutboxState, StudyDetail, StudyState, StudyView

log = logging.getLogger(__name__)

Readiness = Callable[[], Mapping[str, bool | str]]

OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})
MAX_LIMIT: Final = 1000
# PS3.5 9.1: components of digits without leading zeros, separated by dots, at most 64 chars.


class ApiError(Exception):
    """Base of this module's errors."""


class ApiStartError(ApiError):
    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"HTTP API on {host}:{port}: {reason}")
        self.host = host
        self.port = port


def create_app(
    *,
    db: Database,
    metrics: Metrics,
    readiness: Readiness,
    token: str | None,
    liveness: Readiness | None = None,
    worklist_order: Sequence[str] = WORKLIST_ORDER,
) -> FastAPI:
    """The FastAPI application; :class:`ApiServer` serves it."""
    app = FastAPI(
        title="fracnode",
        version=__version__,
        description="Fracture AI worklist prioritisation. Results are not for diagnostic use.",
    )
    expected = token.encode("utf-8") if token else None

    @app.middleware("http")
    async def authorise_and_count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        code = "500"  # an exception escaping the endpoint becomes a 500
        try:
            if expected is not None and request.url.path not in OPEN_PATHS and not _authorised(
                request, expected
            ):
                response: Response = JSONResponse(
                    {"detail": "a valid bearer token is required"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            else:
                response = await call_next(request)
            code = str(response.status_code)
            return response
        finally:
            template = getattr(request.scope.get("route"), "path", None) or "other"
            metrics.http_requests.labels(route=template, code=code).inc()

    @app.get(
        "/healthz",
        summary="Liveness: every worker, sender and assembler thread alive and not stuck",
        responses={503: {"description": "a thread is dead or stuck (the supervisor replaces it)"}},
    )
    def healthz() -> JSONResponse:
        checks = dict(liveness()) if liveness is not None else {}
        # destination:* entries are details (a PACS outage is not the node's ill health)
        healthy = all(value is True for key, value in checks.items() if not key.startswith("destination:"))
        body = {"status": "ok" if healthy else "unhealthy", "version": __version__, "checks": checks}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get(
        "/readyz",
        summary="Readiness to receive and process: database, spool, workers, models",
        responses={503: {"description": "at least one check failed"}},
    )
    def readyz() -> JSONResponse:
        checks = dict(readiness())
        ready = all(value is True for value in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/worklist",
        summary="Studies ordered by priority, score and arrival",
        responses={400: {"description": "inconsistent filters"}, 422: {"description": "invalid filter"}},
    )
    def worklist(
        status: Annotated[
            list[str] | None,
            Query(description="study states, repeated or comma-separated: " + ", ".join(StudyState)),
        ] = None,
        group: Annotated[AnatomicalGroup | None, Query(description="anatomical group")] = None,
        since: Annotated[datetime | None, Query(description="first arrival at or after (ISO 8601)")] = None,
        until: Annotated[datetime | None, Query(description="first arrival before (ISO 8601)")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 200,
        offset: Annotated[int, Query(ge=0, description="rows to skip (paging)")] = 0,
    ) -> dict[str, Any]:
        states = _states(status)
        since_utc, until_utc = _utc(since), _utc(until)
        if since_utc is not None and until_utc is not None and since_utc >= until_utc:
            raise HTTPException(400, "since must be earlier than until")
        filters: dict[str, Any] = dict(
            states=states, group=str(group) if group is not None else None, since=since_utc, until=until_utc
        )
        views = repo.worklist(db, limit=limit, offset=offset, order=worklist_order, **filters)
        counts = repo.count_worklist(db, **filters)
        return {
            **_page(len(views), counts["total"], offset),
            "by_priority": {k: v for k, v in counts.items() if k != "total"},
            "studies": [study_json(view) for view in views],
        }

    @app.get(
        "/studies",
        summary="Studies, most recently received first (paged)",
        responses={422: {"description": "invalid filter"}},
    )
    def studies(
        status: Annotated[StudyState | None, Query(description="one study state")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 200,
        offset: Annotated[int, Query(ge=0, description="rows to skip (paging)")] = 0,
    ) -> dict[str, Any]:
        views = repo.list_studies(db, state=status, limit=limit, offset=offset)
        total = repo.count_studies(db, state=status)
        return {**_page(len(views), total, offset), "studies": [study_json(view) for view in views]}

    @app.get(
        "/studies/{study_uid}",
        summary="One study: state, routing, outcomes, outputs sent, timings",
        responses={400: {"description": "malformed Study Instance UID"}, 404: {"description": "unknown"}},
    )
    def study(study_uid: Annotated[str, PathParam(description="Study Instance UID")]) -> dict[str, Any]:
        if not is_valid_uid(study_uid):
            raise HTTPException(400, "the study UID must be digits and dots, at most 64 characters")
        detail = repo.get_study(db, study_uid)
        if detail is None:
            raise HTTPException(404, "no such study on this node")
        return study_detail_json(detail)

    return app


def _page(count: int, total: int, offset: int) -> dict[str, Any]:
    """Paging fields of a list response: ``more`` says whether rows remain past this page."""
    more = offset + count < total
    return {
        "count": count,
        "total": total,
        "offset": offset,
        "more": more,
        "next_offset": offset + count if more else None,
    }


def _authorised(request: Request, expected: bytes) -> bool:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return secrets.compare_digest(credentials.strip().encode("utf-8"), expected)


def _states(values: list[str] | None) -> list[StudyState] | None:
    if not values:
        return None
    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    unknown = [name for name in names if name not in {state.value for state in StudyState}]
    if unknown:
        raise HTTPException(
            422, f"unknown status {', '.join(unknown)}; expected one of {', '.join(StudyState)}"
        )
    return [StudyState(name) for name in names]


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def study_json(view: StudyView) -> dict[str, Any]:
    """A study as JSON: the stored outcome summary is embedded as an object, not a string."""
    data = dataclasses.asdict(view)
    outcome = data.pop("outcome_json")
    data["outcome"] = json.loads(outcome) if outcome else None
    return data


def study_detail_json(detail: StudyDetail) -> dict[str, Any]:
    study = detail.study
    delivered = [item.delivered_at for item in detail.outbox if item.state is OutboxState.DELIVERED]
    last_delivered = max((d for d in delivered if d is not None), default=None)
    return {
        "study": study_json(study),
        "series": [dataclasses.asdict(series) for series in detail.series],
        "changes": [dataclasses.asdict(change) for change in detail.changes],
        "jobs": [dataclasses.asdict(job) for job in detail.jobs],
        "outputs": [dataclasses.asdict(item) for item in detail.outbox],
        "timings": {
            "receiving_seconds": _seconds(study.first_received_at, study.ready_at),
            "processing_seconds": _seconds(study.ready_at, study.completed_at),
            "ready_to_last_delivered_seconds": _seconds(study.ready_at, last_delivered),
        },
    }


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


class ApiServer:
    """Uvicorn serving :func:`create_app` in a daemon thread; ``port=0`` picks a free port."""

    def __init__(
        self,
        *,
        db: Database,
        metrics: Metrics,
        readiness: Readiness,
        token: str | None,
        liveness: Readiness | None = None,
        worklist_order: Sequence[str] = WORKLIST_ORDER,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.app = create_app(
            db=db,
            metrics=metrics,
            readiness=readiness,
            token=token,
            liveness=liveness,
            worklist_order=worklist_order,
        )
        self.host = host
        self._requested_port = port
        self._tls = (tls_cert_file, tls_key_file)
        self._start_timeout_s = start_timeout_s
        self._socket: socket.socket | None = None
        self._bound_port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the free one picked for port 0) once started."""
        return self._bound_port if self._bound_port is not None else self._requested_port

    @property
    def scheme(self) -> str:
        return "https" if self._tls[0] is not None else "http"

    def start(self) -> None:
        try:
            family = socket.getaddrinfo(self.host, self._requested_port, type=socket.SOCK_STREAM)[0][0]
            self._socket = socket.create_server((self.host, self._requested_port), family=family)
        except OSError as exc:
            raise ApiStartError(self.host, self._requested_port, f"cannot bind: {exc}") from exc
        self._bound_port = int(self._socket.getsockname()[1])
        cert, key = self._tls
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            ssl_certfile=str(cert) if cert is not None else None,
            ssl_keyfile=str(key) if key is not None else None,
        )
        self._server = uvicorn.Server(config)
        sockets = [self._socket]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": sockets}, name="http-api", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ApiStartError(self.host, self._requested_port, "the server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._server = None
