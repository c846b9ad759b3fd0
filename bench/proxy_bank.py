"""Step time and memory of a proxy task from 10k to 1M classes: sampled+sparse vs all classes dense.

One proxy step = sample K classes (holding the batch labels), gather their rows with a sparse
gradient, normalized-softmax loss, backward, optimizer step on the bank. Each configuration runs
in a fresh process so its peak RSS is its own.

    .venv/bin/python bench/proxy_bank.py                     # the table in docs and the issue note
    .venv/bin/python bench/proxy_bank.py --classes 10000 --dim 256 --batch 128 --sampled 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(classes: int, dim: int, batch: int, sampled: int, mode: str, steps: int) -> dict:
    import torch

    from training.losses import NormSoftmaxLoss, cosine_to_proxies
    from training.proxies import ProxyBank, make_proxy_optimizer, sample_classes

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    bank = ProxyBank(classes, dim, g)
    loss_fn = NormSoftmaxLoss(0.05)
    if mode == "sparse":
        opt = make_proxy_optimizer(list(bank.parameters()), "sgd", lr=1.0)
    else:  # the naive baseline: every class, dense gradient, SGD with momentum over the whole bank
        opt = torch.optim.SGD(bank.parameters(), lr=1.0, momentum=0.9)
    times, sample_times = [], []
    for step in range(steps + 2):
        labels = torch.randint(0, classes, (batch,), generator=g)
        emb = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1).requires_grad_()
        t0 = time.perf_counter()
        if mode == "sparse":
            s = sample_classes(labels, classes, sampled, g)
            t1 = time.perf_counter()
            proxies = bank.gather(s.index, "cpu")
            target = s.labels
        else:
            t1 = time.perf_counter()
            proxies, target = bank.weight, labels
        loss = loss_fn(cosine_to_proxies(emb, proxies), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if step >= 2:  # warm-up steps excluded
            times.append(t2 - t0)
            sample_times.append(t1 - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {
        "classes": classes, "mode": mode, "sampled": sampled if mode == "sparse" else classes,
        "step_ms_median": round(1000 * times[len(times) // 2], 2),
        "sample_ms_median": round(1000 * sorted(sample_times)[len(sample_times) // 2], 2),
        "bank_mb": round(classes * dim * 4 / 2**20, 1),
        "peak_rss_mb": round(peak / 1024, 1), "rss_growth_mb": round((peak - base_rss) / 1024, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sampled", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dense-up-to", type=int, default=100_000,
                    help="largest M for the dense baseline (at 1M it takes seconds per step)")
    ap.add_argument("--one", nargs=2, metavar=("CLASSES", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.dim, args.batch, args.sampled, args.one[1], args.steps)))
        return 0
    rows = []
    for m in args.classes:
        for mode in ("sparse", "dense"):
            if mode == "dense" and m > args.dense_up_to:
                continue
            cmd = [sys.executable, __file__, "--one", str(m), mode, "--dim", str(args.dim), "--batch",
                   str(args.batch), "--sampled", str(args.sampled), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    import torch

    print(f"D={args.dim}, batch={args.batch}, K={args.sampled}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps\n")
    print("| classes | mode | proxies/step | step ms | of which sampling ms | bank MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['classes']:,} | {r['mode']} | {r['sampled']:,} | {r['step_ms_median']} | "
              f"{r['sample_ms_median']} | {r['bank_mb']} | {r['peak_rss_mb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
