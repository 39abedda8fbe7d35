"""``edge-inspect export``: a run's head -> a bundle folder, written only if parity holds.

Steps: build the head from the run's config, load the checkpoint (an enrolled one brings
the few-shot memory and the threshold), export the graph (opset 17, fixed input size,
dynamic batch and memory rows), run torch and ONNX Runtime (CPU, fp32) on real images and
refuse to write unless image scores agree within 1e-4 and maps within 1e-3, then write
``model.onnx``, ``memory.npz``, ``parity.json`` and ``manifest.json`` (sha256 of every file)
into a temporary folder renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import platform
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from edge_inspect.export.graph import ExportGraph, batch_axes
from edge_inspect.runtime.bundle import MANIFEST, SCHEMA_VERSION, refuse_existing, sha256_file, staged_bundle
from edge_inspect.trainer.checkpoint import load_checkpoint
from edge_inspect.trainer.config import RunConfig
from edge_inspect.trainer.data.batches import GEOMETRY_INTERPOLATION, sample_plane
from edge_inspect.trainer.data.sample import IMAGE_SUFFIXES, read_rgb
from edge_inspect.trainer.data.transforms import fit_image, to_batch
from edge_inspect.trainer.evaluate import load_head
from edge_inspect.trainer.heads.registry import get_method

log = logging.getLogger(__name__)
OPSET = 17
SCORE_TOL, MAP_TOL = 1e-4, 1e-3


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch model; no bundle is written."""


OUTPUT_MEANING = {
    "score": "anomaly score per image; anomalous when > threshold",
    "map": "per-pixel anomaly map at the input size, after the method's smoothing",
}


