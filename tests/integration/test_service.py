"""The service over real HTTP: a real uvicorn server on 127.0.0.1, real encoded images."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.config import Settings
from tests.service_helpers import (
    EchoBackend,
    ServerThread,
    echo_value,
    encode_image,
    grey_value,
    photo,
    solid,
    wait_until,
)

CPU_BACKENDS = ["onnxruntime", "torchscript"]
SNAPSHOT = Path(__file__).with_name("openapi_snapshot.json")


def settings(artifact: Path, **kw: Any) -> Settings:
    base = {"model": str(artifact), "max_batch_size": 4, "max_wait_ms": 10.0, "decode_threads": 2}
    return Settings(**(base | kw))


@pytest.fixture(scope="module", params=CPU_BACKENDS)
def real(request: pytest.FixtureRequest, tiny_artifact: Path) -> Iterator[ServerThread]:
    with ServerThread(create_app(settings(tiny_artifact, backend=request.param))) as server:
        yield server


def vectors(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    return np.array([e["float"] for e in resp.json()["embeddings"]], dtype=np.float32)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


# -- real model, every CPU backend ---------------------------------------------------------------
def test_every_input_form_gives_the_same_embedding(real: ServerThread) -> None:
    img = Image.open(__import__("io").BytesIO(photo(7, size=(80, 60), fmt="PNG"))).convert("RGB")
    forms = {fmt: encode_image(img, fmt) for fmt in ("PNG", "BMP", "TIFF", "GIF")}
    ref = vectors(httpx.post(f"{real.url}/embed", content=forms["PNG"], headers={"content-type": "image/png"}))
    assert ref.shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    for fmt, ctype in (("BMP", "image/bmp"), ("TIFF", "image/tiff")):  # lossless: identical input pixels
        got = vectors(httpx.post(f"{real.url}/embed", content=forms[fmt], headers={"content-type": ctype}))
        np.testing.assert_allclose(got, ref, atol=1e-5)
    octet = vectors(httpx.post(f"{real.url}/embed", content=forms["PNG"],
                               headers={"content-type": "application/octet-stream"}))
    np.testing.assert_allclose(octet, ref, atol=1e-5)
    multi = vectors(httpx.post(f"{real.url}/embed", files=[("image", ("a.png", forms["PNG"], "image/png")),
                                                           ("image", ("b.gif", forms["GIF"], "image/gif"))]))
    assert multi.shape == (2, 32)
    np.testing.assert_allclose(multi[0], ref[0], atol=1e-5)
    js = vectors(httpx.post(f"{real.url}/embed", json={"images": [base64.b64encode(forms["PNG"]).decode()]}))
    np.testing.assert_allclose(js, ref, atol=1e-5)
    for fmt, ctype in (("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("AVIF", "image/avif"), ("HEIF", "image/heic")):
        lossy = vectors(httpx.post(f"{real.url}/embed", content=encode_image(img, fmt, quality=95),
                                   headers={"content-type": ctype}))
        assert float(lossy[0] @ ref[0]) > 0.95


def test_binary_is_the_packed_sign_of_float_and_provenance_is_there(real: ServerThread) -> None:
    resp = httpx.post(f"{real.url}/embed", content=photo(8))
    body = resp.json()
    assert body["dim"] == 32 and body["model"] == "tiny" and body["version"].startswith("s3-")
    assert body["backend"] in CPU_BACKENDS and body["precision"] == "fp32" and len(body["weights_sha256"]) == 12
    vec = np.array(body["embeddings"][0]["float"])
    bits = np.unpackbits(np.frombuffer(base64.b64decode(body["embeddings"][0]["binary"]), dtype=np.uint8))
    np.testing.assert_array_equal(bits[:32], (vec > 0).astype(np.uint8))
    for header in ("x-queue-time", "x-inference-time"):
        assert float(resp.headers[header]) >= 0
    only_bin = httpx.post(f"{real.url}/embed?output=binary", content=photo(8)).json()["embeddings"][0]
    only_float = httpx.post(f"{real.url}/embed?output=float", content=photo(8)).json()["embeddings"][0]
    assert set(only_bin) == {"binary"} and set(only_float) == {"float"}


def test_a_request_spanning_batches_comes_back_in_order(real: ServerThread) -> None:
    images = [photo(100 + i) for i in range(11)]  # max_batch_size 4: at least 3 batches
    alone = np.concatenate([vectors(httpx.post(f"{real.url}/embed", content=b)) for b in images])
    together = vectors(httpx.post(f"{real.url}/embed", files=[("image", (f"{i}.jpg", b, "image/jpeg"))
                                                               for i, b in enumerate(images)]))
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_concurrent_requests_are_batched(real: ServerThread) -> None:
    before_count = metric(real.url, "uembed_batch_size_count")
    before_sum = metric(real.url, "uembed_batch_size_sum")
    with httpx.Client() as client, ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda i: client.post(f"{real.url}/embed", content=photo(i)).status_code, range(48)))
    assert codes == [200] * 48
    batches = metric(real.url, "uembed_batch_size_count") - before_count
    images = metric(real.url, "uembed_batch_size_sum") - before_sum
    assert images == 48 and batches < 48  # several images shared a forward pass


def test_health_model_and_metrics(real: ServerThread) -> None:
    assert httpx.get(f"{real.url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{real.url}/readyz").json()["ready"] is True
    info = httpx.get(f"{real.url}/v1/model").json()
    assert info["dim"] == 32 and info["limits"]["max_batch_size"] == 4 and info["preprocess"]["input_size"] == 32
    text = httpx.get(f"{real.url}/metrics").text
    for name in ("uembed_request_seconds_bucket", "uembed_queue_wait_seconds_bucket", "uembed_decode_seconds_bucket",
                 "uembed_inference_seconds_bucket", "uembed_batch_size_bucket", "uembed_batch_fill_ratio_bucket",
                 "uembed_queue_depth_images", "uembed_requests_in_flight", "uembed_model_info", 'reason="queue_full"'):
        assert name in text, name


def test_metrics_exist_before_the_first_request(tiny_artifact: Path) -> None:
    with ServerThread(create_app(settings(tiny_artifact))) as server:
        text = httpx.get(f"{server.url}/metrics").text
    assert "uembed_request_seconds_bucket" in text and "uembed_failures_total" in text
    assert 'uembed_model_info{' in text and "uembed_ready 1.0" in text


def test_openapi_matches_the_snapshot(real: ServerThread) -> None:
    spec = httpx.get(f"{real.url}/openapi.json").json()
    shape = {path: {method: {"summary": op.get("summary"),
                             "parameters": sorted(p["name"] for p in op.get("parameters", []))}
                    for method, op in ops.items()} for path, ops in spec["paths"].items()}
    assert shape == json.loads(SNAPSHOT.read_text())
    assert httpx.get(f"{real.url}/docs").status_code == 200


def test_openapi_lists_every_error_the_service_can_answer(real: ServerThread) -> None:
    from service.api import ERROR_CODES

    root = Path(__file__).resolve().parents[2] / "service"
    raised = {(int(status), code) for f in root.rglob("*.py")
              for status, code in re.findall(r'ApiError\(\s*(\d{3}),\s*"([a-z0-9_]+)"', f.read_text())}
    raised.add((500, "internal"))  # the unhandled-error handler's answer (service/app.py)
    assert len(raised) >= 20
    documented = {(status, code) for status, codes in ERROR_CODES.items() for code in codes}
    assert raised == documented, (raised - documented, documented - raised)
    responses = httpx.get(f"{real.url}/openapi.json").json()["paths"]["/embed"]["post"]["responses"]
    for status, code in raised:
        answer = responses[str(status)]
        assert code in answer["description"], (status, code)
        assert answer["content"]["application/json"]["schema"]["required"] == ["error", "detail"]
    ok = responses["200"]
    assert "X-Request-ID" in ok["headers"] and "embeddings" in ok["content"]["application/json"]["schema"]["properties"]


# -- deterministic fake backend: errors, overload, deadlines ------------------------------------------
def echo_app(artifact: Path, backend: EchoBackend, **kw: Any):
    return create_app(settings(artifact, **kw), backend=backend)


def _bad_inputs(max_image_bytes: int) -> list[tuple[str, dict[str, Any], int, str]]:
    good = solid(100)
    return [
        ("empty body", {"content": b""}, 400, "empty_body"),
        ("not an image", {"content": b"plain text, not pixels"}, 400, "not_an_image"),
        ("truncated", {"content": photo(1, fmt="PNG")[:150]}, 400, "truncated_image"),
        ("unsupported type", {"content": good, "headers": {"content-type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ("request too large", {"content": b"x" * 300_000}, 413, "request_too_large"),
        ("image too large", {"content": photo(2, size=(600, 600), fmt="BMP")[: max_image_bytes + 10]}, 413,
         "image_too_large"),
        ("too many pixels", {"content": encode_image(Image.new("1", (3000, 3000)), "PNG")}, 413, "too_many_pixels"),
        ("bad base64", {"json": {"images": [base64.b64encode(good).decode(), "%%%"]}}, 400, "invalid_base64"),
        ("malformed json", {"content": b'{"images": [', "headers": {"content-type": "application/json"}}, 400,
         "invalid_json"),
        ("json without images", {"json": {"pictures": []}}, 400, "invalid_json"),
        ("empty image list", {"json": {"images": []}}, 400, "no_images"),
        ("malformed multipart", {"content": b"--x\r\nnonsense", "headers": {
            "content-type": "multipart/form-data; boundary=x"}}, 400, "invalid_multipart"),
        ("wrong form field", {"files": [("photo", ("a.png", good, "image/png"))]}, 400, "invalid_multipart"),
        ("image sent as a text field", {"data": {"image": "\u20ac not bytes"}, "files": [
            ("other", ("x.txt", b"x", "text/plain"))]}, 400, "invalid_multipart"),
        ("too many images", {"files": [("image", (f"{i}.png", good, "image/png")) for i in range(6)]}, 413,
         "too_many_images"),
        ("one bad image of three", {"files": [("image", ("a.png", good, "image/png")),
                                              ("image", ("b.png", b"junk", "image/png")),
                                              ("image", ("c.png", good, "image/png"))]}, 400, "not_an_image"),
        ("unknown output", {"content": good, "params": {"output": "hex"}}, 400, "unknown_output"),
        ("bad deadline header", {"content": good, "headers": {"x-request-timeout-ms": "soon"}}, 400,
         "invalid_timeout"),
        ("empty image in a form", {"files": [("image", ("a.png", b"", "image/png"))]}, 400, "empty_image"),
    ]


def test_bad_inputs_get_clear_4xx_and_the_server_keeps_answering(tiny_artifact: Path) -> None:
    backend = EchoBackend(32)
    cases = _bad_inputs(max_image_bytes=100_000)
    with ServerThread(echo_app(tiny_artifact, backend, max_images_per_request=5, max_request_bytes=200_000,
                               max_image_bytes=100_000, max_image_pixels=4_000_000)) as server, httpx.Client() as c:
        for name, kwargs, status, code in cases:
            kwargs = dict(kwargs)
            params = kwargs.pop("params", None)
            resp = c.post(f"{server.url}/embed", params=params, **kwargs)
            assert resp.status_code == status, (name, resp.text)
            body = resp.json()
            assert body["error"] == code and body["detail"], (name, body)
            if name in ("bad base64", "one bad image of three"):
                assert body["index"] == 1 and "image 1" in body["detail"], body
            level = (7 * len(name)) % 250  # a different good image after each case
            ok = c.post(f"{server.url}/embed", content=solid(level))
            assert ok.status_code == 200, (name, ok.text)
            assert echo_value(ok.json()["embeddings"][0]["float"]) == pytest.approx(grey_value(level), abs=1e-4)
        assert metric(server.url, 'uembed_failures_total{reason="bad_request"}') == len(cases)
    assert len(cases) >= 12


def test_every_answer_carries_a_request_id(tiny_artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = echo_app(tiny_artifact, EchoBackend(32))

    @app.get("/boom", include_in_schema=False)
    async def boom() -> None:  # a bug: an error no handler foresaw
        raise RuntimeError("kaboom")

    with ServerThread(app) as server, httpx.Client() as c:
        ours = [c.post(f"{server.url}/embed", content=solid(9)), c.post(f"{server.url}/embed", content=b"junk"),
                c.get(f"{server.url}/healthz"), c.get(f"{server.url}/nope")]
        assert [r.status_code for r in ours] == [200, 400, 200, 404]
        ids = [r.headers["x-request-id"] for r in ours]
        assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids), ids
        for unusable in ("x" * 129, "two words"):  # replaced, never refused
            r = c.post(f"{server.url}/embed", content=solid(9), headers={"x-request-id": unusable})
            assert r.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
        theirs = "Checkout-7F3a:42"
        # /boom last: uvicorn closes the connection after an unhandled error.
        for r in (c.post(f"{server.url}/embed", content=solid(9), headers={"x-request-id": theirs}),
                  c.post(f"{server.url}/embed", content=b"", headers={"x-request-id": theirs}),
                  c.get(f"{server.url}/boom", headers={"x-request-id": theirs})):
            assert r.headers["x-request-id"] == theirs, (r.status_code, r.headers)
        assert r.status_code == 500 and r.json()["error"] == "internal"
        assert any(theirs in rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR")


def test_embed_answered_outside_the_router_keeps_the_apps_error_answers(tiny_artifact: Path) -> None:
    """POST /embed runs in RequestMiddleware, not through FastAPI's router (service/app.py): a bug in it
    still gets the app's JSON 500 with the client's request id, counted, and GET still gets 405."""
    app = echo_app(tiny_artifact, EchoBackend(32))
    with ServerThread(app) as server, httpx.Client() as c:
        r = c.get(f"{server.url}/embed")
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"
        assert c.post(f"{server.url}/embed", content=solid(9)).status_code == 200

        def broken(data: bytes, helper: object = None) -> np.ndarray:  # a bug: an error no handler foresaw
            raise RuntimeError("kaboom")

        app.state.uembed.decode_one = broken
        r = c.post(f"{server.url}/embed", content=solid(9), headers={"x-request-id": "lane-1"})
        assert r.status_code == 500 and r.json() == {"error": "internal", "detail": "RuntimeError: kaboom"}
        assert r.headers["x-request-id"] == "lane-1"
        # On a new connection (uvicorn closes one after an unhandled error): counted once, still serving.
        assert metric(server.url, 'uembed_failures_total{reason="internal"}') == 1
        assert metric(server.url, 'uembed_requests_total{status="500"}') == 1


def test_echo_order_across_batches_and_concurrency(tiny_artifact: Path) -> None:
    backend = EchoBackend(32, delay_s=0.01)
    levels = list(range(20, 240, 13))
    with ServerThread(echo_app(tiny_artifact, backend, max_batch_size=3)) as server, httpx.Client() as c:
        def one(offset: int) -> list[float]:
            files = [("image", (f"{lv}.png", solid(lv + offset), "image/png")) for lv in levels]
            resp = c.post(f"{server.url}/embed?output=float", files=files)
            return [echo_value(e["float"]) for e in resp.json()["embeddings"]]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(4)))
    for offset, got in enumerate(results):
        assert got == pytest.approx([grey_value(lv + offset) for lv in levels], abs=1e-4)
    assert max(backend.batches) == 3


def test_a_backend_failure_fails_only_its_batch(tiny_artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = EchoBackend(32, poison=grey_value(66))
    with ServerThread(echo_app(tiny_artifact, backend, max_wait_ms=0.0)) as server, httpx.Client() as c:
        bad = c.post(f"{server.url}/embed", content=solid(66))
        assert bad.status_code == 500 and bad.json()["error"] == "inference_failed"
        assert "poisoned" in bad.json()["detail"]
        # The log names the failed request by the id its client got, with the backend's traceback.
        (line,) = [r for r in caplog.records if bad.headers["x-request-id"] in r.getMessage()]
        assert line.levelname == "ERROR" and "poisoned" in line.getMessage() and line.exc_info
        good = c.post(f"{server.url}/embed", content=solid(67))
        assert good.status_code == 200
        assert c.get(f"{server.url}/readyz").status_code == 200
        assert metric(server.url, 'uembed_failures_total{reason="inference_failed"}') == 1


def test_overload_gets_429_with_retry_after_and_no_5xx(tiny_artifact: Path) -> None:
    backend = EchoBackend(32, delay_s=0.1)
    with ServerThread(echo_app(tiny_artifact, backend, max_batch_size=2, max_queue_images=4)) as server, \
            httpx.Client(limits=httpx.Limits(max_connections=64)) as c, ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda i: c.post(f"{server.url}/embed", content=solid(i)), range(32)))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
        for r in responses:
            if r.status_code == 429:
                assert r.json()["error"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        assert metric(server.url, 'uembed_failures_total{reason="queue_full"}') == codes.count(429)


def test_deadline_gives_504_and_the_images_leave_the_queue(tiny_artifact: Path) -> None:
    backend = EchoBackend(32, delay_s=0.3)
    with ServerThread(echo_app(tiny_artifact, backend, max_batch_size=1, max_wait_ms=0.0)) as server, \
            httpx.Client() as c, ThreadPoolExecutor(2) as pool:
        warmup = len(backend.batches)
        slow = pool.submit(c.post, f"{server.url}/embed", content=solid(1))
        import time

        wait_until(lambda: len(backend.batches) > warmup, "the first request to occupy the backend")
        late = c.post(f"{server.url}/embed", content=solid(2), headers={"x-request-timeout-ms": "50"})
        assert late.status_code == 504 and late.json()["error"] == "deadline_exceeded"
        assert slow.result().status_code == 200
        time.sleep(0.4)
        assert len(backend.batches) == warmup + 1  # the slow request only; the late one never ran
        assert metric(server.url, 'uembed_dropped_images_total{reason="deadline_exceeded"}') == 1


def test_the_direct_path_keeps_its_deadline_and_frees_its_instance_when_the_work_ends(tiny_artifact: Path) -> None:
    import time

    backend = EchoBackend(32, delay_s=0.3)
    app = echo_app(tiny_artifact, backend, max_batch_size=1, max_wait_ms=0.0)
    with ServerThread(app) as server, httpx.Client() as c:
        batcher = app.state.uembed.batcher
        late = c.post(f"{server.url}/embed", content=solid(3), headers={"x-request-timeout-ms": "50"})
        assert late.status_code == 504 and late.json()["error"] == "deadline_exceeded"
        assert batcher.busy == 1  # the abandoned work still holds its instance ...
        time.sleep(0.4)
        assert batcher.busy == 0  # ... until it ends
        ok = c.post(f"{server.url}/embed", content=solid(4))
        assert ok.status_code == 200 and batcher.busy == 0


def test_a_client_that_disconnects_is_dropped_before_inference(tiny_artifact: Path) -> None:
    backend = EchoBackend(32, delay_s=0.3)
    with ServerThread(echo_app(tiny_artifact, backend, max_batch_size=1, max_wait_ms=0.0)) as server, \
            ThreadPoolExecutor(2) as pool:
        warmup = len(backend.batches)
        slow = pool.submit(httpx.post, f"{server.url}/embed", content=solid(1))
        wait_until(lambda: len(backend.batches) > warmup, "the first request to occupy the backend")
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/embed", content=solid(2), timeout=0.1)  # gives up while queued
        assert slow.result().status_code == 200
        time.sleep(0.5)
        assert len(backend.batches) == warmup + 1  # the slow request; never the abandoned one
        assert metric(server.url, 'uembed_failures_total{reason="client_disconnected"}') == 1
        assert metric(server.url, 'uembed_dropped_images_total{reason="client_disconnected"}') == 1


def test_a_client_that_leaves_mid_upload_is_a_disconnect_not_a_server_error(tiny_artifact: Path) -> None:
    import socket

    with ServerThread(echo_app(tiny_artifact, EchoBackend(32))) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = photo(3, size=(300, 300), fmt="BMP")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/bmp\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 3])
                time.sleep(0.05)  # the server is now waiting for the rest of the body
        wait_until(lambda: metric(server.url, 'uembed_failures_total{reason="client_disconnected"}') == 3,
                   "three disconnects to be counted")
        assert metric(server.url, 'uembed_failures_total{reason="internal"}') == 0
        assert metric(server.url, 'uembed_requests_total{status="499"}') == 3
        assert "uembed_requests_total{status=\"500\"}" not in httpx.get(f"{server.url}/metrics").text
        assert httpx.post(f"{server.url}/embed", content=solid(5)).status_code == 200


def test_a_stalled_upload_gets_408_and_the_server_keeps_answering(tiny_artifact: Path) -> None:
    import socket

    with ServerThread(echo_app(tiny_artifact, EchoBackend(32), body_timeout_s=0.3)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = photo(4, size=(300, 300), fmt="BMP")
        with socket.create_connection((host, int(port))) as s:
            s.settimeout(10)
            t0 = time.monotonic()
            s.sendall(f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/bmp\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000])  # and nothing more
            answer = b""
            while b"}" not in answer:  # the head and the JSON body may come in separate segments
                chunk = s.recv(65536)
                assert chunk, f"connection closed before the answer: {answer!r}"
                answer += chunk
            waited = time.monotonic() - t0
        head, _, payload = answer.decode("latin-1").partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 408"), head
        assert json.loads(payload)["error"] == "body_timeout"
        assert 0.25 < waited < 5, waited
        # A body that arrives in time is not affected, however short its deadline.
        ok = httpx.post(f"{server.url}/embed", content=solid(5), headers={"x-request-timeout-ms": "2000"})
        assert ok.status_code == 200


def test_bodies_in_flight_are_bounded_across_requests(tiny_artifact: Path) -> None:
    """While one upload holds most of max_body_bytes_in_flight, another that would pass it gets 429
    uploads_full at once, declared or chunked; once the first is answered its bytes are free again."""
    import socket

    body = photo(4, size=(300, 300), fmt="BMP")  # 270 KB
    budget = len(body) + 100_000
    app = echo_app(tiny_artifact, EchoBackend(32), max_body_bytes_in_flight=budget, max_request_bytes=budget,
                   max_image_bytes=budget)
    with ServerThread(app) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as slow:
            slow.settimeout(10)
            slow.sendall(f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/bmp\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:1000])
            wait_until(lambda: metric(server.url, "uembed_body_bytes_in_flight") == len(body),
                       "the slow upload's declared length to be held")
            t0 = time.monotonic()
            refused = httpx.post(f"{server.url}/embed", content=photo(5, size=(200, 200), fmt="BMP"))
            assert refused.status_code == 429 and refused.json()["error"] == "uploads_full", refused.text
            assert refused.headers["retry-after"] == "1" and time.monotonic() - t0 < 2

            def chunks() -> Iterator[bytes]:  # no Content-Length: charged as it arrives
                data = photo(6, size=(200, 200), fmt="BMP")
                for i in range(0, len(data), 16_384):
                    yield data[i : i + 16_384]

            chunked = httpx.post(f"{server.url}/embed", content=chunks())
            assert chunked.status_code == 429 and chunked.json()["error"] == "uploads_full", chunked.text
            small = httpx.post(f"{server.url}/embed", content=solid(5))  # fits beside the slow one
            assert small.status_code == 200, small.text

            slow.sendall(body[1000:])
            answer = b""
            while b"}]}" not in answer:
                chunk = slow.recv(65536)
                assert chunk, f"connection closed before the answer: {answer!r}"
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert metric(server.url, "uembed_body_bytes_in_flight") == 0
        assert metric(server.url, 'uembed_failures_total{reason="uploads_full"}') == 2
        again = httpx.post(f"{server.url}/embed", content=photo(5, size=(200, 200), fmt="BMP"))
        assert again.status_code == 200, again.text
        assert httpx.get(f"{server.url}/v1/model").json()["limits"]["max_body_bytes_in_flight"] == budget


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet-when-alone", "off"])
def test_a_lone_connection_runs_on_one_thread_and_the_quiet_session(tiny_artifact: Path, quiet: bool) -> None:
    """Requests one at a time run on one inference thread (service/executor.py), and with
    --quiet-when-alone, while one client connection is open, on ONNX Runtime's quiet session at
    once, however recent the last contended batch; a second open connection, even idle, leaves
    that choice to the quiet_spin_after_s timer. Same answers either way."""
    import socket
    import threading

    app = create_app(settings(tiny_artifact, backend="onnxruntime", quiet_when_alone=quiet))
    state = app.state.uembed
    where: list[str] = []
    sessions: list[object] = []
    with ServerThread(app) as server:
        backend, decode_one, session_for = state.backend, state.decode_one, state.backend.session_for
        state.decode_one = lambda data, helper=None: (where.append(threading.current_thread().name),
                                                      decode_one(data, helper))[1]
        backend.session_for = lambda contended: (sessions.append(s := session_for(contended)), s)[1]
        host, port = server.url.removeprefix("http://").split(":")
        images = [photo(i, size=(90, 70)) for i in range(4)]
        for f in [state.infer_pool.submit(time.sleep, 0.1) for _ in range(2)]:  # as under load: both threads up
            f.result()

        def embed_each(client: httpx.Client) -> list[np.ndarray]:
            out = []
            for img in images:
                session_for(True)  # a contended batch just ran: the timer alone says "not quiet yet"
                out.append(vectors(client.post(f"{server.url}/embed", content=img)))
            return out

        with socket.create_connection((host, int(port))):  # another client, idle
            if quiet:
                wait_until(lambda: len(state.http_connections) == 1, "the idle connection to be accepted")
            with httpx.Client() as client:
                two = embed_each(client)
        assert sessions == [backend.solo_session] * 4
        if quiet:
            wait_until(lambda: not state.http_connections, "the connections to close")
        sessions.clear()
        with httpx.Client() as client:
            one = embed_each(client)
        assert sessions == [backend.quiet_session if quiet else backend.solo_session] * 4
        assert len(set(where)) == 1 and where[0].startswith("uembed-infer"), where
        for a, b in zip(one, two, strict=True):
            np.testing.assert_array_equal(a, b)



@pytest.mark.parametrize(("split_on", "idle"), [(True, True), (False, True), (True, False)],
                         ids=["split-decode-when-alone", "off", "threads-spinning-at-normal-priority"])
def test_a_lone_connection_splits_a_large_jpeg_and_gets_the_same_array(tiny_artifact: Path, split_on: bool,
                                                                         idle: bool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--split-decode-when-alone through the server: a lone connection's JPEG is decoded on two
    threads (a decode thread takes its first rows) and the model gets the one-thread array, to the
    bit; with a second connection open, or closed less than --split-decode-after-alone-s ago, the
    setting off, or the quiet session's threads spinning at normal priority between runs
    (--no-quiet-idle-between-runs), no split. The tiny model's input is so small that its drafts stay
    under the split's pixel floor, so the floor is lowered here."""
    import socket

    from service import decode
    from service.backends.onnxruntime import may_unpark

    if idle and not may_unpark():
        pytest.skip("this process may not give a thread its priority back (needs CAP_SYS_NICE)")
    monkeypatch.setattr(decode, "MIN_SPLIT_PIXELS", 1000)
    grain = np.random.default_rng(3).integers(-25, 26, (480, 640, 3))
    base = np.asarray(Image.open(io.BytesIO(photo(3, size=(640, 480)))).convert("RGB"), dtype=np.int16)
    data = encode_image(Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)), "JPEG", quality=90)
    after = 60.0
    app = create_app(settings(tiny_artifact, backend="onnxruntime", split_decode_when_alone=split_on,
                              quiet_idle_between_runs=idle, split_decode_after_alone_s=after))
    state = app.state.uembed
    arrays: list[np.ndarray] = []
    helpers: list[object] = []
    bands: list[str] = []
    with ServerThread(app) as server:
        decode_one, submit = state.decode_one, state.decode_pool.submit

        def recording_decode(blob: bytes, helper: object = None) -> np.ndarray:
            helpers.append(helper)
            arrays.append(decode_one(blob, helper))
            return arrays[-1]

        state.decode_one = recording_decode
        state.decode_pool.submit = lambda fn, *a, **k: (bands.append(fn.__name__), submit(fn, *a, **k))[1]
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))):  # a second client: no split
            wait_until(lambda: len(state.http_connections) == 1, "the idle connection to be accepted")
            with httpx.Client() as client:
                first = vectors(client.post(f"{server.url}/embed", content=data))
        wait_until(lambda: not state.http_connections, "the connections to close")
        with httpx.Client() as client:
            soon = vectors(client.post(f"{server.url}/embed", content=data))
            state.http_connections.crowded_at -= after  # as if `after` seconds had passed
            alone = vectors(client.post(f"{server.url}/embed", content=data))
    assert helpers[0] is None and helpers[1] is None, "split beside, or a moment after, a second client"
    assert (helpers[2] is not None) == (split_on and idle)
    assert bands == (["_top_rows"] if split_on and idle else []), bands
    want = decode.decode_image(data, state.spec, state.limits)
    for got in arrays:
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(alone, first, atol=1e-5)
    np.testing.assert_allclose(soon, first, atol=1e-5)


