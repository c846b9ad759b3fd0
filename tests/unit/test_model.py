"""Model pieces: GeM, the embedding head, its colour-layout input and its saturation, binarization,
pruning of unused trunk layers."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from training.config import ModelConfig
from training.model import GeM, UnifiedEmbeddingModel, binarize, color_layout, prune_unused


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


def test_color_layout_joins_the_head_input() -> None:
    torch.manual_seed(0)
    model = UnifiedEmbeddingModel(ModelConfig(trunk="test_resnet", embedding_dim=24, color_layout=4)).eval()
    c = model.num_features
    assert model.head.proj.weight.shape == (24, c + 3 * 16)
    x = torch.randn(3, 3, 48, 48)
    out = model(x)
    assert out.shape == (3, 24) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    # The path the head warm-up takes (pooled features computed apart) gives the same embedding.
    assert torch.allclose(model.embed_features(model.forward_features(x), x), out, atol=1e-6)
    layout = color_layout(x, 4)
    assert layout.shape == (3, 48)
    assert torch.allclose(layout[:, 0], x[:, 0, :12, :12].mean(dim=(-2, -1)), atol=1e-6)  # red, top-left cell
    # With the trunk's columns of the projection zeroed, the embedding is the layout's alone.
    with torch.no_grad():
        model.head.proj.weight[:, :c] = 0
    only = F.normalize(F.layer_norm(layout, (48,)) @ model.head.proj.weight[:, c:].T, dim=1)
    assert torch.allclose(model(x), only, atol=1e-5)
    # So two images of the same average colours embed alike, whatever the finer detail.
    blurred = F.interpolate(F.avg_pool2d(x, 12), scale_factor=12, mode="nearest")
    assert torch.allclose(model(blurred), only, atol=1e-5)
    assert not torch.allclose(model(x.flip(-1)), only, atol=1e-3)  # and a different layout does not


def test_saturation_keeps_the_bits_and_brings_the_float_to_its_code() -> None:
    torch.manual_seed(0)
    plain = UnifiedEmbeddingModel(ModelConfig(trunk="test_resnet", embedding_dim=64, color_layout=4)).eval()
    x = torch.randn(16, 3, 48, 48)
    base = plain(x)
    code = torch.where(base > 0, 1.0, -1.0) / 8.0  # the unit-norm sign code, sqrt(64) = 8

    def code_cos(e: torch.Tensor) -> float:
        return float((e * code).sum(dim=1).mean().detach())

    previous = code_cos(base)
    for b in (1.0, 3.0, 10.0):
        sat = UnifiedEmbeddingModel(ModelConfig(trunk="test_resnet", embedding_dim=64, color_layout=4,
                                                saturation=b)).eval()
        sat.load_state_dict(plain.state_dict())  # no new parameters
        out = sat(x)
        assert torch.allclose(out.norm(dim=1), torch.ones(16), atol=1e-5)
        assert torch.equal(binarize(out), binarize(base))
        # Stronger saturation, closer to the code: the float embedding nears what it binarizes to.
        assert code_cos(out) > previous
        previous = code_cos(out)
        # The formula: tanh of the unit-RMS projection, scaled by b, then L2-normalized.
        y = sat.head.proj(torch.cat([F.layer_norm(sat.forward_features(x), (sat.num_features,)),
                                     F.layer_norm(color_layout(x, 4), (48,))], dim=1))
        want = F.normalize(torch.tanh(b * 8.0 * F.normalize(y, dim=1)), dim=1)
        assert torch.allclose(out, want, atol=1e-5)
    assert previous > 0.97


def test_unused_head_layers_are_pruned_without_changing_features() -> None:
    trunk = timm.create_model("mobilenetv3_small_050", num_classes=0, global_pool="").eval()
    x = torch.randn(2, 3, 64, 64)
    before = trunk.forward_features(x)
    assert prune_unused(trunk) == ["conv_head"]
    trunk.eval()
    assert torch.equal(trunk.forward_features(x), before)
    assert prune_unused(trunk) == []  # nothing left to prune


def _plain_gem(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def test_gem_matches_the_plain_formula_and_does_not_overflow_where_it_does() -> None:
    gem = GeM(p=4.5)
    x = (torch.rand(2, 5, 3, 3, generator=torch.Generator().manual_seed(0)) * 20).requires_grad_()
    out = gem(x)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    p64 = gem.p.detach().double().requires_grad_()
    ref = _plain_gem(x64, p64)
    ref.sum().backward()
    assert torch.allclose(out.double(), ref, rtol=1e-5)
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(gem.p.grad.double(), p64.grad, rtol=1e-4)
    # Activations of 1e5 at p=8: x**p is 1e40, past float32's 3.4e38.
    big = x.detach() * 5e3
    gem8 = GeM(p=8.0)
    assert not torch.isfinite(_plain_gem(big, gem8.p.detach())).all()
    stable = gem8(big)
    assert torch.isfinite(stable).all()
    assert torch.allclose(stable.double(), _plain_gem(big.double(), gem8.p.detach().double()), rtol=1e-5)
