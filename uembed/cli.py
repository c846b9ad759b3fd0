"""`uembed`: one command line with subcommands. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.train import run_training

    cfg = load_config(args.config, args.overrides)
    run_dir = args.out or f"runs/{cfg.name}"
    summary = run_training(cfg, run_dir, resume=not args.no_resume)
    print(json.dumps(summary))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_run, markdown_table

    report = evaluate_run(args.run, args.out, device=args.device, num_workers=args.workers)
    print(markdown_table(report["results"]), end="")
    return 0


def _cmd_data_synthetic(args: argparse.Namespace) -> int:
    from training.config import SyntheticDataConfig
    from training.data.synthetic import generate_synthetic

    paths = generate_synthetic(SyntheticDataConfig(
        out=args.out, identities=args.identities, holdout=args.holdout, views=args.views,
        image_size=args.image_size, categories=args.categories, seed=args.seed))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def _cmd_data_folder(args: argparse.Namespace) -> int:
    from training.data.manifest import folder_manifest, write_manifest

    n = write_manifest(args.out, folder_manifest(args.root, args.label_key))
    print(f"wrote {n} records to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uembed", description="Unified visual embeddings: train, evaluate, export, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the unified multi-task embedding (torchrun for several processes)")
    p.add_argument("--config", required=True, help="training config YAML (see configs/)")
    p.add_argument("--out", help="run directory (default runs/<config name>); an existing run resumes")
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN_DIR has checkpoints")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optim.lr=0.1 tasks.identity.weight=2 train.epochs=3")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="retrieval metrics of a run's newest checkpoint on its eval sets")
    p.add_argument("--run", required=True, help="run directory or checkpoint directory")
    p.add_argument("--out", help="JSON report path (default RUN_DIR/eval.json; a .md table is written beside)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=2, help="image decoding workers")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("data", help="build training/evaluation manifests")
    dsub = p.add_subparsers(dest="source", required=True)
    s = dsub.add_parser("synthetic", help="synthetic shapes dataset (identity, category, attributes)")
    s.add_argument("--out", required=True)
    s.add_argument("--identities", type=int, default=64)
    s.add_argument("--holdout", type=int, default=16)
    s.add_argument("--views", type=int, default=6)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--categories", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_data_synthetic)
    f = dsub.add_parser("folder", help="manifest from an image-folder tree ROOT/CLASS/*.jpg")
    f.add_argument("root")
    f.add_argument("--out", required=True, help="manifest path (.jsonl)")
    f.add_argument("--label-key", default="label", help="task name the folder names label")
    f.set_defaults(func=_cmd_data_folder)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from uembed.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"uembed {args.command}: error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
