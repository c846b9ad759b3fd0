"""Images/s of eager PyTorch vs TorchScript vs ONNX Runtime on this CPU, per trunk and batch size.

The model is built untrained (weights do not change the speed) and exported exactly as
`uembed export` does. Inputs are already-preprocessed float32 batches: this measures the model,
not decoding. Each cell: 3 warm-up runs, then repeated runs for at least --seconds; images/s =
images / wall time.

    .venv/bin/python bench/export_speed.py
    .venv/bin/python bench/export_speed.py --trunks mobilenetv3_large_100 --sizes 160 --batches 1 8 32 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def throughput(run, batch: np.ndarray, seconds: float) -> float:
    for _ in range(3):
        run(batch)
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or n < 5:
        run(batch)
        n += 1
    return n * batch.shape[0] / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trunks", nargs="*", default=["mobilenetv3_large_100", "resnet18"])
    ap.add_argument("--sizes", nargs="*", type=int, default=[160])
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads and ORT intra_op_num_threads")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from model_export.onnx import export_onnx, ort_runner, ort_session
    from model_export.torchscript import export_torchscript, load_torchscript, torchscript_runner
    from training.config import ModelConfig
    from training.model import UnifiedEmbeddingModel

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for trunk in args.trunks:
            for size in args.sizes:
                torch.manual_seed(0)
                model = UnifiedEmbeddingModel(ModelConfig(trunk=trunk, embedding_dim=256)).eval()
                ts_path = export_torchscript(model, Path(tmp) / f"{trunk}.ts", size)
                onnx_path = Path(tmp) / f"{trunk}.onnx"
                export_onnx(model, onnx_path, size)
                eager_model = model

                @torch.no_grad()
                def eager(b: np.ndarray, m=eager_model) -> np.ndarray:
                    return m(torch.from_numpy(b)).numpy()

                runners = {
                    "eager": eager,
                    "torchscript": torchscript_runner(load_torchscript(ts_path)),
                    "onnxruntime": ort_runner(ort_session(onnx_path, intra_op_threads=args.threads)),
                }
                for batch in args.batches:
                    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
                    row = {"trunk": trunk, "size": size, "batch": batch}
                    for name, run in runners.items():
                        row[name] = throughput(run, x, args.seconds)
                    rows.append(row)
                    print(row, file=sys.stderr)
    print(f"torch {torch.__version__} ({args.threads} threads), onnxruntime {ort.__version__} "
          f"(CPUExecutionProvider, intra_op_num_threads={args.threads}, inter_op_num_threads=1, "
          f"ORT_ENABLE_ALL, sequential); images/s, higher is better\n")
    print("| trunk | input | batch | eager | TorchScript | ONNX Runtime |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['trunk']} | {r['size']} | {r['batch']} | {r['eager']:.0f} | {r['torchscript']:.0f} | "
              f"{r['onnxruntime']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
