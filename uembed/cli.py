"""`uembed`: one command line with subcommands. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from uembed.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.train import run_training

    only = [t.strip() for t in args.only_tasks.split(",") if t.strip()] if args.only_tasks else None
    cfg = load_config(args.config, args.overrides, only)
    run_dir = args.out or f"runs/{cfg.name}"
    summary = run_training(cfg, run_dir, resume=not args.no_resume)
    print(json.dumps(summary))
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    from training.checkpoint import load_checkpoint_config, resolve_checkpoint
    from training.code_rotation import rotate_run
    from training.config import config_from_dict

    ckpt = resolve_checkpoint(args.run)
    cfg = config_from_dict(load_checkpoint_config(ckpt).to_dict(), args.overrides)
    if args.workers is not None:
        cfg.data.num_workers = args.workers
    result = rotate_run(ckpt, cfg, device=args.device)
    with (ckpt.parent.parent / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps({k: result[k] for k in ("checkpoint", "report", "seconds")}, indent=2))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_baseline, evaluate_run, markdown_table

    if args.baseline:
        if not args.config or not args.out or args.run:
            raise UserError("--baseline needs --config (whose eval sets to use) and --out, and no --run")
        report = evaluate_baseline(args.config, args.baseline, args.out, num_workers=args.workers)
    elif args.run:
        report = evaluate_run(args.run, args.out, device=args.device, num_workers=args.workers)
    else:
        raise UserError("give --run RUN_DIR (a trained run) or --baseline with --config")
    print(markdown_table(report["results"]), end="")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from model_export.export import ExportOptions, export_checkpoint
    from model_export.tensorrt import Profile

    opts = ExportOptions(
        formats=[f.strip() for f in args.formats.split(",") if f.strip()], name=args.name, version=args.version,
        parity_images=args.parity_images, opset=args.opset, onnx_simplify=args.onnx_simplify,
        trt_profile=Profile.parse(args.trt_profile), trt_workspace_bytes=int(args.trt_workspace_gb * (1 << 30)),
        trt_timing_cache=args.trt_timing_cache, torchscript_fp16=args.torchscript_fp16,
    )
    manifest = export_checkpoint(args.checkpoint, args.out, opts)
    print(json.dumps({"artifact": str(manifest.root), "model": manifest.name, "version": manifest.version,
                      "files": sorted(manifest.files), "parity": manifest.parity}, indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.server import serve

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    return serve(given)


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    """One flag per service setting; only flags given on the command line override UEMBED_* variables."""
    import typing

    from service.config import Settings

    for name, f in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        helptext = f"{f.description} (env UEMBED_{name.upper()}; default {f.default})"
        kw: dict = {"dest": name, "default": argparse.SUPPRESS, "help": helptext}
        if f.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(f.annotation) is typing.Literal:
            p.add_argument(flag, choices=list(typing.get_args(f.annotation)), **kw)
        else:
            p.add_argument(flag, type=f.annotation, **kw)


def _cmd_data_synthetic(args: argparse.Namespace) -> int:
    from training.config import SyntheticDataConfig
    from training.data.synthetic import generate_synthetic

    paths = generate_synthetic(SyntheticDataConfig(
        out=args.out, identities=args.identities, holdout=args.holdout, views=args.views,
        image_size=args.image_size, categories=args.categories, seed=args.seed))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def _cmd_data_emoji(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.data.emoji import EmojiOptions, build_emoji_dataset

    opts = EmojiOptions(out=Path(args.out), cache=Path(args.cache), artists=tuple(args.artists.split(",")),
                        holdout=args.holdout, seed=args.seed, skin_tones=args.skin_tones, scenes=args.scenes,
                        extra_artists=tuple(a for a in args.extra_artists.split(",") if a))
    paths = build_emoji_dataset(opts)
    print((Path(args.out) / "summary.json").read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _cmd_data_trunk(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.pretrained import build_trunk_weights
    from uembed.preprocess import IMAGENET_MEAN, IMAGENET_STD

    info = build_trunk_weights(Path(args.out), Path(args.cache), IMAGENET_MEAN, IMAGENET_STD)
    print(json.dumps({"out": args.out, **info}, indent=2))
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
    p.add_argument("--only-tasks", metavar="NAMES",
                   help="comma list: train only these tasks of the config (single-task ablations)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optim.lr=0.1 tasks.identity.weight=2 train.epochs=3")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("rotate", help="fit the code rotation on a finished run and rotate its newest checkpoint "
                       "(float embeddings unchanged, sign bits learned; training/code_rotation.py)")
    p.add_argument("--run", required=True, help="run directory or checkpoint directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="image rendering workers (default: the run's data.num_workers)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings over the run's config, e.g. code_rotation.steps=200 code_rotation.holdout=0.2")
    p.set_defaults(func=_cmd_rotate)

    p = sub.add_parser("evaluate", help="retrieval metrics of a run's newest checkpoint on its eval sets")
    p.add_argument("--run", help="run directory or checkpoint directory")
    p.add_argument("--out", help="JSON report path (default RUN_DIR/eval.json; a .md table is written beside)")
    p.add_argument("--baseline", choices=["pixels", "untrained"],
                   help="instead of a run: 16x16 downsampled pixels, or the --config network untrained")
    p.add_argument("--config", help="training config whose eval sets and network a --baseline uses")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=2, help="image decoding workers")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="export a checkpoint to TorchScript / ONNX / TensorRT with parity checks")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="artifact directory to write (manifest.json + model files)")
    p.add_argument("--formats", default="torchscript,onnx", help="comma list of torchscript, onnx, tensorrt")
    p.add_argument("--name", help="model name in the manifest (default: the training config's name)")
    p.add_argument("--version", help="model version (default: s<step>-<weights sha256 prefix>)")
    p.add_argument("--parity-images", help="manifest or folder of images for the parity check "
                   "(default: the config's eval images, else generated synthetic images)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--onnx-simplify", choices=["auto", "on", "off"], default="auto",
                   help="onnxslim: auto keeps it only if ONNX Runtime gets >= 3%% faster")
    p.add_argument("--trt-profile", default="1,16,64", help="TensorRT batch profile MIN,OPT,MAX")
    p.add_argument("--trt-workspace-gb", type=float, default=4.0, help="TensorRT workspace memory-pool limit")
    p.add_argument("--trt-timing-cache", help="TensorRT timing cache file, read and updated "
                   "(default: .tensorrt-timing.cache beside the artifact directory)")
    p.add_argument("--torchscript-fp16", choices=["auto", "on", "off"], default="auto",
                   help="also export an fp16 TorchScript for CUDA (auto: when CUDA is present)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("serve", help="serve an artifact over HTTP: POST images to /embed")
    _add_settings_flags(p)
    p.set_defaults(func=_cmd_serve)

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
    e = dsub.add_parser("emoji", help="emoji by four artists from npm (fetched with `npm pack`, cached)")
    e.add_argument("--out", required=True, help="dataset folder (manifests, eval sets, extracted images)")
    e.add_argument("--cache", default="data/npm-cache", help="where package tarballs are kept (and reused)")
    e.add_argument("--artists", default="apple,google,twitter,facebook")
    e.add_argument("--holdout", type=float, default=0.2, help="fraction of identities held out of training")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--skin-tones", action="store_true", help="skin-tone variants as identities of their own")
    e.add_argument("--scenes", type=int, default=2000,
                   help="scene-crop queries to render (the first N of a larger number are the same)")
    e.add_argument("--extra-artists", default="",
                   help="comma-separated training-only drawings from older pinned releases (google-2017, "
                        "facebook-2017, messenger, emojione), written to train_extra.jsonl (never in the held-out "
                        "split or the eval sets); none by default: they did not help (docs/results.md, v4)")
    e.set_defaults(func=_cmd_data_emoji)
    t = dsub.add_parser("trunk", help="ImageNet-pretrained MobileNetV2 trunk weights from npm (nsfwjs, `npm pack`, "
                        "cached) for train.init_trunk")
    t.add_argument("--out", default="data/pretrained/mobilenetv2_100.safetensors",
                   help="safetensors file to write (a .json with its provenance is written beside)")
    t.add_argument("--cache", default="data/npm-cache", help="where package tarballs are kept (and reused)")
    t.set_defaults(func=_cmd_data_trunk)
    f = dsub.add_parser("folder", help="manifest from an image-folder tree ROOT/CLASS/*.jpg")
    f.add_argument("root")
    f.add_argument("--out", required=True, help="manifest path (.jsonl)")
    f.add_argument("--label-key", default="label", help="task name the folder names label")
    f.set_defaults(func=_cmd_data_folder)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError) as e:
        print(f"uembed {args.command}: error: {e}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
