"""ONNX Runtime backend: CPU, CUDA or TensorRT execution providers.

``providers`` picks them in order of preference (default: CPU). The TensorRT provider's
engine and timing caches are options (``trt_cache_dir``, ``trt_fp16``), kept in the
bundle's ``engines/ort-trt/`` folder by default so a rebuilt bundle never reuses a stale
engine of another one.

``spin`` (default off): ONNX Runtime's CPU threads busy-wait for the next call unless told
not to. Frames arrive at camera rate, so they would spin through every gap between frames
and take a core the camera processes could use (``benchmarks/scale_bench.py`` vs its
``--spin`` run: the pipeline's CPU per frame at one 30 fps camera 3.1 ms instead of 35.9 ms;
latency p50 0.3-0.5 ms higher).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_inspect.runtime.bundle import Bundle
from edge_inspect.runtime.engines.base import Engine, EngineError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def provider_list(names: list[str], bundle: Bundle, trt_fp16: bool = True,
                  trt_cache_dir: str | Path | None = None) -> list:
    """ORT provider entries for short names (``tensorrt``, ``cuda``, ``cpu``), with options."""
    out: list = []
    for name in names:
        if name not in PROVIDERS:
            raise EngineError(f"execution provider {name!r} unknown; choose from {list(PROVIDERS)}")
        if name == "tensorrt":
            cache = Path(trt_cache_dir or bundle.root / "engines" / "ort-trt")
            out.append((PROVIDERS[name], {
                "trt_fp16_enable": trt_fp16,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
            }))
        else:
            out.append(PROVIDERS[name])
    return out


class OrtEngine(Engine):
    """A bundle in an ``onnxruntime.InferenceSession``."""

    backend = "ort"

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int = 0,
                 trt_fp16: bool = True, trt_cache_dir: str | Path | None = None, spin: bool = False) -> None:
        super().__init__(bundle)
        import onnxruntime as ort

        if type(threads) is not int or threads < 0:
            raise EngineError(f"threads must be a whole number >= 0 (0: ONNX Runtime decides), "
                              f"got {threads!r}")
        if providers is not None and (not isinstance(providers, list)
                                      or not all(isinstance(p, str) for p in providers)):
            raise EngineError(f"providers must be a list of names from {list(PROVIDERS)}, got {providers!r}")
        wanted = providers or ["cpu"]
        available = set(ort.get_available_providers())
        missing = [p for p in wanted if PROVIDERS.get(p) not in available]
        if missing:
            raise EngineError(f"ONNX Runtime here lacks {missing} (available: {sorted(available)}); "
                              "install onnxruntime-gpu for cuda/tensorrt or choose cpu")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if type(spin) is not bool:
            raise EngineError(f"spin must be true or false, got {spin!r}")
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(
                str(bundle.model_path), options,
                providers=provider_list(wanted, bundle, trt_fp16, trt_cache_dir))
        except Exception as exc:  # ORT raises its own exception types
            raise EngineError(f"ONNX Runtime cannot load {bundle.model_path}: {exc}") from exc
        graph_inputs = {i.name for i in self.session.get_inputs()}
        if graph_inputs != set(self.input_names):
            raise EngineError(f"{bundle.model_path} has inputs {sorted(graph_inputs)} but the manifest "
                              f"describes {sorted(self.input_names)}; the bundle is inconsistent, "
                              "re-export it")
        self.providers = self.session.get_providers()

    def _run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)
