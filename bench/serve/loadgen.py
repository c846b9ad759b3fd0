"""Load generator for bench/serve (a separate process): closed loop at a concurrency, or open loop
at a fixed rate. Prints one JSON line: requests, errors, images/s, latency percentiles (ms).

The closed loop uses wrk (C; `apt-get install wrk`) when it is installed, since on a 2-core machine
a Python client's own CPU use caps what it can measure; otherwise httpx. The open loop (fixed
rate, below saturation) always uses httpx.

    python bench/serve/loadgen.py URL IMAGES_DIR --concurrency 16 --seconds 10
    python bench/serve/loadgen.py URL IMAGES_DIR --rate 120 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np


async def closed_loop(url: str, images: list[bytes], concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(url, content=images[i % len(images)], headers={"content-type": "image/jpeg"})
                latencies.append(time.perf_counter() - t0)
                errors += r.status_code != 200
                i += concurrency

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t_start
    return summary(latencies, errors, elapsed)


async def open_loop(url: str, images: list[bytes], rate: float, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    n = int(rate * seconds)
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as client:
        async def one(i: int, at: float) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            t0 = time.perf_counter()
            r = await client.post(url, content=images[i % len(images)], headers={"content-type": "image/jpeg"})
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200

        t_start = time.perf_counter()
        await asyncio.gather(*(one(i, t_start + i / rate) for i in range(n)))
        elapsed = time.perf_counter() - t_start
    return summary(latencies, errors, elapsed) | {"rate": rate}


def wrk_closed_loop(url: str, paths: list[Path], concurrency: int, seconds: float) -> dict:
    script = Path(__file__).with_name("post_images.lua")
    cmd = ["wrk", f"-t{min(2, concurrency)}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "60s",
           "-s", str(script), url, "--", *map(str, paths)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def summary(latencies: list[float], errors: int, elapsed: float) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "images_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("images")
    ap.add_argument("--concurrency", type=int)
    ap.add_argument("--rate", type=float)
    ap.add_argument("--seconds", type=float, default=10)
    a = ap.parse_args()
    paths = sorted(Path(a.images).glob("*.jpg"))
    images = [p.read_bytes() for p in paths]
    if not a.rate and shutil.which("wrk"):
        print(json.dumps(wrk_closed_loop(a.url, paths, a.concurrency, a.seconds)))
        return
    if a.rate:
        res = asyncio.run(open_loop(a.url, images, a.rate, a.seconds))
    else:
        res = asyncio.run(closed_loop(a.url, images, a.concurrency, a.seconds))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
