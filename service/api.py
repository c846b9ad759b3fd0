"""HTTP routes: POST /embed, GET /healthz, /readyz, /v1/model, /metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncGenerator, Callable
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.batcher import Batcher
from service.decode import RAW_CONTENT_TYPES, ApiError
from service.encoding import OUTPUTS, encode
from service.state import ServiceState

router = APIRouter()
DEADLINE_HEADER = "x-request-timeout-ms"


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies on its thread
# pool, a thread hop per dependency per request.
async def get_state(request: Request) -> ServiceState:
    return request.app.state.uembed


def ready_batcher(state: ServiceState) -> Batcher:
    # Not `is_ready()`: while draining, uvicorn already refuses new connections, and a request that
    # reaches us was accepted before the signal, so it is answered.
    if state.batcher is None or not state.ready or not state.batcher.alive:
        raise ApiError(503, "not_ready", "the model is loading, the batcher stopped or the server is shutting down",
                       headers={"Retry-After": "1"})
    return state.batcher


def json_bytes(body: Any) -> bytes:
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_bytes(body), status_code=status, media_type="application/json", headers=headers)


# -- reading the payload ------------------------------------------------------------------------
async def read_body(request: Request, limit: int, take: Callable[[int], None]) -> bytes:
    """The body, at most `limit` bytes; `take` (UploadBudget.hold) is charged for it before it is
    read when its length is declared, so a full server answers 429 at once, else as it arrives."""
    declared = request.headers.get("content-length")
    charged = 0
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise ApiError(413, "request_too_large", f"the body is {declared} bytes; the limit is {limit}")
        charged = int(declared)
        take(charged)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "request_too_large", f"the body exceeds the limit of {limit} bytes")
        if size > charged:
            take(size - charged)
            charged = size
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body


async def parse_images(request: Request, body: bytes, max_images: int) -> list[bytes]:
    """The encoded images of a request, in order; ApiError for anything malformed."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; send an image, a multipart form or JSON")
    if ctype == "multipart/form-data":
        try:
            form = await MultiPartParser(request.headers, _once(body), max_files=max_images,
                                         max_fields=max_images + 16).parse()
        except MultiPartException as e:
            if "Too many files" in e.message:
                raise _too_many(max_images + 1, max_images) from None
            raise ApiError(400, "invalid_multipart", f"the multipart body cannot be parsed: {e.message}") from None
        try:
            blobs = []
            for key, value in form.multi_items():
                if key != "image":
                    raise ApiError(400, "invalid_multipart", f"unexpected form field {key!r}; send files as 'image'")
                if not isinstance(value, UploadFile):
                    raise ApiError(400, "invalid_multipart", "the 'image' field must be a file part "
                                   "(curl -F image=@photo.jpg), not a text field")
                blobs.append(await value.read())
        finally:
            await form.close()
        if not blobs:
            raise ApiError(400, "invalid_multipart",
                           "no form part could be read (check the boundary and the parts' headers)")
    elif ctype == "application/json":
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None
        images = payload.get("images") if isinstance(payload, dict) else None
        if not isinstance(images, list):
            raise ApiError(400, "invalid_json", 'expected {"images": ["<base64>", ...]}')
        if not images:
            raise ApiError(400, "no_images", '"images" is empty')
        if len(images) > max_images:
            raise _too_many(len(images), max_images)
        blobs = []
        for i, item in enumerate(images):
            if not isinstance(item, str):
                raise ApiError(400, "invalid_base64", "each image must be a base64 string", i).at(i)
            try:
                blobs.append(base64.b64decode(_strip_data_url(item), validate=True))
            except (binascii.Error, ValueError):
                raise ApiError(400, "invalid_base64", "not valid base64").at(i) from None
    elif ctype in RAW_CONTENT_TYPES or ctype == "":
        blobs = [body]
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"content type {ctype!r} is not accepted; send {', '.join(RAW_CONTENT_TYPES)}, "
                       "multipart/form-data or application/json")
    if len(blobs) > max_images:
        raise _too_many(len(blobs), max_images)
    return blobs


def _strip_data_url(text: str) -> str:
    if text.startswith("data:") and "," in text:
        return text.split(",", 1)[1]
    return text


def _too_many(n: int, limit: int) -> ApiError:
    return ApiError(413, "too_many_images", f"{n} images in one request; the limit is {limit}")


