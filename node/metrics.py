"""Prometheus metrics of the node: one :class:`Metrics` object per registry, no globals.

Every metric name starts with ``fracnode_`` and carries its unit (``_seconds``, ``_bytes``,
``_ratio``, ``_images``, ``_studies``, ``_items``) or ``_total`` for counters. Labels are bounded:
a SOP class short name, an anatomical group, an outcome, a priority, a reason category, a
pipeline stage, a destination *name* from the settings, a queue state. Never a UID, never
patient data (the model info carries the model's device UID: one value per installed model).

The drift test in ``tests/test_deploy.py`` checks that every name used by the alert rules and
the Grafana dashboard exists in :func:`metric_names`, so renaming a metric here fails the test
until ``deploy/`` follows.

Errors: :class:`ValueError` for a stage or Prometheus label value outside its closed set (a
programming error, caught by tests); prometheus-client's own ``ValueError`` when two
:class:`Metrics` share one registry.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final, Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from inference.modelcard import ModelCard
from inference.values import StudyResult
from node import __version__

log = logging.getLogger(__name__)

Stage = Literal["decode", "preprocess", "inference", "report", "send"]
STAGES: Final[tuple[str, ...]] = get_args(Stage)

# Why a study was not analysed, as a label. The node's free-text reasons (``not_analysed_reason``)
# go to the study record; the metric gets one of these categories.
NotAnalysedReason = Literal[
    "no_images", "region_not_supported", "no_model", "decode_failed", "inference_failed", "other"
]
NOT_ANALYSED_REASONS: Final[tuple[str, ...]] = get_args(NotAnalysedReason)

_SOP_CLASS_LABELS: Final[dict[str, str]] = {
    ComputedRadiographyImageStorage: "cr",
    DigitalXRayImageStorageForPresentation: "dx",
    DigitalXRayImageStorageForProcessing: "dx",
    SecondaryCaptureImageStorage: "sc",
    MultiFrameSingleBitSecondaryCaptureImageStorage: "sc",
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage: "sc",
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage: "sc",
    MultiFrameTrueColorSecondaryCaptureImageStorage: "sc",
}

_SECONDS_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SECONDS_STAGE = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SECONDS_STUDY = (1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_BATCH_IMAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_PROBABILITY = tuple(round(0.05 * i, 2) for i in range(1, 21))


def sop_class_label(sop_class_uid: str) -> str:
    """``cr``, ``dx`` (for presentation or processing), ``sc`` (any secondary capture) or ``other``."""
    return _SOP_CLASS_LABELS.get(sop_class_uid.strip().rstrip("\0"), "other")


class Metrics:
    """All metrics of a node, registered on the registry given (never the global one).

    Receiving (``node.scp``, ``node.ingest``):

    - ``instances_received`` counter ``fracnode_instances_received_total{sop_class, outcome}``:
      ``sop_class`` from :func:`sop_class_label`; ``outcome`` one of stored, duplicate, replaced,
      rejected, out_of_resources, failed.
    - ``bytes_received`` counter ``fracnode_received_bytes_total``: dataset bytes of accepted
      C-STOREs (duplicates included).
    - ``store_seconds`` histogram ``fracnode_cstore_handling_seconds``: C-STORE handler time.
    - ``associations_active`` gauge ``fracnode_associations_active``.
    - ``associations_rejected`` counter ``fracnode_associations_rejected_total{reason}``:
      host, ae_title, called_ae, limit, connections (pending-connection cap), tls (handshake
      refused), timeout (request not complete within the ACSE timeout).
    - ``echoes`` counter ``fracnode_echoes_total``; ``pdu_aborts`` counter
      ``fracnode_pdu_aborts_total`` (declared PDU longer than negotiated).

    Studies (``node.assembly``, ``node.worker``):

    - ``studies_ready`` counter ``fracnode_studies_ready_total``.
    - ``studies_completed`` counter ``fracnode_studies_completed_total{group, outcome}``: one
      increment per group result of a processed study (a study with two groups counts in both);
      ``outcome`` is positive, possible, negative or not_analysed. The positive rate per group is
      the drift signal the alerts watch.
    - ``studies_prioritised`` counter ``fracnode_studies_prioritised_total{priority}``: one per
      processed study revision, by its decided priority.
    - ``priority_lowering_withheld`` counter
      ``fracnode_priority_lowering_withheld_total{priority}``: revisions whose lower priority was
      recorded but not pushed; ``priority`` is the one kept.
    - ``studies_not_analysed`` counter ``fracnode_studies_not_analysed_total{reason}``:
      ``reason`` in :data:`NOT_ANALYSED_REASONS`.
    - ``group_probability`` histogram ``fracnode_group_probability_ratio{group}``: calibrated
      probability of each analysed group (drift monitoring), buckets of 0.05.
    - ``stage_seconds`` histogram ``fracnode_stage_duration_seconds{stage}``: ``stage`` in
      :data:`STAGES` (decode, preprocess, inference, report, send).
    - ``processing_failures`` counter ``fracnode_processing_failures_total{stage}``.
    - ``inference_batch_images`` histogram ``fracnode_inference_batch_images``.
    - ``study_latency`` histogram ``fracnode_study_latency_seconds``: from the study being
      ready to the last result acknowledged by the last destination.
    - ``studies_failed`` counter ``fracnode_studies_failed_total``: studies given up after
      ``worker.max_attempts`` failed attempts (state failed, NOT ANALYSED on the worklist).

    Supervision (``node.supervision``):

    - ``thread_restarts`` counter ``fracnode_thread_restarts_total{component}``: dead or stuck
      worker, outbox or assembler threads replaced (``component`` worker, outbox, assembler).
    - ``leases_reaped`` counter ``fracnode_leases_reaped_total{kind}``: expired leases of a dead
      or hung holder (any process) put back in the queue, ``kind`` job or outbox.
    - ``destination_up`` gauge ``fracnode_destination_reachable_ratio{destination}``: 1 when the
      destination accepted a TCP connection at the last probe (every 15 s), else 0.

    Export (``node.outbox``; HL7 deliveries use the destination name ``hl7``):

    - ``exports`` counter ``fracnode_exports_total{destination, outcome}``: one per delivery
      attempt, ``outcome`` sent or failed.
    - ``export_retries`` counter ``fracnode_export_retries_total{destination}``: failed attempts
      scheduled again.
    - ``dead_letters`` counter ``fracnode_export_dead_letters_total{destination}``: deliveries
      given up after the last attempt.

    Set by :meth:`refresh` from values the node reads periodically from the database and disk:

    - ``queue_depth`` gauge ``fracnode_queue_jobs{state}``: processing jobs per state (pending,
      running, done, failed, dead, superseded; ``storage.repo.queue_depth``).
    - ``outbox_depth`` gauge ``fracnode_outbox_items{state}``: outbox items per state (pending,
      sending, delivered, dead; ``storage.repo.outbox_depth``).
    - ``spool_free_bytes`` / ``spool_capacity_bytes`` gauges ``fracnode_spool_free_bytes``,
      ``fracnode_spool_capacity_bytes``.
    - ``last_refresh`` gauge ``fracnode_last_refresh_timestamp_seconds``.

    HTTP API (``node.api``):

    - ``http_requests`` counter ``fracnode_http_requests_total{route, code}``: ``route`` is the
      route template (``/studies/{study_uid}``), ``other`` for unknown paths.

    Info: ``model_info`` ``fracnode_model_info{group, kind, name, version, device_uid}`` (set by
    :meth:`set_models`), ``build_info`` ``fracnode_build_info{version, python}``. With
    ``process=True`` the registry also holds the standard ``process_*`` and ``python_info``.
    """

    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        self.registry = registry
        r = registry
        self.instances_received = Counter(
            "fracnode_instances_received", "Instances received by C-STORE",
            ["sop_class", "outcome"], registry=r,
        )
        self.bytes_received = Counter(
            "fracnode_received_bytes", "Dataset bytes of accepted C-STOREs", registry=r
        )
        self.store_seconds = Histogram(
            "fracnode_cstore_handling_seconds", "Time to handle one C-STORE request",
            buckets=_SECONDS_FAST, registry=r,
        )
        self.associations_active = Gauge(
            "fracnode_associations_active", "DICOM associations open now", registry=r
        )
        self.associations_rejected = Counter(
            "fracnode_associations_rejected", "Associations refused", ["reason"], registry=r
        )
        self.echoes = Counter("fracnode_echoes", "C-ECHO requests answered", registry=r)
        self.pdu_aborts = Counter(
            "fracnode_pdu_aborts", "Associations aborted for a PDU longer than negotiated", registry=r
        )
        self.studies_ready = Counter(
            "fracnode_studies_ready", "Studies that became ready for processing", registry=r
        )
        self.studies_completed = Counter(
            "fracnode_studies_completed", "Group results of processed studies",
            ["group", "outcome"], registry=r,
        )
        self.studies_prioritised = Counter(
            "fracnode_studies_prioritised", "Processed study revisions by decided priority",
            ["priority"], registry=r,
        )
        self.priority_lowering_withheld = Counter(
            "fracnode_priority_lowering_withheld",
            "Revisions whose lower priority was recorded but not signalled", ["priority"], registry=r,
        )
        self.studies_not_analysed = Counter(
            "fracnode_studies_not_analysed", "Studies not analysed, by reason category",
            ["reason"], registry=r,
        )
        self.group_probability = Histogram(
            "fracnode_group_probability_ratio", "Calibrated fracture probability per analysed group",
            ["group"], buckets=_PROBABILITY, registry=r,
        )
        self.stage_seconds = Histogram(
            "fracnode_stage_duration_seconds", "Time spent in one pipeline stage",
            ["stage"], buckets=_SECONDS_STAGE, registry=r,
        )
        self.processing_failures = Counter(
            "fracnode_processing_failures", "Pipeline failures by stage", ["stage"], registry=r
        )
        self.studies_failed = Counter(
            "fracnode_studies_failed", "Studies given up after their last processing attempt",
            registry=r,
        )
        self.thread_restarts = Counter(
            "fracnode_thread_restarts", "Dead or stuck threads replaced by the supervisor",
            ["component"], registry=r,
        )
        self.leases_reaped = Counter(
            "fracnode_leases_reaped", "Expired leases of dead or hung holders put back in the queue",
            ["kind"], registry=r,
        )
        self.destination_up = Gauge(
            "fracnode_destination_reachable_ratio",
            "1 when the destination accepted a TCP connection at the last probe, else 0",
            ["destination"], registry=r,
        )
        self.inference_batch_images = Histogram(
            "fracnode_inference_batch_images", "Images per inference batch",
            buckets=_BATCH_IMAGES, registry=r,
        )
        self.study_latency = Histogram(
            "fracnode_study_latency_seconds", "From study ready to the last result acknowledged",
            buckets=_SECONDS_STUDY, registry=r,
        )
        self.exports = Counter(
            "fracnode_exports", "Delivery attempts by destination and outcome",
            ["destination", "outcome"], registry=r,
        )
        self.export_retries = Counter(
            "fracnode_export_retries", "Failed deliveries scheduled again", ["destination"], registry=r
        )
        self.dead_letters = Counter(
            "fracnode_export_dead_letters", "Deliveries given up after the last attempt",
            ["destination"], registry=r,
        )
        self.queue_depth = Gauge(
            "fracnode_queue_jobs", "Processing jobs by state", ["state"], registry=r
        )
        self.outbox_depth = Gauge(
            "fracnode_outbox_items", "Outbox deliveries by state", ["state"], registry=r
        )
        self.spool_free_bytes = Gauge(
            "fracnode_spool_free_bytes", "Free bytes on the spool's file system", registry=r
        )
        self.spool_capacity_bytes = Gauge(
            "fracnode_spool_capacity_bytes", "Size of the spool's file system", registry=r
        )
        self.last_refresh = Gauge(
            "fracnode_last_refresh_timestamp_seconds", "When the database gauges were last set",
            registry=r,
        )
        self.http_requests = Counter(
            "fracnode_http_requests", "HTTP API requests by route template and status code",
            ["route", "code"], registry=r,
        )
        self.model_info = Info(
            "fracnode_model", "Installed models", ["group", "kind"], registry=r
        )
        self.build_info = Info("fracnode_build", "fracnode build", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self._states: dict[int, set[str]] = {}

    # -- helpers that read better than the raw calls -------------------------------------------
    def observe_stage(self, stage: Stage, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown pipeline stage {stage!r}; one of {', '.join(STAGES)}")
        self.stage_seconds.labels(stage=stage).observe(seconds)

    @contextmanager
    def time_stage(self, stage: Stage) -> Iterator[None]:
        """Observe the time spent in the ``with`` block, also when it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.observe_stage(stage, time.perf_counter() - started)

    def observe_study(self, result: StudyResult) -> None:
        """Count a processed study revision: group outcomes, probabilities, priority."""
        for group in result.groups:
            self.studies_completed.labels(group=str(group.group), outcome=str(group.outcome)).inc()
            if group.probability is not None:
                self.group_probability.labels(group=str(group.group)).observe(group.probability)
        self.studies_prioritised.labels(priority=str(result.priority)).inc()

    def study_not_analysed(self, reason: NotAnalysedReason) -> None:
        if reason not in NOT_ANALYSED_REASONS:
            raise ValueError(f"unknown reason {reason!r}; one of {', '.join(NOT_ANALYSED_REASONS)}")
        self.studies_not_analysed.labels(reason=reason).inc()

    def export_attempt(self, destination: str, *, sent: bool, will_retry: bool = False) -> None:
        """Count one delivery attempt; a failure is either retried or dead-lettered."""
        self.exports.labels(destination=destination, outcome="sent" if sent else "failed").inc()
        if sent:
            return
        if will_retry:
            self.export_retries.labels(destination=destination).inc()
        else:
            self.dead_letters.labels(destination=destination).inc()

    def set_models(self, cards: Iterable[ModelCard]) -> None:
        for card in cards:
            group = str(card.group) if card.group is not None else "none"
            self.model_info.labels(group=group, kind=str(card.kind)).info(
                {"name": card.name, "version": card.version, "device_uid": card.device_uid}
            )

    def refresh(
        self,
        *,
        queue_depth: Mapping[str, int],
        outbox_depth: Mapping[str, int],
        spool_free_bytes: int,
        spool_capacity_bytes: int,
        now: float | None = None,
    ) -> None:
        """Set the gauges read from the database and disk. A state that was
        reported before and is absent now is set to 0 rather than left at its last value."""
        self._set_all(self.queue_depth, queue_depth)
        self._set_all(self.outbox_depth, outbox_depth)
        self.spool_free_bytes.set(spool_free_bytes)
        self.spool_capacity_bytes.set(spool_capacity_bytes)
        self.last_refresh.set(time.time() if now is None else now)

    def _set_all(self, gauge: Gauge, values: Mapping[str, int]) -> None:
        seen = self._states.setdefault(id(gauge), set())
        current = {str(key): value for key, value in values.items()}
        for state in seen - set(current):
            gauge.labels(state=state).set(0)
        for state, value in current.items():
            gauge.labels(state=state).set(value)
        seen.update(current)


_SUFFIXES: Final[dict[str, tuple[str, ...]]] = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def metric_names(metrics: Metrics) -> set[str]:
    """Every sample name the registry exposes, e.g. ``fracnode_exports_total`` and
    ``fracnode_stage_duration_seconds_bucket``, including metrics that have no sample yet."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names
