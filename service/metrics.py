"""Prometheus metrics of one server process (one process per device: see README, Deployment).

All metrics live in the app's own registry and are created with the app, so /metrics lists them
(with zero samples) before the first request. Times are in seconds with explicit buckets.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                   0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)

FAILURE_REASONS = ("bad_request", "queue_full", "uploads_full", "deadline_exceeded", "client_disconnected",
                   "inference_failed", "not_ready", "internal")


def _pow2_buckets(max_batch: int) -> tuple[float, ...]:
    out, b = [], 1
    while b < max_batch:
        out.append(float(b))
        b *= 2
    out.append(float(max_batch))
    return tuple(sorted(set(out)))


class Metrics:
    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = Histogram("uembed_request_seconds", "Time from request start to response, by "
                                         "status class", ["status"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("uembed_queue_wait_seconds", "Time an image waited in the queue before "
                                       "its batch started", buckets=LATENCY_BUCKETS, registry=r)
        self.decode_seconds = Histogram("uembed_decode_seconds", "Decode + preprocess time per image",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("uembed_inference_seconds", "Backend time per batch",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("uembed_batch_size", "Images per inference batch",
                                    buckets=_pow2_buckets(max_batch_size), registry=r)
        self.batch_fill = Histogram("uembed_batch_fill_ratio", "Batch size / max batch size",
                                    buckets=FILL_BUCKETS, registry=r)
        self.requests = Counter("uembed_requests", "Requests answered, by HTTP status", ["status"], registry=r)
        self.images = Counter("uembed_images", "Images embedded", registry=r)
        self.failures = Counter("uembed_failures", "Requests that failed, by reason", ["reason"], registry=r)
        self.dropped_images = Counter("uembed_dropped_images", "Queued images dropped before inference, by "
                                      "reason", ["reason"], registry=r)
        self.queue_depth = Gauge("uembed_queue_depth_images", "Images waiting for a batch", registry=r)
        self.in_flight = Gauge("uembed_requests_in_flight", "Requests being processed", registry=r)
        self.body_bytes = Gauge("uembed_body_bytes_in_flight", "Request body bytes held: being received, parsed "
                                "or decoded (bounded by max_body_bytes_in_flight)", registry=r)
        self.ready = Gauge("uembed_ready", "1 when the model is loaded, warmed up and the batcher alive",
                           registry=r)
        self.model_info = Info("uembed_model", "The served model", registry=r)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        for reason in ("deadline_exceeded", "client_disconnected", "inference_failed"):
            self.dropped_images.labels(reason)
        for status in ("2xx", "4xx", "5xx"):
            self.request_seconds.labels(status)
