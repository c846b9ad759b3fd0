"""Paired closed-loop comparison of server variants, for differences smaller than run-to-run drift.

All variants run at once (each on its own 127.0.0.1 port, idle while the others are measured); the
load generator visits them in turn for BLOCKS short blocks each (each block starting one variant
further on, so that none always comes first or after the same one), so a slow minute of the machine
hits every variant alike. Prints each variant's images/s per block, the median, and the median of
the per-block ratio to the first variant with a 95% bootstrap interval (blocks resampled, seeded)
and the number of blocks in which the variant was ahead: a ratio whose interval holds 1 is level.

A variant is `naive` (naive_server.py) or `uembed` followed by comma-separated `uembed serve`
arguments, e.g. `uembed,--no-solo-spin-only-in-run`.

    .venv/bin/python bench/serve/paired.py --concurrency 1 --blocks 8 naive uembed
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PY, ROOT, free_port, image_dir, load, wait_ready  # noqa: E402


def command(variant: str, model: str, port: int) -> list[str]:
    kind, *extra = variant.split(",")
    if kind == "naive":
        return [PY, str(HERE / "naive_server.py"), model, str(port)]
    if kind != "uembed":
        raise SystemExit(f"unknown variant {variant!r}: naive or uembed[,ARGS]")
    return [PY, "-m", "uembed.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", *extra]


@contextlib.contextmanager
def running(variants: list[str], model: str) -> Iterator[list[str]]:
    """Every variant up at once, each on its own 127.0.0.1 port; yields their URLs once all are
    ready, and stops them after."""
    ports = [free_port() for _ in variants]
    procs = [subprocess.Popen(command(v, model, p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for v, p in zip(variants, ports, strict=True)]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for proc, url in zip(procs, urls, strict=True):
            wait_ready(url, proc)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--model", default=str(ROOT / "models" / "default"))
    ap.add_argument("--images", help="folder of .jpg files (default: generated photos of mixed sizes, as run.py)")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of one block")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, running(args.variants, args.model) as urls:
        images = image_dir(args.images, tmp)
        for url in urls:
            load(url, images, 2, concurrency=args.concurrency)  # warm-up
        runs: list[list[float]] = [[] for _ in args.variants]  # by position: a variant may be given twice
        for b in range(args.blocks):
            for i in visiting_order(len(urls), b):
                runs[i].append(load(urls[i], images, args.seconds, concurrency=args.concurrency)["images_per_s"])
    base = np.asarray(runs[0])
    print(f"concurrency {args.concurrency}, {args.blocks} blocks of {args.seconds:g} s (images/s)")
    for v, r in zip(labels(args.variants), runs, strict=True):
        ratio, low, high, ahead = ratio_summary(np.asarray(r), base)
        print(f"- {v}: median {np.median(r):.1f}, ratio to {args.variants[0]} {ratio:.3f} (95% {low:.3f} to "
              f"{high:.3f}), ahead in {ahead} of {len(r)} blocks; blocks {r}")
    return 0


def visiting_order(n: int, block: int) -> list[int]:
    """Block b visits the variants starting from the b-th, in turn: none is always first or always
    follows the same one (a server's threads may still spin for a while after its block ends)."""
    return [(block + i) % n for i in range(n)]


def labels(variants: list[str]) -> list[str]:
    """The variants' names, a repeated one numbered ("uembed", "uembed #2"): an A/A run, two servers
    alike, shows how far apart the method puts two equal servers."""
    seen: dict[str, int] = {}
    out = []
    for v in variants:
        seen[v] = seen.get(v, 0) + 1
        out.append(v if seen[v] == 1 else f"{v} #{seen[v]}")
    return out


def ratio_summary(values: np.ndarray, base: np.ndarray, resamples: int = 4000,
                  seed: int = 0) -> tuple[float, float, float, int]:
    """Median of the per-block ratio values/base, its 95% percentile-bootstrap interval (whole blocks
    resampled, so each ratio keeps its pair), and in how many blocks values was ahead."""
    ratios = values / base
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, size=(resamples, ratios.size)), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(np.median(ratios)), float(low), float(high), int((ratios > 1).sum())


if __name__ == "__main__":
    sys.exit(main())
