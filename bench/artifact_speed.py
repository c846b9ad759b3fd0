"""Images/s of an exported artifact's ONNX model through ONNX Runtime, per batch size.

The model as shipped (default: models/default), an ONNX Runtime session as the service builds its
uncontended one (all cores, spinning), already-preprocessed float32 inputs (this measures the
model, not decoding; bench/serve measures the whole service). Each cell: 3 warm-up runs, then
repeated runs for at least --seconds.

    .venv/bin/python bench/artifact_speed.py
    .venv/bin/python bench/artifact_speed.py --model models/default --batches 1 16 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.export_speed import throughput


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8, 16, 32])
    ap.add_argument("--threads", type=int, default=0, help="ORT intra_op_num_threads (0: all physical cores)")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    from model_export.manifest import load_manifest
    from model_export.onnx import ort_session

    manifest = load_manifest(args.model)
    session = ort_session(manifest.path("onnx"), intra_op_threads=args.threads)
    name = session.get_inputs()[0].name
    size = int(manifest.preprocess["input_size"])
    print(f"{manifest.name} {manifest.version} ({manifest.data['model'].get('trunk')}, {size} px, "
          f"D={manifest.embedding_dim}), ONNX Runtime, threads={args.threads or 'all'}")
    print("| batch | images/s |\n|---|---|")
    rng = np.random.default_rng(0)
    for b in args.batches:
        x = rng.standard_normal((b, 3, size, size), dtype=np.float32)
        ips = throughput(lambda batch: session.run(None, {name: batch}), x, args.seconds)
        print(f"| {b} | {ips:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
