"""Prometheus metrics for speech-to-text, served on BentoML's ``/metrics``.

BentoML runs prometheus_client in multiprocess mode with one directory shared by every worker of
every service, so series recorded in the model service (batches, load time) and in the API service
(requests, audio) all appear on the public ``/metrics``. Metric objects are created on first use,
after the worker has set ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import functools
import threading

# Long audio takes minutes: the default buckets (up to 10 s) would put every long request in +Inf.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
LIVE_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)
# A window on an idle model service waits about a millisecond; behind a busy one, a batch or more.
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)


class SttMetrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("openstt_requests_total", "Transcription/translation requests by outcome",
                                ["route", "model", "status"])
        self.audio_seconds = Counter("openstt_audio_seconds_total", "Seconds of audio transcribed",
                                     ["route", "model"])
        self.processing_seconds = Counter("openstt_processing_seconds_total",
                                          "Wall seconds spent on transcriptions (divide by audio seconds for RTF)",
                                          ["route", "model"])
        self.latency = Histogram("openstt_request_duration_seconds", "Request latency, upload to full response",
                                 ["route", "model"], buckets=LATENCY_BUCKETS)
        self.in_flight = Gauge("openstt_requests_in_flight", "Transcriptions admitted and not finished",
                               ["route"], multiprocess_mode="livesum")
        self.batch_windows = Histogram("openstt_batch_windows", "30 s windows decoded together in one batch",
                                       ["model"], buckets=BATCH_BUCKETS)
        self.window_queue_seconds = Histogram("openstt_window_queue_seconds",
                                              "Time a window waited in the model service before its batch started",
                                              ["model"], buckets=QUEUE_BUCKETS)
        # The autoscaling signals (README, "Scaling out"): work waiting in a model service, by model.
        self.queued_windows = Gauge("openstt_queued_windows", "Windows waiting in the model service", ["model"],
                                    multiprocess_mode="livesum")
        self.queued_audio_seconds = Gauge("openstt_queued_audio_seconds",
                                          "Seconds of audio in the windows waiting in the model service", ["model"],
                                          multiprocess_mode="livesum")
        self.batch_fill = Histogram("openstt_batch_fill_ratio", "Windows per batch over the largest batch allowed",
                                    buckets=FILL_BUCKETS)
        self.model_replicas = Gauge("openstt_model_replicas", "Model-service replicas of a split API, by the last "
                                    "probe's answer", ["state"], multiprocess_mode="livesum")
        self.replica_retries = Counter("openstt_model_replica_retries_total",
                                       "Calls retried on another model-service replica after theirs failed", ["api"])
        self.window_seconds = Histogram("openstt_batch_duration_seconds", "Time to decode one batch",
                                        ["model"], buckets=LATENCY_BUCKETS)
        self.model_load_seconds = Gauge("openstt_model_load_seconds", "Time its last load took (at startup or at runtime)",
                                        ["model"], multiprocess_mode="max")
        self.models_loaded = Gauge("openstt_models_loaded", "Models loaded in the model service",
                                   multiprocess_mode="livemax")
        self.model_unloads = Counter("openstt_model_unloads_total", "Models unloaded at runtime, by reason",
                                     ["model", "reason"])
        self.failures = Counter("openstt_decode_failures_total", "Requests refused or failed, by reason",
                                ["route", "reason"])
        self.diarization_seconds = Histogram("openstt_diarization_duration_seconds",
                                             "Time to diarize one request's audio (model service)",
                                             buckets=LATENCY_BUCKETS)
        self.diarization_audio_seconds = Counter("openstt_diarization_audio_seconds_total",
                                                 "Seconds of audio diarized")
        self.diarization_failures = Counter("openstt_diarization_failures_total",
                                            "Diarizations that failed in the model service")
        self.live_sessions = Gauge("openstt_live_sessions", "Live transcription sessions open (WebSocket)",
                                   multiprocess_mode="livesum")
        self.live_audio_seconds = Counter("openstt_live_audio_seconds_total",
                                          "Seconds of audio received by live transcription sessions")
        self.live_turns = Counter("openstt_live_turns_total", "Live transcription turns, by outcome", ["status"])
        self.live_turn_latency = Histogram("openstt_live_turn_latency_seconds",
                                           "From the end of a live turn's audio (speech stopped or commit) "
                                           "to its completed transcript", buckets=LIVE_LATENCY_BUCKETS)
        self.cancelled = Counter("openstt_requests_cancelled_total",
                                 "Transcriptions stopped because their client disconnected", ["route", "model"])


_created = threading.Lock()


@functools.cache
def _metrics() -> SttMetrics:
    return SttMetrics()


def metrics() -> SttMetrics:
    """The process's metrics, created once: two threads creating them at once would register every
    series twice (prometheus_client refuses that)."""
    with _created:
        return _metrics()
