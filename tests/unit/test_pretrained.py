"""training/pretrained.py: TensorFlow.js bundle parsing and Keras MobileNetV2 -> timm conversion.

No download: a bundle in nsfwjs' format (browserify-wrapped model.min.js and base64 weight shard)
is written here from seeded random Keras weights, quantized to uint8 like nsfwjs'.
"""

from __future__ import annotations

import base64
import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch

from training.pretrained import (
    MODEL_DIR,
    STAGES,
    PretrainedError,
    decode_weights,
    keras_mobilenetv2_to_timm,
    read_layers_model,
    read_package,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def keras_mobilenetv2_shapes() -> dict[str, tuple[int, ...]]:
    """Keras MobileNetV2 1.0's weight names and shapes, from its published layer table."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, c: int) -> None:
        for part in ("gamma", "beta", "moving_mean", "moving_variance"):
            shapes[f"{name}/{part}"] = (c,)

    shapes["Conv1/kernel"] = (3, 3, 3, 32)
    bn("bn_Conv1", 32)
    shapes["expanded_conv_depthwise/depthwise_kernel"] = (3, 3, 32, 1)
    bn("expanded_conv_depthwise_BN", 32)
    shapes["expanded_conv_project/kernel"] = (1, 1, 32, 16)
    bn("expanded_conv_project_BN", 16)
    cin, k = 16, 1
    for (_, n), cout in zip(STAGES, (24, 32, 64, 96, 160, 320), strict=True):
        for _ in range(n):
            mid = cin * 6
            shapes[f"block_{k}_expand/kernel"] = (1, 1, cin, mid)
            bn(f"block_{k}_expand_BN", mid)
            shapes[f"block_{k}_depthwise/depthwise_kernel"] = (3, 3, mid, 1)
            bn(f"block_{k}_depthwise_BN", mid)
            shapes[f"block_{k}_project/kernel"] = (1, 1, mid, cout)
            bn(f"block_{k}_project_BN", cout)
            cin, k = cout, k + 1
    shapes["Conv_1/kernel"] = (1, 1, 320, 1280)
    bn("Conv_1_bn", 1280)
    shapes["dense_3/kernel"] = (1280, 5)  # nsfwjs' head: in the bundle, not in the trunk
    return shapes


def quantize(arr: np.ndarray) -> tuple[bytes, dict]:
    lo, hi = float(arr.min()), float(arr.max())
    scale = (hi - lo) / 255 or 1.0
    q = np.clip(np.round((arr - lo) / scale), 0, 255).astype(np.uint8)
    return q.tobytes(), {"min": lo, "scale": scale, "dtype": "uint8"}


def js_literal(obj: object) -> str:
    """JSON written the way a minifier writes JavaScript: bare keys, !0 / !1, .5 for 0.5."""
    text = json.dumps(obj, separators=(",", ":"))
    text = re.sub(r'"([A-Za-z_$][\w$]*)":', r"\1:", text)
    text = text.replace(":true", ":!0").replace(":false", ":!1")
    return re.sub(r"(?<=[:\[,])(-?)0\.(\d)", r"\1.\2", text)


def bundle(weights: dict[str, np.ndarray]) -> tuple[str, str, dict[str, np.ndarray]]:
    """(model.min.js, shard.min.js, the dequantized weights the bundle really holds)."""
    specs, chunks, held = [], [], {}
    for name, arr in weights.items():
        data, q = quantize(arr)
        specs.append({"name": name, "shape": list(arr.shape), "dtype": "float32", "quantization": q})
        chunks.append(data)
        held[name] = np.frombuffer(data, np.uint8).astype(np.float32).reshape(arr.shape) * np.float32(
            q["scale"]) + np.float32(q["min"])
    layers = [{"name": "Conv1", "class_name": "Conv2D", "config": {"name": "Conv1", "trainable": False}},
              {"name": "block_11_expand", "class_name": "Conv2D",
               "config": {"name": "block_11_expand", "trainable": True}}]
    model = {"modelTopology": {"keras_version": "2.2.4", "model_config": {"class_name": "Model", "config": {
        "name": "model_1", "layers": layers}}}, "weightsManifest": [{"paths": ["group1-shard1of1"], "weights": specs}]}
    wrapper = '!function(e){{module.exports=e()}}(function(){{return {{1:[function(e,a,n){{a.exports={}}},{{}}]}}}});'
    shard = '!function(e){{module.exports=e()}}(function(){{return {{1:[function(e,h,n){{h.exports="{}"}},{{}}]}}}});'
    return (wrapper.format(js_literal(model)),
            shard.format(base64.b64encode(b"".join(chunks)).decode()), held)


@pytest.fixture(scope="module")
def keras_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in keras_mobilenetv2_shapes().items():
        arr = rng.normal(0, 0.3, shape).astype(np.float32)
        if name.endswith("moving_variance"):
            arr = np.abs(arr) + 0.5
        out[name] = arr
    return out


def test_bundle_round_trip_dequantizes_every_tensor(keras_weights):
    model_js, shard_js, held = bundle(keras_weights)
    model = read_layers_model(model_js, shard_js)
    assert set(model.weights) == set(keras_weights)
    for name, arr in held.items():
        np.testing.assert_array_equal(model.weights[name], arr)
        # uint8 quantization: within half a step of the original
        step = (keras_weights[name].max() - keras_weights[name].min()) / 255
        assert np.abs(model.weights[name] - keras_weights[name]).max() <= step / 2 + 1e-6
    assert model.topology["model_config"]["config"]["layers"][0]["config"]["trainable"] is False


def test_decode_weights_rejects_a_short_or_long_shard():
    manifest = [{"weights": [{"name": "w", "shape": [4], "dtype": "float32"}]}]
    got = decode_weights(manifest, np.arange(4, dtype=np.float32).tobytes())
    np.testing.assert_array_equal(got["w"], np.arange(4, dtype=np.float32))
    with pytest.raises(PretrainedError, match="ends before"):
        decode_weights(manifest, b"\0" * 8)
    with pytest.raises(PretrainedError, match="covers 16 of the shard's 20 bytes"):
        decode_weights(manifest, b"\0" * 20)


def test_conversion_loads_strictly_into_timm_and_computes_the_keras_stem(keras_weights):
    import timm

    sd = keras_mobilenetv2_to_timm(keras_weights, MEAN, STD)
    trunk = timm.create_model("mobilenetv2_100", num_classes=0, global_pool="", pad_type="same").eval()
    own = {k for k in trunk.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(sd) == own
    trunk.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)

    # Keras' stem on its own input convention, computed directly from the HWIO kernel: TF "same"
    # padding at stride 2 on an even size pads bottom/right by one.
    rng = np.random.default_rng(1)
    p = rng.random((16, 16, 3)).astype(np.float64)  # pixels in [0, 1], HWC
    keras_in = np.pad(2 * p - 1, ((0, 1), (0, 1), (0, 0)))
    kernel = keras_weights["Conv1/kernel"].astype(np.float64)
    conv = np.zeros((8, 8, 32))
    for i in range(8):
        for j in range(8):
            conv[i, j] = np.einsum("hwc,hwco->o", keras_in[2 * i:2 * i + 3, 2 * j:2 * j + 3], kernel)
    g, b = keras_weights["bn_Conv1/gamma"], keras_weights["bn_Conv1/beta"]
    m, v = keras_weights["bn_Conv1/moving_mean"], keras_weights["bn_Conv1/moving_variance"]
    expected = np.clip((conv - m) / np.sqrt(v + 1e-3) * g + b, 0, 6)  # Keras BN eps, ReLU6

    ours = (p - np.asarray(MEAN)) / np.asarray(STD)
    x = torch.from_numpy(ours.transpose(2, 0, 1)[None].astype(np.float32))
    with torch.no_grad():
        got = trunk.bn1(trunk.conv_stem(x))[0].numpy().transpose(1, 2, 0)
    # The fold is exact where the window holds no padding (rows/columns 0..6 here); at the
    # bottom/right border Keras pads 2p - 1 = 0, we pad x = 0.
    np.testing.assert_allclose(got[:7, :7], expected[:7, :7], rtol=1e-4, atol=1e-4)


def test_depthwise_and_pointwise_kernels_keep_their_channels(keras_weights):
    sd = keras_mobilenetv2_to_timm(keras_weights, MEAN, STD)
    dw = keras_weights["block_3_depthwise/depthwise_kernel"]  # (3, 3, C, 1)
    np.testing.assert_array_equal(sd["blocks.2.0.conv_dw.weight"][5, 0], dw[:, :, 5, 0])
    pw = keras_weights["block_3_project/kernel"]  # (1, 1, Cin, Cout)
    np.testing.assert_array_equal(sd["blocks.2.0.conv_pwl.weight"][7, 11, 0, 0], pw[0, 0, 11, 7])
    # BN epsilon moved into the variance: the same normalization at PyTorch's eps
    v = keras_weights["block_16_project_BN/moving_variance"]
    np.testing.assert_allclose(sd["blocks.6.0.bn3.running_var"] + 1e-5, v + 1e-3, rtol=1e-6)


def test_a_model_that_is_not_mobilenetv2_is_named(keras_weights):
    partial = {k: v for k, v in keras_weights.items() if not k.startswith("block_7_")}
    with pytest.raises(PretrainedError, match="block_7_expand/kernel"):
        keras_mobilenetv2_to_timm(partial, MEAN, STD)


def test_read_package_finds_the_bundle_in_an_npm_tarball(tmp_path, keras_weights):
    model_js, shard_js, held = bundle({k: keras_weights[k] for k in ("Conv1/kernel", "Conv_1/kernel")})
    tgz = tmp_path / "nsfwjs-4.3.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, text in (("model.min.js", model_js), ("group1-shard1of1.min.js", shard_js)):
            data = text.encode()
            info = tarfile.TarInfo(MODEL_DIR + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    model = read_package(tgz)
    np.testing.assert_array_equal(model.weights["Conv_1/kernel"], held["Conv_1/kernel"])
    empty = tmp_path / "empty.tgz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(PretrainedError, match=r"no package/dist/models/mobilenet_v2/model\.min\.js"):
        read_package(empty)
