"""Native TensorRT backend: build a plan from the bundle's ONNX, cache it, run it.

* TensorRT 10 (weakly typed): FP16 is a builder flag (``precision="fp16"``); LayerNorm
  stays in fp32 when the ONNX uses opset >= 17 ``LayerNormalization``.
* TensorRT 11 (strongly typed: the weak-typing flags are gone): the network is created
  ``STRONGLY_TYPED`` and precision is what the ONNX says; asking for ``fp16`` on an fp32
  ONNX is an error naming the fix, not a silent fp32 build.
* A timing cache (``<cache>/timing.cache``) speeds up rebuilds; plans are keyed per
  :mod:`runtime.engines.plan_cache` and a mismatching plan is rebuilt, never used.

``tensorrt`` and the CUDA runtime bindings (``cuda-python``) are imported only here, when
this backend is chosen. Dynamic axes get an optimisation profile: batch 1..``max_batch``,
memory rows fixed to the bundle's memory (re-enrollment with another K changes the key).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edge_inspect.runtime.bundle import Bundle
from edge_inspect.runtime.engines.base import Engine, EngineError
from edge_inspect.runtime.engines.plan_cache import PlanCache, PlanKey

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16")


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineError("the tensorrt backend needs the TensorRT Python package (pip install "
                          "tensorrt, or JetPack's python3-libnvinfer); use backend 'ort' otherwise") from exc
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise EngineError("the tensorrt backend needs cuda-python (pip install cuda-python) "
                              "for device buffers") from exc
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def profile_shapes(bundle: Bundle, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape per input: planes and state 1..max_batch, memory arrays as they are."""
    per_frame = {p.name: p.shape for p in bundle.inputs} | {s.input: s.initial.shape for s in bundle.state}
    shapes = {name: ((1, *shape), (max(1, max_batch // 2), *shape), (max_batch, *shape))
              for name, shape in per_frame.items()}
    for name, arr in bundle.memory.items():
        shapes[f"memory.{name}"] = (arr.shape,) * 3
    return shapes


def plan_key(bundle: Bundle, trt_version: str, gpu_name: str, compute_capability: str,
             precision: str, max_batch: int) -> PlanKey:
    if precision not in PRECISIONS:
        raise EngineError(f"precision {precision!r} unknown; choose one of {PRECISIONS}")
    shapes = profile_shapes(bundle, max_batch)
    files, model = bundle.manifest["files"], bundle.manifest["model"]
    digest = files[model]
    if f"{model}.data" in files:  # the weights of a large graph live beside it
        digest += "+" + files[f"{model}.data"]
    return PlanKey(digest, trt_version, gpu_name,
                   compute_capability, precision,
                   tuple(sorted((k, tuple(tuple(s) for s in v)) for k, v in shapes.items())))


def build_plan(trt, onnx_path: Path, precision: str, shapes: dict, timing_cache: Path,
               workspace: int = 4 << 30) -> bytes:
    """Parse the ONNX and build a serialized plan with the TensorRT 10 or 11 API."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = trt_major(trt.__version__)
    if major >= 11:
        if precision == "fp16":
            raise EngineError("TensorRT 11 builds strongly typed networks: FP16 must be decided in "
                              "the ONNX (export an fp16 graph); build this fp32 graph with precision fp32")
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:
        flags = 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if precision == "fp16" and major < 11:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    old = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(old)
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {onnx_path} ({precision}); see the log above")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(cache.serialize()))
    return bytes(plan)


class TensorRTEngine(Engine):
    """A bundle as a TensorRT plan on one GPU."""

    backend = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str = "fp16", max_batch: int = 8,
                 cache_dir: str | Path | None = None, device: int = 0) -> None:
        super().__init__(bundle)
        trt = _import_trt()
        self.cudart = cudart = _cudart()
        _check(cudart.cudaSetDevice(device))
        props = _check(cudart.cudaGetDeviceProperties(device))
        gpu = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        cc = f"{props.major}.{props.minor}"
        self.precision, self.max_batch = precision, max_batch
        key = plan_key(bundle, trt.__version__, gpu, cc, precision, max_batch)
        cache = PlanCache(cache_dir or bundle.root / "engines")
        plan = cache.load(key)
        if plan is None:
            log.info("building TensorRT %s plan for %s on %s (sm %s)", precision, bundle.model_path, gpu, cc)
            plan = build_plan(trt, bundle.model_path, precision, profile_shapes(bundle, max_batch),
                              cache.folder / "timing.cache")
            cache.store(key, plan)
        self.key = key
        self.trt = trt
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError("TensorRT could not deserialize the plan (version or GPU mismatch)")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())

    def _run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        cudart, trt = self.cudart, self.trt
        batch = feeds[self.bundle.inputs[0].name].shape[0]
        if batch > self.max_batch:
            raise EngineError(f"batch {batch} exceeds the plan's max_batch {self.max_batch}")
        buffers, results = [], {}
        try:
            for name, array in feeds.items():
                self.context.set_input_shape(name, array.shape)
                ptr = _check(cudart.cudaMalloc(array.nbytes))
                buffers.append(ptr)
                _check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                self.context.set_tensor_address(name, ptr)
            for i in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(i)
                if self.engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                    continue
                shape = tuple(self.context.get_tensor_shape(name))
                host = np.empty(shape, trt.nptype(self.engine.get_tensor_dtype(name)))
                ptr = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
                buffers.append(ptr)
                self.context.set_tensor_address(name, ptr)
                results[name] = (host, ptr)
            if not self.context.execute_async_v3(int(self.stream)):
                raise EngineError("TensorRT execution failed")
            for host, ptr in results.values():
                _check(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)
        return [results[name][0].astype(np.float32, copy=False) for name in outputs]
