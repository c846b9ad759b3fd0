"""`create_app(settings) -> FastAPI`: nothing is built at import time."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model_export.manifest import load_manifest
from service.api import embed, json_response, router
from service.backends import Backend, BackendError, load_backend
from service.batcher import Batcher
from service.config import Settings
from service.decode import ApiError
from service.executor import WarmThreadPool
from service.metrics import Metrics
from service.state import ServiceState
from uembed.preprocess import PreprocessSpec

log = logging.getLogger("uembed.service")

# Files each backend reads; only those (and the weights) are hashed at start.
BACKEND_FILES = {"onnxruntime": ["onnx"], "torchscript": ["torchscript"], "tensorrt": ["tensorrt"]}


def failure_reason(status: int, code: str) -> str:
    if code in ("queue_full", "uploads_full", "deadline_exceeded", "inference_failed", "not_ready"):
        return code
    if code == "shutting_down":
        return "not_ready"
    return "bad_request" if 400 <= status < 500 else "inference_failed"


def api_error_response(state: ServiceState, request: Request, err: ApiError) -> Response:
    """The JSON answer to an ApiError, counted by reason (the app's handler; RequestMiddleware for /embed)."""
    state.metrics.failures.labels(failure_reason(err.status, err.code)).inc()
    if err.status == 500:  # the model failed: one line per request, with the id its client sees
        log.error("request %s failed: %s", getattr(request.state, "request_id", None), err.detail,
                  exc_info=err.__cause__)  # the direct path's backend traceback; batches log theirs once
    body: dict[str, object] = {"error": err.code, "detail": err.detail}
    if err.index is not None:
        body["index"] = err.index
    return json_response(body, status=err.status, headers=err.headers)


REQUEST_ID_HEADER = b"x-request-id"
# What a client's own id may be: 1-128 visible ASCII characters (no spaces or controls, which would
# let it forge log lines or headers).
_CLIENT_REQUEST_ID = re.compile(rb"[!-~]{1,128}")


def request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's X-Request-ID when it is a sane one, else a new random id (32 hex digits)."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _CLIENT_REQUEST_ID.fullmatch(value):
                return value
            break
    return uuid.uuid4().hex.encode()


class RequestMiddleware:
    """Pure ASGI (no body copies), for every HTTP request: an X-Request-ID on the answer (the
    client's, or a new one; also `request.state.request_id` for log lines); for /embed, the end-to-end
    time and the count by status.

    POST /embed is answered here, by the route's own function (`service.api.embed`), instead of
    through the layers below: FastAPI's exception, exit-stack and body-limit middlewares, its
    router, the included router and the dependency resolution run on the event loop for every
    request; skipping them gained 1 to 3% at concurrency 1 (docs/service.md). Its ApiErrors
    get the app handler's answer (`api_error_response`); anything else propagates to Starlette's
    ServerErrorMiddleware, the app's 500 handler, as it does from the route. The route stays
    registered: it is what the OpenAPI schema documents, and any other path or method goes there."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope["headers"])
        scope.setdefault("state", {})["request_id"] = rid.decode()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, rid)]
            await send(message)

        if scope["path"] != "/embed":
            await self.app(scope, receive, send_wrapper)
            return
        metrics = self.state.metrics
        t0 = time.perf_counter()
        metrics.in_flight.inc()
        try:
            if scope["method"] == "POST":
                await self._embed(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)  # 405 from the router
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(str(status)).inc()
            metrics.request_seconds.labels(f"{status // 100}xx").observe(time.perf_counter() - t0)

    async def _embed(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await embed(request)
        except ApiError as err:
            response = api_error_response(self.state, request, err)
        await response(scope, receive, send)


def create_app(settings: Settings, backend: Backend | None = None) -> FastAPI:
    """The service. `backend` replaces the one the settings name (tests use a deterministic fake)."""
    state = ServiceState(settings, Metrics(settings.max_batch_size))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        verify = ["weights", *BACKEND_FILES.get(settings.backend, [])] if settings.verify_sha256 else False
        manifest = load_manifest(settings.model, verify=verify if backend is None else False)
        state.manifest = manifest
        state.spec = PreprocessSpec.from_dict(manifest.preprocess)
        state.backend = backend or load_backend(settings.backend, manifest, settings)
        if settings.max_batch_size > state.backend.max_batch_size:
            raise BackendError(f"max_batch_size {settings.max_batch_size} exceeds what the {state.backend.name} "
                               f"backend accepts ({state.backend.max_batch_size})")
        # Idle threads are reused last-in first-out (service/executor.py): a lone request stays on one thread.
        state.decode_pool = WarmThreadPool(settings.decode_threads, thread_name_prefix="uembed-decode")
        instances = min(settings.inference_instances, state.backend.max_instances)
        state.infer_pool = WarmThreadPool(instances, thread_name_prefix="uembed-infer")
        state.metrics.model_info.info({
            "name": manifest.name, "version": manifest.version, "dim": str(manifest.embedding_dim),
            "backend": state.backend.name, "precision": state.backend.precision, "device": state.backend.device,
            "weights_sha256": manifest.weights_sha256[:12]})
        if settings.warmup:
            size = state.spec.input_size
            for n in sorted({settings.max_batch_size, 1}):  # backends may keep a separate path for one image
                warm = np.zeros((n, 3, size, size), dtype=np.float32)
                state.infer_pool.submit(state.backend.warmup, warm).result()
        state.batcher = Batcher(
            state.backend.embed, max_batch=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000,
            max_queue_images=settings.max_queue_images, metrics=state.metrics, executor=state.infer_pool,
            embedding_dim=manifest.embedding_dim, instances=instances)
        state.batcher.start()
        state.ready = True
        state.metrics.ready.set(1)
        log.info("serving %s %s with %s on %s (%s)", manifest.name, manifest.version, state.backend.name,
                 state.backend.device, state.backend.precision)
        try:
            yield
        finally:
            state.ready = False
            state.draining = True
            state.metrics.ready.set(0)
            await state.batcher.close(settings.drain_timeout_s)
            state.infer_pool.shutdown(wait=True)
            state.decode_pool.shutdown(wait=True)

    app = FastAPI(
        title="uembed", version="1", lifespan=lifespan,
        summary="Unified visual embeddings: POST images to /embed, get float and binary embeddings.",
    )
    app.state.uembed = state
    app.include_router(router)
    app.add_middleware(RequestMiddleware, state=state)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> object:
        return api_error_response(state, request, err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> object:
        state.metrics.failures.labels("bad_request").inc()
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        return json_response({"error": "invalid_request", "detail": detail}, status=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> object:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return json_response({"error": code, "detail": str(err.detail)}, status=err.status_code,
                             headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> object:
        # Starlette answers unhandled errors from outside every middleware, so the id is set here.
        rid = getattr(request.state, "request_id", None)
        log.exception("unhandled error (request %s)", rid)
        state.metrics.failures.labels("internal").inc()
        return json_response({"error": "internal", "detail": f"{type(err).__name__}: {err}"}, status=500,
                             headers={"X-Request-ID": rid} if rid else None)

    return app
