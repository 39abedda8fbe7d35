"""``edge-inspect export``: a run's head -> a bundle folder, written only if parity holds.

Steps: build the head from the run's config, load the checkpoint (an enrolled one brings
the few-shot memory and the threshold), export the graph (opset 17, fixed input size,
dynamic batch, and dynamic memory rows unless the head's memory has a fixed capacity), run
torch and ONNX Runtime (CPU, fp32) on real images and
refuse to write unless image scores agree within 1e-4 and maps within 1e-3, then write
``model.onnx`` (and ``model.onnx.data``, the weights, for graphs over 1.8 GB), ``memory.npz``,
``parity.json`` and ``manifest.json`` (sha256 of every file) into a temporary folder renamed
into place: a failed export leaves nothing behind.

``carry_state`` (``--carry-state``; PIRN) exports the head's carried state as a graph input
and output and declares it in the manifest (``state``: initial value in ``state.npz``,
scope camera, reset on reload / sequence restart / command, ``gate: normal``: carried only
from frames scored at or below the threshold, so the checkpoint must be calibrated). The
parity check then runs two steps: from the initial state, and from the state the first
step returned (scores, maps and the next state compared).
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
# Graphs above this keep their weights in one file beside the graph (``model.onnx.data``):
# ONNX's protobuf cannot hold more than 2 GB (IIPAD at ViT-L sizes with its Q-Former).
EXTERNAL_DATA_BYTES = 1_800_000_000
EXTERNAL_DATA = "model.onnx.data"


def _gather_external_data(model_path: Path) -> list[str]:
    """One weights file beside a large graph; returns the data file names to checksum.

    For a graph over 2 GB the exporter itself writes every tensor to its own file beside the
    graph; those files (the graph's external-data locations, nothing else) are gathered into
    :data:`EXTERNAL_DATA`, as are the weights of any graph over :data:`EXTERNAL_DATA_BYTES`.
    ONNX Runtime and TensorRT read the data file from the graph's folder.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    model = onnx.load(str(model_path), load_external_data=False)
    folder = model_path.parent
    scattered = sorted({entry.value for t in model.graph.initializer if uses_external_data(t)
                        for entry in t.external_data if entry.key == "location"})
    total = model_path.stat().st_size + sum((folder / name).stat().st_size for name in scattered)
    if not scattered and total <= EXTERNAL_DATA_BYTES:
        return []
    load_external_data_for_model(model, str(folder))
    for name in scattered:
        (folder / name).unlink()
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)
    log.info("weights of %s (%.2f GB) kept in %s beside it", model_path.name, total / 1e9, EXTERNAL_DATA)
    return [EXTERNAL_DATA]
STATE_TOL = 1e-3


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


def _check_carry_state(head, ckpt, checkpoint: Path, memory: dict) -> None:
    if head.carried_state is None:
        raise ValueError(f"--carry-state: the {head.method} head carries no state between frames "
                         "(only PIRN's prototypes do); export without it")
    if memory:
        raise ValueError(f"--carry-state: a {head.method} head with a few-shot memory cannot carry state")
    if not getattr(head.cfg, "carried_training", False):
        raise ValueError("--carry-state: this head was trained from its codebook only, and such a "
                         "decoder scores normal frames from carried prototypes as anomalies; train "
                         "with head.carried_training: true to export it with carried state")
    if ckpt.calibration is None:
        raise ValueError(f"--carry-state carries the state only from frames scored normal, which "
                         f"needs a threshold, and {checkpoint} has none: export the calibrated "
                         "checkpoint that `edge-inspect eval` writes (<run>/eval-<K>shot/enrolled/)")