def test_readiness_reflects_a_dead_batcher(tiny_artifact: Path) -> None:
    app = echo_app(tiny_artifact, EchoBackend(32))
    with ServerThread(app) as server:
        assert httpx.get(f"{server.url}/readyz").status_code == 200
        batcher = app.state.uembed.batcher
        batcher._task.get_loop().call_soon_threadsafe(batcher._task.cancel)
        import time

        time.sleep(0.1)
        resp = httpx.get(f"{server.url}/readyz")
        assert resp.status_code == 503 and resp.json()["batcher_alive"] is False
        assert httpx.post(f"{server.url}/embed", content=solid(5)).status_code == 503


def test_onnxruntime_sessions_contended_solo_and_quiet(tiny_artifact: Path) -> None:
    import time

    from model_export.manifest import load_manifest
    from service.backends.onnxruntime import OnnxRuntimeBackend

    manifest = load_manifest(tiny_artifact)
    backend = OnnxRuntimeBackend(manifest, settings(tiny_artifact, quiet_spin_after_s=0.2))
    assert len({id(backend.session), id(backend.solo_session), id(backend.quiet_session)}) == 3
    assert backend.session_for(True) is backend.session
    assert backend.session_for(False) is backend.solo_session  # contended a moment ago
    time.sleep(0.25)
    assert backend.session_for(False) is backend.quiet_session  # one at a time for 0.2 s
    assert backend.session_for(True) is backend.session
    assert backend.session_for(False) is backend.solo_session  # contention ends the quiet period
    size = manifest.preprocess["input_size"]
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    outs = [s.run(None, {backend.input_name: x})[0] for s in (backend.session, backend.solo_session,
                                                                backend.quiet_session)]
    assert np.allclose(outs[0], outs[1], atol=1e-5) and np.allclose(outs[0], outs[2], atol=1e-5)
    off = OnnxRuntimeBackend(manifest, settings(tiny_artifact, quiet_spin_after_s=0))
    assert off.quiet_session is off.solo_session


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_the_quiet_sessions_threads_idle_between_runs_and_not_during_them(tiny_artifact: Path) -> None:
    """--quiet-idle-between-runs (the default): the quiet session's ONNX Runtime threads are
    SCHED_IDLE while no run needs them and at their own policy during its runs; the other sessions'
    threads and the caller's are never idle, and the answers are the same as without."""
    from model_export.manifest import load_manifest
    from service.backends.onnxruntime import OnnxRuntimeBackend, may_unpark

    if not may_unpark():
        pytest.skip("this process may not give a thread its priority back (needs CAP_SYS_NICE)")

    def threads() -> set[int]:
        return {int(t) for t in os.listdir("/proc/self/task")}

    def policies(tids: set[int]) -> dict[int, int]:
        return {tid: os.sched_getscheduler(tid) for tid in tids}

    manifest = load_manifest(tiny_artifact)
    before = threads()
    backend = OnnxRuntimeBackend(manifest, settings(tiny_artifact))
    started = threads() - before
    idle = {tid for tid, p in policies(started).items() if p == os.SCHED_IDLE}
    assert idle and idle < started, policies(started)  # the quiet session's threads, and only those
    assert backend.spare_core_when_alone and os.sched_getscheduler(0) != os.SCHED_IDLE
    plain = OnnxRuntimeBackend(manifest, settings(tiny_artifact, quiet_idle_between_runs=False))
    assert not plain.spare_core_when_alone  # its quiet session spins at normal priority after a run

    seen: list[dict[int, int]] = []
    quiet = backend.quiet_session

    class Watched:  # the real session; records the threads' policies while its run is in progress
        def run(self, *args: Any) -> Any:
            seen.append(policies(idle))
            return quiet.run(*args)

    backend.quiet_session = Watched()
    size = manifest.preprocess["input_size"]
    x = np.random.default_rng(2).standard_normal((1, 3, size, size)).astype(np.float32)
    backend.note_sequential()  # one client connection: lone images on the quiet session
    got = [backend.embed(x, contended=False), backend.embed_alone(x)]
    assert len(seen) == 2 and all(os.SCHED_IDLE not in s.values() for s in seen), seen
    assert set(policies(idle).values()) == {os.SCHED_IDLE}
    backend.embed(x, contended=True)  # the contended session: no switch
    assert len(seen) == 2 and set(policies(idle).values()) == {os.SCHED_IDLE}
    want = plain.solo_session.run(None, {plain.input_name: x})[0]
    for out in got:
        np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
