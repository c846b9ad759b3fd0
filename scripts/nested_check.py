"""Nested validation of the sign-bit settings: how far the binary codes fall behind float on identities
that the model never trained on, measured without touching the eval sets.

The eval sets are the only identities the shipped model never saw, so settings chosen on them would be
fitted to them, and settings chosen on held-out *training* identities are judged where the trunk's
margins are wide. So a proxy model is trained (by `uembed train`) without a fifth of the training
identities, and measured there with the eval sets' own generators (training/data/emoji.py):

    python scripts/nested_check.py split --config configs/default.yaml --out runs/nested
    uembed train --config runs/nested/config.yaml --out runs/nested/proxy
    python scripts/nested_check.py check --run runs/nested/proxy --config configs/default.yaml \\
        --val runs/nested/val.jsonl --work runs/nested/sets

`split` writes the training manifest without a seeded fifth of its identities (`train.jsonl`), that
fifth (`val.jsonl`), both with image paths resolved, and the config with those manifests, no code
rotation and no eval sets (`config.yaml`: the proxy is never measured on the eval identities).
`check` builds browse and camera sets on the validation identities (`--rounds` times, each with
the query artists in a new seeded order, pooled) and a scene set of `--scenes` crops; embeds them
and the proxy's training images' views with the proxy; fits the code rotation of `--config` on
those views (training/code_rotation.py, the same function `uembed train` runs); and prints
binary-minus-float P@1 (95% interval of the paired difference) per kind, before and after the
rotation, as JSON lines. The proxy trains on 80% of the data, so its figures estimate the shipped
model's, they are not its figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.checkpoint import load_model, resolve_checkpoint
from training.code_rotation import ViewsDataset, _class_labels, embed_views, fit_rotation, rotation_labels
from training.config import load_config, save_config
from training.data import emoji
from training.data.manifest import Record, read_manifest, write_manifest
from training.evaluate import embed_records, evaluate_embeddings, paired_loss


def split(args: argparse.Namespace) -> None:
    cfg = load_config(args.config)
    manifest, key = _class_labels(cfg)
    records = read_manifest(manifest)
    values = sorted({str(r.labels[key]) for r in records if r.labels.get(key) is not None})
    rng = np.random.default_rng(args.seed)
    held = set(rng.choice(values, size=max(1, round(args.fraction * len(values))), replace=False).tolist())
    out = Path(args.out)
    train = [r for r in records if str(r.labels.get(key)) not in held]
    val = [r for r in records if str(r.labels.get(key)) in held]
    write_manifest(out / "train.jsonl", [Record(Path(r.image).resolve(), r.labels) for r in train])
    write_manifest(out / "val.jsonl", [Record(Path(r.image).resolve(), r.labels) for r in val])
    for ds in cfg.data.datasets:
        if ds.manifest == manifest:
            ds.manifest = str(out / "train.jsonl")
    for task in cfg.tasks:
        task.manifest = [str(out / "train.jsonl") if m == manifest else m for m in task.manifest]
    cfg.code_rotation.steps = 0
    cfg.eval = []
    save_config(cfg, out / "config.yaml")
    print(json.dumps({"manifest": manifest, "label_key": key, "values": len(values), "held_out": len(held),
                      "train_images": len(train), "val_images": len(val), "config": str(out / "config.yaml")}))


def _sets(val: list[Record], key: str, work: Path, rounds: int, scenes: int,
          seed: int) -> dict[str, dict[str, Path]]:
    """The eval generators on the validation identities: browse and camera `rounds` times, one scene set."""
    by: dict[str, list[Record]] = {}
    for r in val:
        by.setdefault(str(r.labels[key]), []).append(r)
    held = [{"imgs": [(str(i), r.image) for i, r in enumerate(rs)], "labels": dict(rs[0].labels)}
            for _, rs in sorted(by.items())]
    if len(held) < 5:
        raise SystemExit(f"{len(held)} validation identities: a scene pastes up to 5 of them; split off more")

    def images_of(e: dict) -> list:
        return e["imgs"]

    def labels(e: dict) -> dict:
        return e["labels"]

    rng = np.random.default_rng(seed)
    sets = {}
    for k in range(rounds):
        order = [held[i] for i in rng.permutation(len(held))]
        sets[f"browse{k}"] = emoji._browse_set(work / f"round{k}", order, images_of, labels)
        sets[f"camera{k}"] = emoji._camera_set(work / f"round{k}", order, images_of, labels, seed + 1 + k)
    sets["scene"] = emoji._scene_set(work / "scene", held, images_of, labels, seed, scenes)
    return sets


def _report(embedded: dict[str, dict], rotation: torch.Tensor | None) -> dict[str, dict]:
    pooled: dict[str, dict[str, list[np.ndarray]]] = {}
    for name, s in embedded.items():
        q, g = s["q"], s["g"]
        if rotation is not None:
            q, g = q @ rotation.numpy(), g @ rotation.numpy()
        res = evaluate_embeddings(q, s["ql"], g, s["gl"])  # what `uembed evaluate` runs on each set
        flt, bits = res["float"]["per_query"], res["binary"]["per_query"]
        p = pooled.setdefault(name.rstrip("0123456789"), {"f": [], "b": [], "f20": [], "b20": []})
        p["f"].append(np.asarray(flt["p@1"], dtype=bool))
        p["b"].append(np.asarray(bits["p@1"], dtype=bool))
        p["f20"].append(np.asarray(flt["avg_p@20"]))
        p["b20"].append(np.asarray(bits["avg_p@20"]))
    out = {}
    for kind, p in pooled.items():
        f, b = np.concatenate(p["f"]), np.concatenate(p["b"])
        gap = paired_loss(f, b, ("float", "binary"))
        out[kind] = {"queries": len(f), "float_p@1": round(100 * f.mean(), 2), "binary_p@1": round(100 * b.mean(), 2),
                     "gap": round(100 * gap["loss"], 2), "gap_ci95": [round(100 * x, 2) for x in gap["ci95"]],
                     "float_avg_p@20": round(100 * np.concatenate(p["f20"]).mean(), 2),
                     "binary_avg_p@20": round(100 * np.concatenate(p["b20"]).mean(), 2)}
    return out


def check(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    model, proxy_cfg = load_model(resolve_checkpoint(args.run), "cpu")
    cfg = load_config(args.config)
    spec = proxy_cfg.preprocess_spec
    cr = cfg.code_rotation
    _, key = _class_labels(proxy_cfg)
    sets = _sets(read_manifest(args.val), key, Path(args.work), args.rounds, args.scenes, args.seed)
    embedded = {}
    for name, paths in sets.items():
        kind = name.rstrip("0123456789")
        label = args.browse_label if kind == "browse" else key
        q, g = read_manifest(paths[f"{kind}_query"]), read_manifest(paths[f"{kind}_gallery"])
        embedded[name] = {"q": embed_records(model, q, spec, num_workers=args.workers),
                          "g": embed_records(model, g, spec, num_workers=args.workers),
                          "ql": [str(r.labels[label]) for r in q], "gl": [str(r.labels[label]) for r in g]}
    # The proxy's training images (its config points at split's train.jsonl), labelled as `uembed train`
    # does, with the extra labels of the settings being checked.
    records, labels, extra = rotation_labels(proxy_cfg, cr.extra_labels)
    views = embed_views(model, ViewsDataset(records, spec, cfg.seed, cr.draws), num_workers=args.workers)
    embed_s = time.perf_counter() - t0
    rotation = fit_rotation(views, labels, cr, seed=cfg.seed,
                            extra=[(v, float(cr.extra_labels[k])) for k, v in extra.items()])
    print(json.dumps({"rotation": "none", **_report(embedded, None)}))
    print(json.dumps({"rotation": {"config": args.config, "settings": asdict(cr)},
                      **_report(embedded, rotation),
                      "seconds": {"embed": round(embed_s, 1), "total": round(time.perf_counter() - t0, 1)}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(required=True)
    s = sub.add_parser("split", help="hold a fifth of the training identities out; write the proxy's config")
    s.add_argument("--config", default="configs/default.yaml")
    s.add_argument("--out", default="runs/nested")
    s.add_argument("--fraction", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=2026)
    s.set_defaults(func=split)
    c = sub.add_parser("check", help="the binary gap of the proxy on the held-out identities, before and after "
                                     "the config's code rotation")
    c.add_argument("--run", required=True, help="the proxy run (trained on split's config)")
    c.add_argument("--config", default="configs/default.yaml", help="whose code_rotation settings to fit")
    c.add_argument("--val", required=True, help="split's val.jsonl")
    c.add_argument("--work", default="runs/nested/sets", help="where the rendered sets go")
    c.add_argument("--rounds", type=int, default=4, help="browse and camera sets, each with other query artists")
    c.add_argument("--scenes", type=int, default=2000)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--browse-label", default="subcategory", help="what makes two images relevant in browse")
    c.add_argument("--workers", type=int, default=2, help="data-loading processes")
    c.set_defaults(func=check)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
