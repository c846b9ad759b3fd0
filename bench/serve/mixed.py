"""Clients that come and go beside a sequential one: the latency of both, per server variant.

One client posts images one after another on a kept-alive connection (what a lone client does, and
what `--quiet-when-alone`, `--quiet-idle-priority` and `--split-decode-when-alone` are for); a second
one opens a new connection every INTERVAL (drawn uniformly between the two bounds), posts one image
and closes it, so the server keeps passing between one client connection and two. All variants run
at once, each on its own 127.0.0.1 port, and are visited in turn for BLOCKS blocks, in paired.py's
rotating order.
Prints, per variant, the sequential client's requests/s and latency (p50, p99, max, how many over 60
and 100 ms) and the same for the newcomers, and the sequential client's requests/s per block as a
ratio to the first variant's in the same block, with a 95% bootstrap interval (paired.py's).

    .venv/bin/python bench/serve/mixed.py --blocks 10 --seconds 8 uembed uembed,--quiet-idle-priority
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from paired import labels, ratio_summary, running, visiting_order  # noqa: E402
from run import ROOT, image_dir  # noqa: E402


class Tally:
    def __init__(self) -> None:
        self.sequential: list[float] = []
        self.newcomers: list[float] = []
        self.seconds = 0.0
        self.per_block: list[float] = []  # the sequential client's requests/s in each block


def block(url: str, blobs: list[bytes], seconds: float, interval: tuple[float, float], seed: int,
          tally: Tally) -> None:
    stop = time.perf_counter() + seconds
    headers = {"content-type": "image/jpeg"}

    def post(client: httpx.Client, blob: bytes) -> float:
        t0 = time.perf_counter()
        r = client.post(url, content=blob, headers=headers)
        if r.status_code != 200:
            raise SystemExit(f"{url}: {r.status_code} {r.text[:200]}")
        return time.perf_counter() - t0

    def sequential() -> None:
        with httpx.Client() as client:
            i = 0
            while time.perf_counter() < stop:
                tally.sequential.append(post(client, blobs[i % len(blobs)]))
                i += 1

    def newcomers() -> None:
        rng = random.Random(seed)
        while time.perf_counter() < stop - interval[1]:
            time.sleep(rng.uniform(*interval))
            with httpx.Client() as client:
                tally.newcomers.append(post(client, blobs[rng.randrange(len(blobs))]))

    threads = [threading.Thread(target=sequential), threading.Thread(target=newcomers)]
    t0, done = time.perf_counter(), len(tally.sequential)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    tally.seconds += took
    tally.per_block.append((len(tally.sequential) - done) / took)


def describe(name: str, seconds: list[float]) -> str:
    ms = 1000 * np.asarray(seconds)
    return (f"{name} n={len(ms)} p50 {np.median(ms):.1f} p99 {np.percentile(ms, 99):.1f} max {ms.max():.1f} ms, "
            f"over 60 ms {(ms > 60).sum()}, over 100 ms {(ms > 100).sum()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="naive, or uembed followed by comma-separated serve arguments")
    ap.add_argument("--model", default=str(ROOT / "models" / "default"))
    ap.add_argument("--images", help="folder of .jpg files (default: generated photos of mixed sizes, as run.py)")
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of one block")
    ap.add_argument("--interval-ms", type=float, nargs=2, default=(10.0, 50.0), metavar=("LOW", "HIGH"),
                    help="pause before each newcomer, drawn uniformly between these")
    args = ap.parse_args()
    import tempfile

    interval = (args.interval_ms[0] / 1000, args.interval_ms[1] / 1000)
    tallies = [Tally() for _ in args.variants]
    with tempfile.TemporaryDirectory() as tmp, running(args.variants, args.model) as urls:
        blobs = [p.read_bytes() for p in sorted(image_dir(args.images, tmp).glob("*.jpg"))]
        for url in urls:
            block(f"{url}/embed", blobs, 2.0, interval, 0, Tally())  # warm-up
        for b in range(args.blocks):
            for i in visiting_order(len(urls), b):
                block(f"{urls[i]}/embed", blobs, args.seconds, interval, b, tallies[i])
    print(f"{args.blocks} blocks of {args.seconds:g} s, a newcomer every {args.interval_ms[0]:g}-"
          f"{args.interval_ms[1]:g} ms")
    base = np.asarray(tallies[0].per_block)
    for v, t in zip(labels(args.variants), tallies, strict=True):
        ratio, low, high, ahead = ratio_summary(np.asarray(t.per_block), base)
        print(f"- {v}: all requests {(len(t.sequential) + len(t.newcomers)) / t.seconds:.1f}/s; "
              f"sequential client {len(t.sequential) / t.seconds:.1f} requests/s, ratio to "
              f"{args.variants[0]} {ratio:.3f} (95% {low:.3f} to {high:.3f}), ahead in {ahead} of {len(base)} "
              f"blocks; {describe('sequential', t.sequential)}; {describe('newcomers', t.newcomers)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