def parity_images(cfg: RunConfig, folder: Path | None, count: int,
                  planes: tuple[str, ...] = ()) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Real images: from ``folder``, else from the run's target (or auxiliary) test data;
    and per further plane (``planes``: xyz / depth) the same samples' raw plane."""
    if folder is not None:
        if planes:
            raise ValueError(f"--images gives RGB images only, but this model also takes "
                             f"{list(planes)}: leave --images out to check parity on the run's "
                             "RGB-D data")
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images in {folder} for the parity check")
        return [read_rgb(p) for p in files[:count]], []
    specs = cfg.target_data or cfg.train_data
    if not specs:
        raise ValueError("the run names no datasets; pass --images DIR for the parity check")
    ds = specs[0].open(specs[0].split)
    rng = np.random.default_rng(cfg.seed)
    picks = rng.choice(len(ds), size=min(count, len(ds)), replace=False)
    samples = [ds[int(i)] for i in sorted(picks)]
    return [s.image for s in samples], [[sample_plane(s, name) for s in samples] for name in planes]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "opset": str(OPSET)}
    for name in ("edge-inspect", "torch", "onnx", "onnxruntime", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def export_bundle(run_dir: Path, out: Path, checkpoint: Path | None = None,
                  images: Path | None = None, parity_count: int = 8) -> Path:
    """Export a run's head as a bundle at ``out``; returns ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    refuse_existing(out)  # before the expensive part; staged_bundle checks again
    cfg = RunConfig.from_yaml(run_dir / "config.yaml")
    checkpoint = checkpoint or run_dir / "checkpoint.safetensors"
    ckpt = load_checkpoint(checkpoint)
    head = load_head(cfg, checkpoint, device="cpu")  # the graph and its parity check run on the CPU
    head.check_exportable()
    if cfg.method == "memory" and not ckpt.memory:
        raise ValueError(f"{checkpoint} has no few-shot memory; the memory method needs an "
                         "enrolled checkpoint (eval writes them: "
                         f"{run_dir}/eval-<K>shot/enrolled/<dataset>-<class>.safetensors)")
    memory = {k: v.detach().float().contiguous() for k, v in head.memory_state().items()}
    h, w = head.backbone.input_size
    raw_images, raw_planes = parity_images(cfg, images, parity_count, head.planes)
    pictures = [fit_image(im, (h, w), cfg.fit_mode, cfg.interpolation) for im in raw_images]
    frames = np.stack(pictures)
    plane_frames = {name: np.stack([fit_image(p, (h, w), cfg.fit_mode, GEOMETRY_INTERPOLATION)
                                    for p in arrays]).astype(np.float32)
                    for name, arrays in zip(head.planes, raw_planes, strict=True)}

    batch = to_batch(pictures, (h, w), head.backbone.normalization, cfg.fit_mode, cfg.interpolation)
    plane_batch = tuple(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in plane_frames.values())
    with torch.no_grad():
        want_score, want_map, want_feats = head.forward_with_features(batch, *plane_batch)
    feature_names = sorted(want_feats)
    axes = batch_axes(head, batch, plane_batch)
    graph = ExportGraph(head, list(memory), feature_names).eval()
    example = [torch.from_numpy(a[:2].copy()) for a in (frames, *plane_frames.values())]
    if frames.shape[0] < 2:
        example = [e.repeat(2, 1, 1, 1) for e in example]
    input_names = ["image", *head.planes] + [f"memory.{k}" for k in memory]
    output_names = ["image_score", "anomaly_map"] + [f"feature.{k}" for k in feature_names]
    dynamic = {"image": {0: "batch"}, "image_score": {0: "batch"}, "anomaly_map": {0: "batch"}}
    dynamic |= {name: {0: "batch"} for name in head.planes}
    for k in feature_names:
        dynamic[f"feature.{k}"] = {axes[k]: "batch"}
    for k, v in memory.items():
        if v.ndim >= 2:
            dynamic[f"memory.{k}"] = {v.ndim - 2: "memory_rows"}

    with staged_bundle(out) as tmp:
        model_path = tmp / "model.onnx"
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (*example, *memory.values()), str(model_path), opset_version=OPSET,
                              dynamo=False, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic, do_constant_folding=True)
        head.load_memory_state(memory)  # export bound graph inputs into the head: restore
        log.info("exported %s in %.1f s", model_path, time.perf_counter() - t0)
        files = ["model.onnx"]
        if memory:
            np.savez(tmp / "memory.npz", **{k: v.numpy() for k, v in memory.items()})
            files.append("memory.npz")
        report = _parity(tmp, files, {"image": frames} | plane_frames, want_score.numpy(),
                         want_map.numpy(), cfg, memory)
        (tmp / "parity.json").write_text(json.dumps(report, indent=2))
        files.append("parity.json")
        if not report["passed"]:
            raise ParityError(f"exported graph disagrees with torch: score max diff "
                              f"{report['score_max_abs_diff']:.3g} (limit {SCORE_TOL}), map max diff "
                              f"{report['map_max_abs_diff']:.3g} (limit {MAP_TOL}); no bundle written")
        manifest = _manifest(cfg, ckpt, checkpoint, head, memory, want_feats, axes, files, tmp,
                             {k: v.shape[-1] for k, v in plane_frames.items()})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _parity(folder: Path, files: list[str], planes: dict[str, np.ndarray], want_score: np.ndarray,
            want_map: np.ndarray, cfg: RunConfig, memory: dict) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = planes | {f"memory.{k}": v.numpy() for k, v in memory.items()}
    got_score, got_map = sess.run(["image_score", "anomaly_map"], feeds)
    ds = float(np.abs(got_score - want_score).max())
    dm = float(np.abs(got_map - want_map).max())
    return {"images": int(len(want_score)), "planes": list(planes),
            "backend": "onnxruntime CPUExecutionProvider fp32",
            "score_max_abs_diff": ds, "map_max_abs_diff": dm,
            "score_tolerance": SCORE_TOL, "map_tolerance": MAP_TOL,
            "passed": bool(ds <= SCORE_TOL and dm <= MAP_TOL),
            "torch_scores": want_score.tolist(), "onnx_scores": got_score.tolist()}


def _geometry_input(name: str, channels: int, size: tuple[int, int], fit: str) -> dict:
    """A raw 3D plane input: float32 as measured (metres), nearest-neighbour fitted."""
    return {"name": name, "modality": name, "dtype": "float32", "layout": "NHWC", "size": list(size),
            "channels": channels, "fit": fit,
            "interpolation": "none" if fit == "center_crop" else GEOMETRY_INTERPOLATION,
            "normalization": {"formula": "none: raw values; the graph derives surface normals "
                                         "(a missing point is 0 or NaN)", "in_graph": True}}


def _manifest(cfg: RunConfig, ckpt, checkpoint: Path, head, memory: dict, feats: dict,
              axes: dict[str, int], files: list[str], folder: Path,
              plane_channels: dict[str, int]) -> dict:
    """Schema 2 (runtime/bundle.py): input planes, outputs with roles, state, memory recipe."""
    h, w = head.backbone.input_size
    norm = head.backbone.normalization
    outputs = [{"name": "image_score", "role": "score", "shape": ["batch"], "dtype": "float32",
                "meaning": OUTPUT_MEANING["score"]},
               {"name": "anomaly_map", "role": "map", "shape": ["batch", h, w], "dtype": "float32",
                "meaning": OUTPUT_MEANING["map"]}]
    for k in sorted(feats):
        shape: list = list(feats[k].shape)
        shape[axes[k]] = "batch"
        outputs.append({"name": f"feature.{k}", "role": "feature", "shape": shape, "dtype": "float32",
                        "meaning": f"features the few-shot memory is built from ({cfg.method} enroll)"})
    recipe = get_method(cfg.method).memory_recipe
    return {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.name,
        "method": cfg.method,
        "backbone": {k: v for k, v in cfg.to_dict()["backbone"].items()},
        "model": "model.onnx",
        "inputs": [{"name": "image", "modality": "rgb", "dtype": "uint8", "layout": "NHWC",
                    "size": [h, w], "channels": 3, "color": "RGB", "fit": cfg.fit_mode,
                    "interpolation": "none" if cfg.fit_mode == "center_crop" else cfg.interpolation,
                    "normalization": {"mean": list(norm.mean), "std": list(norm.std),
                                      "formula": "(x / 255 - mean) / std", "in_graph": True}}]
                  + [_geometry_input(name, plane_channels[name], (h, w), cfg.fit_mode)
                     for name in head.planes],
        "outputs": outputs,
        "state": [],
        "memory": ({"file": "memory.npz", "arrays": {k: list(v.shape) for k, v in memory.items()},
                    "inputs": [f"memory.{k}" for k in memory],
                    "recipe": recipe(head) if recipe else None} if memory else None),
        "shots": cfg.shots if memory else 0,
        "threshold": ckpt.calibration,
        "config": cfg.to_dict(),
        "checkpoint": {"file": str(checkpoint), "sha256": sha256_file(checkpoint),
                       "enrollment": ckpt.extra or None},
        "files": {name: sha256_file(folder / name) for name in files},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
