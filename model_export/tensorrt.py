"""TensorRT FP16 engine, built offline from the ONNX file with the TensorRT 10 Python API.

Build: explicit-batch network from the ONNX parser (parser errors reported one per line), one
optimization profile min/opt/max on the real input name, FP16 flag, a workspace memory-pool limit,
and a timing cache that is loaded if present and saved back, so rebuilding on the same GPU is fast.

Engines are not portable: the manifest records the TensorRT version and GPU, and `check_engine`
refuses an engine built for another TensorRT version or another GPU model with a clear message.
Never built inside a server: `uembed export --formats tensorrt` (or an init container) does it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uembed.errors import UserError


class TensorRTError(UserError):
    pass


@dataclass(frozen=True)
class Profile:
    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise TensorRTError(f"TensorRT profile needs 1 <= min <= opt <= max, got {self}")

    @classmethod
    def parse(cls, text: str) -> Profile:
        try:
            lo, opt, hi = (int(v) for v in text.split(","))
        except ValueError as e:
            raise TensorRTError(f"--trt-profile expects MIN,OPT,MAX (e.g. 1,16,64), got {text!r}") from e
        return cls(lo, opt, hi)


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTError("TensorRT is not installed: pip install 'uembed[tensorrt]' (needs an NVIDIA GPU)") from e
    return trt


def gpu_identity() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("TensorRT needs a CUDA GPU and none is visible here")
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def tensorrt_available() -> tuple[bool, str]:
    """(available, reason if not) for tests and CLI messages."""
    try:
        _import_tensorrt()
        gpu_identity()
    except TensorRTError as e:
        return False, str(e)
    return True, ""


def build_engine(onnx_path: Path, engine_path: Path, input_size: int, *, profile: Profile = Profile(),
                 fp16: bool = True, workspace_bytes: int = 4 << 30,
                 timing_cache: Path | None = None) -> dict[str, Any]:
    """Parse `onnx_path`, build a serialized engine to `engine_path`; returns manifest info."""
    trt = _import_tensorrt()
    identity = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    if network.num_inputs != 1:
        raise TensorRTError(f"expected one network input, found {network.num_inputs}")
    input_name = network.get_input(0).name
    output_name = network.get_output(0).name

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        if not builder.platform_has_fast_fp16:
            raise TensorRTError(f"{identity['gpu']} has no fast FP16; build without --trt-fp16")
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    shape = (3, input_size, input_size)
    opt_profile.set_shape(input_name, (profile.min, *shape), (profile.opt, *shape), (profile.max, *shape))
    config.add_optimization_profile(opt_profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError("TensorRT failed to build the engine (see the TensorRT log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt_version": trt.__version__, **identity, "input_name": input_name, "output_name": output_name,
        "profile": {"min": profile.min, "opt": profile.opt, "max": profile.max},
        "workspace_bytes": int(workspace_bytes),
    }


def check_engine(info: dict[str, Any]) -> None:
    """Refuse an engine built for another TensorRT version or GPU: engines are not portable."""
    trt = _import_tensorrt()
    here = gpu_identity()
    if info.get("tensorrt_version") != trt.__version__:
        raise TensorRTError(
            f"the engine was built with TensorRT {info.get('tensorrt_version')} and this is {trt.__version__}: "
            "rebuild it here (uembed export --formats tensorrt) or serve the ONNX file")
    if info.get("gpu") != here["gpu"] or info.get("compute_capability") != here["compute_capability"]:
        raise TensorRTError(
            f"the engine was built for {info.get('gpu')} (sm {info.get('compute_capability')}) and this GPU is "
            f"{here['gpu']} (sm {here['compute_capability']}): rebuild it on this GPU model")


class TensorRTRunner:
    """Runs a serialized engine on CUDA with torch-allocated buffers on a dedicated stream."""

    def __init__(self, engine_path: Path, info: dict[str, Any], device: int = 0) -> None:
        import torch

        check_engine(info)
        trt = _import_tensorrt()
        self.torch = torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"{engine_path}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = info["input_name"], info["output_name"]
        self.max_batch = int(info["profile"]["max"])
        self.min_batch = int(info["profile"]["min"])
        self.stream = torch.cuda.Stream(self.device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        n = batch.shape[0]
        if not self.min_batch <= n <= self.max_batch:
            raise TensorRTError(f"batch of {n} outside the engine profile [{self.min_batch}, {self.max_batch}]")
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, non_blocking=True)
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            y = torch.empty(out_shape, dtype=torch.float32, device=self.device)
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, y.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise TensorRTError("TensorRT execution failed")
            result = y.cpu()
        self.stream.synchronize()
        return result.numpy()