def _deadline(request: Request, state: ServiceState) -> float:
    settings = state.settings
    raw = request.headers.get(DEADLINE_HEADER)
    ms = settings.request_timeout_ms
    if raw is not None:
        try:
            ms = float(raw)
        except ValueError:
            raise ApiError(400, "invalid_timeout", f"{DEADLINE_HEADER} must be a number of milliseconds") from None
        if not 0 < ms <= settings.max_request_timeout_ms:
            raise ApiError(400, "invalid_timeout",
                           f"{DEADLINE_HEADER} must be in (0, {settings.max_request_timeout_ms:g}]")
    return time.monotonic() + ms / 1000.0


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- routes -------------------------------------------------------------------------------------
# Every error /embed answers, by status: the OpenAPI schema lists them, and a test checks that
# each ApiError the service can raise is here.
ERROR_CODES: dict[int, tuple[str, ...]] = {
    400: ("empty_body", "empty_image", "not_an_image", "truncated_image", "corrupt_image", "invalid_json",
          "invalid_base64", "invalid_multipart", "no_images", "unknown_output", "invalid_timeout"),
    408: ("body_timeout",),
    413: ("request_too_large", "image_too_large", "too_many_pixels", "too_many_images"),
    415: ("unsupported_media_type",),
    429: ("queue_full", "uploads_full"),
    500: ("inference_failed", "internal"),
    503: ("not_ready", "shutting_down"),
    504: ("deadline_exceeded",),
}
_ERROR_SCHEMA = {"type": "object", "required": ["error", "detail"], "properties": {
    "error": {"type": "string", "description": "machine-readable code"},
    "detail": {"type": "string", "description": "what is wrong, for a person"},
    "index": {"type": "integer", "description": "the offending image of a multi-image request"}}}
_EMBEDDING_SCHEMA = {"type": "object", "properties": {
    "float": {"type": "array", "items": {"type": "number"}, "description": "D floats, L2-normalized"},
    "binary": {"type": "string", "format": "byte",
               "description": "the D sign bits (1 where float > 0), packed MSB-first as numpy.packbits"}}}
_HEADER = {"schema": {"type": "string"}}
EMBED_OPENAPI: dict[str, Any] = {
    "parameters": [{
        "name": "output", "in": "query", "required": False,
        "description": "float | binary | both: which form of each embedding the answer carries",
        "schema": {"type": "string", "enum": list(OUTPUTS), "default": "both"},
    }, {
        "name": DEADLINE_HEADER, "in": "header", "required": False,
        "description": "this request's deadline in milliseconds (the server's default otherwise); 504 after it",
        "schema": {"type": "number"},
    }, {
        "name": "x-request-id", "in": "header", "required": False,
        "description": "your id for this request, echoed in the answer's X-Request-ID (1-128 visible ASCII "
                       "characters; otherwise the server makes one)",
        "schema": {"type": "string"},
    }],
    "responses": {
        "200": {
            "description": "The embeddings in input order, with the model's provenance",
            "headers": {"X-Request-ID": _HEADER, "X-Queue-Time": _HEADER, "X-Inference-Time": _HEADER,
                        "X-Decode-Time": _HEADER},  # the times in milliseconds
            "content": {"application/json": {"schema": {"type": "object", "properties": {
                "model": {"type": "string"}, "version": {"type": "string"}, "dim": {"type": "integer"},
                "backend": {"type": "string"}, "precision": {"type": "string"},
                "weights_sha256": {"type": "string"},
                "embeddings": {"type": "array", "items": _EMBEDDING_SCHEMA}}}}},
        },
        **{str(status): {"description": "error: " + ", ".join(codes),
                         "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
           for status, codes in ERROR_CODES.items()},
    },
    "requestBody": {"required": True, "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_CONTENT_TYPES},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {"type": "object", "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}}}}},
    }},
}


