"""TensorRT plan cache key and mismatch handling (CPU: no TensorRT needed for these)."""

import dataclasses
import importlib.util
import json

import pytest

from edge_inspect.runtime.bundle import load_bundle
from edge_inspect.runtime.engines import EngineError, open_engine
from edge_inspect.runtime.engines.ort import provider_list
from edge_inspect.runtime.engines.plan_cache import PlanCache
from edge_inspect.runtime.engines.tensorrt import plan_key, profile_shapes


def _key(bundle, **changes):
    key = plan_key(bundle, "10.9.0", "NVIDIA H100", "9.0", "fp16", 8)
    return dataclasses.replace(key, **changes)


def test_key_covers_model_trt_gpu_precision_and_shapes(bundles):
    few = load_bundle(bundles["afclip+"])
    base = _key(few)
    assert base.onnx_sha256 == few.manifest["files"]["model.onnx"]
    variants = [_key(few, onnx_sha256="0" * 64), _key(few, tensorrt_version="11.0.0"),
                _key(few, gpu_name="Orin"), _key(few, compute_capability="8.7"),
                _key(few, precision="fp32"), plan_key(few, "10.9.0", "NVIDIA H100", "9.0", "fp16", 4)]
    digests = {k.digest for k in variants}
    assert base.digest not in digests and len(digests) == len(variants)
    shapes = profile_shapes(few, 8)
    assert shapes["image"][0][0] == 1 and shapes["image"][2][0] == 8
    assert shapes["memory.bank"][0] == few.memory["bank"].shape  # fixed memory rows
    with pytest.raises(EngineError, match="precision"):
        plan_key(few, "10.9.0", "x", "9.0", "int4", 8)


def test_plan_cache_uses_only_matching_plans(bundles, tmp_path):
    bundle = load_bundle(bundles["cmad"])
    cache = PlanCache(tmp_path)
    key = _key(bundle)
    assert cache.load(key) is None
    cache.store(key, b"plan-bytes")
    assert cache.load(key) == b"plan-bytes"
    plan_path, meta_path = cache.paths(key)
    # a sidecar describing other build conditions: deleted, rebuilt, never used
    meta = json.loads(meta_path.read_text())
    meta["key"]["tensorrt_version"] = "8.6.1"
    meta_path.write_text(json.dumps(meta))
    assert cache.load(key) is None and not plan_path.exists()
    # damaged plan bytes
    cache.store(key, b"plan-bytes")
    plan_path.write_bytes(b"plan-bytez")
    assert cache.load(key) is None and not plan_path.exists()
    # plan without sidecar
    cache.store(key, b"plan-bytes")
    meta_path.unlink()
    assert cache.load(key) is None and not plan_path.exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT installed")
def test_tensorrt_backend_without_tensorrt_says_what_to_install(bundles):
    with pytest.raises(EngineError, match="needs the TensorRT Python package"):
        open_engine(load_bundle(bundles["cmad"]), "tensorrt")


def test_ort_tensorrt_provider_options(bundles, tmp_path):
    bundle = load_bundle(bundles["cmad"])
    (name, opts), cuda, cpu = provider_list(["tensorrt", "cuda", "cpu"], bundle, trt_fp16=True,
                                            trt_cache_dir=tmp_path)
    assert name == "TensorrtExecutionProvider" and (cuda, cpu) == ("CUDAExecutionProvider",
                                                                    "CPUExecutionProvider")
    assert opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"]
    assert opts["trt_engine_cache_path"] == str(tmp_path) and opts["trt_timing_cache_enable"]


def test_key_covers_the_weights_file_of_a_large_graph(bundles):
    """A graph over 1.8 GB keeps its weights in model.onnx.data: two exports of one
    architecture share model.onnx but not the weights, and must not share a plan."""
    few = load_bundle(bundles["afclip+"])
    files = dict(few.manifest["files"])
    keys = []
    for weights in ("a" * 64, "b" * 64):
        files["model.onnx.data"] = weights
        large = dataclasses.replace(few, manifest=few.manifest | {"files": dict(files)})
        keys.append(_key(large))
    assert keys[0].digest != keys[1].digest != _key(few).digest
