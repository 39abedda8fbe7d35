"""PyTorch eager vs ONNX Runtime (CPU) on the same model and input, in one run.

Two models, each exported with ``export.graph.ExportGraph`` (uint8 frames in, score and map
out, normalization and post-processing inside), timed at batch 1 after warm-up, torch and
ONNX Runtime both limited to the same thread count:

* ``texture+memory``: the texture backbone and the few-shot memory head, K = 4 textile
  images (the offline demo's model, 248x248);
* ``afclip-vit-b16``: AF-CLIP on a ViT-B/16-shaped CLIP with random weights at 224x224
  (taps 3/6/9/12, 12 token sets; zero-shot).

The printed number is the ratio torch time / ONNX Runtime time (> 1: ONNX Runtime faster),
measured in the same process, interleaved, so machine noise hits both. Absolute times are
kept in the JSON only; they mean something only on the machine that ran them.

    .venv/bin/python benchmarks/engine_bench.py [--runs 30] [--threads 2]

Writes benchmarks/results/engine_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edge_inspect.export.graph import ExportGraph
from edge_inspect.runtime.preprocess import fit_image
from edge_inspect.trainer.backbones import BackboneSpec, build_clip
from edge_inspect.trainer.backbones.texture import TextureBackbone
from edge_inspect.trainer.data import TextileImages
from edge_inspect.trainer.data.transforms import to_batch
from edge_inspect.trainer.heads.afclip import AfClipConfig, AfClipHead
from edge_inspect.trainer.heads.memory import TEXTURE_MEMORY, MemoryHead

RESULTS = Path(__file__).resolve().parent / "results"


def texture_model() -> tuple[torch.nn.Module, np.ndarray]:
    head = MemoryHead(TextureBackbone(248).eval(), TEXTURE_MEMORY)
    ds = TextileImages(["nominal"])
    shots = [fit_image(ds[i].image, (248, 248), "center_crop") for i in range(4)]
    head.enroll(to_batch(shots, (248, 248), head.backbone.normalization, "center_crop"))
    reference = [fit_image(ds[i].image, (248, 248), "center_crop") for i in range(500, 530)]
    head.fit_reference([to_batch(reference, (248, 248), head.backbone.normalization, "center_crop")])
    frame = fit_image(ds[10].image, (248, 248), "center_crop")[None]
    return head.eval(), frame


def afclip_model() -> tuple[torch.nn.Module, np.ndarray]:
    torch.manual_seed(0)
    clip = build_clip(BackboneSpec(kind="clip", arch="ViT-B-16", input_size=224))
    head = AfClipHead(clip, AfClipConfig(taps=(3, 6, 9, 12))).eval()
    frame = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    return head, frame


def bench(name: str, head, frame: np.ndarray, runs: int, threads: int, folder: Path) -> dict:
    memory = {k: v.detach() for k, v in head.memory_state().items()}
    graph = ExportGraph(head, list(memory), []).eval()
    path = folder / f"{name}.onnx"
    x = torch.from_numpy(frame)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (x, *memory.values()), str(path), opset_version=17, dynamo=False,
                          input_names=["image"] + [f"memory.{k}" for k in memory],
                          output_names=["image_score", "anomaly_map"])
    head.load_memory_state(memory)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = {"image": frame} | {f"memory.{k}": v.numpy() for k, v in memory.items()}

    def run_torch():
        with torch.no_grad():
            return graph(x, *memory.values())[0]

    def run_ort():
        return sess.run(["image_score"], feeds)[0]

    diff = float(np.abs(run_torch().numpy() - run_ort()).max())
    for _ in range(3):
        run_torch(), run_ort()
    t_torch, t_ort = [], []
    for _ in range(runs):  # interleaved: both see the same machine state
        t0 = time.perf_counter()
        run_torch()
        t1 = time.perf_counter()
        run_ort()
        t2 = time.perf_counter()
        t_torch.append(t1 - t0)
        t_ort.append(t2 - t1)
    med_torch, med_ort = float(np.median(t_torch)), float(np.median(t_ort))
    return {"model": name, "input": list(frame.shape), "runs": runs, "threads": threads,
            "torch_eager_ms_median": 1000 * med_torch, "onnxruntime_ms_median": 1000 * med_ort,
            "ratio_torch_over_ort": med_torch / med_ort, "score_max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("texture+memory", texture_model), ("afclip-vit-b16", afclip_model)):
            head, frame = make()
            rows.append(bench(name, head, frame, args.runs, args.threads, Path(tmp)))
            print(json.dumps(rows[-1]))
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "processor": platform.processor(),
            "torch": torch.__version__, "onnxruntime": ort.__version__,
            "command": "python benchmarks/engine_bench.py " + f"--runs {args.runs} --threads {args.threads}"}
    (RESULTS / "engine_bench.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    lines = [f"PyTorch eager vs ONNX Runtime CPU, batch 1, {args.threads} threads, median of "
             f"{args.runs} interleaved runs. Command: `{meta['command']}`; {meta['machine']}.", "",
             "| model | input (uint8 NHWC) | torch eager time / ONNX Runtime time | score max diff |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | "
                     f"**{r['ratio_torch_over_ort']:.2f}x** | {r['score_max_abs_diff']:.1e} |")
    lines.append("")
    lines.append("Only the ratio is a claim: both engines ran interleaved in one process on a shared "
                 "CPU; the per-engine medians in engine_bench.json are for the record, not for "
                 "comparison across machines.")
    (RESULTS / "engine_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
