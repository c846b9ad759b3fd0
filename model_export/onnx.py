"""ONNX export (torch.export-based exporter), checker, optional onnxslim, ONNX Runtime sessions.

The dynamic batch axis is declared on the forward's real argument name and the exported graph's
real input/output names are read back from the file, never assumed.
"""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OPSET = 18
MAX_BATCH = 4096


def export_onnx(model: Any, path: Path, input_size: int, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    import onnx
    import torch

    if opset < 17:
        raise ValueError("opset must be >= 17")
    model = model.eval().cpu()
    arg = next(iter(inspect.signature(model.forward).parameters))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.randn(2, 3, input_size, input_size)
    torch.onnx.export(
        model, (example,), str(path), dynamo=True, opset_version=opset, input_names=[arg],
        output_names=["embeddings"], dynamic_shapes={arg: {0: batch}}, external_data=False, verbose=False,
    )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    return io_info(proto) | {"opset": opset}


def io_info(proto: Any) -> dict[str, Any]:
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ValueError(f"expected one input and one output, got {inputs} -> {[o.name for o in graph.output]}")
    return {"input_name": inputs[0], "output_name": graph.output[0].name}


def ort_providers(device: str = "cpu", cache_dir: str | Path | None = None) -> list[Any]:
    """Execution providers by preference for `device` (cpu | cuda | auto).

    On a GPU with no TensorRT engine in the artifact this is the fallback: ONNX Runtime's
    TensorRT provider (FP16, engine cache in `cache_dir`), then its CUDA provider, then the CPU,
    keeping only those this onnxruntime build offers.
    """
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen: list[Any] = []
    if device in ("cuda", "auto"):
        if "TensorrtExecutionProvider" in available:
            trt_opts: dict[str, Any] = {"trt_fp16_enable": True}
            if cache_dir is not None:
                trt_opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                             "trt_timing_cache_enable": True}
            chosen.append(("TensorrtExecutionProvider", trt_opts))
        if "CUDAExecutionProvider" in available:
            chosen.append("CUDAExecutionProvider")
        if device == "cuda" and not chosen:
            raise RuntimeError(
                "device cuda asked for, but this onnxruntime has no CUDA or TensorRT provider "
                f"(it has {sorted(available)}): install onnxruntime-gpu")
    chosen.append("CPUExecutionProvider")
    return chosen


def ort_session(path: Path | str, *, providers: list[Any] | None = None, intra_op_threads: int = 0,
                inter_op_threads: int = 1, allow_spinning: bool = True, spin_only_in_run: bool = False) -> Any:
    """An ONNX Runtime session tuned for batch inference: all graph optimizations, sequential
    execution, intra-op threads = physical cores unless given (0 lets ORT decide).

    allow_spinning=False stops idle intra-op threads from busy-waiting for the next op: in a
    server whose decode threads and event loop share the cores, spinning steals their CPU.
    spin_only_in_run=True keeps the spinning inside Run() (fast op-to-op hand-offs) but stops it
    the moment the last Run returns (`session.force_spinning_stop`), so the threads do not burn
    the cores that the next request needs for decoding.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spin_only_in_run:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"])


def ort_runner(session: Any):
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    return run


def _median_ms(path: Path, input_size: int, batch: int = 8, runs: int = 15) -> float:
    run = ort_runner(ort_session(path))
    x = np.random.default_rng(0).standard_normal((batch, 3, input_size, input_size), dtype=np.float32)
    run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def maybe_simplify(path: Path, input_size: int, mode: str = "auto", min_gain: float = 0.03) -> dict[str, Any]:
    """onnxslim the graph. `auto` keeps the slimmed graph only if ONNX Runtime runs it at least
    `min_gain` faster (median of 15 runs at batch 8); `on` always keeps it; `off` skips."""
    if mode == "off":
        return {"simplified": False, "reason": "off"}
    try:
        import onnx
        import onnxslim
    except ImportError:
        if mode == "on":
            raise
        return {"simplified": False, "reason": "onnxslim not installed"}
    slim_path = path.with_suffix(".slim.onnx")
    onnx.save(onnxslim.slim(onnx.load(str(path))), str(slim_path))
    onnx.checker.check_model(str(slim_path))
    before, after = _median_ms(path, input_size), _median_ms(slim_path, input_size)
    keep = mode == "on" or after <= before * (1 - min_gain)
    if keep:
        os.replace(slim_path, path)
    else:
        slim_path.unlink()
    return {"simplified": keep, "ms_batch8_before": round(before, 3), "ms_batch8_after": round(after, 3)}
