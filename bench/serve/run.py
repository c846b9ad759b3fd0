"""bench/serve: the service vs a naive server vs the in-process pipeline limit, on this machine.

1. Pipeline limit (in this process, one run): decode + preprocess + model, sequentially per batch,
   at each batch size; the best images/s.
2. `uembed serve` (subprocess, 127.0.0.1) under a closed-loop load at concurrency 1..64 (loadgen.py,
   a separate process, single-image JPEG requests); saturation = the best images/s. Then an open
   loop at half that rate: p50/p99 latency.
3. The naive server (naive_server.py: one request = one decode + one forward) under the same loads.

With --repeat N the tables give medians over the rounds, followed by each round's figures and, per
concurrency, the uembed / naive ratio's median, range and the rounds uembed was ahead in.

    .venv/bin/python bench/serve/run.py --model models/default --seconds 8
    .venv/bin/python bench/serve/run.py --seconds 6 --repeat 3     # medians of 3 interleaved rounds
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PY = sys.executable
SIZES = [(320, 240), (640, 480), (1024, 768), (1600, 1200)]


def make_images(out: Path, n: int = 48) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 10, img.shape)  # sensor noise: realistic JPEG entropy
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out / f"{i:03d}.jpg", quality=88)


def image_dir(given: str | None, tmp: str) -> Path:
    """The --images folder, or `tmp` filled with the generated photos (make_images)."""
    if given:
        return Path(given)
    make_images(Path(tmp))
    return Path(tmp)


def pipeline_limit(model: Path, images: list[bytes], threads: int) -> dict:
    from model_export.manifest import load_manifest
    from model_export.onnx import ort_runner, ort_session
    from service.decode import DecodeLimits, decode_image
    from uembed.preprocess import PreprocessSpec

    m = load_manifest(model)
    spec = PreprocessSpec.from_dict(m.preprocess)
    run = ort_runner(ort_session(m.path("onnx"), intra_op_threads=threads))
    limits = DecodeLimits(64 << 20, 100_000_000)
    best = {}
    for batch in (1, 4, 8, 16, 32):
        run(np.stack([decode_image(images[0], spec, limits)] * batch))  # warm-up
        t0 = time.perf_counter()
        done = 0
        for _ in range(2):
            for i in range(0, len(images), batch):
                chunk = images[i : i + batch]
                run(np.stack([decode_image(b, spec, limits) for b in chunk]))
                done += len(chunk)
        best[batch] = done / (time.perf_counter() - t0)
    b = max(best, key=best.get)
    return {"best_batch": b, "images_per_s": round(best[b], 1), "by_batch": {k: round(v, 1) for k, v in best.items()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen) -> None:
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited")
        time.sleep(0.1)
    raise RuntimeError("server not ready")


def load(url: str, images_dir: Path, seconds: float, **kw: float) -> dict:
    args = [PY, str(Path(__file__).with_name("loadgen.py")), f"{url}/embed", str(images_dir), "--seconds", str(seconds)]
    for k, v in kw.items():
        args += [f"--{k}", str(v)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_server(cmd: list[str], port: int, images_dir: Path, concurrencies: list[int], seconds: float,
                 rate: float | None = None) -> tuple[dict, dict | None]:
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        load(url, images_dir, 2, concurrency=8)  # warm-up
        closed = {c: load(url, images_dir, seconds, concurrency=c) for c in concurrencies}
        for c, r in closed.items():
            print(f"  concurrency {c}: {r}", file=sys.stderr)
        opened = load(url, images_dir, seconds * 1.5, rate=rate) if rate else None
        return closed, opened
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def median_runs(runs: list[dict]) -> dict:
    """Per-key median of several loadgen results (each key of the first)."""
    return {k: round(float(np.median([r[k] for r in runs])), 1) for k, v in runs[0].items() if not isinstance(v, str)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "default"))
    ap.add_argument("--images", help="folder of .jpg files (default: generated photos of mixed sizes)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds (uembed then naive each round, interleaved so drift hits both); the tables "
                         "report each figure's median over the rounds")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--decode-threads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2,
                    help="ONNX Runtime intra-op threads of the pipeline limit and the naive server "
                         "(uembed serve runs with its defaults)")
    ap.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `uembed serve` (repeatable), e.g. --serve-arg=--inference-instances=1")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images_dir = image_dir(args.images, tmp)
        images = [p.read_bytes() for p in sorted(images_dir.glob("*.jpg"))]
        limit = pipeline_limit(Path(args.model), images, args.threads)
        print(f"pipeline limit: {limit}", file=sys.stderr)
        port = free_port()
        ours_cmd = [PY, "-m", "uembed.cli", "serve", "--model", args.model, "--host", "127.0.0.1", "--port",
                    str(port), "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
                    "--decode-threads", str(args.decode_threads),
                    "--max-queue-images", "512", "--log-level", "warning", *args.serve_arg]
        naive_cmd = [PY, str(Path(__file__).with_name("naive_server.py")), args.model, str(port)]
        rounds: list[tuple[dict, dict, dict, dict, float]] = []
        for r in range(args.repeat):
            print(f"round {r + 1}/{args.repeat}, uembed serve:", file=sys.stderr)
            ours, _ = bench_server(ours_cmd, port, images_dir, args.concurrency, args.seconds)
            half = round(max(o["images_per_s"] for o in ours.values()) / 2, 1)
            _, ours_half = bench_server(ours_cmd, port, images_dir, [], args.seconds, rate=half)
            print(f"round {r + 1}/{args.repeat}, naive server:", file=sys.stderr)
            naive, naive_half = bench_server(naive_cmd, port, images_dir, args.concurrency, args.seconds, rate=half)
            print(f"  half load {half}/s: uembed {ours_half}, naive {naive_half}", file=sys.stderr)
            rounds.append((ours, ours_half, naive, naive_half, half))

    ours = {c: median_runs([rd[0][c] for rd in rounds]) for c in args.concurrency}
    naive = {c: median_runs([rd[2][c] for rd in rounds]) for c in args.concurrency}
    ours_half = median_runs([rd[1] for rd in rounds])
    naive_half = median_runs([rd[3] for rd in rounds])
    half = float(np.median([rd[4] for rd in rounds]))
    saturation = max(o["images_per_s"] for o in ours.values())
    of = f"medians of {args.repeat} rounds" if args.repeat > 1 else "one round"
    print(f"Pipeline limit (decode+preprocess+model in-process, best batch {limit['best_batch']}): "
          f"{limit['images_per_s']} images/s; by batch {limit['by_batch']}\n")
    print(f"Saturation ({of}): uembed serve {saturation} images/s = "
          f"{100 * saturation / limit['images_per_s']:.0f}% of the pipeline limit\n")
    print("| concurrency | uembed images/s | uembed p50 ms | uembed p99 ms | naive images/s | naive p50 ms | "
          "naive p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        o, n = ours[c], naive[c]
        print(f"| {c} | {o['images_per_s']} | {o['p50_ms']} | {o['p99_ms']} | {n['images_per_s']} | "
              f"{n['p50_ms']} | {n['p99_ms']} |")
    print(f"\nOpen loop at half saturation ({half} requests/s, {of}): uembed p50 {ours_half['p50_ms']} ms, "
          f"p99 {ours_half['p99_ms']} ms ({ours_half['errors']:g} errors); naive p50 {naive_half['p50_ms']} ms, "
          f"p99 {naive_half['p99_ms']} ms ({naive_half['errors']:g} errors, {naive_half['images_per_s']} achieved)")
    if args.repeat > 1:
        print("\nEach round (uembed / naive images/s by concurrency; half-load p99 ms):")
        for i, (o, oh, n, nh, h) in enumerate(rounds, 1):
            cells = ", ".join(f"c{c} {o[c]['images_per_s']}/{n[c]['images_per_s']}" for c in args.concurrency)
            print(f"- round {i}: {cells}; half load {h}/s p99 {oh['p99_ms']}/{nh['p99_ms']}")
        # The rounds' spread says whether a median lead is more than this machine's drift.
        print("\nuembed / naive images/s per round (median ratio, range, rounds ahead):")
        for c in args.concurrency:
            ratios = np.array([rd[0][c]["images_per_s"] / rd[2][c]["images_per_s"] for rd in rounds])
            print(f"- concurrency {c}: {np.median(ratios):.3f} ({ratios.min():.3f} to {ratios.max():.3f}), "
                  f"ahead in {int((ratios > 1).sum())} of {len(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