def export_bundle(run_dir: Path, out: Path, checkpoint: Path | None = None,
                  images: Path | None = None, parity_count: int = 8,
                  carry_state: bool = False, prompt_class: str | None = None) -> Path:
    """Export a run's head as a bundle at ``out``; returns ``out``.

    ``prompt_class``: the class whose prompts a class-conditioned head bakes (KAnoCLIP's
    ``head.export_class``; the manifest's config records it)."""
    run_dir, out = Path(run_dir), Path(out)
    refuse_existing(out)  # before the expensive part; staged_bundle checks again
    cfg = RunConfig.from_yaml(run_dir / "config.yaml")
    if prompt_class is not None:
        if "export_class" not in cfg.head:
            raise ValueError(f"--class: {cfg.method} has no class-conditioned prompts; drop --class")
        cfg.head["export_class"] = prompt_class
    checkpoint = checkpoint or run_dir / "checkpoint.safetensors"
    ckpt = load_checkpoint(checkpoint)
    head = load_head(cfg, checkpoint, device="cpu")  # the graph and its parity check run on the CPU
    head.check_exportable()
    baked = head.baked_constants()
    if baked.get("in_knowledge") is False:
        log.warning("class %r is in no knowledge file of %s: its prompts use the words %r; add "
                    "it to a knowledge file if that is not how it should be written",
                    baked["prompt_class"], cfg.name, baked["class_words"])
    if cfg.method == "memory" and not ckpt.memory:
        raise ValueError(f"{checkpoint} has no few-shot memory; the memory method needs an "
                         "enrolled checkpoint (eval writes them: "
                         f"{run_dir}/eval-<K>shot/enrolled/<dataset>-<class>.safetensors)")
    memory = {k: v.detach().float().contiguous() for k, v in head.memory_state().items()}
    if carry_state:
        _check_carry_state(head, ckpt, checkpoint, memory)
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
    steps = _state_steps(head, batch, plane_batch) if carry_state else []
    feature_names = sorted(want_feats)
    axes = batch_axes(head, batch, plane_batch)
    graph = ExportGraph(head, list(memory), feature_names, carry_state).eval()
    example = [torch.from_numpy(a[:2].copy()) for a in (frames, *plane_frames.values())]
    if frames.shape[0] < 2:
        example = [e.repeat(2, 1, 1, 1) for e in example]
    input_names = ["image", *head.planes] + [f"memory.{k}" for k in memory]
    output_names = ["image_score", "anomaly_map"] + [f"feature.{k}" for k in feature_names]
    dynamic = {"image": {0: "batch"}, "image_score": {0: "batch"}, "anomaly_map": {0: "batch"}}
    dynamic |= {name: {0: "batch"} for name in head.planes}
    state_inputs = []
    if carry_state:
        name = head.carried_state
        input_names.append(f"state.{name}")
        output_names.append(f"next.{name}")
        dynamic |= {f"state.{name}": {0: "batch"}, f"next.{name}": {0: "batch"}}
        state = steps[0][0][:2]
        state_inputs = [state.repeat(2, 1, 1, 1) if state.shape[0] < 2 else state]  # as the example
    for k in feature_names:
        dynamic[f"feature.{k}"] = {axes[k]: "batch"}
    for k, v in memory.items():
        if v.ndim >= 2 and not head.memory_capacity_fixed:
            dynamic[f"memory.{k}"] = {v.ndim - 2: "memory_rows"}

    with staged_bundle(out) as tmp:
        model_path = tmp / "model.onnx"
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (*example, *memory.values(), *state_inputs), str(model_path),
                              opset_version=OPSET,
                              dynamo=False, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic, do_constant_folding=True)
        head.load_memory_state(memory)  # export bound graph inputs into the head: restore
        log.info("exported %s in %.1f s", model_path, time.perf_counter() - t0)
        files = ["model.onnx", *_gather_external_data(model_path)]
        if memory:
            np.savez(tmp / "memory.npz", **{k: v.numpy() for k, v in memory.items()})
            files.append("memory.npz")
        if carry_state:
            np.savez(tmp / "state.npz", **{head.carried_state: head.initial_state().float().numpy()})
            files.append("state.npz")
        # a carried-state graph, fed the initial state, is the stateless model
        initial = {f"state.{head.carried_state}": steps[0][0].numpy()} if carry_state else {}
        report = _parity(tmp, files, {"image": frames} | plane_frames, want_score.numpy(),
                         want_map.numpy(), cfg, memory, initial)
        if carry_state:
            carried = _state_parity(tmp, {"image": frames} | plane_frames, head.carried_state, steps)
            passed = report["passed"] and carried["passed"]
            report |= carried
            report["passed"] = passed
        (tmp / "parity.json").write_text(json.dumps(report, indent=2))
        files.append("parity.json")
        if not report["passed"]:
            state = (f", carried state max diff {report['state_max_abs_diff']:.3g} (limit {STATE_TOL})"
                     if carry_state else "")
            raise ParityError(f"exported graph disagrees with torch: score max diff "
                              f"{report['score_max_abs_diff']:.3g} (limit {SCORE_TOL}), map max diff "
                              f"{report['map_max_abs_diff']:.3g} (limit {MAP_TOL}){state}; no bundle written")
        manifest = _manifest(cfg, ckpt, checkpoint, head, memory, want_feats, axes, files, tmp,
                             {k: v.shape[-1] for k, v in plane_frames.items()}, carry_state)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _parity(folder: Path, files: list[str], planes: dict[str, np.ndarray], want_score: np.ndarray,
            want_map: np.ndarray, cfg: RunConfig, memory: dict, state: dict | None = None) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = planes | {f"memory.{k}": v.numpy() for k, v in memory.items()} | (state or {})
    got_score, got_map = sess.run(["image_score", "anomaly_map"], feeds)
    ds = float(np.abs(got_score - want_score).max())
    dm = float(np.abs(got_map - want_map).max())
    return {"images": int(len(want_score)), "planes": list(planes),
            "backend": "onnxruntime CPUExecutionProvider fp32",
            "score_max_abs_diff": ds, "map_max_abs_diff": dm,
            "score_tolerance": SCORE_TOL, "map_tolerance": MAP_TOL,
            "passed": bool(ds <= SCORE_TOL and dm <= MAP_TOL),
            "torch_scores": want_score.tolist(), "onnx_scores": got_score.tolist()}


