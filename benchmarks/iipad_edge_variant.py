"""IIPAD's two conditionings as exported graphs: per-frame time on ONNX Runtime (CPU), random
weights, one run.

* ``qformer`` (the paper): CLIP plus BLIP-Diffusion's Q-Former, whose own vision encoder
  (one block fewer than CLIP's, the same width, as the released model's 23 against CLIP
  ViT-L's 24) runs on every frame;
* ``class_token`` (the edge variant): the prompts and the retrieval keys come from CLIP's
  class token alone, no second vision tower.

Both heads are built at one CLIP architecture (``--arch``, default ViT-B-16 at 224: ViT-L's
graph is over ONNX's 2 GB protobuf limit, which the exporter does not handle yet), with a
Q-Former of the matching width (the CLIP text width) and depth, a memory of 12 enrolled
frames, and exported through :class:`export.graph.ExportGraph` (the bundle's graph). Each
graph is checked against torch (max abs diff of the score), then both are timed on the same
frames, alternating, batch 1 (``--frames`` each after 2 warm-up runs). The claim is the
ratio of the medians; absolute CPU times are noisy and only shown for context.

    .venv/bin/python benchmarks/iipad_edge_variant.py        # ~3 min on 2 cores

Writes <out>/iipad_edge_variant.{json,md} (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edge_inspect.export.graph import ExportGraph
from edge_inspect.trainer.backbones.clip import ClipModel, get_clip_config
from edge_inspect.trainer.backbones.qformer import QFormer, QFormerConfig
from edge_inspect.trainer.heads.iipad.model import IipadConfig, IipadHead

RESULTS = Path(__file__).resolve().parent / "results"


def build(arch: str, condition: str) -> IipadHead:
    torch.manual_seed(0)
    clip = ClipModel(get_clip_config(arch)).eval()
    c = clip.cfg
    qformer = None
    if condition == "qformer":
        qformer = QFormer(QFormerConfig(
            vision_width=c.width, vision_layers=c.layers - 1, vision_heads=c.heads,
            vision_mlp=4 * c.width, patch_size=c.patch_size, image_size=c.image_size,
            width=c.text_width, layers=12, heads=c.text_heads, mlp=4 * c.text_width))
        with torch.no_grad():
            for p in (qformer.query_tokens, qformer.visual_encoder.class_embedding,
                      qformer.visual_encoder.positional_embedding):
                p.normal_(0, 0.02)
        qformer.eval()
    layers = c.layers
    taps = tuple(sorted({max(1, layers * q // 4) for q in (1, 2, 3, 4)}))  # 6/12/18/24 of 24 blocks
    cfg = IipadConfig(taps=taps, memory_taps=(taps[0], taps[-2]), vv_from=taps[0],
                      condition=condition, retrieve=4, capacity=64)
    return IipadHead(clip, qformer, cfg).eval()


def export(head: IipadHead, frames: np.ndarray, path: Path) -> list[str]:
    memory = {k: v.contiguous() for k, v in head.memory_state().items()}
    graph = ExportGraph(head, list(memory), []).eval()
    names = ["image"] + [f"memory.{k}" for k in memory]
    example = torch.from_numpy(frames[:1])
    torch.onnx.export(graph, (example, *memory.values()), str(path), opset_version=17, dynamo=False,
                      input_names=names, output_names=["image_score", "anomaly_map"],
                      dynamic_axes={"image": {0: "batch"}}, do_constant_folding=True)
    head.load_memory_state(memory)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    size = get_clip_config(args.arch).image_size
    frames = rng.integers(0, 256, (args.frames + 12, size, size, 3), dtype=np.uint8)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    def normalized(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std

    sessions, report = {}, {"arch": args.arch, "frames": args.frames, "threads": args.threads,
                            "backend": f"onnxruntime {ort.__version__} CPUExecutionProvider fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        for condition in ("qformer", "class_token"):
            head = build(args.arch, condition)
            with torch.no_grad():
                head.enroll(normalized(frames[:12]))
                want = head(normalized(frames[12:14]))[0].numpy()
            path = Path(tmp) / f"{condition}.onnx"
            t0 = time.perf_counter()
            export(head, frames, path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feeds = {f"memory.{k}": v.numpy() for k, v in head.memory_state().items()}
            got = sess.run(["image_score"], {"image": frames[12:14]} | feeds)[0]
            sessions[condition] = (sess, feeds)
            report[condition] = {
                "parameters": sum(p.numel() for p in head.parameters()),
                "export_seconds": round(time.perf_counter() - t0, 1),
                "score_max_abs_diff_vs_torch": float(np.abs(got - want).max())}
        times = {c: [] for c in sessions}
        for i in range(args.frames + 2):
            frame = frames[12 + i % args.frames:13 + i % args.frames]
            for condition, (sess, feeds) in sessions.items():
                t0 = time.perf_counter()
                sess.run(["image_score", "anomaly_map"], {"image": frame} | feeds)
                if i >= 2:
                    times[condition].append(time.perf_counter() - t0)
    for condition, t in times.items():
        report[condition]["median_ms"] = round(1000 * float(np.median(t)), 1)
    ratio = report["qformer"]["median_ms"] / report["class_token"]["median_ms"]
    report["ratio_qformer_over_class_token"] = round(ratio, 2)
    lines = [f"IIPAD per-frame time, {report['backend']}, {args.threads} threads, batch 1, random "
             f"weights, CLIP {args.arch}; {args.frames} frames each, alternating.",
             f"Command: `.venv/bin/python benchmarks/iipad_edge_variant.py --arch {args.arch}`", "",
             "| conditioning | parameters | score vs torch | median ms (context only) |", "|---|---|---|---|"]
    for condition in ("qformer", "class_token"):
        r = report[condition]
        lines.append(f"| {condition} | {r['parameters'] / 1e6:.1f} M | "
                     f"{r['score_max_abs_diff_vs_torch']:.1e} | {r['median_ms']} |")
    lines += ["", f"**The Q-Former variant takes {ratio:.2f}x the edge variant's time per frame.**"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "iipad_edge_variant.json").write_text(json.dumps(report, indent=2))
    (args.out / "iipad_edge_variant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
