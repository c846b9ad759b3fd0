"""The unified embedding model: timm trunk -> GeM -> LayerNorm (no affine) -> Linear -> L2 norm;
optionally the input's colour layout (a coarse grid of average colours) joins the head's input, and
optionally a tanh saturates the projection so the float embedding nears its binary code."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.config import ModelConfig


class GeM(nn.Module):
    """Generalized-mean pooling with a learned power p (p=1 average, p->inf max; GrokNet)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 and divided by each map's maximum first: x**p overflows fp16 for activations
        # above ~40 at p=3, and float32 too once p has grown (the v3 run ended at p=6.75). A v4
        # run's loss turned NaN between steps 2,180 and 2,200 (its checkpoints from before were
        # rotated away, so the cause is not pinned down; this overflow is one candidate). GeM is
        # homogeneous of degree 1 (gem(c*x) = c*gem(x)), so the value and the gradients are the
        # same; the maximum is detached and only scales.
        p = self.p.float().clamp(min=1.0)
        x = x.float().clamp(min=self.eps)
        top = x.amax(dim=(-2, -1)).detach()
        pooled = (x / top[..., None, None]).pow(p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / p) * top

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, eps={self.eps}"


class EmbeddingHead(nn.Module):
    """LayerNorm without affine then a bias-free projection (Zhai & Wu, BMVC 2019), L2-normalized.

    With `extra_features`, a second input (the colour layout) gets its own LayerNorm and joins the
    first before the projection, so neither input's scale decides its share; the projection learns it.

    With `saturation` b > 0 the projection y passes through tanh(b * sqrt(D) * y / |y|) before the
    L2 norm (HashNet, Cao et al. 2017, with a fixed b): each coordinate is scaled to unit RMS, then
    squashed towards +-1, so the embedding nears its own sign code (cos 0.80 -> 0.95 at b = 3 for
    Gaussian-like coordinates) and the losses train the float embedding that binarizes. tanh keeps
    signs, so the bits are those of y.
    """

    def __init__(self, in_features: int, dim: int, extra_features: int = 0, saturation: float = 0.0) -> None:
        super().__init__()
        self.saturation = float(saturation)
        self.saturation_scale = self.saturation * math.sqrt(dim)
        self.norm = nn.LayerNorm(in_features, elementwise_affine=False)
        self.extra_norm = nn.LayerNorm(extra_features, elementwise_affine=False) if extra_features else None
        self.proj = nn.Linear(in_features + extra_features, dim, bias=False)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(x)
        if self.extra_norm is not None:
            if extra is None:
                raise ValueError("this head was built with extra features; pass them")
            x = torch.cat([x, self.extra_norm(extra)], dim=-1)
        y = self.proj(x)
        if self.saturation > 0:
            y = torch.tanh(F.normalize(y, dim=-1) * self.saturation_scale)
        return F.normalize(y, dim=-1)

    def extra_repr(self) -> str:
        return f"saturation={self.saturation}" if self.saturation else ""


def color_layout(images: torch.Tensor, grid: int) -> torch.Tensor:
    """The images' average colour on a grid x grid layout, flattened: (N, 3 * grid**2)."""
    return F.adaptive_avg_pool2d(images.float(), grid).flatten(1)


def create_trunk(cfg: ModelConfig) -> tuple[nn.Module, int, bool]:
    """A timm trunk without classifier. Returns (trunk, feature channels, feature map is spatial)."""
    import timm

    kwargs: dict[str, Any] = {"drop_rate": cfg.drop_rate, **cfg.trunk_kwargs}
    trunk = timm.create_model(cfg.trunk, pretrained=cfg.pretrained, num_classes=0, global_pool="", **kwargs)
    spatial = True
    with torch.no_grad():
        was_training = trunk.training
        trunk.eval()
        probe = trunk.forward_features(torch.zeros(1, 3, 64, 64)) if _accepts_any_size(trunk) else None
        trunk.train(was_training)
    if probe is not None and probe.ndim != 4:
        spatial = False
    if not spatial:
        # Token models (ViT...): let timm pool (class token or average), GeM needs spatial maps.
        trunk = timm.create_model(cfg.trunk, pretrained=cfg.pretrained, num_classes=0, **kwargs)
    elif probe is not None:
        prune_unused(trunk)
    return trunk, int(trunk.num_features), spatial


def prune_unused(trunk: nn.Module, size: int = 64) -> list[str]:
    """Replace trunk modules that `forward_features` never uses with Identity; return their names.

    Some timm trunks keep head layers that only `forward_head` runs (mobilenetv3's 960->1280
    `conv_head`: 1.2M parameters). We pool `forward_features` ourselves, so those weights would be
    trained (decayed) for nothing, checkpointed and shipped. One probe backward finds them.
    """
    was_training = trunk.training
    trunk.eval()
    trunk.forward_features(torch.zeros(2, 3, size, size)).float().sum().backward()
    unused = {n for n, p in trunk.named_parameters() if p.grad is None}
    trunk.zero_grad(set_to_none=True)
    trunk.train(was_training)
    pruned: list[str] = []
    for name, module in list(trunk.named_modules()):
        if not name or any(name.startswith(done + ".") for done in pruned):
            continue
        names = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if names and all(n in unused for n in names):
            parent_name, _, attr = name.rpartition(".")
            setattr(trunk.get_submodule(parent_name) if parent_name else trunk, attr, nn.Identity())
            pruned.append(name)
    return pruned


def _accepts_any_size(trunk: nn.Module) -> bool:
    cfg = getattr(trunk, "pretrained_cfg", {}) or {}
    return not cfg.get("fixed_input_size", False)


class UnifiedEmbeddingModel(nn.Module):
    """Images (normalized NCHW float) -> L2-normalized embeddings (N, D)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk, self.num_features, self.spatial = create_trunk(cfg)
        self.pool = GeM(cfg.gem_p, cfg.gem_eps) if self.spatial else None
        self.head = EmbeddingHead(self.num_features, cfg.embedding_dim, 3 * cfg.color_layout**2, cfg.saturation)

    @property
    def embedding_dim(self) -> int:
        return self.cfg.embedding_dim

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Trunk + pooling: (N, C) descriptors before the embedding head."""
        if self.pool is None:
            return self.trunk(images)
        return self.pool(self.trunk.forward_features(images))

    def embed_features(self, pooled: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The head on pooled trunk features (and the colour layout of `images` when configured)."""
        layout = color_layout(images, self.cfg.color_layout) if self.cfg.color_layout else None
        return self.head(pooled.float(), layout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.forward_features(images), images)

    def param_groups(self, lr: float, weight_decay: float, gem_lr_mult: float) -> list[dict[str, Any]]:
        """Trunk and head weights decay; norms, biases and GeM's p don't; p learns `gem_lr_mult` faster."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad or name == "pool.p":
                continue
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
        if self.pool is not None:
            groups.append({"name": "gem", "params": [self.pool.p], "lr": lr * gem_lr_mult, "weight_decay": 0.0})
        for g in groups:
            g["base_lr"] = g["lr"]
        return [g for g in groups if g["params"]]

    def head_parameters(self) -> list[nn.Parameter]:
        """What a head warm-up trains besides the proxies: pooling and the embedding projection."""
        params = list(self.head.parameters())
        if self.pool is not None:
            params.append(self.pool.p)
        return params


def binarize(embeddings: torch.Tensor) -> torch.Tensor:
    """Binary code: bit = 1 where the embedding is > 0 (Pinterest's thresholding at zero)."""
    return embeddings > 0
