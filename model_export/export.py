"""`uembed export`: checkpoint -> artifact directory, every format checked against eager PyTorch.

Order: weights (safetensors copy) -> each requested format, exported then loaded back and run on
the parity images in batches of 1, 3 and 17 (dynamic batch) -> parity figures checked against the
precision's bounds -> manifest.json written last, so an interrupted or failed export leaves no
manifest and can never be served.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export.manifest import MANIFEST_NAME, Manifest, file_entry, load_manifest, write_manifest
from model_export.onnx import DEFAULT_OPSET, export_onnx, maybe_simplify, ort_runner, ort_session
from model_export.parity import check_bounds, load_images, parity_figures, run_batched
from model_export.tensorrt import Profile, TensorRTError, TensorRTRunner, build_engine, tensorrt_available
from model_export.torchscript import export_torchscript, load_torchscript, torchscript_runner
from training.checkpoint import load_checkpoint_config, load_classes, resolve_checkpoint
from training.checkpoint import load_model as load_checkpoint_model
from training.data.manifest import IMAGE_SUFFIXES, read_manifest
from uembed.errors import UserError

FORMATS = ("torchscript", "onnx", "tensorrt")
PARITY_IMAGES = 48


class ExportError(UserError):
    pass


@dataclass
class ExportOptions:
    formats: Sequence[str] = ("torchscript", "onnx")
    name: str | None = None
    version: str | None = None
    parity_images: str | None = None  # manifest, folder, or None: the config's eval images / synthetic
    opset: int = DEFAULT_OPSET
    onnx_simplify: str = "auto"
    trt_profile: Profile = field(default_factory=Profile)
    trt_workspace_bytes: int = 4 << 30
    trt_timing_cache: str | None = None
    torchscript_fp16: str = "auto"  # auto: when CUDA is present; on; off


def _parity_paths(opts: ExportOptions, cfg: Any, tmp: Path) -> list[Path]:
    if opts.parity_images:
        src = Path(opts.parity_images)
        if src.is_dir() and not any(src.glob("*.jsonl")):
            paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths = [r.image for r in read_manifest(src)]
        if not paths:
            raise ExportError(f"no images in {src}")
        return paths[:PARITY_IMAGES]
    paths: list[Path] = []
    for es in cfg.eval:
        for m in (es.query, es.gallery):
            if Path(m).exists():
                paths += [r.image for r in read_manifest(m)]
    paths = list(dict.fromkeys(paths))
    if len(paths) >= 8:
        step = max(1, len(paths) // PARITY_IMAGES)
        return paths[::step][:PARITY_IMAGES]
    # No eval images on this machine: real encoded images from the synthetic generator.
    from training.config import SyntheticDataConfig
    from training.data.synthetic import generate_synthetic

    made = generate_synthetic(SyntheticDataConfig(out=str(tmp / "parity"), identities=16, holdout=4, views=3,
                                                  image_size=max(64, cfg.preprocess_spec.input_size)))
    return [r.image for name in ("train", "query", "gallery") for r in read_manifest(made[name])][:PARITY_IMAGES]


def export_checkpoint(checkpoint: str | Path, out: str | Path, opts: ExportOptions | None = None,
                      log: Any = print) -> Manifest:
    opts = opts or ExportOptions()
    unknown = set(opts.formats) - set(FORMATS)
    if unknown or not opts.formats:
        raise ExportError(f"unknown formats {sorted(unknown)}; choose from {', '.join(FORMATS)}")
    if "tensorrt" in opts.formats:
        ok, why = tensorrt_available()
        if not ok:
            raise ExportError(f"cannot build a TensorRT engine here: {why}")
    ckpt = resolve_checkpoint(checkpoint)
    cfg = load_checkpoint_config(ckpt)
    spec = cfg.preprocess_spec
    model, _ = load_checkpoint_model(ckpt, "cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    weights = out / "weights.safetensors"
    shutil.copyfile(ckpt / "model.safetensors", weights)
    files: dict[str, dict[str, Any]] = {"weights": file_entry(out, weights, "safetensors", "fp32")}
    parity: dict[str, dict[str, Any]] = {}

    with tempfile.TemporaryDirectory() as tmp:
        paths = _parity_paths(opts, cfg, Path(tmp))
        images = load_images(paths, spec)
    with torch.no_grad():
        reference = np.concatenate([model(torch.from_numpy(images[i : i + 16])).numpy()
                                    for i in range(0, len(images), 16)])
    log(f"parity: {len(images)} images, reference = eager PyTorch fp32")

    def check(key: str, precision: str, runner: Any, batch_sizes: Sequence[int] = (1, 3, 17)) -> None:
        figures = parity_figures(reference, run_batched(runner, images, batch_sizes))
        figures["batch_sizes"] = list(batch_sizes)
        check_bounds(key, precision, figures)
        parity[key] = figures
        log(f"{key} ({precision}): cosine min {figures['cosine_min']:.6f} mean {figures['cosine_mean']:.6f}, "
            f"bits {figures['bits_agree']:.4%}, nn {figures.get('nn_agree', 1.0):.2%}")

    size = spec.input_size
    if "torchscript" in opts.formats:
        path = export_torchscript(model, out / "model.ts", size)
        check("torchscript", "fp32", torchscript_runner(load_torchscript(path)))
        files["torchscript"] = file_entry(out, path, "torchscript", "fp32", device="cpu,cuda")
        want_fp16 = opts.torchscript_fp16 == "on" or (opts.torchscript_fp16 == "auto" and torch.cuda.is_available())
        if want_fp16:
            if not torch.cuda.is_available():
                raise ExportError("--torchscript-fp16 on needs CUDA")
            fresh, _ = load_checkpoint_model(ckpt, "cpu")
            path16 = export_torchscript(fresh, out / "model.fp16.ts", size, fp16=True, device="cuda")
            check("torchscript_fp16", "fp16", torchscript_runner(load_torchscript(path16, "cuda"), "cuda"))
            files["torchscript_fp16"] = file_entry(out, path16, "torchscript", "fp16", device="cuda")
        else:
            (out / "model.fp16.ts").unlink(missing_ok=True)
    if "onnx" in opts.formats or "tensorrt" in opts.formats:
        path = out / "model.onnx"
        info = export_onnx(model, path, size, opts.opset)
        info |= maybe_simplify(path, size, opts.onnx_simplify)
        check("onnx", "fp32", ort_runner(ort_session(path)))
        files["onnx"] = file_entry(out, path, "onnx", "fp32", **info)
    if "tensorrt" in opts.formats:
        plan = out / "model.plan"
        cache = Path(opts.trt_timing_cache) if opts.trt_timing_cache else out.parent / ".tensorrt-timing.cache"
        t0 = time.perf_counter()
        info = build_engine(out / "model.onnx", plan, size, profile=opts.trt_profile,
                            workspace_bytes=opts.trt_workspace_bytes, timing_cache=cache)
        info["build_seconds"] = round(time.perf_counter() - t0, 1)
        runner = TensorRTRunner(plan, info)
        sizes = [b for b in (1, 3, 17) if opts.trt_profile.min <= b <= opts.trt_profile.max] or [opts.trt_profile.max]
        check("tensorrt", "fp16", runner, sizes)
        files["tensorrt"] = file_entry(out, plan, "tensorrt", "fp16", **info)

    classes = load_classes(ckpt)
    step = int(ckpt.name.split("_")[-1]) if ckpt.name.startswith("step_") else None
    weights_sha = files["weights"]["sha256"]
    manifest = {
        "model": {
            "name": opts.name or cfg.name,
            "version": opts.version or (f"s{step}-{weights_sha[:8]}" if step is not None else weights_sha[:12]),
            "embedding_dim": cfg.model.embedding_dim,
            "trunk": cfg.model.trunk,
            "color_layout": cfg.model.color_layout,
            "saturation": cfg.model.saturation,
            "checkpoint": str(ckpt),
            "step": step,
            "init_from": cfg.train.init_from or None,  # the run a fine-tune started from, if any
            "init_trunk": _trunk_provenance(cfg.train.init_trunk),  # pretrained trunk weights, if any
            "code_rotation": _rotation_provenance(ckpt),  # the learned rotation of the sign bits, if any
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch_version": torch.__version__,
            "tasks": {t.name: {"head": t.head, "classes": len(classes.get(t.name, []))} for t in cfg.tasks},
        },
        "preprocess": spec.to_dict(),
        "binary": {"threshold": 0.0, "bit": "1 where float > 0", "packing": "numpy.packbits, MSB first"},
        "files": files,
        "parity": parity,
    }
    write_manifest(out, manifest)
    return load_manifest(out)


def _rotation_provenance(ckpt: Path) -> dict[str, Any] | None:
    """What training/code_rotation.py recorded in the checkpoint: its settings and the binary P@1
    before and after on the images it measured, or None for a checkpoint without a code rotation."""
    from training.code_rotation import rotation_record

    record = rotation_record(ckpt)
    if record is None:
        return None
    keep = ("settings", "manifest", "label_key", "views", "images", "fit_images", "report")
    return {k: record[k] for k in keep if k in record}


def _trunk_provenance(path: str) -> dict[str, Any] | None:
    """train.init_trunk and, from the .json `uembed data trunk` writes beside it, where it came from."""
    if not path:
        return None
    info: dict[str, Any] = {"path": path}
    sidecar = Path(path).with_suffix(".json")
    if sidecar.is_file():
        info["source"] = json.loads(sidecar.read_text()).get("source")
    return info


__all__ = ["FORMATS", "ExportError", "ExportOptions", "TensorRTError", "export_checkpoint"]
