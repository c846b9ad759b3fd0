"""Mixed traffic against a real `uembed serve` process: good, bad, multi-image, JSON, short-deadline
and vanishing clients at once (seeded choices; the interleaving still varies run to run). Each
answer must be the one its request deserves (every 200 carries exactly the embeddings its own
images get alone, so batching under disorder mixes no rows), nothing may fail on the server's side,
and afterwards the queue and the in-flight gauge are empty and the log has no traceback."""

from __future__ import annotations

import asyncio
import base64
import random
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service_helpers import photo, serve_process

pytestmark = pytest.mark.slow
SECONDS = 6.0
CLIENTS = 12


def gauge(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def floats(resp: httpx.Response) -> np.ndarray:
    return np.array([e["float"] for e in resp.json()["embeddings"]], dtype=np.float32)


def test_mixed_traffic_gets_the_right_answers_and_leaves_nothing_behind(tiny_artifact: Path) -> None:
    goods = [photo(200 + i, size=size, fmt=fmt) for i, (size, fmt) in
             enumerate([((320, 240), "JPEG"), ((64, 48), "PNG"), ((900, 700), "JPEG"), ((120, 90), "WEBP")] * 2)]
    bads = [b"plain text, not pixels", goods[0][:300], b"\x89PNG\r\n\x1a\n" + bytes(64)]
    with serve_process(str(tiny_artifact), "--max-batch-size", "4", "--max-queue-images", "24",
                       "--log-level", "warning") as url:
        refs = np.concatenate([floats(httpx.post(f"{url}/embed", content=g)) for g in goods])
        rnd = random.Random(0)
        seen: dict[tuple[str, int], int] = {}
        problems: list[str] = []

        def check(kind: str, resp: httpx.Response, allowed: set[int], sent: list[int] | None = None) -> None:
            seen[kind, resp.status_code] = seen.get((kind, resp.status_code), 0) + 1
            if resp.status_code not in allowed | {429}:
                problems.append(f"{kind}: {resp.status_code} {resp.text[:200]}")
            elif resp.status_code == 200 and sent is not None:
                got = floats(resp)
                if got.shape != (len(sent), refs.shape[1]) or not np.allclose(got, refs[sent], atol=1e-4):
                    problems.append(f"{kind}: embeddings are not those of the images sent ({sent})")
                body = resp.json()["embeddings"]
                bits = [np.unpackbits(np.frombuffer(base64.b64decode(e["binary"]), np.uint8))[: got.shape[1]]
                        for e in body]
                if not np.array_equal(np.array(bits), (got > 0).astype(np.uint8)):
                    problems.append(f"{kind}: binary is not the sign of float")

        def cut_upload() -> None:  # headers and a third of the body, then gone
            host, port = url.removeprefix("http://").split(":")
            body = goods[2]
            with socket.create_connection((host, int(port))) as s:
                s.sendall(f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 3])

        async def one(c: httpx.AsyncClient) -> None:
            kind = rnd.choice(["single", "multi", "multi_bad", "bad", "json", "deadline", "vanish", "cut"])
            picks = [rnd.randrange(len(goods)) for _ in range(rnd.randint(2, 7))]
            post = f"{url}/embed"
            if kind == "single":
                check(kind, await c.post(post, content=goods[picks[0]]), {200}, picks[:1])
            elif kind == "multi":
                files = [("image", (f"{i}.img", goods[k], "application/octet-stream")) for i, k in enumerate(picks)]
                check(kind, await c.post(post, files=files), {200}, picks)
            elif kind == "multi_bad":
                files = [("image", (f"{i}.img", goods[k], "application/octet-stream")) for i, k in enumerate(picks)]
                bad_at = rnd.randrange(len(files))
                files[bad_at] = ("image", ("bad.img", rnd.choice(bads), "application/octet-stream"))
                resp = await c.post(post, files=files)
                check(kind, resp, {400})
                if resp.status_code == 400 and resp.json().get("index") != bad_at:
                    problems.append(f"multi_bad: index {resp.json().get('index')}, the bad image was {bad_at}")
            elif kind == "bad":
                check(kind, await c.post(post, content=rnd.choice(bads)), {400})
            elif kind == "json":
                payload = {"images": [base64.b64encode(goods[k]).decode() for k in picks[:3]]}
                check(kind, await c.post(post, json=payload), {200}, picks[:3])
            elif kind == "deadline":
                resp = await c.post(post, content=goods[picks[0]], headers={"x-request-timeout-ms": "2"})
                check(kind, resp, {200, 504}, picks[:1])
            elif kind == "vanish":
                with_timeout = asyncio.wait_for(c.post(post, content=goods[2]), timeout=rnd.uniform(0.001, 0.03))
                try:
                    check(kind, await with_timeout, {200}, [2])
                except (TimeoutError, httpx.HTTPError):
                    seen[kind, 0] = seen.get((kind, 0), 0) + 1
            else:
                await asyncio.to_thread(cut_upload)
                seen[kind, 0] = seen.get((kind, 0), 0) + 1

        async def client(stop: float) -> None:
            async with httpx.AsyncClient(timeout=30) as c:
                while time.monotonic() < stop:
                    await one(c)

        async def main() -> None:
            stop = time.monotonic() + SECONDS
            await asyncio.gather(*(client(stop) for _ in range(CLIENTS)))

        asyncio.run(main())
        time.sleep(1.0)  # cut uploads and abandoned requests finish on the server
        text = httpx.get(f"{url}/metrics").text
        assert httpx.post(f"{url}/embed", content=goods[0]).status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 200

    assert not problems, problems[:10]
    kinds = {k for k, _ in seen}
    assert kinds == {"single", "multi", "multi_bad", "bad", "json", "deadline", "vanish", "cut"}, seen
    assert seen.get(("multi", 200), 0) > 0 and seen.get(("single", 200), 0) > 0, seen
    assert gauge(text, "uembed_queue_depth_images") == 0
    assert gauge(text, "uembed_requests_in_flight") == 0
    for reason in ("internal", "inference_failed"):
        assert gauge(text, f'uembed_failures_total{{reason="{reason}"}}') == 0, reason
    # Every cut upload was seen as a disconnect (vanished requests may add to it).
    assert gauge(text, 'uembed_failures_total{reason="client_disconnected"}') >= seen["cut", 0] > 0