def _state_steps(head, batch: torch.Tensor, planes: tuple[torch.Tensor, ...]) -> list[tuple]:
    """Torch's two carried steps: ``(state in, score, map, state out)`` from the initial
    state, then from the state the first step returned."""
    state = head.initial_state()[None].expand(batch.shape[0], *head.initial_state().shape).contiguous()
    steps = []
    with torch.no_grad():
        for _ in range(2):
            score, amap, nxt = head.forward_carried(batch, *planes, state=state)
            steps.append((state, score, amap, nxt))
            state = nxt
    return steps


def _state_parity(folder: Path, planes: dict[str, np.ndarray], name: str, steps: list[tuple]) -> dict:
    """Both carried steps through ONNX Runtime, each fed the state torch fed."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ds = dm = dstate = 0.0
    for state, score, amap, nxt in steps:
        feeds = planes | {f"state.{name}": state.numpy()}
        got = sess.run(["image_score", "anomaly_map", f"next.{name}"], feeds)
        ds = max(ds, float(np.abs(got[0] - score.numpy()).max()))
        dm = max(dm, float(np.abs(got[1] - amap.numpy()).max()))
        dstate = max(dstate, float(np.abs(got[2] - nxt.numpy()).max()))
    return {"state_steps": len(steps), "state_score_max_abs_diff": ds, "state_map_max_abs_diff": dm,
            "state_max_abs_diff": dstate, "state_tolerance": STATE_TOL,
            "passed": bool(ds <= SCORE_TOL and dm <= MAP_TOL and dstate <= STATE_TOL)}


def _geometry_input(name: str, channels: int, size: tuple[int, int], fit: str) -> dict:
    """A raw 3D plane input: float32 as measured (metres), nearest-neighbour fitted."""
    return {"name": name, "modality": name, "dtype": "float32", "layout": "NHWC", "size": list(size),
            "channels": channels, "fit": fit,
            "interpolation": "none" if fit == "center_crop" else GEOMETRY_INTERPOLATION,
            "normalization": {"formula": "none: raw values; the graph derives surface normals "
                                         "(a missing point is 0 or NaN)", "in_graph": True}}


def _manifest(cfg: RunConfig, ckpt, checkpoint: Path, head, memory: dict, feats: dict,
              axes: dict[str, int], files: list[str], folder: Path,
              plane_channels: dict[str, int], carry_state: bool = False) -> dict:
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
    state = []
    if carry_state:
        name, initial = head.carried_state, head.initial_state()
        outputs.append({"name": f"next.{name}", "role": "state", "shape": ["batch", *initial.shape],
                        "dtype": "float32", "meaning": f"the {name} refined from this frame: the next "
                        "frame's starting ones when this frame is scored normal"})
        state.append({"name": name, "input": f"state.{name}", "output": f"next.{name}",
                      "initial": {"file": "state.npz", "array": name, "dtype": "float32"},
                      "scope": "camera", "reset": ["reload", "sequence_restart", "command"],
                      "gate": "normal"})
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
        "state": state,
        "memory": ({"file": "memory.npz", "arrays": {k: list(v.shape) for k, v in memory.items()},
                    "inputs": [f"memory.{k}" for k in memory],
                    "recipe": recipe(head) if recipe else None} if memory else None),
        # images in the memory: K, or every enrolled image of a memory spanning categories
        "shots": (int(memory["valid"].sum()) if head.memory_capacity_fixed else cfg.shots) if memory else 0,
        "threshold": ckpt.calibration,
        **({"baked": head.baked_constants()} if head.baked_constants() else {}),
        "config": cfg.to_dict(),
        "checkpoint": {"file": str(checkpoint), "sha256": sha256_file(checkpoint),
                       "enrollment": ckpt.extra or None},
        "files": {name: sha256_file(folder / name) for name in files},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
