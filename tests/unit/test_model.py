"""Model pieces: GeM, the embedding head, binarization, pruning of unused trunk layers."""

from __future__ import annotations

import timm
import torch

from training.config import ModelConfig
from training.model import GeM, UnifiedEmbeddingModel, binarize, prune_unused


def test_gem_between_average_and_max() -> None:
    x = torch.rand(2, 4, 5, 5) + 0.01
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(-2, -1)), atol=1e-6)
    big = GeM(p=60.0)(x)
    assert torch.all(big <= x.amax(dim=(-2, -1)) + 1e-5) and torch.all(big >= x.mean(dim=(-2, -1)))
    manual = x.pow(3).mean(dim=(-2, -1)).pow(1 / 3)
    assert torch.allclose(GeM(p=3.0)(x), manual, atol=1e-6)


def test_model_embeds_unit_vectors_and_groups_parameters() -> None:
    model = UnifiedEmbeddingModel(ModelConfig(trunk="test_resnet", embedding_dim=24)).eval()
    out = model(torch.randn(3, 3, 48, 48))
    assert out.shape == (3, 24) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(binarize(out), out > 0)
    groups = {g["name"]: g for g in model.param_groups(lr=0.1, weight_decay=1e-4, gem_lr_mult=10)}
    assert groups["gem"]["lr"] == 1.0 and groups["gem"]["weight_decay"] == 0.0
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    assert model.head.norm.elementwise_affine is False and model.head.proj.bias is None


def test_unused_head_layers_are_pruned_without_changing_features() -> None:
    trunk = timm.create_model("mobilenetv3_small_050", num_classes=0, global_pool="").eval()
    x = torch.randn(2, 3, 64, 64)
    before = trunk.forward_features(x)
    assert prune_unused(trunk) == ["conv_head"]
    trunk.eval()
    assert torch.equal(trunk.forward_features(x), before)
    assert prune_unused(trunk) == []  # nothing left to prune