@pytest.mark.parametrize("idle", [True, False], ids=["idle-priority", "off"])
def test_the_alone_sessions_threads_run_at_idle_priority(tiny_artifact: Path, idle: bool) -> None:
    """--quiet-idle-priority: a fourth session for requests while one client connection is open,
    whose ONNX Runtime threads (and only those) are SCHED_IDLE; the caller's thread keeps its policy,
    and the session answers the same. Without the setting there is no such session."""
    from model_export.manifest import load_manifest
    from service.backends.onnxruntime import OnnxRuntimeBackend, idle_priority

    def threads() -> set[int]:
        return {int(t) for t in os.listdir("/proc/self/task")}

    def idle_threads(tids: set[int]) -> set[int]:
        out = set()
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that has ended meanwhile
                if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                    out.add(tid)
        return out

    manifest = load_manifest(tiny_artifact)
    before = threads()
    plain = OnnxRuntimeBackend(manifest, settings(tiny_artifact, quiet_spin_after_s=0))  # no quiet session
    assert not idle_threads(threads() - before) and plain.alone_session is None
    before = threads()
    backend = OnnxRuntimeBackend(manifest, settings(tiny_artifact, quiet_idle_priority=idle,
                                                    quiet_idle_between_runs=False))
    started = threads() - before
    assert started, "ONNX Runtime started no threads for the sessions"
    assert os.sched_getscheduler(0) != os.SCHED_IDLE
    assert bool(idle_threads(started)) == idle and (backend.alone_session is not None) == idle
    # A lone request's decode helper only where no backend thread spins after a run at normal priority.
    assert backend.spare_core_when_alone == idle and plain.spare_core_when_alone
    if idle:
        assert idle_threads(started) < started  # the other sessions' threads are not idle
    size = manifest.preprocess["input_size"]
    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    want = plain.solo_session.run(None, {plain.input_name: x})[0]
    np.testing.assert_allclose(backend.embed_alone(x), want, atol=1e-5)
    np.testing.assert_allclose(backend.embed(x, contended=False), want, atol=1e-5)
    with pytest.raises(ValueError, match="no session"):
        idle_priority(lambda: (_ for _ in ()).throw(ValueError("no session")))
    assert idle_priority(lambda: os.sched_getscheduler(0)) == (os.SCHED_IDLE, True)
