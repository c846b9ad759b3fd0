"""The multi-task training loop (single process, or DDP through torchrun).

Per step: embed the batch; in DDP all-gather embeddings (gradient flowing to the local slice)
and labels so every rank sees the global batch; for each task, mask the rows it has labels for,
sample proxies (same generator on every rank), compute its loss; sum by named weights; one
backward; dense optimizer for trunk+head (DDP-averaged), sparse optimizer for the proxy rows.
Because every rank computes the identical proxy loss on identical inputs, every rank applies the
identical sparse update and the CPU proxy banks never need to be communicated.

All randomness is a function of (seed, step): batches, augmentations, proxy samples and the
global torch RNG (dropout) are re-seeded per step, so resuming from a checkpoint continues
bit-for-bit.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_classes,
    load_proxies,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from training.config import TrainConfig, save_config
from training.data.augment import TrainTransform
from training.data.datasets import (
    IndexedConcat,
    ManifestDataset,
    MixedBatchSampler,
    TaskLabels,
    collate,
    derive_seed,
)
from training.data.manifest import Vocabulary, read_manifest
from training.data.synthetic import ensure_synthetic
from training.losses import DoubleMarginLoss, MultipleLosses, build_proxy_loss, cosine_to_proxies
from training.model import UnifiedEmbeddingModel
from training.proxies import IGNORE, ProxyBank, make_proxy_optimizer, sample_classes


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class _GatherWithGrad(torch.autograd.Function):
    """All-gather (N, D) rows from every rank; the backward returns the local slice's gradient
    times world size, so after DDP averages the trunk gradients they equal the gradient of the
    global-batch loss."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.rank, ctx.world, ctx.n = rank, world, local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n] * ctx.world


def _gather_labels(labels: torch.Tensor) -> torch.Tensor:
    if labels.ndim == 2:
        width = torch.tensor([labels.shape[1]], device=labels.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        if labels.shape[1] < int(width):
            pad = torch.full((labels.shape[0], int(width) - labels.shape[1]), IGNORE,
                             dtype=labels.dtype, device=labels.device)
            labels = torch.cat([labels, pad], dim=1)
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, labels.contiguous())
    return torch.cat(parts)


def _unit_code(embeddings: torch.Tensor) -> torch.Tensor:
    """+-1/sqrt(D), +1 where the float is > 0: the served bits as a unit vector, no gradient."""
    hard = torch.where(embeddings.detach() > 0, 1.0, -1.0).to(embeddings.dtype)
    return hard / math.sqrt(embeddings.shape[-1])


def sign_code(embeddings: torch.Tensor) -> torch.Tensor:
    """The binary embedding as a unit vector: +-1/sqrt(D), +1 where the float is > 0 (as served).

    The forward value is the code; the backward pass is the identity (straight-through), so the
    gradient that would move the code moves the float embedding under it.
    """
    return embeddings + (_unit_code(embeddings) - embeddings).detach()