# /embed takes only the Request: FastAPI's dependency and parameter resolution cost more of the
# event loop's time per request than the rest of the route together (py-spy at concurrency 1), so
# the state, the readiness check and `output` are read directly; EMBED_OPENAPI documents them.
@router.post("/embed", summary="Embed one or more images", response_class=Response, openapi_extra=EMBED_OPENAPI)
async def embed(request: Request) -> Response:
    state: ServiceState = request.app.state.uembed
    batcher = ready_batcher(state)
    output = request.query_params.get("output", "both")
    if output not in OUTPUTS:
        raise ApiError(400, "unknown_output", f"output must be one of {', '.join(OUTPUTS)}, not {output!r}")
    deadline = _deadline(request, state)
    with state.uploads.hold() as take:  # the body's bytes count against the budget until the answer
        return await _embed(request, state, batcher, output, deadline, take)


async def _embed(request: Request, state: ServiceState, batcher: Batcher, output: str, deadline: float,
                 take: Callable[[int], None]) -> Response:
    settings = state.settings
    try:
        # A client trickling its body must not hold a connection and a coroutine for ever (slowloris).
        async with asyncio.timeout(settings.body_timeout_s):
            body = await read_body(request, settings.max_request_bytes, take)
    except ClientDisconnect:  # left mid-upload (a phone losing signal): a disconnect, not a server error
        state.client_gone()
        return Response(status_code=499)
    except TimeoutError:
        raise ApiError(408, "body_timeout",
                       f"the request body did not arrive within {settings.body_timeout_s:g} s") from None
    blobs = await parse_images(request, body, settings.max_images_per_request)
    del body

    if len(blobs) == 1 and (contended := batcher.claim_direct()) is not None:
        return await _direct(state, batcher, blobs[0], deadline, output, contended)

    if await request.is_disconnected():
        state.client_gone()
        return Response(status_code=499)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    batcher.begin_decode()
    try:
        decoded = await asyncio.gather(
            *(loop.run_in_executor(state.decode_pool, state.decode_one, b) for b in blobs), return_exceptions=True)
        for i, result in enumerate(decoded):
            if isinstance(result, ApiError):
                raise result.at(i) if len(blobs) > 1 else result
            if isinstance(result, BaseException):
                raise result
        images = np.stack(decoded)  # type: ignore[arg-type]
        decode_seconds = time.perf_counter() - t0
        if await request.is_disconnected():
            state.client_gone()
            return Response(status_code=499)
        job = batcher.submit(images, deadline)
    finally:
        batcher.end_decode()
    done = await _wait(request, job.future, deadline)
    if job.future not in done:
        job.cancel("client_disconnected" if done else "deadline_exceeded")
        return _gave_up(state, bool(done))
    embeddings = job.future.result()  # raises the batch's ApiError (500, 504) if it failed
    return _answer(state, _answer_body(state, embeddings, output), embeddings.shape[0], job.queue_seconds,
                   job.inference_seconds, decode_seconds)


