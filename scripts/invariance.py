"""Where a model loses the camera set: cross-artist identity P@1 on the held-out drawings, clean,
only resized and padded onto white (the first step of the camera rendering), and fully rendered
(the camera set's own queries). Same queries and gallery as the browse and camera sets.

    .venv/bin/python scripts/invariance.py --run runs/ablation/unified
    .venv/bin/python scripts/invariance.py --config configs/default.yaml --baseline pixels
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data.manifest import read_manifest
from training.evaluate import _labels, embed_records, evaluate_embeddings
from uembed.preprocess import PreprocessSpec


def padded(path: Path, k: int, seed: int = 0) -> Image.Image:
    """The drawing resized to 128 px and padded by 5-35% of its side on white, like camera_view's
    first step without the textured background."""
    rng = np.random.default_rng([seed, 23, k])
    with Image.open(path) as im:
        rgba = im.convert("RGBA").resize((128, 128), Image.Resampling.BICUBIC)
    pad = int(128 * rng.uniform(0.05, 0.35))
    canvas = Image.new("RGBA", (128 + 2 * pad, 128 + 2 * pad), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, (pad, pad))
    return canvas.convert("RGB")


class _Padded(torch.utils.data.Dataset):
    def __init__(self, records: list, spec: PreprocessSpec) -> None:
        self.records, self.spec = records, spec

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.spec.to_array(padded(Path(self.records[i].image), i)))


@torch.no_grad()
def _embed_padded(model: torch.nn.Module, records: list, spec: PreprocessSpec) -> np.ndarray:
    model.eval()
    loader = torch.utils.data.DataLoader(_Padded(records, spec), batch_size=64)
    return np.concatenate([model(batch).float().numpy() for batch in loader])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a training run (its newest checkpoint and config)")
    ap.add_argument("--config", help="with --baseline: the config whose eval sets and preprocessing to use")
    ap.add_argument("--baseline", choices=["pixels"])
    args = ap.parse_args()
    if args.run:
        from training.checkpoint import load_model, resolve_checkpoint

        model, cfg = load_model(resolve_checkpoint(args.run), "cpu")
    elif args.config and args.baseline:
        from training.config import load_config
        from training.evaluate import PixelBaseline

        cfg, model = load_config(args.config), PixelBaseline(16)
    else:
        ap.error("give --run, or --config with --baseline")
    sets = {es.name: es for es in cfg.eval}
    if not {"browse", "camera"} <= set(sets):
        ap.error("the config needs the browse and camera eval sets (uembed data emoji)")
    spec = cfg.preprocess_spec
    clean_q, gallery = read_manifest(sets["browse"].query), read_manifest(sets["browse"].gallery)
    camera_q = read_manifest(sets["camera"].query)
    if [str(r.image) for r in gallery] != [str(r.image) for r in read_manifest(sets["camera"].gallery)]:
        ap.error("the browse and camera sets must share their gallery")
    g_emb = embed_records(model, gallery, spec, num_workers=0)
    g_lab = _labels(gallery, "identity", "gallery")
    rows = {
        "clean": embed_records(model, clean_q, spec, num_workers=0),
        "padded": _embed_padded(model, clean_q, spec),
        "camera": embed_records(model, camera_q, spec, num_workers=0),
    }
    q_lab = _labels(clean_q, "identity", "query")
    print("| query | float p@1 | binary p@1 |\n|---|---|---|")
    for name, q_emb in rows.items():
        r = evaluate_embeddings(q_emb, q_lab, g_emb, g_lab)
        print(f"| {name} | {100 * r['float']['p@1']:.1f} | {100 * r['binary']['p@1']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