def quantization_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(e, code)) for unit-norm embeddings, the code constant: 0 when every |e_i| = 1/sqrt(D)."""
    return (1.0 - (embeddings.float() * _unit_code(embeddings).float()).sum(dim=1)).mean()


def koleo_loss(embeddings: torch.Tensor, same: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """-mean log(distance to the nearest other row) for unit-norm rows (the KoLeo entropy estimate,
    up to constants). `same[i, j]` True: j is not a candidate neighbour of i (e.g. the same class).
    Rows with no candidate are left out."""
    e = embeddings.float()
    with torch.no_grad():
        dots = e @ e.T
        blocked = torch.eye(len(e), dtype=torch.bool, device=e.device)
        if same is not None:
            blocked |= same
        dots.masked_fill_(blocked, -3.0)
        nearest = dots.argmax(dim=1)
        keep = ~blocked.all(dim=1)
    if not bool(keep.any()):
        return e.sum() * 0.0
    dist = (e[keep] - e[nearest[keep]]).norm(dim=1)
    return -torch.log(dist + eps).mean()


def lr_multiplier(cfg: TrainConfig, step: int, total: int) -> float:
    progress = min(1.0, step / max(1, total))
    if cfg.optim.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.optim.schedule == "step":
        return cfg.optim.step_gamma ** sum(progress >= m for m in cfg.optim.step_milestones)
    return 1.0


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.enabled:
        name = f"cuda:{info.local_rank}"
    return torch.device(name)


class Trainer:
    """Builds data, model, proxy banks and optimizers from a config; trains and checkpoints."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, dist_info: DistInfo | None = None,
                 resume: bool = True) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(cfg.train.device, self.dist)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        if cfg.data.synthetic is not None and self.dist.is_main:
            ensure_synthetic(cfg.data.synthetic)
        if self.dist.enabled:
            dist.barrier()
        self.spec = cfg.preprocess_spec

        ckpt = latest_checkpoint(self.run_dir) if resume else None
        self._build_data(load_classes(ckpt) if ckpt else None)
        self._build_model()
        self.step, self.epoch_of_step = 0, 0
        self.nonfinite_steps, self.nonfinite_in_a_row = 0, 0
        self.init_record: dict[str, Any] | None = None
        if ckpt is not None:
            self._restore(ckpt)
        elif cfg.train.init_from:
            self._init_from(resolve_checkpoint(cfg.train.init_from))
        elif cfg.train.init_trunk:
            self._init_trunk(Path(cfg.train.init_trunk))
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # -- construction --------------------------------------------------------------------------
    def _build_data(self, classes: dict[str, list[str]] | None) -> None:
        cfg = self.cfg
        manifests = cfg.manifests()
        records = {m: read_manifest(m) for m in manifests}
        self.task_labels: list[TaskLabels] = []
        for t in cfg.tasks:
            if classes and t.name in classes:
                vocab = Vocabulary(classes[t.name])
            else:
                vocab = Vocabulary.from_records([r for m in t.manifest for r in records[m]], t.label_key)
            if len(vocab) == 0:
                raise ValueError(f"task {t.name}: no '{t.label_key}' labels in {t.manifest}")
            self.task_labels.append(TaskLabels(t.name, t.label_key, vocab, t.multi_label, frozenset(t.manifest)))
        transform = TrainTransform(self.spec, cfg.data.augment)
        self.datasets = [ManifestDataset(records[m], m, self.task_labels, transform, self.spec) for m in manifests]
        opts = [cfg.dataset_options(m) for m in manifests]
        per_batch = [o.images_per_batch or cfg.data.images_per_dataset for o in opts]
        self.sampler = MixedBatchSampler(
            [len(d) for d in self.datasets], per_batch, cfg.seed,
            rank=self.dist.rank, world_size=self.dist.world_size,
            classes=[d.class_of(o.class_key) if o.m_per_class else None
                     for d, o in zip(self.datasets, opts, strict=True)],
            m_per_class=[o.m_per_class for o in opts],
        )
        self.loader = DataLoader(
            IndexedConcat(self.datasets), batch_sampler=self.sampler, collate_fn=collate,
            num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.data.num_workers > 0,
            multiprocessing_context=cfg.data.worker_start if cfg.data.num_workers > 0 else None,
        )
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    def _build_model(self) -> None:
        cfg = self.cfg
        self.model = UnifiedEmbeddingModel(cfg.model).to(self.device)
        self.banks = nn.ModuleDict()
        self.losses: dict[str, nn.Module] = {}
        for i, (t, tl) in enumerate(zip(cfg.tasks, self.task_labels, strict=True)):
            if t.has_proxies:
                g = torch.Generator().manual_seed(derive_seed(cfg.seed, 1000 + i))
                self.banks[t.name] = ProxyBank(len(tl.vocab), cfg.model.embedding_dim, g)
                self.losses[t.name] = build_proxy_loss(t.head, temperature=t.temperature, margin=t.margin,
                                                       scale=t.scale)
            else:
                self.losses[t.name] = DoubleMarginLoss(t.pos_margin, t.neg_margin)
        self.combine = MultipleLosses({t.name: t.weight for t in cfg.tasks})
        o = cfg.optim
        groups = self.model.param_groups(o.lr, o.weight_decay, o.gem_lr_mult)
        if o.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=o.lr)
        self.proxy_optimizer = (
            make_proxy_optimizer(list(self.banks.parameters()), o.proxy_optimizer, o.proxy_lr)
            if len(self.banks) else None
        )
        if self.proxy_optimizer is not None:
            for g in self.proxy_optimizer.param_groups:
                g["base_lr"] = g["lr"]
        use_amp = (o.amp == "on") or (o.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = (torch.float16 if self.device.type == "cuda" else torch.bfloat16) if use_amp else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ddp: nn.Module = self.model
        if self.dist.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )

    def _restore(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        self.model.load_state_dict(load_file(ckpt / "model.safetensors"))
        proxies = load_proxies(ckpt)
        with torch.no_grad():
            for name, bank in self.banks.items():
                bank.weight.copy_(proxies[name])
        state = load_trainer_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.proxy_optimizer is not None:
            self.proxy_optimizer.load_state_dict(state["proxy_optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])

    def _init_from(self, ckpt: Path) -> None:
        """Weights from another run; each proxy row by class name, so new classes start fresh."""
        from safetensors.torch import load_file

        try:
            self.model.load_state_dict(load_file(ckpt / "model.safetensors"))
        except RuntimeError as e:
            raise CheckpointError(
                f"train.init_from {ckpt}: its weights do not match this config's model section ({e})") from e
        proxies, classes = load_proxies(ckpt), load_classes(ckpt)
        copied: dict[str, int] = {}
        with torch.no_grad():
            for t in self.task_labels:
                if t.name not in self.banks or t.name not in proxies:
                    continue
                old = {name: i for i, name in enumerate(classes.get(t.name, []))}
                pairs = [(i, old[n]) for i, n in enumerate(t.vocab.names) if n in old]
                if pairs:
                    new_rows, old_rows = (torch.tensor(x) for x in zip(*pairs, strict=True))
                    self.banks[t.name].weight[new_rows] = proxies[t.name][old_rows].to(self.banks[t.name].weight)
                copied[t.name] = len(pairs)
        self.init_record = {"event": "init_from", "path": str(ckpt), "proxies_copied": copied}

    def _init_trunk(self, path: Path) -> None:
        """Pretrained trunk weights (a safetensors state dict of the timm trunk, no head)."""
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"train.init_trunk {path}: no such file (`uembed data trunk` writes it)")
        state = load_file(path)
        own = self.model.trunk.state_dict()
        bad = sorted(k for k, v in state.items() if k not in own or own[k].shape != v.shape)
        if bad:
            raise CheckpointError(f"train.init_trunk {path}: {len(bad)} tensors do not fit trunk "
                                  f"{self.cfg.model.trunk}, e.g. {bad[:3]}")
        missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
        self.init_record = {"event": "init_trunk", "path": str(path), "tensors": len(state),
                            "trunk_tensors_left_at_init": missing}

    # -- one step ------------------------------------------------------------------------------
    def in_head_warmup(self, step: int) -> bool:
        return step < self.cfg.optim.head_warmup_epochs * self.steps_per_epoch

    def _set_lr(self, step: int) -> float:
        mult = lr_multiplier(self.cfg, step, self.total_steps)
        for opt in (self.optimizer, self.proxy_optimizer):
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * mult
        return mult

    def _embed(self, images: torch.Tensor, train_trunk: bool) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            if train_trunk:
                return self.ddp(images)  # the model itself when not distributed
            # Head warm-up: the trunk runs without a graph; GeM, the head and the proxies learn.
            with torch.no_grad():
                feats = self.model.trunk.forward_features(images) if self.model.pool is not None \
                    else self.model.trunk(images)
            pooled = self.model.pool(feats) if self.model.pool is not None else feats
            return self.model.embed_features(pooled, images)

    def task_losses(self, embeddings: torch.Tensor, labels: dict[str, torch.Tensor],
                    step: int, imprint: bool = True) -> dict[str, torch.Tensor]:
        """Per-task losses on the rows each task has labels for (the global batch in DDP).

        The proxy sample is a function of (seed, step, task), so a second call in the same step
        (the sign code's losses) scores against the same proxies.
        """
        out: dict[str, torch.Tensor] = {}
        for i, t in enumerate(self.cfg.tasks):
            lab = labels[t.name]
            mask = (lab != IGNORE).any(dim=1) if lab.ndim == 2 else lab != IGNORE
            if not bool(mask.any()):
                continue
            emb, lab = embeddings[mask], lab[mask]
            if t.has_proxies:
                bank = self.banks[t.name]
                if imprint and self.cfg.optim.proxy_imprint > 0 and bool(torch.isfinite(emb).all()):
                    bank.imprint(lab, emb, self.cfg.optim.proxy_imprint)  # never a NaN into the bank
                g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, step, 2000 + i))
                sample = sample_classes(lab.cpu(), bank.num_classes, t.num_sampled, g)
                proxies = bank.gather(sample.index, self.device)
                cos = cosine_to_proxies(emb.float(), proxies)
                out[t.name] = self.losses[t.name](cos, sample.labels.to(self.device))
            else:
                out[t.name] = self.losses[t.name](emb, lab.to(self.device))
        return out

    def _same_label(self, labels: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Rows that share a label of optim.koleo_exclude's (single-label) task."""
        name = self.cfg.optim.koleo_exclude
        if name is None:
            return None
        lab = labels[name]
        known = lab != IGNORE
        return (lab[:, None] == lab[None, :]) & known[:, None] & known[None, :]

    def train_step(self, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
        step = self.step
        torch.manual_seed(derive_seed(self.cfg.seed, step, self.dist.rank, 3))  # dropout & co, per step
        self._set_lr(step)
        warm = self.in_head_warmup(step)
        self.model.train()
        if warm:
            self.model.trunk.eval()  # a frozen trunk keeps its BatchNorm statistics too
        images = images.to(self.device, non_blocking=True)
        low = self.cfg.train.low_res_size
        if low and step < self.cfg.train.low_res_fraction * self.total_steps:
            images = F.interpolate(images, size=(low, low), mode="bilinear", antialias=True, align_corners=False)
        # BatchNorm's running statistics change in the forward pass: kept to undo a non-finite step.
        buffers = [b.detach().clone() for b in self.model.buffers()]
        emb = self._embed(images, train_trunk=not warm)
        if self.dist.enabled:
            emb = _GatherWithGrad.apply(emb)
            labels = {k: _gather_labels(v.to(self.device)) for k, v in labels.items()}
        labels = {k: v.to(self.device) for k, v in labels.items()}
        losses = self.task_losses(emb, labels, step)
        total = self.combine(losses)
        sign_weight = self.cfg.optim.sign_loss_weight
        if sign_weight > 0:
            sign_total = self.combine(self.task_losses(sign_code(emb), labels, step, imprint=False))
            total = total + sign_weight * sign_total
        quant_weight = self.cfg.optim.quantization_weight
        if quant_weight > 0:
            quant = quantization_loss(emb)
            total = total + quant_weight * quant
        koleo_weight = self.cfg.optim.koleo_weight
        if koleo_weight > 0:
            koleo = koleo_loss(emb, self._same_label(labels))
            total = total + koleo_weight * koleo
        self.optimizer.zero_grad(set_to_none=True)
        if self.proxy_optimizer is not None:
            self.proxy_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if warm and self.dist.enabled:
            # The warm-up forward bypasses DDP (no trunk graph), so average the head gradients here.
            for p in self.model.head_parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.dist.world_size
        grad_norm = float("nan")
        if self.cfg.optim.grad_clip > 0 and not warm:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))
        # Every rank sees the same total (global batch) and the same all-reduced gradients, so
        # every rank takes the same decision. With fp16 the scaler skips overflowing steps itself.
        nonfinite = not math.isfinite(float(total.detach())) or (
            not self.scaler.is_enabled() and not warm and self.cfg.optim.grad_clip > 0
            and not math.isfinite(grad_norm))
        if nonfinite:
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers, strict=True):
                    b.copy_(saved)
            self._skip_nonfinite(step, float(total.detach()), grad_norm)
        else:
            self.nonfinite_in_a_row = 0
            self.scaler.step(self.optimizer)
            if self.proxy_optimizer is not None:
                self.scaler.step(self.proxy_optimizer)
            self.scaler.update()
        self.step += 1
        result = {name: float(v.detach()) for name, v in losses.items()}
        if sign_weight > 0:
            result["sign"] = float(sign_total.detach())
        if quant_weight > 0:
            result["quantization"] = float(quant.detach())
        if koleo_weight > 0:
            result["koleo"] = float(koleo.detach())
        result["total"] = float(total.detach())
        result["grad_norm"] = grad_norm
        return result

    def _skip_nonfinite(self, step: int, total: float, grad_norm: float) -> None:
        """Drop this step's gradients: weights, proxies and optimizer moments stay as they were (and
        the caller has put BatchNorm's statistics back)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.proxy_optimizer is not None:
            self.proxy_optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        self._log({"event": "nonfinite_step", "step": step, "total": str(total), "grad_norm": str(grad_norm),
                   "in_a_row": self.nonfinite_in_a_row})
        if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            raise RuntimeError(f"training diverged: {self.nonfinite_in_a_row} steps in a row up to step {step} had "
                               f"a non-finite loss or gradient (last loss {total}, grad norm {grad_norm}); skipped "
                               "steps change nothing, so the last checkpoint is sound: lower optim.lr or grad_clip")

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self) -> Path | None:
        if self.dist.enabled:
            self._check_proxy_sync()
        if not self.dist.is_main:
            return None
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "proxy_optimizer": self.proxy_optimizer.state_dict() if self.proxy_optimizer else {},
            "scaler": self.scaler.state_dict(),
        }
        save_config(self.cfg, self.run_dir / "config.yaml")
        path = save_checkpoint(
            self.run_dir, self.step, model_state=self.model.state_dict(),
            proxies={n: b.weight for n, b in self.banks.items()}, cfg=self.cfg,
            classes={t.name: t.vocab.names for t in self.task_labels}, trainer_state=state,
            keep=self.cfg.train.keep_checkpoints,
        )
        self._log({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def rotate_code(self) -> dict[str, Any]:
        """After the last step: the code rotation (training/code_rotation.py) on the newest
        checkpoint, once; a resumed run whose checkpoint already holds one keeps it."""
        from training.code_rotation import rotate_run, rotation_record

        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None and rotation_record(ckpt) is not None:
            return {"skipped": f"{ckpt.name} already holds a code rotation"}
        result = rotate_run(self.run_dir, self.cfg, device=self.device, log=self._log)
        self._log(result)
        return {"checkpoint": result["checkpoint"], "report": result["report"], "seconds": result["seconds"]}

    def _check_proxy_sync(self) -> None:
        """Every rank must hold the same banks; a divergence is a bug, stop loudly."""
        digests = {n: float(b.weight.detach().double().sum() + (b.weight.detach().double() ** 2).sum())
                   for n, b in self.banks.items()}
        gathered: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(gathered, digests)
        if any(g != gathered[0] for g in gathered):
            raise RuntimeError(f"proxy banks diverged across ranks: {gathered}")

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with self.metrics_path.open("a") as fh:
                fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, on_step: Callable[[Trainer, dict[str, float]], None] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        if self.dist.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
            self._log({"event": "start", "step": self.step, "total_steps": self.total_steps,
                       "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                       "device": str(self.device), "classes": {t.name: len(t.vocab) for t in self.task_labels}})
            if self.init_record is not None and self.step == 0:
                self._log(self.init_record)
        every = cfg.train.checkpoint_every
        last: dict[str, float] = {}
        images_seen, t0 = 0, time.perf_counter()
        progress = None
        if cfg.train.progress and self.dist.is_main:
            from tqdm import tqdm

            # No tqdm monitor thread: a thread that wakes up for the GIL while the data loader forks
            # its workers can leave a worker waiting for the GIL forever (a hung worker seen in CI).
            tqdm.monitor_interval = 0
            progress = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True)
        while self.step < self.total_steps:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, in_epoch)
            for images, labels in self.loader:
                last = self.train_step(images, labels)
                images_seen += images.shape[0] * self.dist.world_size
                rate = images_seen / max(1e-9, time.perf_counter() - t0)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix({**{k: f"{v:.3f}" for k, v in last.items() if k != "grad_norm"},
                                          "img/s": f"{rate:.0f}"}, refresh=False)
                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                    self._log({"event": "train", "step": self.step, "epoch": epoch,
                               "lr": self.optimizer.param_groups[0]["lr"], "losses": last,
                               "images_per_s": round(rate, 2), "head_warmup": self.in_head_warmup(self.step - 1)})
                if (every and self.step % every == 0) or self.step == self.total_steps:
                    self.checkpoint()
                if on_step is not None:
                    on_step(self, last)
                if self.step >= self.total_steps:
                    break
            else:
                if not every:
                    self.checkpoint()
        if progress is not None:
            progress.close()
        elapsed = time.perf_counter() - t0
        summary = {"event": "end", "step": self.step, "seconds": round(elapsed, 2),
                   "images_per_s": round(images_seen / max(elapsed, 1e-9), 2),
                   "nonfinite_steps": self.nonfinite_steps, "last": last}
        self._log(summary)
        return summary


def run_training(cfg: TrainConfig, run_dir: str | Path, resume: bool = True) -> dict[str, Any]:
    info = init_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, run_dir, info, resume=resume)
        summary = trainer.fit()
        if cfg.code_rotation.steps and info.is_main:
            summary["code_rotation"] = trainer.rotate_code()
        return summary
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()