async def _wait(request: Request, future: asyncio.Future[Any], deadline: float) -> set[asyncio.Future[Any]]:
    """Wait for `future`, the client going away or the deadline; returns the set of what finished
    other than the future: {watcher} when the client left, empty on the deadline."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({future, watcher}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    return {future} if future in done else ({watcher} if watcher in done else set())


def _gave_up(state: ServiceState, client_left: bool) -> Response:
    if client_left:
        state.client_gone()
        return Response(status_code=499)
    raise ApiError(504, "deadline_exceeded", "the request did not finish before its deadline")


async def _direct(state: ServiceState, batcher: Batcher, blob: bytes, deadline: float, output: str,
                  contended: bool) -> Response:
    """The direct path (Batcher.claim_direct, which the caller made): decode, embed and encode the
    answer of one image in one hop on the inference instance it claimed, so the event loop only
    parses and sends. The claim is released when that work ends, not when the request gives up.

    Same errors, deadline and metrics as the batched path, with one difference: no watch for a
    client that leaves. The work starts at once on an idle instance and cannot be aborted once
    started, so a watcher task would only cost the event loop time on every request (py-spy at
    concurrency 1); an answer to a client that left is dropped by uvicorn."""
    assert state.backend is not None
    backend, dim = state.backend, batcher.embedding_dim
    alone = not contended and state.alone()
    # One client connection: nothing else can decode meanwhile, so a decode thread may take part of
    # this image's decoding (service/decode.py, TopBand), where no backend thread spins on that core,
    # unless clients came and went a moment ago: a newcomer then waits for the cores the split holds.
    helper = (state.decode_pool if alone and state.settings.split_decode_when_alone
              and backend.spare_core_when_alone and state.alone_for(state.settings.split_decode_after_alone_s)
              else None)
    run_alone = alone and state.settings.quiet_when_alone

    def work() -> tuple[bytes, float, float]:
        t0 = time.perf_counter()
        x = state.decode_one(blob, helper)
        t1 = time.perf_counter()
        try:
            out = np.asarray(backend.embed_alone(x[None]) if run_alone else backend.embed(x[None], contended),
                             dtype=np.float32)
        except Exception as e:
            raise ApiError(500, "inference_failed", f"the model failed on this image: {type(e).__name__}: {e}") from e
        t2 = time.perf_counter()
        if out.shape != (1, dim):
            raise ApiError(500, "inference_failed", f"the backend returned {out.shape}")
        return _answer_body(state, out, output), t1 - t0, t2 - t1

    if run_alone:
        # One client connection: its requests come strictly one at a time, so the backend may keep
        # its threads awake for the next one at once (--quiet-when-alone).
        backend.note_sequential()
    loop = asyncio.get_running_loop()
    try:
        running = state.infer_pool.submit(work)
    except BaseException:
        batcher.release_direct()
        raise
    running.add_done_callback(lambda _: loop.call_soon_threadsafe(batcher.release_direct))
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            body, decode_seconds, inference_seconds = await asyncio.wrap_future(running)
    except TimeoutError:
        return _gave_up(state, client_left=False)  # raises the 504
    state.metrics.queue_seconds.observe(0.0)
    batcher.observe_batch(1, inference_seconds)
    return _answer(state, body, 1, 0.0, inference_seconds, decode_seconds)


def _answer_body(state: ServiceState, embeddings: np.ndarray, output: str) -> bytes:
    """The 200 answer's JSON: provenance and the embeddings in `output` form."""
    assert state.manifest is not None and state.backend is not None
    return json_bytes({
        "model": state.manifest.name, "version": state.manifest.version, "dim": state.manifest.embedding_dim,
        "backend": state.backend.name, "precision": state.backend.precision,
        "weights_sha256": state.manifest.weights_sha256[:12],
        "embeddings": encode(embeddings, output),  # type: ignore[arg-type]
    })


def _answer(state: ServiceState, body: bytes, images: int, queue_s: float, inference_s: float,
            decode_s: float) -> Response:
    state.metrics.images.inc(images)
    headers = {
        "X-Queue-Time": f"{queue_s * 1000:.3f}",
        "X-Inference-Time": f"{inference_s * 1000:.3f}",
        "X-Decode-Time": f"{decode_s * 1000:.3f}",
    }
    return Response(body, media_type="application/json", headers=headers)


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Response:
    return json_response({"status": "alive"})


@router.get("/readyz", summary="Readiness: model loaded, warmed up, batcher alive")
async def readyz(state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    ready = state.is_ready()
    body = {"ready": ready, "batcher_alive": state.batcher is not None and state.batcher.alive,
            "draining": state.draining}
    return json_response(body, status=200 if ready else 503)


@router.get("/v1/model", summary="The served model and the server's limits")
async def model_info(state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    if state.manifest is None or state.backend is None:
        raise ApiError(503, "not_ready", "the model is still loading", headers={"Retry-After": "1"})
    s = state.settings
    m = state.manifest
    return json_response({
        "model": m.name, "version": m.version, "dim": m.embedding_dim,
        "weights_sha256": m.weights_sha256, "trunk": m.data["model"].get("trunk"),
        "preprocess": m.preprocess, "binary": m.data.get("binary"),
        "backend": state.backend.health(), "parity": m.parity,
        "limits": {
            "max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms, "max_queue_images": s.max_queue_images,
            "request_timeout_ms": s.request_timeout_ms, "max_request_timeout_ms": s.max_request_timeout_ms,
            "body_timeout_s": s.body_timeout_s,
            "max_images_per_request": s.max_images_per_request, "max_image_bytes": s.max_image_bytes,
            "inference_instances": state.batcher.instances if state.batcher else s.inference_instances,
            "max_request_bytes": s.max_request_bytes, "max_image_pixels": s.max_image_pixels,
            "max_body_bytes_in_flight": s.max_body_bytes_in_flight,
        },
    })


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=True)
async def metrics(state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    state.metrics.ready.set(1 if state.is_ready() else 0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
