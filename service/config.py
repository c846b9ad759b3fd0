"""Server settings: one class, each field an environment variable (UEMBED_<NAME>) and a CLI flag
(--name-with-dashes) whose help text is the field's description. Built in `main()` and passed
down; nothing reads the environment at import time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UEMBED_", extra="forbid", frozen=True)

    model: str = Field("models/default", description="artifact directory written by `uembed export`")
    backend: Literal["onnxruntime", "torchscript", "tensorrt"] = Field(
        "onnxruntime", description="inference backend: onnxruntime (CPU; CUDA/TensorRT providers when present), "
        "torchscript (CPU; CUDA fp16), tensorrt (engine file, CUDA)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu", description="cpu, cuda, or auto (cuda when a GPU is visible)")
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8080, ge=1, le=65535, description="port to listen on")
    max_batch_size: int = Field(16, ge=1, le=1024, description="most images in one inference batch")
    max_wait_ms: float = Field(
        4.0, ge=0, le=1000, description="longest time the first image of a batch waits for others to join it")
    max_queue_images: int = Field(
        256, ge=1, description="queued images (all requests) above which new requests get 429 at once")
    request_timeout_ms: float = Field(
        10_000, gt=0, description="default per-request deadline; a request header X-Request-Timeout-Ms may "
        "shorten or lengthen it up to max_request_timeout_ms")
    max_request_timeout_ms: float = Field(60_000, gt=0, description="largest deadline a client may ask for")
    body_timeout_s: float = Field(
        30.0, gt=0, description="longest a request body may take to arrive; a slower or stalled upload gets 408 "
        "(apart from the deadline, which bounds the work: a busy server reading late is not a slow client)")
    max_images_per_request: int = Field(32, ge=1, description="most images in one request")
    max_image_bytes: int = Field(16 << 20, ge=1024, description="largest encoded image, bytes")
    max_request_bytes: int = Field(64 << 20, ge=1024, description="largest request body, bytes")
    max_body_bytes_in_flight: int = Field(
        256 << 20, ge=1024, description="request bodies held at once across all requests (being received, parsed "
        "or decoded), bytes; a request that would pass it gets 429 uploads_full at once, so many large uploads "
        "cannot grow the process past its memory limit")
    max_image_pixels: int = Field(
        50_000_000, ge=64, description="largest decoded image, width x height (decompression-bomb guard)")
    decode_threads: int = Field(2, ge=1, le=64, description="threads decoding and preprocessing images")
    intra_op_threads: int = Field(
        1, ge=0, description="inference threads per batch for CPU backends (0: all physical cores). One leaves "
        "the other cores to decoding, which bounds throughput under load")
    solo_intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime on CPU: threads for a batch that runs while no other request is "
        "decoding or queued, where latency is what counts (0: all physical cores)")
    intra_op_spinning: bool = Field(
        False, description="let ONNX Runtime threads of contended batches busy-wait between ops (steals CPU "
        "from decoding under load)")
    solo_intra_op_spinning: bool = Field(
        True, description="let ONNX Runtime threads of uncontended batches busy-wait between ops (lower "
        "latency; a request arriving meanwhile decodes slower)")
    inference_instances: int = Field(
        2, ge=1, le=16, description="batches that may run in the backend at once (CPU: several small "
        "batches on one thread each use the cores better than one batch at a time; capped by what the "
        "backend allows: tensorrt 1)")
    solo_spin_only_in_run: bool = Field(
        True, description="stop the uncontended session's spinning threads the moment a run returns (ONNX "
        "Runtime's session.force_spinning_stop): they spin between ops, not into the next request's decoding")
    quiet_spin_after_s: float = Field(
        1.0, ge=0, description="onnxruntime on CPU, with solo_spin_only_in_run: after this many seconds without "
        "a contended batch (requests one at a time), lone images run on a session whose threads keep spinning "
        "after the run, so back-to-back requests find them awake (0: never, and no third session in memory)")
    quiet_idle_priority: bool = Field(
        False, description="onnxruntime on CPU, Linux, with quiet_when_alone, for a process that may not give a "
        "thread its priority back (see quiet_idle_between_runs): while one client connection is open, "
        "lone images run on a fourth session whose spinning pool threads run at idle priority (SCHED_IDLE), so a "
        "decode thread can take their core (split_decode_when_alone). About 2 to 6% more images/s at concurrency 1 "
        "on the 2-core bench machine, but when a second client comes and goes the first one's slowest requests "
        "got slower (up to 0.14 s against 0.05 s; docs/service.md), so off by default")
    quiet_idle_between_runs: bool = Field(
        True, description="onnxruntime on CPU, Linux, where the process may give a thread its priority back "
        "(CAP_SYS_NICE, as root, or an RLIMIT_NICE of 20; elsewhere it does not apply, and says so in the log): "
        "the quiet session's pool threads spin between runs at idle priority (SCHED_IDLE), giving their core at "
        "once to any thread that wants it (the next request's parsing and decoding, split_decode_when_alone), "
        "and run at their own priority")
    quiet_when_alone: bool = Field(
        True, description="onnxruntime on CPU: while one client connection is open (its requests come strictly one "
        "at a time), lone images run on the quiet session at once, without waiting quiet_spin_after_s")
    split_decode_when_alone: bool = Field(
        True, description="while one client connection is open (nothing else can run), decode a large baseline "
        "JPEG on two threads: a decode thread takes its first rows and resizes them while the request's own "
        "thread decodes the rest; the same array to the bit, a lone request's answer sooner. Only where no "
        "backend thread spins after a run at normal priority: GPU backends; onnxruntime on CPU with "
        "quiet_idle_between_runs where it applies (CAP_SYS_NICE), with quiet_idle_priority, or without the "
        "quiet session")
    split_decode_after_alone_s: float = Field(
        1.0, ge=0, description="split_decode_when_alone only after this many seconds without a second client "
        "connection: where clients come and go beside a sequential one, a newcomer waited for the cores a split "
        "held (the sequential client got 0.926 of the naive server's requests/s with the split, 0.990 without; "
        "docs/service.md)")
    drain_timeout_s: float = Field(
        20.0, ge=0, description="on SIGTERM, how long queued and in-flight requests may take to finish")
    cache_dir: str = Field(
        "", description="writable folder for ONNX Runtime's TensorRT engine and timing caches on GPUs "
        "(default: MODEL/.ort-cache; set it when the model folder is read-only)")
    verify_sha256: bool = Field(True, description="verify the artifact files' sha256 at start")
    warmup: bool = Field(True, description="run a batch of max_batch_size before reporting ready")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="uvicorn log level")
    access_log: bool = Field(False, description="log every request (uvicorn access log)")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_queue_images < self.max_batch_size:
            raise ValueError(f"max_queue_images ({self.max_queue_images}) must be >= max_batch_size "
                             f"({self.max_batch_size})")
        if self.max_image_bytes > self.max_request_bytes:
            raise ValueError("max_image_bytes must be <= max_request_bytes")
        if self.max_request_bytes > self.max_body_bytes_in_flight:
            raise ValueError("max_request_bytes must be <= max_body_bytes_in_flight")
        if self.request_timeout_ms > self.max_request_timeout_ms:
            raise ValueError("request_timeout_ms must be <= max_request_timeout_ms")
        return self
